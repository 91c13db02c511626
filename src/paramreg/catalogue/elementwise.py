"""Elementwise regularizers: L0, L1, L2 and ElasticNet, with their in-place multi-tensor maps.

Conventions: L1 with strength a is a·Σ abs(w); L2 with strength b is (b/2)·Σ w² (torch's
``weight_decay=b``); the proximal map of step t is argmin_z ½‖z − w‖² + t·R(z)
(:mod:`paramreg.catalogue.base`).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import Regularizer, check_strength, register

__all__ = ["L0", "L1", "L2", "ElasticNet", "soft_threshold_"]


def _by_precision(tensors: Sequence[Tensor], steps: Sequence[Tensor]):
    """Split (tensors, steps) into the pairs that share a dtype, to be mapped in place as they
    are, and half-precision tensors, to be mapped on float32 copies and rounded once."""
    same = ([], [])
    low = []
    for w, t in zip(tensors, steps, strict=True):
        if w.dtype == t.dtype:
            same[0].append(w)
            same[1].append(t)
        else:
            low.append((w, t))
    return same, low


def _diag_(fn, tensors: Sequence[Tensor], steps: Sequence[Tensor]) -> None:
    """Apply ``fn(tensors, steps)`` (an in-place multi-tensor map) to ``tensors``; a tensor whose
    dtype differs from its steps' (bfloat16 or float16 weights, float32 steps) is mapped in float32
    and the result stored in its own dtype."""
    (ws, ts), low = _by_precision(tensors, steps)
    if ws:
        fn(ws, ts)
    for w, t in low:
        accurate = [w.to(t.dtype)]
        fn(accurate, [t])
        w.copy_(accurate[0])


def _elementwise(self, ndim: int) -> str:
    return "elements"


def _elastic_net_metric_(tensors: list[Tensor], inverse_steps: list[Tensor], l1: float = 0.0, l2: float = 0.0) -> None:
    """In place: the elastic-net prox in the metric diag(u), u = ``inverse_steps`` = 1/t (finite,
    > 0; consumed), which is L1's with l2 = 0 and L2's with l1 = 0::

        w ← sign(w)·max(abs(w) − a/u, 0)/(1 + b/u) = softshrink(u·w, a)/(u + b)

    The right-hand form takes three passes (a product, a scalar soft-threshold, a quotient) where
    w − clamp(w, −t·a, t·a) takes six; entries with u·abs(w) <= a become exact zeros.
    """
    torch._foreach_mul_(tensors, inverse_steps)
    soft_threshold_(tensors, l1)
    if l2 != 0.0:
        torch._foreach_add_(inverse_steps, l2)
    torch._foreach_div_(tensors, inverse_steps)


def _sum_of(terms) -> Tensor:
    """The sum of a non-empty iterable of tensors, left to right (no leading 0 + first)."""
    terms = iter(terms)
    total = next(terms)
    for term in terms:
        total = total + term
    return total


FOREACH_BELOW = 65_536  # Note [Sums of many small tensors]: a tensor this small joins one foreach call
FOREACH_FROM = 4  # ... when at least this many of them share a device and dtype
CHUNK = 1 << 18  # elements of the buffer that large CPU tensors' abs values pass through
CHUNKED_FROM = 1 << 20  # ... when together they have at least this many elements
VIEWS_HELD = 64  # views of a buffer kept per thread (one per tensor shape, or per length of a chunk)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a Parameter of a DTensor is a DTensor: it takes abs().sum()
_buffers = threading.local()  # per thread: (dtype, device) -> the CHUNK-element buffer


def _abs_sum(tensors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """Note [Sums of many small tensors]
        Σ over the tensors of Σ abs(w), differentiable. A Python loop of ``w.abs().sum()`` pays two
        dispatches and an autograd node per tensor: on 200 Linear(32, 32) weights that is the
        whole cost (about 5 µs a tensor on this machine's CPU). ``torch._foreach_norm(ws, 1)``
        takes the L1 norms of many tensors in one call (2.2x faster there: 478 against 1055 µs),
        but is slower per element on large ones (965 against 550 µs on a transformer's 17
        weights of up to 786k elements). So the plain float tensors under ``FOREACH_BELOW``
        elements go to one foreach call per device and dtype, when there are at least
        ``FOREACH_FROM`` of them.

        Larger ones on the CPU, when together they have at least ``CHUNKED_FROM`` elements (2^20),
        pass through one buffer of ``CHUNK`` elements per thread, dtype and device (1 MiB in
        float32), kept between calls, in one autograd node (``_ChunkedAbsSum``): ``w.abs()``
        allocates a temporary the size of w, which glibc serves from pages it holds or from
        fresh pages the kernel zeroes on first touch, depending on the process's history
        (benchmarks/penalty_allocator.py: the same loop 4-7x slower in one state than the
        other; in two runs of benchmarks/suite.py's penalty table, paramreg's penalty on the
        transformer took 4.2-4.6x the hand-written loop, after the MLP's). Through the held
        buffer no call allocates and the buffer stays in the caches: on the MLP's 1.9M weights
        367-416 µs in every allocator state, where the loop takes 544 µs or 2.4-2.9 ms; on the
        transformer (16 large weights and a small one) 1.14-1.18x the loop's fast state in six
        runs of benchmarks/suite.py's penalty table before stop 34, and 0.20x its slow one. Each
        chunk's ``abs`` writes into a view of the buffer, made once per shape and kept (at most
        ``VIEWS_HELD`` per buffer): a contiguous tensor that fits is written into a view shaped
        as it (a flat view of it cost 1.1 µs a tensor, ad hoc), a larger one is cut into flat
        chunks. Fewer than ``FOREACH_FROM`` small tensors of the node's dtype pass through the
        node too, and where one node takes every tensor it also takes the scale (the strength):
        the sum is one autograd node, not one per small tensor plus two to add and scale. With
        the cheaper plan check of Note [Penalty plans], five same-process A/B runs of the
        penalty table (``python benchmarks/suite.py --markdown --no-steps --no-memory
        --no-scaling --before 67cc6a5``, stop 34): transformer 1.060-1.097 against 1.148-1.220,
        CNN 1.023-1.070 against 1.055-1.120 (an A/A run puts its first column up to 0.03 above
        its second on the CNN, 0.004 on the transformer). A compiled ``abs().sum()``, which
        needs no buffer, took 1.8x the loop there (ad hoc): a compiled call's fixed cost, about
        20 µs, is paid per tensor. Below 2^20 elements the node's fixed cost (about 20 µs)
        outweighs what it saves. Under ``torch.compile``, for tensor
        subclasses (DTensor), half precision and other devices (whose allocators cache) each
        tensor takes ``abs().sum()``, as do sparse tensors and every tensor under ``torch.func``'s
        transforms (the node is an old-style autograd Function); the buffer and its views are made
        outside ``inference_mode`` even in it, so that a penalty taken first for evaluation under
        ``inference_mode`` leaves a buffer training can write. The value can differ from the loop's in the last bits
        (another summation order); the gradient is the same, sign(w) with 0 at 0.
    """
    if ((len(tensors) < FOREACH_FROM and sum(w.numel() for w in tensors) < CHUNKED_FROM) or torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None):  # under torch.func's transforms
        return _scaled(scale, _sum_of(w.abs().sum() for w in tensors))
    small: dict[tuple, list[Tensor]] = {}
    large: dict[tuple, list[Tensor]] = {}
    terms = []
    for w in tensors:  # keyed by dtype on the CPU, by (device, dtype) elsewhere
        if type(w) not in _PLAIN or w.dtype not in (torch.float32, torch.float64) or w.layout != torch.strided:
            terms.append(w.abs().sum())
        elif w.numel() < FOREACH_BELOW:
            small.setdefault(w.dtype if w.is_cpu else (w.device, w.dtype), []).append(w)
        elif w.is_cpu:
            large.setdefault(w.dtype, []).append(w)
        else:
            terms.append(w.abs().sum())
    chunked = []
    for key, group in large.items():
        if sum(w.numel() for w in group) >= CHUNKED_FROM:
            if len(small.get(key, ())) < FOREACH_FROM:  # a few small ones join the node, not a node each
                group = group + small.pop(key, [])
            chunked.append(group)
        else:
            terms.extend(w.abs().sum() for w in group)
    for group in small.values():
        if len(group) < FOREACH_FROM:
            terms.extend(w.abs().sum() for w in group)
        else:
            terms.append(torch.stack(torch._foreach_norm(group, 1)).sum())
    if len(chunked) == 1 and not terms:  # one node: the scale too, without a node of its own
        return _ChunkedAbsSum.apply(scale, *chunked[0])
    return _scaled(scale, _sum_of([*(_ChunkedAbsSum.apply(1.0, *group) for group in chunked), *terms]))


def _scaled(scale: float, total: Tensor) -> Tensor:
    return total if scale == 1.0 else scale * total


def _view(views: dict, shape, buffer: Tensor, n: int) -> Tensor:
    """The held buffer's first ``n`` elements as a tensor of ``shape`` (a size or a torch.Size),
    kept in ``views`` (one buffer's), of which at most ``VIEWS_HELD`` are kept."""
    if len(views) >= VIEWS_HELD:
        views.clear()
    with torch.inference_mode(False):
        views[shape] = out = buffer[:n].view(shape)
    return out


class _ChunkedAbsSum(torch.autograd.Function):
    """scale·Σ abs(w) over CPU tensors of one dtype, through a held buffer (Note [Sums of many
    small tensors]); its gradient is abs's, (grad·scale)·sgn(w)."""

    @staticmethod
    def forward(ctx, scale: float, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors)
        ctx.scale = scale
        first = tensors[0]
        key = (first.dtype, first.device)
        buffers = _buffers.__dict__.setdefault("by_key", {})
        if key not in buffers:
            with torch.inference_mode(False):  # a buffer made under inference_mode could not be written outside it
                buffers[key] = torch.empty(CHUNK, dtype=first.dtype, device=first.device)
        buffer = buffers[key]
        views = _buffers.__dict__.setdefault("views", {}).setdefault(key, {})  # shape -> the buffer's first elements so shaped
        parts = []
        for w in tensors:
            n = w.numel()
            if n <= CHUNK and w.is_contiguous():  # one chunk, written into a view shaped as w: no view of w made
                out = views.get(w.shape)
                if out is None:
                    out = _view(views, w.shape, buffer, n)
                parts.append(torch.abs(w, out=out).sum())
                continue
            flat = w.view(-1) if w.is_contiguous() else w.reshape(-1)  # reshape copies
            for start in range(0, n, CHUNK):
                size = min(CHUNK, n - start)
                out = views.get(size)
                if out is None:
                    out = _view(views, size, buffer, size)
                parts.append(torch.abs(flat[start : start + size], out=out).sum())
        return _scaled(scale, torch.stack(parts).sum() if len(parts) > 1 else parts[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        return (None, *(grad * w.sgn() for w in ctx.saved_tensors))


def soft_threshold_(tensors: Sequence[Tensor], threshold: float) -> None:
    """In place: w ← sign(w)·max(abs(w) − threshold, 0) over every tensor.

    On the CPU, ``softshrink`` written through ``out=`` into its own input is one pass per tensor
    with no temporary (aliasing is safe for an elementwise op), the memory-bound floor. On an
    accelerator, where a launch per tensor dominates for many small tensors, three multi-tensor
    ops do it for all tensors at once: w − clamp(w, −θ, θ), the same arithmetic (w − θ, w + θ, or
    w − w = 0), so the values are equal (a zero is +0 where softshrink may give −0).
    """
    if threshold == 0.0:
        return
    if len(tensors) > 1 and tensors[0].device.type != "cpu":
        _soft_threshold_multi_(list(tensors), threshold)
        return
    for w in tensors:
        torch._C._nn.softshrink(w, threshold, out=w)


def _soft_threshold_multi_(tensors: list[Tensor], threshold: float) -> None:
    clipped = torch._foreach_clamp_max(tensors, threshold)
    torch._foreach_clamp_min_(clipped, -threshold)
    torch._foreach_sub_(tensors, clipped)


@register("l1")
@dataclass(frozen=True)
class L1(Regularizer):
    r"""Lasso: R(w) = a·Σ abs(w), with a = ``strength``.

    Proximal map (soft-thresholding)::

        prox_{tR}(w) = sign(w)·max(abs(w) − t·a, 0)

    Entries whose magnitude is at most t·a become exact zeros.

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([2.0, 0.3, -1.0])
        >>> paramreg.L1(0.5).penalty(w)
        tensor(1.6500)
        >>> paramreg.L1(0.5).prox(w, t=1.0)
        tensor([ 1.5000,  0.0000, -0.5000])

    Reference: Tibshirani (1996), "Regression shrinkage and selection via the lasso";
    Parikh & Boyd (2014), "Proximal Algorithms", section 6.5.2.
    """

    strength: float
    unit = "weights"  # what one group of the map is (a sparsity target counts them)
    strengths = ("strength",)
    adaptive = True
    split = _elementwise

    def __post_init__(self):
        object.__setattr__(self, "strength", check_strength("L1 strength", self.strength))

    def penalty(self, w: Tensor) -> Tensor:
        return self.strength * w.abs().sum()

    def penalty_sum(self, tensors: Sequence[Tensor]) -> Tensor:
        return _abs_sum(tensors, self.strength)

    def prox(self, w: Tensor, t: float) -> Tensor:
        return F.softshrink(w, float(t) * self.strength) if float(t) * self.strength else w.clone()

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        soft_threshold_(tensors, float(t) * self.strength)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        x = w.to(torch.promote_types(w.dtype, t.dtype))
        threshold = t * self.strength
        return (x - torch.clamp(x, -threshold, threshold)).to(w.dtype)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        if self.strength != 0.0:
            _diag_(functools.partial(_elastic_net_metric_, l1=self.strength), tensors, inverse_steps)

    def critical(self, tensors: Sequence[Tensor], inverse_steps: Sequence) -> list[Tensor]:
        """abs(w_i)/t_i per element: the prox zeroes w_i exactly when the strength is at least that."""
        return [(w * u).abs_() for w, u in zip(tensors, inverse_steps, strict=True)]


def _hard_threshold_metric_(tensors: list[Tensor], inverse_steps: list[Tensor], l0: float) -> None:
    """In place: w_i ← w_i where w_i²·u_i > 2a, else 0 (u = ``inverse_steps`` = 1/t, consumed).

    The score w_i²·u_i is rounded exactly as :meth:`L0.critical` rounds it (times 2), so that a
    strength equal to an entry's critical strength zeroes it."""
    for w, u in zip(tensors, inverse_steps, strict=True):
        u.mul_(w * w)
        w.masked_fill_(u <= 2.0 * l0, 0.0)


#: Elements per piece of a contiguous tensor that :func:`_hard_threshold_` scores at once.
_PIECE = 1 << 16


def _hard_threshold_(tensors: Sequence[Tensor], inverse: float, bound: float) -> None:
    """In place: w ← 0 where (w·w)·inverse <= bound, the score rounded as :meth:`L0.critical`
    rounds it (times 2).

    The rounded score grows with abs(w) (rounding is monotone), so the map is ``hardshrink``
    at the largest value τ of w's dtype whose score is at most ``bound``: one pass, in place, no
    temporary, as the L1 map's ``softshrink``. τ is found by scoring, with the same operations,
    the values of the dtype within 32 steps of sqrt(bound/inverse) (:func:`_magnitude_bound`).
    Where it is not among them (float16 squares that under- or overflow), or where autograd
    records the map, a plain contiguous tensor is scored in flat pieces of ``_PIECE`` elements,
    and another tensor (a DTensor, whose ``view(-1)`` is no view of its shard) whole. Under SGD
    the whole-tensor form held two float32 copies of every weight at once (30.5 MB beyond the
    ``l1=`` step at 8M weights); the pieces took 0.9 ns a weight, and hardshrink takes what
    softshrink takes."""
    taus: dict[tuple, float | None] = {}  # (dtype, device) -> τ
    for w in tensors:
        # hardshrink's out= and split's views record no gradient: under autograd the whole tensor
        plain = type(w) in (Tensor, torch.nn.Parameter) and not (w.requires_grad and torch.is_grad_enabled())
        if plain:
            key = (w.dtype, w.device)
            if key not in taus:
                taus[key] = _magnitude_bound(w.dtype, w.device, inverse, bound)
            if taus[key] is not None:
                torch.ops.aten.hardshrink.out(w, taus[key], out=w)
                continue
        for piece in w.view(-1).split(_PIECE) if plain and w.is_contiguous() else (w,):
            score = piece * piece
            score.mul_(inverse)
            piece.masked_fill_(score <= bound, 0.0)


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _magnitude_bound(dtype: torch.dtype, device: torch.device, inverse: float, bound: float) -> float | None:
    """The largest value τ >= 0 of ``dtype`` whose score (τ·τ)·inverse, rounded as the map rounds
    it on ``device``, is at most ``bound`` (so that the score of w is at most ``bound`` exactly
    when abs(w) <= τ), from the 65 values of the dtype around sqrt(bound/inverse), scored where
    the weights are; None where the change from "at most" to "above" is not among them."""
    guess = math.sqrt(bound / inverse) if inverse > 0 and bound >= 0 else math.nan
    if dtype not in _BITS or not 0.0 < guess < math.inf:
        return None
    bits = torch.tensor(guess, dtype=dtype).view(_BITS[dtype])
    candidates = (bits + torch.arange(-32, 33, dtype=_BITS[dtype])).clamp_(min=0).view(dtype).to(device)
    low = (candidates * candidates * inverse) <= bound
    if not (bool(low[0]) and not bool(low[-1])):
        return None
    return float(candidates[int(low.sum()) - 1])


@register("l0")
@dataclass(frozen=True)
class L0(Regularizer):
    r"""Best subset: R(w) = a·(number of non-zero entries of w), with a = ``strength``.

    Proximal map (hard thresholding; R is not convex, the map is still exact)::

        prox_{tR}(w)_i = w_i  if w_i²/(2t) > a,  else 0

    Unlike L1 it does not shrink the entries it keeps: it decides which entries are zero and
    leaves the others to the optimizer. With a target (``l0=True, sparsity=s``) the strength
    is calibrated on every step so that the fraction s of entries with the smallest
    w_i²/(2·t_i) is zero: in Adam's metric t_i = lr/(sqrt(v̂_i) + eps) this is gradual pruning
    by abs(w)·(sqrt(v̂) + eps)^½ in which zeros come back when their gradient moves them. R has no
    gradient, so there is no ``mode="penalty"``.

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([2.0, 0.3, -1.5])
        >>> paramreg.L0(0.5).penalty(w)
        tensor(1.5000)
        >>> paramreg.L0(0.5).prox(w, t=1.0)
        tensor([ 2.0000,  0.0000, -1.5000])

    Reference: Blumensath & Davies (2008), "Iterative thresholding for sparse approximations";
    Bolte, Sabach & Teboulle (2014), "Proximal alternating linearized minimization for
    nonconvex and nonsmooth problems".
    """

    strength: float
    unit = "weights"
    strengths = ("strength",)
    adaptive = True
    convex = False
    differentiable = False
    split = _elementwise

    def __post_init__(self):
        object.__setattr__(self, "strength", check_strength("L0 strength", self.strength))

    def penalty(self, w: Tensor) -> Tensor:
        return self.strength * torch.count_nonzero(w).to(torch.promote_types(w.dtype, torch.float32))

    # Every form compares the score w²·(1/t) with 2a, rounded as critical() rounds w²·(1/t)/2.

    def prox(self, w: Tensor, t: float) -> Tensor:
        return w.masked_fill(w * w * (1.0 / float(t)) <= 2.0 * self.strength, 0.0) if float(t) * self.strength else w.clone()

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        if float(t) * self.strength:
            _hard_threshold_(tensors, 1.0 / float(t), 2.0 * self.strength)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        x = w.to(torch.promote_types(w.dtype, t.dtype))
        return x.masked_fill(x * x * t.reciprocal() <= 2.0 * self.strength, 0.0).to(w.dtype)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        if self.strength != 0.0:
            _diag_(functools.partial(_hard_threshold_metric_, l0=self.strength), tensors, inverse_steps)

    def critical(self, tensors: Sequence[Tensor], inverse_steps: Sequence) -> list[Tensor]:
        """w_i²/(2·t_i) per element: the prox zeroes w_i exactly when the strength is at least that."""
        return [w * w * u / 2 for w, u in zip(tensors, inverse_steps, strict=True)]


@register("l2")
@dataclass(frozen=True)
class L2(Regularizer):
    r"""Ridge: R(w) = (b/2)·Σ w², with b = ``strength``.

    This is the convention of torch's ``weight_decay=b`` (its gradient is b·w); Keras ``L2(c)``
    penalizes c·Σ w², which is ``L2(2c)`` here.

    Proximal map (shrinkage)::

        prox_{tR}(w) = w / (1 + t·b)

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([2.0, -1.0])
        >>> paramreg.L2(0.5).penalty(w)
        tensor(1.2500)
        >>> paramreg.L2(1.0).prox(w, t=1.0)
        tensor([ 1.0000, -0.5000])
    """

    strength: float
    strengths = ("strength",)
    adaptive = True
    split = _elementwise

    def __post_init__(self):
        object.__setattr__(self, "strength", check_strength("L2 strength", self.strength))

    def penalty(self, w: Tensor) -> Tensor:
        return 0.5 * self.strength * w.pow(2).sum()

    def penalty_sum(self, tensors: Sequence[Tensor]) -> Tensor:
        return 0.5 * self.strength * _sum_of(w.pow(2).sum() for w in tensors)

    def prox(self, w: Tensor, t: float) -> Tensor:
        return w / (1.0 + float(t) * self.strength)

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        if self.strength != 0.0:
            torch._foreach_div_(list(tensors), 1.0 + float(t) * self.strength)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        return (w.to(torch.promote_types(w.dtype, t.dtype)) / (1.0 + t * self.strength)).to(w.dtype)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        if self.strength != 0.0:
            _diag_(functools.partial(_elastic_net_metric_, l2=self.strength), tensors, inverse_steps)


@register("elastic_net")
@dataclass(frozen=True)
class ElasticNet(Regularizer):
    r"""Elastic net: R(w) = a·Σ abs(w) + (b/2)·Σ w², with a = ``l1`` and b = ``l2``.

    Its proximal map is exact in closed form (soft-threshold, then shrink)::

        prox_{tR}(w) = sign(w)·max(abs(w) − t·a, 0) / (1 + t·b)

    scikit-learn's ``ElasticNet(alpha, l1_ratio=r)`` is ``ElasticNet(l1=alpha·r, l2=alpha·(1 − r))``
    on the loss (1/(2n))‖y − Xw‖².

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([2.0, 0.3])
        >>> paramreg.ElasticNet(l1=0.5, l2=1.0).prox(w, t=1.0)
        tensor([0.7500, 0.0000])
    """

    l1: float
    l2: float
    strengths = ("l1", "l2")
    adaptive = True
    split = _elementwise

    def __post_init__(self):
        object.__setattr__(self, "l1", check_strength("ElasticNet l1", self.l1))
        object.__setattr__(self, "l2", check_strength("ElasticNet l2", self.l2))

    def penalty(self, w: Tensor) -> Tensor:
        return self.l1 * w.abs().sum() + 0.5 * self.l2 * w.pow(2).sum()

    def penalty_sum(self, tensors: Sequence[Tensor]) -> Tensor:
        return _abs_sum(tensors, self.l1) + 0.5 * self.l2 * _sum_of(w.pow(2).sum() for w in tensors)

    def prox(self, w: Tensor, t: float) -> Tensor:
        shrunk = F.softshrink(w, float(t) * self.l1) if float(t) * self.l1 else w
        return shrunk / (1.0 + float(t) * self.l2)

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        soft_threshold_(tensors, float(t) * self.l1)
        if self.l2 != 0.0:
            torch._foreach_div_(list(tensors), 1.0 + float(t) * self.l2)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        return L2(self.l2).prox_diag(L1(self.l1).prox_diag(w, t), t)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        _diag_(functools.partial(_elastic_net_metric_, l1=self.l1, l2=self.l2), tensors, inverse_steps)
