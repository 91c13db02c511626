"""Constraints: Euclidean projections onto a set C, applied after each optimizer step.

As regularizers, a constraint's penalty is the indicator of C (0 on C, +inf outside) and its
proximal map, for any step t, is the projection onto C. They act with ``mode="prox"`` only.
Norm constraints count a group within a relative tolerance of a few roundings of the tensor's
dtype as feasible and leave it bit for bit, so that projecting twice changes nothing.
``TopK``, ``NM`` and ``UnitNorm`` project onto non-convex sets: the projection is a nearest point
(which of equal magnitudes is kept is unspecified), not a non-expansive map.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ParamregError
from .groups import accurate_dtype, check_groups, check_groups_option, group_norms
from .base import Regularizer, register

__all__ = ["NonNegative", "Box", "MaxNorm", "UnitNorm", "TopK", "NM", "KeepZeros"]

_INF = float("inf")


def _tolerance(w: Tensor) -> float:
    """Relative slack for feasibility checks of norms: a few roundings of w's dtype."""
    return max(1e-6, 8 * torch.finfo(w.dtype).eps) if w.is_floating_point() else 1e-6


def _indicator(feasible: bool, w: Tensor) -> Tensor:
    return torch.tensor(0.0 if feasible else _INF, dtype=w.dtype if w.is_floating_point() else None, device=w.device)


class Constraint(Regularizer):
    """Base for projections: ``penalty`` is the indicator of the set, ``prox`` ignores t."""

    kind = "constraint"

    def feasible(self, w: Tensor) -> bool:
        raise NotImplementedError

    def penalty(self, w: Tensor) -> Tensor:
        return _indicator(self.feasible(w), w)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        # For a set that is a product of intervals (``adaptive = True``), the projection in any
        # diagonal metric is the Euclidean one.
        return self.prox(w, 0.0)


@register("non_negative")
@dataclass(frozen=True)
class NonNegative(Constraint):
    """C = {w : w >= 0}; projection max(w, 0). Keras ``NonNeg``.

    Example:
        >>> import torch, paramreg
        >>> paramreg.NonNegative().prox(torch.tensor([-1.0, 2.0]), t=1.0)
        tensor([0., 2.])
    """

    adaptive = True

    def feasible(self, w):
        return bool((w >= 0).all())

    def prox(self, w, t):
        return w.clamp(min=0)

    def prox_(self, tensors, t):
        torch._foreach_clamp_min_(list(tensors), 0.0)


@register("box")
@dataclass(frozen=True)
class Box(Constraint):
    """C = {w : lo <= w <= hi}; projection min(max(w, lo), hi).

    Example:
        >>> import torch, paramreg
        >>> paramreg.Box(-0.5, 1.0).prox(torch.tensor([-1.0, 0.2, 3.0]), t=1.0)
        tensor([-0.5000,  0.2000,  1.0000])
    """

    adaptive = True
    lo: float
    hi: float

    def __post_init__(self):
        for label, v in (("lo", self.lo), ("hi", self.hi)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
                raise ParamregError(f"Box {label} must be a number, got {v!r}")
        if not self.lo <= self.hi:
            raise ParamregError(f"Box needs lo <= hi, got lo={self.lo!r}, hi={self.hi!r}")
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))

    def feasible(self, w):
        return bool(((w >= self.lo) & (w <= self.hi)).all())

    def prox(self, w, t):
        return w.clamp(self.lo, self.hi)

    def prox_(self, tensors, t):
        for w in tensors:
            w.clamp_(self.lo, self.hi)


