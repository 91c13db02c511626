"""The fused map: the L1 and elastic-net prox in the Adam family's metric as one compiled kernel per tensor.

Note [Fused map]
    After an Adam, AdamW or NAdam step the default L1 prox (Note [Safeguarded metric] in
    optim/step_sizes.py) is, per tensor w with gradient g and second moment v,

        F = ratio·sqrt(1 − β₂ᵏ)·‖g‖₂/sqrt(n),   u = max(sqrt(v), F)·scale + shift,
        w ← softshrink(u·w, a)/(u + b)          (scale, shift: ``step_sizes.adam_scalars``)

    (b = 0 for L1, the elastic net's l2 otherwise). The eager map takes it in about 10 elementwise
    passes' worth of time (benchmarks/adaptive_floor.py); this module compiles the whole formula,
    the reduction included, with ``torch.compile`` (inductor: one C++ loop over g, one over v and
    w, vectorized and parallel), so that g and v are read once and w is read and written once.
    It is compiled once per dtype and device: the tensors are passed flat with dynamic sizes and
    every number that moves between steps (lr, the step count, the strength) travels in a small
    tensor, so no step recompiles (``tests/test_fused.py`` counts the graphs).

    Where it runs (the rule): ``enabled`` (default True), a plain contiguous tensor on a device
    in ``devices`` (default the CPU, where it was measured faster; the first call compiles, which
    needs a C++ compiler), float32 or float64 with its gradient and state in the same dtype, at
    least ``min_numel`` elements (default 2^16: a compiled call costs about 30 µs, the eager map
    about 1 ns per element on 2 cores, so smaller tensors take the eager map), the optimizer's eps
    > 0, and the caller not itself being compiled. Everything else, and everything after a
    failed compilation (a warning says why, once), takes the eager map, which stays the tested
    reference. ``paramreg.optim.fused.enabled = False`` turns the fused map off everywhere.

    How it differs from the eager map: not in the formula (the same operations in the same order,
    no contraction into FMA; the soft-threshold as x − clamp(x, −a, a), whose values are
    softshrink's: x − a, x + a or x − x = +0, NaN kept), only in two roundings. torch's eager ``sqrt`` on large CPU tensors (MKL's
    vectorized math) is within 1 ulp, the compiled one correctly rounded; and torch's eager float32
    ``_foreach_norm`` accumulates an error that grows with the tensor (measured 1.8e-5 relative
    over 1M elements, 2.1e-4 over 8M), the compiled reduction about 3e-7. A perturbation δ of u
    relative moves the result by at most δ·abs(w) (the map is w − clamp(w, −a/u, a/u) in exact
    arithmetic; near the threshold the subtraction keeps the absolute error of u·w). So the two
    maps agree within 4 ulp of abs(w) where the floor does not bind (measured: 1.8), and within
    8 ulp plus abs(w) times twice the eager floor's relative error where it binds (measured: 14
    ulp, float32 and float64); an entry may be 0 in one and not the other only within that band
    around the threshold (``test_fused_and_eager_maps_agree`` in tests/test_fused.py).
"""

from __future__ import annotations

import threading
import time
import warnings

import torch
from torch import Tensor, nn

from ..catalogue.elementwise import L1, ElasticNet
from . import step_sizes

__all__ = ["enabled", "devices", "min_numel", "compile_seconds", "map_"]

#: False: every tensor takes the eager map.
enabled = True
#: Devices whose tensors take the fused map (Note [Fused map]): measured faster on the CPU only.
devices = ("cpu",)
#: Tensors with fewer elements take the eager map (Note [Fused map]); at least 2 (a compiled size of 1 would specialize).
min_numel = 1 << 16
#: (dtype, device type) -> seconds the first call took, compilation included (None: it failed).
compile_seconds: dict[tuple, float | None] = {}

_ADAM = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam)
_lock = threading.Lock()
_compiled = None


