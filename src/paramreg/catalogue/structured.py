"""Structured sparsity and low rank: group lasso, sparse group lasso, nuclear norm.

How a tensor is split into groups lives in :mod:`paramreg.catalogue.groups`; the maps here apply one formula
per group. All are proximal maps of convex penalties, exact in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import ParamregError
from .base import Regularizer, check_strength, register
from .elementwise import L1, soft_threshold_
from .groups import accurate_dtype, check_groups, check_groups_option, group_norms, group_size, kept_dims, reduced_dims

__all__ = ["GroupLasso", "SparseGroupLasso", "NuclearNorm"]


def _check_bool(label: str, value) -> None:
    if not isinstance(value, bool):
        raise ParamregError(f"{label} must be True or False, got {value!r}")


def _group_scale(w: Tensor, groups, threshold: float) -> Tensor:
    """max(1 − threshold/‖w_g‖, 0) per group, broadcastable against w, in w's dtype (threshold > 0)."""
    norms = group_norms(w, groups, dtype=accurate_dtype(w))
    return (1 - threshold / norms).clamp_(min=0).to(w.dtype)  # a zero group stays zero: 1 − c/0 = −inf → 0


# Newton's method on the scalar group norm (GroupLasso.prox_diag) stops when the relative change of
# r is below this, for the dtype it computes in (float32 for half-precision weights).
NEWTON_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}
NEWTON_MAX_ITERATIONS = 50


def _group_shrink_diag(w: Tensor, t: Tensor, groups, threshold: float) -> Tensor:
    """argmin_z Σ_i (z_i − w_i)²/(2·t_i) + threshold·Σ_g ‖z_g‖₂, in w's dtype.

    Per group: z = 0 if ‖w_g / t_g‖₂ <= threshold; otherwise z_i = w_i·r / (r + threshold·t_i)
    with r = ‖z_g‖₂ > 0 the root of S(r) = Σ_i w_i² / (r + threshold·t_i)² = 1. Newton's method
    on g(r) = S(r)^(-1/2) − 1 (linear in r when all t_i are equal), from the root for the mean
    step (2 to 4 iterations on Adam's steps in the benchmarks), safeguarded by bisection inside the bracket ‖w_g‖ − threshold·max t ≤ r ≤ ‖w_g‖ − threshold·min t,
    until r changes by less than ``NEWTON_RTOL`` relative (at most ``NEWTON_MAX_ITERATIONS``).
    Deleu & Bengio (2021), "Structured sparsity inducing adaptive optimizers for deep learning".
    """
    dtype = torch.promote_types(accurate_dtype(w) or w.dtype, t.dtype)
    x, lt = w.to(dtype), t.to(dtype) * threshold
    dims = reduced_dims(groups, w.dim())

    def total(v: Tensor) -> Tensor:
        return v.sum(dim=dims, keepdim=True) if dims else v

    def amax(v: Tensor) -> Tensor:
        return v.amax(dim=dims, keepdim=True) if dims else v

    def amin(v: Tensor) -> Tensor:
        return v.amin(dim=dims, keepdim=True) if dims else v

    squares = x * x
    zero = total(squares / (lt * lt)) <= 1.0
    norm = total(squares).sqrt()
    lo = (norm - amax(lt)).clamp(min=0.0)
    hi = (norm - amin(lt)).clamp(min=0.0)
    # start from the root for one shared step, the squares-weighted mean of threshold·t_i: exact
    # when the t_i are equal, and usually within a few Newton steps of the root otherwise
    mean_lt = total(squares * lt) / total(squares).clamp(min=torch.finfo(dtype).tiny)
    r = torch.where(zero, norm, torch.minimum(torch.maximum(norm - mean_lt, lo), hi))
    rtol = NEWTON_RTOL.get(dtype, 1e-6)
    for _ in range(NEWTON_MAX_ITERATIONS):
        d = r + lt
        s = total(squares / (d * d))
        g = s.rsqrt() - 1.0
        slope = total(squares / (d * d * d)) * s.pow(-1.5)  # g'(r) > 0
        lo = torch.where(g < 0, r, lo)
        hi = torch.where(g > 0, r, hi)
        newton = r - g / slope
        inside = (newton > lo) & (newton < hi)
        new = torch.where(inside, newton, 0.5 * (lo + hi))
        new = torch.where(zero | (g == 0), r, new)
        done = bool(((new - r).abs() <= rtol * new).all())
        r = new
        if done:
            break
    return torch.where(zero, 0.0, x * (r / (r + lt))).to(w.dtype)