def _positive(label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ParamregError(f"{label} must be a finite number > 0, got {value!r}")
    return float(value)


class _GroupScaling(Constraint):
    """A projection that multiplies each group (``self.groups``) by a factor from ``_scale``."""

    def check(self, shape):
        return check_groups(self.groups, shape)

    def _scale(self, w: Tensor) -> Tensor:
        raise NotImplementedError

    def prox(self, w, t):
        return w * self._scale(w)

    def prox_(self, tensors, t):
        for w in tensors:
            w.mul_(self._scale(w))


@register("max_norm")
@dataclass(frozen=True)
class MaxNorm(_GroupScaling):
    """C = {w : ‖w_g‖₂ <= c for every group}; projection w_g·min(1, c/‖w_g‖₂). Keras ``MaxNorm``.

    ``groups="out"`` (default) bounds each output unit's incoming weights, as Keras ``MaxNorm``
    does on a Dense kernel with ``axis=0``; see :mod:`paramreg.catalogue.groups` for the other groupings.

    Example:
        >>> import torch, paramreg
        >>> paramreg.MaxNorm(1.0).prox(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), t=1.0)
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """

    max_value: float
    groups: str | int = "out"

    def __post_init__(self):
        object.__setattr__(self, "max_value", _positive("MaxNorm max_value", self.max_value))
        check_groups_option("MaxNorm", self.groups)

    def _scale(self, w):
        # groups feasible within the tolerance are left bit for bit, so projecting twice changes nothing
        norms = group_norms(w, self.groups, dtype=accurate_dtype(w))
        inside = norms <= self.max_value * (1 + _tolerance(w))
        return torch.where(inside, torch.ones_like(norms), self.max_value / norms).to(w.dtype)

    def feasible(self, w):
        return bool((group_norms(w, self.groups, dtype=torch.float64) <= self.max_value * (1 + _tolerance(w))).all())


@register("unit_norm")
@dataclass(frozen=True)
class UnitNorm(_GroupScaling):
    """C = {w : ‖w_g‖₂ = 1 for every group}; projection w_g/‖w_g‖₂ (a zero group stays zero). Keras ``UnitNorm``.

    Non-convex (a sphere): the projection is the nearest point, not a non-expansive map.

    Example:
        >>> import torch, paramreg
        >>> paramreg.UnitNorm().prox(torch.tensor([[3.0, 4.0]]), t=1.0)
        tensor([[0.6000, 0.8000]])
    """

    groups: str | int = "out"
    convex = False

    def __post_init__(self):
        check_groups_option("UnitNorm", self.groups)

    def _scale(self, w):
        # groups already of unit norm within the tolerance (and zero groups) are left bit for bit
        norms = group_norms(w, self.groups, dtype=accurate_dtype(w))
        keep = ((norms - 1).abs() <= _tolerance(w)) | (norms == 0)
        return torch.where(keep, torch.ones_like(norms), 1 / norms).to(w.dtype)

    def feasible(self, w):
        return bool(((group_norms(w, self.groups, dtype=torch.float64) - 1).abs() <= _tolerance(w)).all())


@register("top_k")
@dataclass(frozen=True)
class TopK(Constraint):
    """C = {w : at most k non-zeros}; projection: keep the k largest abs(w), zero the rest.

    ``k`` is a count (int) or a fraction of the tensor's size (float in (0, 1]: k = fraction·numel
    rounded half up, at least 1). After the projection the tensor has exactly numel − k zeros
    (more only if kept entries were zero). Non-convex: the projection is a nearest point (among
    equal magnitudes, which are kept is unspecified), not a non-expansive map.

    Example:
        >>> import torch, paramreg
        >>> paramreg.TopK(2).prox(torch.tensor([0.5, -3.0, 1.0, 0.1]), t=1.0)
        tensor([ 0., -3.,  1.,  0.])
    """

    k: int | float
    convex = False

    def __post_init__(self):
        k = self.k
        if isinstance(k, bool) or not (
            (isinstance(k, int) and k >= 0) or (isinstance(k, float) and math.isfinite(k) and 0 < k <= 1)
        ):
            raise ParamregError(f"TopK k must be a count (int >= 0) or a fraction in (0, 1], got {k!r}")

    def kept(self, numel: int) -> int:
        return self.k if isinstance(self.k, int) else min(numel, max(1, math.floor(self.k * numel + 0.5)))

    def check(self, shape):
        numel = math.prod(shape)
        if isinstance(self.k, int) and self.k > numel:
            return f"TopK({self.k}) keeps more entries than the tensor has ({numel})"
        return None

    def feasible(self, w):
        return int((w != 0).sum()) <= self.kept(w.numel())

    def _mask(self, w):
        flat = w.detach().reshape(-1)
        mask = torch.zeros(flat.shape, dtype=torch.bool, device=w.device)
        mask[flat.abs().topk(self.kept(flat.numel()), sorted=False).indices] = True
        return mask.reshape(w.shape)

    def prox(self, w, t):
        return w.masked_fill(~self._mask(w), 0)

    def prox_(self, tensors, t):
        for w in tensors:
            w.masked_fill_(~self._mask(w), 0)


@register("nm")
@dataclass(frozen=True)
class NM(Constraint):
    """N:M structured sparsity: in every group of m consecutive entries along the input dim
    (dim 1), at most n are non-zero; the projection keeps the n largest abs(w) of each group.

    ``NM(2, 4)`` is the 2:4 pattern that sparse tensor cores run. Needs a tensor with >= 2 dims
    whose dim 1 is a multiple of m. Non-convex: the projection is the nearest point.

    Example:
        >>> import torch, paramreg
        >>> paramreg.NM(2, 4).prox(torch.tensor([[0.1, -2.0, 0.3, 1.0]]), t=1.0)
        tensor([[ 0., -2.,  0.,  1.]])
    """

    n: int
    m: int
    convex = False

    def __post_init__(self):
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m))
        if not ok or not 0 <= self.n <= self.m or self.m < 1:
            raise ParamregError(f"NM needs ints 0 <= n <= m, m >= 1, got n={self.n!r}, m={self.m!r}")

    def check(self, shape):
        if len(shape) < 2 or shape[1] % self.m:
            return f"NM({self.n}, {self.m}) needs a tensor with >= 2 dims whose dim 1 is a multiple of {self.m}"
        return None

    def _grouped(self, w):
        x = w.movedim(1, -1)
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.m, self.m)

    def feasible(self, w):
        return bool(((self._grouped(w) != 0).sum(-1) <= self.n).all())

    def _mask(self, w):
        grouped = self._grouped(w.detach()).abs()
        mask = torch.zeros(grouped.shape, dtype=torch.bool, device=w.device)
        mask.scatter_(-1, grouped.topk(self.n, dim=-1, sorted=False).indices, True)
        x_shape = w.movedim(1, -1).shape
        return mask.reshape(x_shape).movedim(-1, 1)

    def prox(self, w, t):
        return w.masked_fill(~self._mask(w), 0)

    def prox_(self, tensors, t):
        for w in tensors:
            w.masked_fill_(~self._mask(w), 0)


