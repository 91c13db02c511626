"""The fused maps: the L1, elastic-net, L0 and group-lasso prox in the Adam family's metric, a target's critical strengths and its held zeros, as compiled kernels per tensor.

Note [Fused map]
    After an Adam, AdamW or NAdam step the default L1 prox (Note [Safeguarded metric] in
    optim/step_sizes.py) is, per tensor w with gradient g and second moment v,

        F = ratio·sqrt(1 − β₂ᵏ)·‖g‖₂/sqrt(n),   u = max(sqrt(v), F)·scale + shift,
        w ← softshrink(u·w, a)/(u + b)          (scale, shift: ``step_sizes.adam_scalars``)

    (b = 0 for L1, the elastic net's l2 otherwise). The eager map takes it in about 10 elementwise
    passes' worth of time (benchmarks/adaptive_floor.py); this module takes ‖g‖₂ by one BLAS dot
    product (``_floor``: one read of g at memory speed, where inductor's compiled reduction took
    twice as long, 232 against 101 µs on 2^20 float32 values on this machine's 2 cores; in
    float32 the native sum of squares of Note [Native hold] in optim/native.py, as fast: 3.8
    against 3.8 ms over 25M values, ad hoc) and
    compiles the rest of the formula with ``torch.compile`` (inductor: one C++ loop over v and w,
    vectorized and parallel), so that g and v are read once and w is read and written once. That
    loop is bound by its sqrt and division, not by memory: it takes what the least map in this
    metric, a compiled w/sqrt(v), takes (440 against 395 µs there).
    The group lasso over rows (``groups="out"``, the default) is the same Newton solve as the
    eager one (Note [Group lasso in a diagonal metric, fast] in catalogue/structured.py) in one
    compiled call per tensor for the start, the first evaluation and the map of the rows it
    proves; a further evaluation runs on the rows left unproven only (usually a few groups near
    their threshold), gathered, and scattered back, where it used to take the whole tensor again.
    Each 1/(r + threshold·t_i) is taken as u_i/(r·u_i + threshold) (1/r where r·u_i overflows),
    one division per element where t_i = 1/u_i took another, and the inverse steps u are
    recomputed from v in each loop instead of kept: 3 passes over w and v, each bound by its sqrt
    and division, where the eager solve takes about 20 (the MLP's two hidden weights, captured
    after 50 to 300 Adam and AdamW steps: 1.73 against 2.40 ms per tensor before, ad hoc).
    One loop over the rows with all three phases inside (each row in the L1 cache while it is
    solved) is what inductor's outer-loop fusion emits for this formula once its realization
    thresholds are raised (``torch.compile(options=...)``; by default it writes the reciprocals
    to a tensor-sized buffer and emits a loop per phase), but that loop recomputes the sqrt and
    the reciprocals in every phase: 1213 against 1079 µs on a 1024x784 float32 weight, and
    raising the thresholds alone 777-901 against 865-889 µs, with and without rows that prove
    (ad hoc, stop 34). The passes are bound by their arithmetic, not by reading w and v again.

    Each kernel is compiled once per dtype and device, into its own compiled function: the
    tensors are passed flat (rows for the group lasso) with dynamic sizes, as aliases of their
    storage rather than views (``_flat``: Dynamo guards on a view's base, its dims, strides and
    sizes equal to others, so views of a square weight, a conv weight and a vector compiled a
    graph each), and every number that moves between steps (lr, the step count, the strength)
    travels in a small tensor, so no step after the first recompiles, whatever the weights'
    shapes (tests/test_fused.py counts the graphs). Two exceptions: the group lasso's further
    evaluation compiles at the first step that needs one (then takes any number of rows,
    ``_generic_rows``), and inductor guards a reduction's size on either side of 4096, so rows
    of both kinds compile a graph each (as a first trace on a square weight, or on 5 rows or
    columns, the constants' length, is guarded on that equality), each once. A call that Dynamo
    still refuses after the first (a new shape past its recompile limit) runs the kernel's
    formula eagerly, with a warning once per kernel, rather than failing the optimizer's step.

    Where it runs (the rule): ``enabled`` (default True), a plain contiguous tensor on a device
    in ``devices`` (default the CPU, where it was measured faster; the first call compiles, which
    needs a C++ compiler), float32 or float64 with its gradient and state in the same dtype, at
    least ``min_numel`` elements (default 2^16: a compiled call costs 20-70 µs, and below about
    65,536 elements the eager map, measured per tensor, is as fast), the optimizer's eps > 0, and
    the caller not itself being compiled. The group lasso also takes smaller tensors (of at
    least 2 rows) where fewer than ``FEW_SMALL`` (4) of them are in the call: the eager solve's
    fixed cost per call is more than a compiled call per tensor there (a 10x1024 weight: 227
    against 147 µs for one such tensor, 476 against 426 for three, 534 against 563 for four,
    ad hoc, stop 34), where the eager L1 map stays faster at every count (70 against 100 µs
    for one). On the suite's MLP, whose 10x1024 output layer took the eager solve, the group
    lasso step's ratio to the unregularized one fell by 0.02-0.04 in six same-process A/B runs
    (``python benchmarks/suite.py --models MLP --optimizers Adam AdamW --variants none "prox
    group lasso" "prox adaptive L1" --before HEAD``, three runs), where an A/A run moves it by
    -0.03 to +0.02. Everything else, and everything after a failed
    compilation (a warning says why, once per kernel), takes the eager map, which stays the
    tested reference. ``paramreg.optim.fused.enabled = False`` turns the fused maps off everywhere.

    How the L1 map differs from the eager one: not in the formula (the same operations in the
    same order, no contraction into FMA; the soft-threshold as x − clamp(x, −a, a), whose values
    are softshrink's: x − a, x + a or x − x = +0, NaN kept), only in two roundings. torch's eager
    ``sqrt`` on CPU tensors (MKL's vectorized math) is within 1 ulp, the compiled one correctly
    rounded (the eager metric's float32 sqrt is now correctly rounded too: Note [Correctly
    rounded sqrt] in optim/step_sizes.py); and torch's eager float32 ``_foreach_norm`` accumulates an error that grows
    with the tensor (measured 1.8e-5 relative over 1M elements, 2.1e-4 over 8M), the dot product's
    more slowly (1.2e-7 over 2^20 elements, 3.4e-6 over 2^23, against float64; ad hoc). A perturbation δ of u relative moves the result by at most δ·abs(w) (the
    map is w − clamp(w, −a/u, a/u) in exact arithmetic; near the threshold the subtraction keeps
    the absolute error of u·w). So the two maps agree within 4 ulp of abs(w) where the floor does
    not bind (measured: 1.8), and within 8 ulp plus abs(w) times twice the eager floor's relative
    error where it binds (measured: 14 ulp, float32 and float64); an entry may be 0 in one and
    not the other only within that band around the threshold. The group lasso's two solves are done
    with each group by the same rule: its norm proven within ``NEWTON_RTOL`` of the root (1e-6
    relative in float32, 1e-12 in float64), or found at it within the rounding of S; the eager
    solve maps every group with its last iterate, the fused one each group with its first done
    point. Where the tolerance is proven they agree within 4 times it relative to abs(w) (measured:
    2.2e-7 and 4.4e-16) and zero the same groups (``tests/test_fused.py``).

    Under a sparsity target the map must zero exactly the groups whose critical strengths, taken
    with the floors of that step, lie at or below the calibrated strength (raised by 2^-18,
    ``BOUNDARY`` in optim/applying.py). A floor recomputed by another reduction differs from
    the eager one by up to 2.1e-4 relative at 8M elements, far more than 2^-18: the map then left
    up to 13 of 2M weights nonzero below the asked count (an AdamW L1 target on two 1024x1024
    layers). So a target takes its floors once per step (``floors``: by ``_floor``, as
    this map takes them, for the tensors it could take, whether or not it is ``enabled``, so
    that both paths rank the same values) and passes them, and the map takes them as they are;
    the sqrt's 1 ulp is well inside 2^-18. A target's group lasso takes the eager solve.

    L0 (the default target's regularizer) has the same kernel, ``l0``: w_i ← 0
    where u_i·w_i² <= 2a, the score rounded as ``L0.critical`` rounds it; it keeps every other
    weight bitwise, and differs from the eager map only where the score lies within the sqrt's
    ulp (and the floor's error, without a target) of 2a. A target's selection computes the
    critical strengths (abs(w)·u for L1, w²·u/2 for L0) in every pass (Note [Critical strengths
    on the fly] in optim/applying.py); for a tensor the fused map takes, a compiled kernel computes
    them in one pass over w and v (``critical_blocks``), in blocks of ``CRITICAL_BLOCK`` elements
    (2^20) written into one buffer per thread, dtype and device that is kept between steps (4 MiB
    in float32), so that the selection counts each block while it is in the caches. The eager
    path took about 10 elementwise passes per block, and its ``sqrt`` (MKL's on the CPU) is 5-6
    times slower on a block that holds zeros, as v does for weights whose gradient is 0 (dead
    units: 62 against 11 µs for 2^17 values with every eighth 0, on this machine's 2 cores). The
    criticals and the map of one tensor then both run compiled; the 1 ulp by which they may
    differ from the eager ones lies well inside 2^-18, so a target's count is exact either way
    (``tests/test_fused.py``: the same counts through both paths, an L1 and an L0 target).

Note [Held zeros, fused]
    A target with ``regrow=False`` sets, before every step of its ramp and after it, the
    gradient and the momentum of each zero weight to zero (Note [Zeros that do not regrow] in
    optim/targets.py). Eagerly that is a comparison and two masked writes per tensor, three
    kernels that each read or write the whole tensor, and torch's CPU ``eq`` and
    ``masked_fill_`` are slow (0.7 and 0.9 ns an element on this machine's 2 cores, a profile of
    two 2896x2896 AdamW weights: 42 of a 254 ms target step, ad hoc). ``hold_`` does it in one
    compiled pass that reads w, g and the momentum and writes g and the momentum
    (``torch.where(w == 0, zero, x)``: the values ``masked_fill_`` writes, for -0.0, inf and NaN
    too), 5.4 ms a weight there against 20.8. The +0.0 it writes is a 0-d tensor, an input of the
    kernel, not the constant 0.0: with the constant the compiled pass slowed as the zeros grew
    (on 12.5M weights, alone, with momentum: 5.5 ms with no zero, 7.0 with 1%, 12.7-13.3 with
    35-79% at random), with the tensor it took 5.9-7.5 ms at all four, the same bits (ad hoc;
    the other kernels, which write 0.0 where a computed condition holds, showed no such slowing:
    the select and map passes took the same time with no zero and with half the weights zero).
    It takes any optimizer paramreg knows (the pass
    reads no other state) and the tensors the rule above takes (in float32 the native pass of
    Note [Native hold] in optim/native.py, which writes the same bits and also sums the held
    gradient's squares for the floor), where the eager writes stay the
    fallback and the reference (``tests/test_fused.py``: the same weights and optimizer states,
    bit for bit, through both, under Adam, NAdam, SGD with and without momentum and RMSprop).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from typing import Callable, Iterator

import numpy
import torch
from torch import Tensor, nn

from ..catalogue.elementwise import L0, L1, ElasticNet
from ..catalogue.groups import group_size, kept_dims
from ..catalogue.structured import NEWTON_MAX_ITERATIONS, NEWTON_RTOL, GroupLasso
from . import native, step_sizes
from .state import ORIGIN_KEY

__all__ = ["enabled", "devices", "min_numel", "compile_seconds", "map_", "map_points_", "floors", "critical_blocks", "select_pieces", "points_of", "ahead_scale", "hold_", "zero_count", "CRITICAL_BLOCK"]

#: False: every tensor takes the eager map.
enabled = True
#: Devices whose tensors take the fused map (Note [Fused map]): measured faster on the CPU only.
devices = ("cpu",)
#: Tensors with fewer elements take the eager map (Note [Fused map]); at least 2 (a compiled size of 1 would specialize).
min_numel = 1 << 16
#: Fewer tensors than this under ``min_numel`` in one group lasso's call take its fused map too (Note [Fused map]).
FEW_SMALL = 4
#: (kernel, dtype, device type) -> seconds its first call took, compilation included (None: it failed).
compile_seconds: dict[tuple, float | None] = {}

_ADAM = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam)
_lock = threading.Lock()
_compiled: dict = {}  # (kernel, dtype, device type) -> its torch.compile'd function
_eager_calls: set = set()  # (kernel, dtype, device type) whose later calls fell back to the formula, eagerly
_zeros: dict = {}  # (dtype, device) -> the 0-d +0.0 the held zeros' pass writes (Note [Held zeros, fused])


def _l1(w: Tensor, v: Tensor, floor: Tensor, c: Tensor) -> None:
    """In place on w (flat): the formula of Note [Fused map] with the floor F given, c = [scale, shift, a, b]."""
    u = _inverse(v, floor, c)
    x = w * u
    w.copy_((x - x.clamp(-c[2], c[2])) / (u + c[3]))  # softshrink's values: x − a, x + a, or +0; NaN kept


def _inverse(v: Tensor, floor: Tensor, c: Tensor) -> Tensor:
    return torch.maximum(torch.sqrt(v), floor) * c[0] + c[1]


def _l0(w: Tensor, v: Tensor, floor: Tensor, c: Tensor) -> None:
    """In place on w (flat): the L0 map (hard threshold) in the metric with the floor F given, c =
    [scale, shift, 2a, 0]: w_i ← 0 where u_i·w_i² <= 2a, the score rounded as the eager map and
    ``L0.critical`` round it."""
    u = _inverse(v, floor, c)
    w.copy_(torch.where(u * (w * w) <= c[2], 0.0, w))  # NaN kept, as masked_fill_ keeps it


def _l1_critical(out: Tensor, w: Tensor, v: Tensor, floor: Tensor, c: Tensor) -> None:
    """Into out: abs(w_i)·u_i, ``L1.critical`` in the metric (c = [scale, shift])."""
    out.copy_((w * _inverse(v, floor, c)).abs())


def _l0_critical(out: Tensor, w: Tensor, v: Tensor, floor: Tensor, c: Tensor) -> None:
    """Into out: w_i²·u_i/2, ``L0.critical`` in the metric (c = [scale, shift])."""
    out.copy_(w * w * _inverse(v, floor, c) / 2)


def _ahead(w: Tensor, v: Tensor, m: Tensor, floor: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(u, y): the inverse steps and the points y = w − c[2]·m/u of Note [Looking ahead] in
    optim/targets.py (c[2] = horizon/(1 − β₁ᵏ)), 0 where w is 0: as the eager path computes them."""
    u = _inverse(v, floor, c)
    return u, torch.where(w == 0, 0.0, w - c[2] * (m / u))