def _group_view(x: Tensor, groups) -> Tensor:
    """``x`` viewed as (A, G, B) with one group per index of the middle dim: the kept dims of a
    grouping are consecutive (``"out"``: (0,), ``"kernel"``: (0, 1), an int d: (d,)), so every
    group is the slice ``[:, g, :]`` and its norm reduces over dims 0 and 2."""
    keep = kept_dims(groups, x.dim())
    lo, hi = keep[0], keep[-1] + 1
    shape = x.shape
    return x.view(math.prod(shape[:lo]), math.prod(shape[lo:hi]), math.prod(shape[hi:]))


def group_shrink_diag_(w: Tensor, u: Tensor, groups, threshold: float, l1: float = 0.0) -> None:
    """In place: w ← argmin_z Σ_i u_i·(z_i − w_i)²/2 + l1·Σ abs(z) + threshold·Σ_g ‖z_g‖₂, with
    u = 1/t the inverse steps (finite, > 0; consumed).

    Note [Group lasso in a diagonal metric, fast]
        The same root as :func:`_group_shrink_diag` (the reference, which ``prox_diag`` keeps),
        found in far fewer passes over the tensor. With c_i = threshold·t_i, g(r) =
        S(r)^(-1/2) − 1 is concave and increasing in r, with g'(r) >= 1/‖w_g‖: S^(-1/2)·‖w_g‖ is
        the weighted power mean M_(-2) of r + c_i (weights w_i²/‖w_g‖²), concave in r with
        slope >= 1. Hence:

        - the start r_0 = ‖w_g‖ − m, m the weighted mean of c_i, is never right of the root
          (M_(-2) <= M_1), and is the root when the c_i are equal (one shared step), except
          where ‖w_g‖² underflows below the dtype's ``tiny`` (the clamp of its denominator then
          makes m too small): a right start only brackets, r itself the far end;
        - from a point r left of the root, Newton's step lands at or left of the root (the
          tangent of a concave function lies above it), and r − ‖w_g‖·g(r) is at or right of it
          (the slope is at least 1/‖w_g‖): every evaluation brackets the root, and the iterates
          rise monotonically without a safeguard;
        - a group whose start is 0 and whose g(0) >= 0 (‖w_g/c_g‖ <= 1) is zero: its Newton step
          from 0 is <= 0 (from a left point it is >= 0), and the iterate is clamped at 0; a
          Newton point of 0 proves a zero group only when taken from 0 (from a right start it
          may be clamped there too).

        The iteration stops when every group is done, and maps with the last Newton point. A
        group is done when its bracket is narrower than ``NEWTON_RTOL`` times its Newton point (a
        proof of the tolerance, where the reference stops on a small step), or when its Newton
        point does not rise above a point left of the root (S >= 1) it was taken from: in exact
        arithmetic every step from a left point rises until the root, so the iterate then lies
        at the root within the rounding of S, about eps·‖w_g‖ (eps·‖w_g‖/r relative to abs(w):
        float32 solves of such groups differ from a float64 one by as much). That happens in
        float32 to a group shrunk to a small part of its norm (‖w_g‖/r about 30: S rounded at
        1e-7 relative moves the bracket's far end by about 3e-6 of r, so the bracket cannot
        close to 1e-6), whose iterates then jitter at that scale; the solve ran its 50
        evaluations on them before. On Adam's steps in the benchmarks one evaluation suffices
        for almost every group. The passes: the inverse steps to steps (1), ‖w_g‖ and m (4), per
        evaluation S and S' (7), the map (3); all in place or in two scratch tensors, and the
        per-group arithmetic on (G,) tensors. With ``l1`` > 0 (the sparse group lasso) the
        metric soft-threshold comes first (the composition is exact, as in
        ``SparseGroupLasso.prox_diag``). A tensor subclass or a tensor with no (A, G, B) view
        (not contiguous) takes the reference.
    """
    dtype = torch.promote_types(accurate_dtype(w) or w.dtype, u.dtype)
    plain = type(w) in (Tensor, torch.nn.Parameter) and type(u) is Tensor
    if not (plain and w.is_contiguous() and u.is_contiguous() and u.shape == w.shape):
        t = u.reciprocal_()
        x = L1(l1).prox_diag(w, t) if l1 else w
        w.copy_(_group_shrink_diag(x, t, groups, threshold))
        return
    x = w if w.dtype == dtype else w.to(dtype)
    ws = u if u.dtype == dtype else u.to(dtype)  # the inverse steps, then the steps t
    if l1:
        x.mul_(ws)
        torch._C._nn.softshrink(x, l1, out=x)
        x.div_(ws)
    x3, t3 = _group_view(x, groups), _group_view(ws, groups)
    dims = (0, 2)
    t3.reciprocal_()
    norm = torch.linalg.vector_norm(x3, dim=dims, keepdim=True)
    y = torch.mul(x3, t3)
    y.mul_(x3)
    mean = y.sum(dim=dims, keepdim=True).mul_(threshold).div_((norm * norm).clamp_(min=torch.finfo(dtype).tiny))
    r = (norm - mean).clamp_(min=0.0)
    d = torch.empty_like(x3)
    rtol = NEWTON_RTOL.get(dtype, 1e-6)
    tiny = torch.finfo(dtype).tiny
    for _ in range(NEWTON_MAX_ITERATIONS):
        torch.add(r, t3, alpha=threshold, out=d)  # r + c_i
        torch.div(x3, d, out=y)
        s = torch.linalg.vector_norm(y, dim=dims, keepdim=True).square_()  # S(r) = Σ w_i²/(r + c_i)²
        torch.div(y, d, out=d)
        d.mul_(y)
        slope = d.sum(dim=dims, keepdim=True).clamp_(min=tiny)  # Σ w_i²/(r + c_i)³ = −S'(r)/2
        root = s.sqrt()
        below = root - 1.0  # −g(r)·√S
        # Newton's step −g/g' = S·(√S − 1)/(−S'/2); at r = 0 a step <= 0 (g(0) >= 0) means the
        # group is zero: the clamp makes it so (an all-zero group: S = 0, a step of −0)
        new = torch.addcdiv(r, s.mul_(below), slope).clamp_(min=0.0)
        # the bracket's far end: r − ‖w_g‖·g(r) = r + ‖w_g‖·(1 − 1/√S), or r when r is right of the root
        upper = torch.addcmul(r, norm, below.div_(root).clamp_(min=0.0))
        proven = (upper.sub_(new) <= new * rtol) | ((new == 0) & (r == 0)) | ((new <= r) & (root >= 1.0))  # the Note
        r = new
        if bool(proven.all()):
            break
    torch.add(r, t3, alpha=threshold, out=d)
    torch.div(r, d, out=d)  # r/(r + c_i); 0 for a zero group
    x3.mul_(d)
    if x is not w:
        w.copy_(x)