def _kernel(w: Tensor, v: Tensor, g: Tensor, c: Tensor) -> None:
    """In place on w (flat): the formula of Note [Fused map], c = [scale, shift, a, b, floor per unit of ‖g‖₂]."""
    floor = torch.where(c[4] > 0, torch.linalg.vector_norm(g) * c[4], 0.0)
    u = torch.maximum(torch.sqrt(v), floor) * c[0] + c[1]
    x = w * u
    w.copy_((x - x.clamp(-c[2], c[2])) / (u + c[3]))  # softshrink's values: x − a, x + a, or +0; NaN kept


def _strengths(regularizer) -> tuple[float, float] | None:
    """(a, b) of the elastic-net maps this kernel computes, or None."""
    if type(regularizer) is L1:
        return regularizer.strength, 0.0
    if type(regularizer) is ElasticNet:
        return regularizer.l1, regularizer.l2
    return None


def _fits(p: Tensor, v) -> bool:
    g = p.grad
    return (
        type(p) in (Tensor, nn.Parameter) and p.device.type in devices and p.dtype in (torch.float32, torch.float64)
        and p.numel() >= max(min_numel, 2) and p.is_contiguous()
        and type(v) is Tensor and v.dtype == p.dtype and v.shape == p.shape and v.is_contiguous()
        and type(g) is Tensor and g.dtype == p.dtype and g.shape == p.shape and g.is_contiguous()
        and compile_seconds.get((p.dtype, p.device.type), 0.0) is not None
    )


def _call(w: Tensor, v: Tensor, g: Tensor, c: Tensor) -> bool:
    """Run the compiled kernel; False (and a warning, once) if it cannot be compiled."""
    global _compiled
    key = (w.dtype, w.device.type)
    if key in compile_seconds:
        _compiled(w, v, g, c)
        return True
    with _lock:  # the first call per dtype and device compiles; one thread at a time
        if key in compile_seconds:
            return _call(w, v, g, c)
        if _compiled is None:
            _compiled = torch.compile(_kernel, dynamic=True, fullgraph=True)
        started = time.perf_counter()
        try:
            _compiled(w, v, g, c)
        except Exception as e:  # no C++ compiler, a backend that refuses: the eager map it is
            compile_seconds[key] = None
            warnings.warn(f"paramreg: the fused prox could not be compiled for {key[0]} on {key[1]} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); the eager map runs instead. Set "
                          f"paramreg.optim.fused.enabled = False to choose it explicitly.", stacklevel=4)
            return False
        compile_seconds[key] = time.perf_counter() - started
        return True


def map_(optimizer, group: dict, regularizer, tensors: list[Tensor], states: list[dict], lr: float, ratio: float) -> list[int]:
    """The fused map (Note [Fused map]) on every tensor of ``tensors`` it takes, after ``optimizer``
    stepped them in ``group`` (``states``: their optimizer states; ``lr``: the prox's step scale;
    ``ratio``: the metric floor); returns the indices of the tensors it left to the eager map."""
    everything = list(range(len(tensors)))
    strengths = _strengths(regularizer)
    if (not enabled or strengths is None or step_sizes.resolve(optimizer) not in _ADAM or not group.get("eps", 0.0) > 0
            or torch.compiler.is_compiling()):
        return everything
    if strengths == (0.0, 0.0) and type(regularizer) is L1:
        return []  # L1(0) is the identity, as in the eager map
    cls, key = step_sizes.resolve(optimizer), step_sizes._adam_key(group)
    left = []
    for i, (p, state) in enumerate(zip(tensors, states, strict=True)):
        v = state.get(key)
        if not _fits(p, v):
            left.append(i)
            continue
        scale, shift = step_sizes.adam_scalars(group, float(state["step"]), lr)
        factor = step_sizes.floor_factor(cls, group, p.numel(), state, ratio)
        c = torch.tensor([scale, shift, *strengths, factor], dtype=p.dtype, device=p.device)
        if not _call(p.detach().view(-1), v.view(-1), p.grad.view(-1), c):
            left.append(i)
    return left