@register("keep_zeros")
@dataclass(frozen=True)
class KeepZeros(Constraint):
    """C = {w : w_i = 0 wherever the tensor was exactly zero when attached}; projection: zero those
    entries again, leave the rest.

    The last phase of the sparsity recipe: train with a target (``sparsity=``), then fine-tune with
    ``attach(model, targets, keep_zeros=True)``, so that the zeros stay while every other weight
    trains. Each tensor's zero set Z is taken when it is attached (:meth:`remember`) and again when
    a state_dict is loaded into the attached model (a resumed run takes the checkpoint's zeros).
    The pure map without a zero set (:meth:`prox`) projects onto Z = ∅, the identity;
    :meth:`project_` applies it with the remembered sets. ``remove`` leaves the zeros in the plain
    weights.

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([0.0, 2.0, 0.0, -1.0])
        >>> zeros = paramreg.KeepZeros().remember(w)
        >>> moved = w + 0.5                                   # an optimizer step
        >>> paramreg.KeepZeros().project_([moved], [zeros]); moved
        tensor([ 0.0000,  2.5000,  0.0000, -0.5000])
    """

    adaptive = True
    remembers = True

    def remember(self, w: Tensor) -> Tensor:
        """The zero set of ``w``: a bool tensor of its shape."""
        return w.detach() == 0

    def feasible(self, w):
        return True  # feasibility is relative to the remembered zero set, which project_ restores

    def prox(self, w, t):
        return w.clone()

    def prox_(self, tensors, t):
        pass  # Z = ∅ without a remembered zero set

    def project_(self, tensors, zeros) -> None:
        """In place: every tensor's remembered zeros set to zero again."""
        for w, z in zip(tensors, zeros, strict=True):
            w.masked_fill_(z, 0)