def _diag_rows_together_(tensors: Sequence[Tensor], inverse_steps: list[Tensor], split, map_) -> None:
    """``map_(w, u)`` (in place on w, u its inverse steps, consumed) on every tensor. Plain
    tensors of one dtype and device whose groups lie within rows (``split(ndim)`` is ``"rows"``)
    and whose rows have the same shape are concatenated along dim 0 and mapped in one call: a
    model of many small layers then takes one group solve (a few dozen small ops) instead of one
    per layer.
    """
    together: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
    alone: list[tuple[Tensor, Tensor]] = []
    for w, u in zip(tensors, inverse_steps, strict=True):
        plain = type(w) in (Tensor, torch.nn.Parameter) and type(u) is Tensor
        if plain and w.dim() and split(w.dim()) == "rows":
            together.setdefault((w.shape[1:], w.dtype, u.dtype, w.device), []).append((w, u))
        else:
            alone.append((w, u))
    for pairs in together.values():
        if len(pairs) == 1:
            alone.append(pairs[0])
            continue
        ws = [w for w, _ in pairs]
        joined = torch.cat(ws)
        map_(joined, torch.cat([u for _, u in pairs]))
        torch._foreach_copy_(ws, list(joined.split([w.shape[0] for w in ws])))
    for w, u in alone:
        map_(w, u)