def _extended(w: Tensor, v: Tensor, origin: Tensor, floor: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(u, y): the inverse steps and the points y = w + c[2]·(w − origin) of Note [Extrapolated
    paths] in optim/targets.py (c[2] = α), 0 where w is 0: as the eager path computes them."""
    return _inverse(v, floor, c), torch.where(w == 0, 0.0, w + c[2] * (w - origin))


def _score(u: Tensor, y: Tensor) -> Tensor:
    """y_i²·u_i/2: ``L0.critical`` at the points y, the one formula the selection ranks and the map compares."""
    return y * y * u / 2


def _l0_ahead_critical(out: Tensor, w: Tensor, v: Tensor, m: Tensor, floor: Tensor, c: Tensor) -> None:
    """Into out: the score at the points ahead (c = [scale, shift, horizon/(1 − β₁ᵏ)])."""
    out.copy_(_score(*_ahead(w, v, m, floor, c)))


def _l0_ahead(w: Tensor, v: Tensor, m: Tensor, floor: Tensor, c: Tensor) -> None:
    """In place on w (flat): 0 where the score at its point, computed as :func:`_l0_ahead_critical`
    computes it, is at most c[3] (the target's strength), so the map zeroes what the selection
    counted; every other weight as it is."""
    w.copy_(torch.where(_score(*_ahead(w, v, m, floor, c)) <= c[3], 0.0, w))


def _l0_extended_critical(out: Tensor, w: Tensor, v: Tensor, origin: Tensor, floor: Tensor, c: Tensor) -> None:
    """Into out: the score at the extended points (c = [scale, shift, α])."""
    out.copy_(_score(*_extended(w, v, origin, floor, c)))


def _l0_extended(w: Tensor, v: Tensor, origin: Tensor, floor: Tensor, c: Tensor) -> None:
    """In place on w (flat): 0 where the score at its extended point, computed as
    :func:`_l0_extended_critical` computes it, is at most c[3]; every other weight as it is."""
    w.copy_(torch.where(_score(*_extended(w, v, origin, floor, c)) <= c[3], 0.0, w))


def _marked(s: Tensor, w: Tensor, out: Tensor, b: Tensor) -> Tensor:
    """One block of a guessed selection's single pass (Note [Selection that zeroes] in
    optim/applying.py): into out −1 where a weight that the map zeroes at any strength from lo =
    b[0] on scores below lo (every weight but +0.0, told by its bits: the map writes +0.0 over
    −0.0 and denormals too), the score where it lies in [lo, hi) (hi = b[1]), 0 elsewhere.
    Returns the counts of scores below lo, below hi, and of the entries of out that are not 0.
    The counts are int32 (a block holds at most ``CRITICAL_BLOCK`` elements: :func:`_block_buffer`):
    with int64 sums of booleans a block in the caches took 0.93 ms against 0.60 on this machine
    (ad hoc; in a training step, where the pass waits on memory, the difference is within the
    noise). (A kernel that also writes a boolean tensor, or reads the scores' bits, took 1.4 to
    20 times as long: no longer vectorized.)"""
    below, under = s < b[0], s < b[1]
    inside = under & ~below
    fresh = below & (w.view(torch.int32) != 0)
    out.copy_(torch.where(fresh, -1.0, torch.where(inside, s, 0.0)))
    return torch.stack([below.sum(dtype=torch.int32), under.sum(dtype=torch.int32), (fresh | inside).sum(dtype=torch.int32)])


def _l0_select(out: Tensor, w: Tensor, v: Tensor, floor: Tensor, c: Tensor, b: Tensor) -> Tensor:
    """:func:`_marked` of the scores :func:`_l0_critical` computes."""
    return _marked(w * w * _inverse(v, floor, c) / 2, w, out, b)


def _l0_ahead_select(out: Tensor, w: Tensor, v: Tensor, m: Tensor, floor: Tensor, c: Tensor, b: Tensor) -> Tensor:
    """:func:`_marked` of the scores :func:`_l0_ahead_critical` computes."""
    return _marked(_score(*_ahead(w, v, m, floor, c)), w, out, b)


def _l0_extended_select(out: Tensor, w: Tensor, v: Tensor, origin: Tensor, floor: Tensor, c: Tensor, b: Tensor) -> Tensor:
    """:func:`_marked` of the scores :func:`_l0_extended_critical` computes."""
    return _marked(_score(*_extended(w, v, origin, floor, c)), w, out, b)


def _group_first(w: Tensor, v: Tensor, floor: Tensor, c: Tensor):
    """The group lasso's solve on rows of w (G, B) (Note [Group lasso in a diagonal metric, fast] in
    catalogue/structured.py) with the floor F given, c = [scale, shift, threshold, rtol, tiny]:
    the start and one Newton evaluation, the rows it proves mapped in place. Returns (‖w_g‖, the
    new iterate, which rows it proved), per row."""
    u = _inverse(v, floor, c)
    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
    mean = (w * w / u).sum(dim=1, keepdim=True) * c[2] / (norm * norm).clamp(min=c[4])
    return (norm, *_group_evaluate(w, u, norm, (norm - mean).clamp(min=0.0), c))


def _group_next(w: Tensor, v: Tensor, floor: Tensor, norm: Tensor, r: Tensor, c: Tensor):
    """Another Newton evaluation from r on rows of w (those the last left unproven), the rows it
    proves mapped in place. Returns (the new iterate, which rows it proved)."""
    return _group_evaluate(w, _inverse(v, floor, c), norm, r, c)


def _group_evaluate(w: Tensor, u: Tensor, norm: Tensor, r: Tensor, c: Tensor):
    """One Newton evaluation per row from r (g(r) = S(r)^(-1/2) − 1, S(r) = Σ w_i²/(r + c_i)², c_i =
    threshold/u_i), each 1/(r + c_i) taken as u_i/(r·u_i + threshold): one division per element.
    A row is done when its bracket [new, upper] is narrower than rtol·new, new is 0, or new <= r
    with r left of the root (S(r) >= 1; Note [Group lasso in a diagonal metric, fast])."""
    q = _group_reciprocal(u, r, c)
    y = w * q
    s = (y * y).sum(dim=1, keepdim=True)
    slope = (y * y * q).sum(dim=1, keepdim=True).clamp(min=c[4])  # −S'(r)/2
    root = s.sqrt()
    below = root - 1.0
    new = (r + s * below / slope).clamp(min=0.0)
    upper = r + norm * (below / root).clamp(min=0.0)
    proven = (upper - new <= new * c[3]) | ((new == 0) & (r == 0)) | ((new <= r) & (root >= 1.0))
    w.copy_(torch.where(proven, w * _group_factor(u, new, c), w))
    return new, proven


def _group_factor(u: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """The map's factor r/(r + c_i) of each row's entries, at the group norm r."""
    return r * _group_reciprocal(u, r, c)


def _group_reciprocal(u: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """1/(r + threshold/u) as u/(r·u + threshold); 1/r where r·u + threshold overflows: then
    threshold/u <= threshold·r/MAX (MAX the dtype's largest value) lies below r's rounding unless
    the threshold exceeds MAX·eps, and for u = inf the eager solve's step t = 1/u is 0 (at r = 0
    and u = inf both give NaN: 0·inf here, a group norm of 0/0 there)."""
    ru = r * u + c[2]
    return torch.where(ru == math.inf, 1.0 / r, u / ru)


def _hold(w: Tensor, g: Tensor, zero: Tensor) -> None:
    """In place on g (flat): ``zero`` (a 0-d +0.0: Note [Held zeros, fused]) where w is 0 (-0.0
    too), as ``g.masked_fill_(w == 0, 0)`` sets it."""
    g.copy_(torch.where(w == 0, zero, g))


def _hold_momentum(w: Tensor, g: Tensor, m: Tensor, zero: Tensor) -> None:
    """In place on g and m (flat): ``zero`` where w is 0, in one pass over the three."""
    held = w == 0
    g.copy_(torch.where(held, zero, g))
    m.copy_(torch.where(held, zero, m))


def _zero_count(w: Tensor) -> Tensor:
    """How many elements of w (flat) are 0 (−0.0 too): one read (``torch.count_nonzero`` took 10.5
    ms over 12.5M float32 values on this machine, this compiled 2.1; ad hoc)."""
    return (w == 0).sum()


_KERNELS = {"hold": _hold, "zero_count": _zero_count, "hold_momentum": _hold_momentum, "l1": _l1, "l0": _l0, "l1_critical": _l1_critical, "l0_critical": _l0_critical,
            "l0_ahead": _l0_ahead, "l0_ahead_critical": _l0_ahead_critical, "l0_extended": _l0_extended,
            "l0_extended_critical": _l0_extended_critical, "l0_select": _l0_select, "l0_ahead_select": _l0_ahead_select,
            "l0_extended_select": _l0_extended_select, "group_first": _group_first, "group_next": _group_next}


def _elementwise_map(regularizer) -> tuple[str, float, float] | None:
    """(kernel, a, b) of the elementwise map this module computes for ``regularizer``, or None:
    the elastic net's (a, b) for L1 and ElasticNet, (2a, 0) for L0's hard threshold."""
    if type(regularizer) is L1:
        return "l1", regularizer.strength, 0.0
    if type(regularizer) is ElasticNet:
        return "l1", regularizer.l1, regularizer.l2
    if type(regularizer) is L0:
        return "l0", 2.0 * regularizer.strength, 0.0
    return None


def _plain(p: Tensor, least: int | None = None) -> bool:
    """Whether ``p`` is a tensor the compiled kernels take: a plain contiguous float32 or float64
    tensor of at least ``least`` (default ``min_numel``) elements, and at least 2, on a device in
    ``devices``."""
    return (type(p) in (Tensor, nn.Parameter) and p.device.type in devices and p.dtype in (torch.float32, torch.float64)
            and p.numel() >= max(min_numel if least is None else least, 2) and p.is_contiguous())


def _fits(p: Tensor, v, name: str, least: int | None = None) -> bool:
    return (_plain(p, least) and _alike(p, v) and _alike(p, p.grad)
            and compile_seconds.get((name, p.dtype, p.device.type), 0.0) is not None)


_NOT_COMPILED = object()


def _flat(t: Tensor, shape: tuple[int, ...] | None = None, start: int = 0) -> Tensor:
    """A contiguous tensor of ``shape`` (default: all of t, flat) over t's storage from element
    ``start`` of t on, that is not a view: Dynamo guards on a view's base (its dims, strides, and
    sizes that equal other sizes), so views of differently shaped weights would each compile a
    graph; this alias is guarded on its own sizes, which are dynamic. Writes through it do not
    advance t's version counter: a caller that writes advances it."""
    if shape is None:
        shape, strides = (t.numel() - start,), (1,)
    else:
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset() + start, shape, strides)