@register("group_lasso")
@dataclass(frozen=True)
class GroupLasso(Regularizer):
    r"""Group lasso: R(w) = a·Σ_g c_g·‖w_g‖₂, with a = ``strength``.

    ``groups`` says what a group is (:mod:`paramreg.catalogue.groups`): ``"out"`` (default; rows, output
    units, conv filters), ``"in"`` (columns, input features or channels), ``"kernel"`` or an int
    dim. c_g = sqrt(group size) when ``weighted=True``, else 1.

    Proximal map (block soft-thresholding; whole groups become exact zeros)::

        prox_{tR}(w)_g = w_g·max(1 − t·a·c_g / ‖w_g‖₂, 0)

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])   # row norms 5 and 0.5
        >>> paramreg.GroupLasso(1.0).prox(w, t=1.0)
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])

    Reference: Yuan & Lin (2006), "Model selection and estimation in regression with grouped
    variables"; scikit-learn's ``MultiTaskLasso`` is ``GroupLasso(alpha, groups="in")`` on the
    loss (1/(2n))‖Y − XWᵀ‖²_F.
    """

    strength: float
    groups: str | int = "out"
    weighted: bool = False
    strengths = ("strength",)
    adaptive = True

    def __post_init__(self):
        object.__setattr__(self, "strength", check_strength("GroupLasso strength", self.strength))
        check_groups_option("GroupLasso", self.groups)
        _check_bool("GroupLasso weighted", self.weighted)

    def check(self, shape):
        return check_groups(self.groups, shape)

    def split(self, ndim):
        return "rows" if 0 in kept_dims(self.groups, ndim) else None

    def _c(self, w: Tensor) -> float:
        return math.sqrt(group_size(self.groups, tuple(w.shape))) if self.weighted else 1.0

    def penalty(self, w: Tensor) -> Tensor:
        return self.strength * self._c(w) * group_norms(w, self.groups).sum()

    def prox(self, w: Tensor, t: float) -> Tensor:
        if float(t) * self.strength == 0.0:
            return w.clone()
        return w * _group_scale(w, self.groups, float(t) * self.strength * self._c(w))

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        if float(t) * self.strength == 0.0:
            return
        for w in tensors:
            w.mul_(_group_scale(w, self.groups, float(t) * self.strength * self._c(w)))

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        """The group lasso map in the metric diag(1/t): no closed form; see :func:`_group_shrink_diag`."""
        if self.strength == 0.0:
            return w.clone()
        return _group_shrink_diag(w, t, self.groups, self.strength * self._c(w))

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        if self.strength != 0.0:
            _diag_rows_together_(tensors, inverse_steps, self.split, self._shrink_)

    def _shrink_(self, w: Tensor, u: Tensor) -> None:
        group_shrink_diag_(w, u, self.groups, self.strength * self._c(w))

    def critical(self, tensors: Sequence[Tensor], inverse_steps: Sequence) -> list[Tensor]:
        """‖w_g / t_g‖₂ / c_g per group: the prox zeroes group g exactly when the strength is at least that."""
        return [group_norms(w * u, self.groups, dtype=accurate_dtype(w)) / self._c(w) for w, u in zip(tensors, inverse_steps, strict=True)]