def _call(name: str, *args: Tensor):
    """The compiled kernel ``name`` on ``args`` (the first: the tensor it maps); its result, or
    ``_NOT_COMPILED`` (and a warning, once per kernel, dtype and device) if its first call cannot
    be compiled. A later call that cannot be (a shape past Dynamo's recompile limit) runs the same
    formula eagerly, with a warning once per kernel, dtype and device."""
    key = (name, args[0].dtype, args[0].device.type)
    if key in compile_seconds:
        if compile_seconds[key] is None:  # its first call could not be compiled: not tried again
            return _NOT_COMPILED
        try:
            return _compiled[key](*args)
        except Exception as e:
            if key not in _eager_calls:
                _eager_calls.add(key)
                warnings.warn(f"paramreg: the fused kernel {name} for {key[1]} on {key[2]} could not be compiled for a new "
                              f"shape ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); those calls run its "
                              f"formula eagerly.", stacklevel=5)
            return _KERNELS[name](*args)
    with _lock:  # the first call per kernel, dtype and device compiles; one thread at a time
        if key in compile_seconds:
            return _call(name, *args)
        if key not in _compiled:
            _compiled[key] = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
        started = time.perf_counter()
        try:
            if name == "group_next":
                _compiled[key](*_generic_rows(*args))
            out = _compiled[key](*args)
        except Exception as e:  # no C++ compiler, a backend that refuses: the eager path it is
            compile_seconds[key] = None
            what = ("critical strengths" if name.endswith("_critical") else "selection" if name.endswith("_select")
                    else "zero holding" if name.startswith("hold") else "zero counting" if name == "zero_count" else "prox")
            warnings.warn(f"paramreg: the fused {what} could not be compiled for {key[1]} on {key[2]} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); the eager path runs instead. Set "
                          f"paramreg.optim.fused.enabled = False to choose it explicitly.", stacklevel=5)
            return _NOT_COMPILED
        compile_seconds[key] = time.perf_counter() - started
        return out


def _generic_rows(w: Tensor, v: Tensor, floor: Tensor, norm: Tensor, r: Tensor, c: Tensor) -> tuple[Tensor, ...]:
    """``group_next``'s arguments on 2 rows (3 where w has 2 columns) of w's width: traced first on
    a number of rows that equals neither the columns, nor 1, nor the constants' 5, its graph takes
    any number of rows without a recompile (Dynamo guards a graph first traced on equal sizes, e.g.
    as many rows as columns, on that equality, and specializes a size of 1; inductor guards a
    reduction's size on either side of 4096, so the width is w's; tests/test_fused.py counts the
    graphs)."""
    rows = 3 if w.shape[1] == 2 else 2
    block, column = torch.ones(rows, w.shape[1], dtype=w.dtype, device=w.device), torch.ones(rows, 1, dtype=w.dtype, device=w.device)
    return block, block.clone(), floor, column, column.clone(), c


def _group_lasso_(p: Tensor, v: Tensor, floor: Tensor, c: Tensor) -> bool:
    """The group lasso over the rows of p (Note [Fused map]); False if it cannot be compiled. The
    first call maps the rows its evaluation proves; each further evaluation runs on the rows still
    unproven only, gathered (usually a few: groups near their threshold), and scattered back."""
    rows = (p.shape[0], p.numel() // p.shape[0])
    w, v = _flat(p, rows), _flat(v, rows)
    torch.autograd.graph.increment_version(p)  # written through an alias (_flat)
    out = _call("group_first", w, v, floor, c)
    if out is _NOT_COMPILED:
        return False
    norm, r, proven = out
    at = None  # the indices in w of the rows of the last evaluation
    for evaluation in range(1, NEWTON_MAX_ITERATIONS + 1):
        left = (~proven).view(-1).nonzero().view(-1)
        if not len(left):
            return True
        if len(left) == 1:  # a compiled size of 1 would specialize (Note [Fused map]): the row twice
            left = left.repeat(2)
        at = left if at is None else at[left]
        norm, r, part, part_v = norm[left], r[left], w.index_select(0, at), v.index_select(0, at)
        if evaluation == NEWTON_MAX_ITERATIONS:  # the eager solve's last iterate, as it maps it (rows that never proved: NaN, inf)
            part.mul_(_group_factor(_inverse(part_v, floor, c), r, c))
        else:
            args = (part, part_v, floor, norm, r, c)
            out = _call("group_next", *args)
            r, proven = _group_next(*args) if out is _NOT_COMPILED else out
        w.index_copy_(0, at, part)
    return True


def map_(optimizer, group: dict, regularizer, tensors: list[Tensor], states: list[dict], lr: float, ratio: float,
         floors: list | None = None) -> list[int]:
    """The fused map (Note [Fused map]) on every tensor of ``tensors`` it takes, after ``optimizer``
    stepped them in ``group`` (``states``: their optimizer states; ``lr``: the prox's step scale;
    ``ratio``: the metric floor; ``floors``: the floors already taken, a target's, which the map
    then uses as they are); returns the indices of the tensors it left to the eager map."""
    everything = list(range(len(tensors)))
    elementwise = _elementwise_map(regularizer)
    grouped = type(regularizer) is GroupLasso and regularizer.strength > 0
    if (not enabled or (elementwise is None and not grouped) or step_sizes.resolve(optimizer) not in _ADAM
            or not group.get("eps", 0.0) > 0 or torch.compiler.is_compiling()):
        return everything
    if elementwise is not None and elementwise[1:] == (0.0, 0.0) and type(regularizer) is not ElasticNet:
        return []  # L1(0) and L0(0) are the identity, as in the eager maps
    cls, key = step_sizes.resolve(optimizer), step_sizes.adam_key(group)
    name = "group_first" if grouped else elementwise[0]
    # the group lasso takes a few small tensors too: a compiled call each undercuts the eager solve's fixed cost
    least = 2 if grouped and sum(1 for p in tensors if p.numel() < min_numel) < FEW_SMALL else None
    left = []
    for i, (p, state) in enumerate(zip(tensors, states, strict=True)):
        v = state.get(key)
        if (not _fits(p, v, name, least)
                or (grouped and (floors is not None or p.dim() < 2 or p.shape[0] < 2 or kept_dims(regularizer.groups, p.dim()) != (0,)))
                or (floors is not None and type(floors[i]) is not Tensor)):
            left.append(i)
            continue
        scale, shift = step_sizes.adam_scalars(group, float(state["step"]), lr)
        if floors is not None:  # a target's floor, as its critical strengths took it
            floor = floors[i].to(p.dtype)
        else:
            floor = _floor(p.grad, step_sizes.floor_factor(cls, group, p.numel(), state, ratio))
        if grouped:
            threshold = regularizer.strength * (math.sqrt(group_size(regularizer.groups, tuple(p.shape))) if regularizer.weighted else 1.0)
            c = torch.tensor([scale, shift, threshold, NEWTON_RTOL[p.dtype], torch.finfo(p.dtype).tiny], dtype=p.dtype, device=p.device)
            done = _group_lasso_(p, v, floor, c)
        else:
            c = torch.tensor([scale, shift, *elementwise[1:]], dtype=p.dtype, device=p.device)
            done = _call(name, _flat(p), _flat(v), floor, c) is not _NOT_COMPILED
            if done:
                torch.autograd.graph.increment_version(p)  # written through an alias (_flat)
        if not done:
            left.append(i)
    return left


def floors(optimizer, group: dict, tensors: list[Tensor], states: list[dict], ratio: float = step_sizes.DEFAULT_METRIC_FLOOR
           ) -> list | None:
    """A target's floors (``step_sizes.floors``, taken once per step for its selection and its
    map, which both take them as they are): ‖g‖₂ by :func:`_floor` (a dot product, or the native
    sum of squares), as :func:`map_` takes it without a target, for each plain contiguous float32 or float64 tensor of at least
    ``min_numel`` elements on a device in ``devices`` (whether or not the compiled kernels are
    ``enabled``, so that the fused and the eager path rank the same values); the others as
    ``step_sizes.floors`` takes them. torch's ``_foreach_norm`` took 10-30 ms a step over 25M
    weights on this machine, where the dot product takes a few."""
    if not ratio:
        return None
    cls = step_sizes.resolve(optimizer)
    taken = [_plain(p) and _alike(p, p.grad) for p in tensors]
    rest = [i for i, t in enumerate(taken) if not t]
    eager = iter(step_sizes.floors(optimizer, group, [tensors[i] for i in rest], [states[i] for i in rest], ratio) if rest else ())
    return [_floor(p.grad, step_sizes.floor_factor(cls, group, p.numel(), state, ratio)) if t else next(eager)
            for p, state, t in zip(tensors, states, taken, strict=True)]


def _floor(g: Tensor, factor: float) -> Tensor:
    """The metric floor F = factor·‖g‖₂ (0 where factor is 0): for a float32 CPU gradient the sum
    of squares of Note [Native hold] in optim/native.py (none of its own where the held zeros'
    pass took it), else, or where the native kernels are not built, one BLAS dot product: one
    read of g at memory speed, accumulated blockwise (Note [Fused map])."""
    if not factor > 0:
        return torch.zeros((), dtype=g.dtype, device=g.device)
    if g.dtype == torch.float32 and g.device.type == "cpu" and g.is_contiguous():
        total = native.squares(g)  # the held zeros' pass's sum where it took it (Note [Native hold] in optim/native.py)
        if total is not None:
            return torch.tensor(total, dtype=g.dtype).sqrt_().mul_(factor)
    flat = g.view(-1)
    return torch.dot(flat, flat).sqrt_().mul_(factor)


#: Elements per call of a compiled critical-strength kernel: each block is counted by the target's
#: selection while it is in the caches, then overwritten by the next.
CRITICAL_BLOCK = 1 << 20
_buffers = threading.local()  # per thread: (dtype, device) -> the blocks' buffer


def critical_blocks(optimizer, group: dict, regularizer, p: Tensor, state: dict, lr: float, floor, horizon: int = 0,
                    extrapolate: float = 0.0) -> Iterator[Tensor] | None:
    """A target's critical strengths of ``p`` in the Adam family's metric (``L1.critical``,
    ``L0.critical`` with the inverse steps of Note [Fused map]; with ``horizon``, L0's at the
    points ahead of Note [Looking ahead] in optim/targets.py, with ``extrapolate`` at the
    extended points of Note [Extrapolated paths]), computed by a compiled kernel in
    blocks of about ``CRITICAL_BLOCK`` elements that share one buffer: a block is valid until the
    next is asked for. ``floor``: the floor the target took (None: no floor). None where the
    fused map does not take ``p`` (the rule of Note [Fused map]), and the eager path computes them."""
    kind, extra, factor = points_of(state, group, horizon, extrapolate) if type(regularizer) is L0 else ("", None, None)
    name = {L1: "l1_critical", L0: f"l0{kind}_critical"}.get(type(regularizer))
    inputs = None if name is None else _scoring(optimizer, group, name, p, state, lr, floor, extra, factor)
    if inputs is None:
        return None
    moments, floor, c = inputs
    out, size = _block_buffer(p)
    if _call(name, _flat(out, (size,)), _flat(p, (size,)), *(_flat(t, (size,)) for t in moments), floor, c) is _NOT_COMPILED:
        return None
    return _critical_blocks(name, out, p, moments, floor, c, size)


def select_pieces(optimizer, group: dict, regularizer, p: Tensor, state: dict, lr: float, floor, horizon: int,
                  extrapolate: float, bounds: tuple[float, float],
                  cap: Callable[[], int] | None = None) -> Iterator[tuple[list[int], numpy.ndarray | None, numpy.ndarray] | None] | None:
    """A guessed selection's single pass over an L0 target's scores of ``p`` (Note [Selection that
    zeroes] in optim/applying.py), as :func:`critical_blocks` computes them, with ``bounds`` =
    (lo, hi): per piece of ``p``, ((its scores below lo, below hi, its entries counted as kept),
    the flat indices of its kept entries, their values: −1 for a weight the map zeroes at any
    strength from lo, else the score in [lo, hi)); the indices None where more than ``cap()``
    (called as the piece is computed; by default ``GUESSED``, order_statistic.py) entries were to be kept in one range of the native pass (the values
    then hold the bracket's scores only, or nothing where they are more than ``GUESSED`` too). One piece by the native pass (Note [Native selection] in optim/native.py),
    else one per block of about ``CRITICAL_BLOCK`` elements by :func:`_marked` and numpy's search;
    a None in a piece's place if the kernel cannot be compiled. None where the rule of Note
    [Fused map] does not take ``p``, or ``p`` is not float32 (the selection compares float32
    values)."""
    if type(regularizer) is not L0 or p.dtype != torch.float32:
        return None
    kind, extra, factor = points_of(state, group, horizon, extrapolate)
    name = f"l0{kind}_select"
    inputs = _scoring(optimizer, group, name, p, state, lr, floor, extra, factor)
    if inputs is None:
        return None
    if p.device.type == "cpu" and native.available():
        return _native_pieces(kind, p, *inputs, bounds, cap)
    return _select_blocks(name, p, *inputs, torch.tensor(bounds, dtype=torch.float32, device=p.device))


def _native_pieces(kind: str, w: Tensor, moments: list[Tensor], floor: Tensor, c: Tensor, bounds: tuple[float, float],
                   cap: Callable[[], int] | None):
    """:func:`select_pieces`'s one piece by the native pass: past ``cap`` kept entries in a
    thread's range, the pass again with the bracket's scores only (where they are at most
    ``GUESSED``: more, and the selection counts them by its passes)."""
    from .order_statistic import GUESSED

    args = (kind, w, *moments[:1], moments[1] if len(moments) > 1 else None, float(floor), *(float(x) for x in c.tolist()[:2]),
            float(c[2]) if len(c) > 2 else 0.0, *(float(numpy.float32(b)) for b in bounds))
    found = native.select(*args, GUESSED if cap is None else max(0, min(cap(), GUESSED)))
    if found is None:  # not a tensor the native pass takes: the compiled kernel's blocks
        yield from _select_blocks(f"l0{kind}_select", w, moments, floor, c, torch.tensor(bounds, dtype=torch.float32, device=w.device))
        return
    counts, indices, values = found
    if indices is None:
        values = numpy.empty(0, dtype=numpy.float32)
        if counts[1] - counts[0] <= GUESSED:  # the bracket's scores fit: those alone
            _, _, values = native.select(*args, GUESSED, keep_fresh=False)
    yield counts, indices, values


def _select_blocks(name: str, w: Tensor, moments: list[Tensor], floor: Tensor, c: Tensor, b: Tensor):
    out, size = _block_buffer(w)
    marks = None
    for start in range(0, w.numel(), size):
        k = min(size, w.numel() - start)
        counts = _call(name, _flat(out, (k,)), _flat(w, (k,), start), *(_flat(t, (k,), start) for t in moments), floor, c, b)
        if counts is _NOT_COMPILED:
            yield None
            return
        counts = counts.tolist()
        x = out[:k].numpy()
        if not counts[2]:
            yield counts, numpy.empty(0, dtype=numpy.int64), x[:0]
            continue
        if marks is None:
            marks = numpy.empty(size, dtype=bool)
        indices = numpy.flatnonzero(numpy.not_equal(x, 0.0, out=marks[:k]))
        yield counts, indices + start, x[indices]


def _scoring(optimizer, group: dict, name: str, p: Tensor, state: dict, lr: float, floor, extra, factor):
    """(the tensors beside w, the floor, the constants [scale, shift(, factor)]) that the scoring
    kernel ``name`` takes for ``p`` (``extra`` and ``factor`` from :func:`points_of`); None where
    the rule of Note [Fused map] does not take ``p``."""
    if (not enabled or step_sizes.resolve(optimizer) not in _ADAM or not group.get("eps", 0.0) > 0
            or torch.compiler.is_compiling() or not (floor is None or type(floor) is Tensor)):
        return None
    v = state.get(step_sizes.adam_key(group))
    moments = [v] if extra is None else [v, extra]
    if not _fits(p, v, name) or not _alike(p, moments[-1]):
        return None
    scale, shift = step_sizes.adam_scalars(group, float(state["step"]), lr)
    c = torch.tensor([scale, shift] + ([] if factor is None else [factor]), dtype=p.dtype, device=p.device)
    floor = torch.zeros((), dtype=p.dtype, device=p.device) if floor is None else floor.to(p.dtype)
    return moments, floor, c


def _block_buffer(p: Tensor) -> tuple[Tensor, int]:
    """(this thread's buffer for ``p``'s dtype and device, grown to a block if needed, the size of
    ``p``'s blocks): equal blocks of about ``CRITICAL_BLOCK`` (the last at most as many elements
    shorter as there are blocks)."""
    n = p.numel()
    size = -(-n // -(-n // CRITICAL_BLOCK))
    key = (p.dtype, p.device)
    buffers = _buffers.__dict__.setdefault("by_key", {})
    if key not in buffers or buffers[key].numel() < size:
        buffers[key] = torch.empty(size, dtype=p.dtype, device=p.device)
    return buffers[key], size


def points_of(state: dict, group: dict, horizon: int, extrapolate: float) -> tuple[str, Tensor | None, float | None]:
    """(the kernels' suffix, the tensor beside w and v they read, its factor c[2]) for an L0
    target's points: ahead along Adam's momentum (``horizon``), extended along the path since the
    ramp began (``extrapolate``, once the origin is in ``state``), or the weights themselves
    ("", None, None). The compiled kernels and the eager path (``applying._points``) both ask here."""
    if horizon:
        m = state.get("exp_avg")
        return "_ahead", m, ahead_scale(group, state, horizon) if isinstance(m, Tensor) else None
    if extrapolate and ORIGIN_KEY in state:
        return "_extended", state[ORIGIN_KEY], extrapolate
    return "", None, None


def _critical_blocks(name: str, out: Tensor, w: Tensor, moments: list[Tensor], floor: Tensor, c: Tensor, size: int) -> Iterator[Tensor]:
    yield out[:size]  # the first block, computed by critical_blocks
    for start in range(size, w.numel(), size):
        n = min(size, w.numel() - start)
        _call(name, _flat(out, (n,)), _flat(w, (n,), start), *(_flat(t, (n,), start) for t in moments), floor, c)
        yield out[:n]


def _alike(p: Tensor, t) -> bool:
    """Whether ``t`` (a gradient or optimizer state) is a plain contiguous tensor of ``p``'s dtype and shape."""
    return type(t) is Tensor and t.dtype == p.dtype and t.shape == p.shape and t.is_contiguous()


def ahead_scale(group: dict, state: dict, horizon: int) -> float:
    """horizon/(1 − β₁ᵏ): the factor of Adam's first moment in the points ahead (Note [Looking ahead])."""
    return horizon / (1.0 - group["betas"][0] ** float(state["step"]))


def map_points_(optimizer, group: dict, tensors: list[Tensor], states: list[dict], lr: float, floors: list | None, horizon: int,
               extrapolate: float, strength: float) -> list[int]:
    """An L0 target's map at its points (Note [Looking ahead] with ``horizon``, Note [Extrapolated
    paths] with ``extrapolate``, in optim/targets.py) by one compiled pass per tensor it takes
    (the rule of Note [Fused map]); ``floors``: the target's; returns the indices of the tensors
    it left to the eager map."""
    if not enabled or step_sizes.resolve(optimizer) not in _ADAM or not group.get("eps", 0.0) > 0 or torch.compiler.is_compiling():
        return list(range(len(tensors)))
    key, left = step_sizes.adam_key(group), []
    for i, (p, state) in enumerate(zip(tensors, states, strict=True)):
        kind, extra, factor = points_of(state, group, horizon, extrapolate)
        v = state.get(key)
        floor = None if floors is None else floors[i]
        if not kind or not _fits(p, v, f"l0{kind}") or not _alike(p, extra) or not (floor is None or type(floor) is Tensor):
            left.append(i)
            continue
        scale, shift = step_sizes.adam_scalars(group, float(state["step"]), lr)
        c = torch.tensor([scale, shift, factor, strength], dtype=p.dtype, device=p.device)
        floor = torch.zeros((), dtype=p.dtype, device=p.device) if floor is None else floor.to(p.dtype)
        if _call(f"l0{kind}", _flat(p), _flat(v), _flat(extra), floor, c) is _NOT_COMPILED:
            left.append(i)
            continue
        torch.autograd.graph.increment_version(p)  # written through an alias (_flat)
    return left


def zero_count(p: Tensor) -> int:
    """How many elements of ``p`` are zero (±0.0), by one compiled read where ``p`` is a tensor
    the kernels take (:func:`_plain`), else by ``torch.count_nonzero``."""
    if (enabled and not torch.compiler.is_compiling() and _plain(p)
            and compile_seconds.get(("zero_count", p.dtype, p.device.type), 0.0) is not None):
        n = _call("zero_count", _flat(p.detach()))
        if n is not _NOT_COMPILED:
            return int(n)
    return p.numel() - int(torch.count_nonzero(p.detach()))


def hold_(p: Tensor, momentum: Tensor | None) -> bool:
    """Before a step: the gradient of ``p`` and its ``momentum`` (None: none) set to 0 where ``p``
    is 0, by one compiled pass over the three (Note [Held zeros, fused]; in float32 the native
    pass, which also sums the held gradient's squares, Note [Native hold] in optim/native.py);
    False where the rule of Note [Fused map] does not take ``p`` (any optimizer here: the pass reads no optimizer state
    but ``momentum``), and the caller's masked writes do it."""
    name = "hold" if momentum is None else "hold_momentum"
    g = p.grad
    if (not enabled or torch.compiler.is_compiling() or not _plain(p)
            or compile_seconds.get((name, p.dtype, p.device.type), 0.0) is None):
        return False
    tensors = [g] if momentum is None else [g, momentum]
    if not all(_alike(p, t) for t in tensors):
        return False
    key = (p.dtype, p.device)
    zero = _zeros.get(key)
    if zero is None:
        zero = _zeros[key] = torch.zeros((), dtype=p.dtype, device=p.device)  # read, never written
    if p.dtype == torch.float32 and p.device.type == "cpu" and native.hold(p, g, momentum):
        return True  # Note [Native hold] in optim/native.py: the floor's sum of squares taken too
    if _call(name, _flat(p), *(_flat(t) for t in tensors), zero) is _NOT_COMPILED:
        return False
    for t in tensors:
        torch.autograd.graph.increment_version(t)  # written through an alias (_flat)
    return True