@register("sparse_group_lasso")
@dataclass(frozen=True)
class SparseGroupLasso(Regularizer):
    r"""Sparse group lasso: R(w) = a·Σ abs(w) + b·Σ_g c_g·‖w_g‖₂, with a = ``l1``, b = ``group``.

    Its proximal map is exact in closed form (soft-threshold, then block soft-threshold)::

        prox_{tR}(w)_g = s_g·max(1 − t·b·c_g / ‖s_g‖₂, 0),   s = sign(w)·max(abs(w) − t·a, 0)

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([[3.5, 4.5, 0.2], [0.3, 0.4, 0.1]])
        >>> paramreg.SparseGroupLasso(l1=0.5, group=1.0).prox(w, t=1.0)
        tensor([[2.4000, 3.2000, 0.0000],
                [0.0000, 0.0000, 0.0000]])

    Reference: Simon, Friedman, Hastie & Tibshirani (2013), "A sparse-group lasso".
    """

    l1: float
    group: float
    groups: str | int = "out"
    weighted: bool = False
    strengths = ("l1", "group")
    adaptive = True

    def __post_init__(self):
        object.__setattr__(self, "l1", check_strength("SparseGroupLasso l1", self.l1))
        object.__setattr__(self, "group", check_strength("SparseGroupLasso group", self.group))
        check_groups_option("SparseGroupLasso", self.groups)
        _check_bool("SparseGroupLasso weighted", self.weighted)

    def _group_lasso(self) -> GroupLasso:
        return GroupLasso(self.group, self.groups, self.weighted)

    def check(self, shape):
        return check_groups(self.groups, shape)

    def split(self, ndim):
        return "rows" if 0 in kept_dims(self.groups, ndim) else None

    def penalty(self, w: Tensor) -> Tensor:
        return self.l1 * w.abs().sum() + self._group_lasso().penalty(w)

    def prox(self, w: Tensor, t: float) -> Tensor:
        shrunk = F.softshrink(w, float(t) * self.l1) if float(t) * self.l1 else w
        return self._group_lasso().prox(shrunk, t)

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        soft_threshold_(tensors, float(t) * self.l1)
        self._group_lasso().prox_(tensors, t)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        # The composition holds in a diagonal metric too: the optimality conditions split the
        # same way coordinate by coordinate.
        return self._group_lasso().prox_diag(L1(self.l1).prox_diag(w, t), t)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        if self.group != 0.0:
            _diag_rows_together_(tensors, inverse_steps, self.split, self._shrink_)
        elif self.l1 != 0.0:
            L1(self.l1).prox_diag_(tensors, inverse_steps)

    def _shrink_(self, w: Tensor, u: Tensor) -> None:
        group_shrink_diag_(w, u, self.groups, self.group * self._group_lasso()._c(w), l1=self.l1)


@register("nuclear_norm")
@dataclass(frozen=True)
class NuclearNorm(Regularizer):
    r"""Nuclear norm: R(w) = a·Σ_i σ_i(W), the singular values of W = w reshaped to (out, rest).

    A conv weight (out, in, kh, kw) is taken as the (out, in·kh·kw) matrix. Proximal map
    (singular value soft-thresholding; small singular values become exact zeros, so the rank
    drops)::

        prox_{tR}(W) = U·diag(max(σ − t·a, 0))·Vᵀ,   W = U·diag(σ)·Vᵀ

    An SVD per step is costly: with ``every=k`` the optimizer hook applies it once every k steps,
    with step k·t (a lazy proximal step; ``prox`` itself always applies once).

    Example:
        >>> import torch, paramreg
        >>> w = torch.diag(torch.tensor([3.0, 0.5]))
        >>> paramreg.NuclearNorm(1.0).prox(w, t=1.0)
        tensor([[2., 0.],
                [0., 0.]])

    Reference: Cai, Candès & Shen (2010), "A singular value thresholding algorithm for matrix
    completion".
    """

    strength: float
    every: int = 1
    strengths = ("strength",)

    def __post_init__(self):
        object.__setattr__(self, "strength", check_strength("NuclearNorm strength", self.strength))
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ParamregError(f"NuclearNorm every must be an int >= 1, got {self.every!r}")

    def check(self, shape):
        return None if len(shape) >= 2 else "NuclearNorm needs a tensor with at least 2 dims (a matrix)"

    def penalty(self, w: Tensor) -> Tensor:
        matrix = w.reshape(w.shape[0], -1)
        dtype = accurate_dtype(w)
        singular = torch.linalg.svdvals(matrix if dtype is None else matrix.to(dtype))
        return (self.strength * singular.sum()).to(w.dtype)

    def prox(self, w: Tensor, t: float) -> Tensor:
        if float(t) * self.strength == 0.0:
            return w.clone()
        matrix = w.reshape(w.shape[0], -1)
        dtype = accurate_dtype(w)
        u, s, vh = torch.linalg.svd(matrix if dtype is None else matrix.to(dtype), full_matrices=False)
        s = (s - float(t) * self.strength).clamp_(min=0)
        return ((u * s) @ vh).reshape(w.shape).to(w.dtype)

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        if self.strength == 0.0:
            return
        for w in tensors:
            w.copy_(self.prox(w, t))
