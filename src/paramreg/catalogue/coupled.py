"""Coupled group lasso: one group per channel, spanning every tensor that produces that channel.

A conv filter alone is not a removable unit: its bias, the BatchNorm scale and shift after it and,
behind a residual connection, the partner layer's filter all produce the same channel. The group
of channel k here is the concatenation of row k of every member tensor (dim 0: a conv filter, a
``Linear`` row, a bias entry, a BatchNorm weight or bias entry). When the prox zeroes that group,
the channel's output is exactly 0, which is what :func:`paramreg.shrink` can delete.

Which tensors are coupled is found from the model's graph (:func:`paramreg.attach_channels`); this
module is pure tensor code and identifies its members by shape, never by object identity, so a
deep copy or a spec rebuilt on a fresh model works the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ParamregError
from .base import Regularizer, check_strength
from .structured import group_shrink_diag_

__all__ = ["CoupledGroupLasso"]


def _rows(w: Tensor, dtype) -> Tensor:
    """‖w_k‖² for every row k (dim 0) of w, in ``dtype``."""
    return w.reshape(w.shape[0], -1).to(dtype).pow(2).sum(1)


@dataclass(frozen=True)
class CoupledGroupLasso(Regularizer):
    r"""Group lasso over channels coupled across tensors: R = a·Σ_k ‖(m_k)_m‖₂, with a = ``strength``.

    For members m (tensors whose dim 0 has ``channels`` entries), the group of channel k is the
    concatenation of the rows m_k of every member, with norm n_k = sqrt(Σ_m ‖m_k‖²). Proximal map
    over all members at once (block soft-thresholding, every member scaled by the same factor)::

        prox_{tR}(m)_k = m_k·max(1 − t·a / n_k, 0)

    so a channel becomes exactly zero in all members together. In an optimizer's diagonal metric
    (``step="auto"`` under Adam and the other adaptive optimizers, as for :class:`GroupLasso`),
    the map is the group lasso's in that metric over the concatenated rows
    (:meth:`prox_diag_`), so ``attach_channels`` and ``group_lasso`` take strengths in the same
    units under the same optimizer. Built by
    :func:`paramreg.attach_channels`; ``members`` are the canonical names (for specs and
    messages) and ``shapes`` their shapes. ``prox_`` must receive all members in one call, so they
    must sit in one optimizer parameter group (one learning rate); it raises otherwise.

    ``penalty(w)`` and ``prox(w, t)`` of a single tensor treat it as the only member (the group
    lasso of its rows); the coupled penalty of all members is :meth:`joint_penalty`, which is at
    most the sum of the members' single values.

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([[3.0, 0.0], [0.3, 0.0]])    # a filter per row
        >>> gamma = torch.tensor([4.0, 0.4])              # BatchNorm scale, one entry per row
        >>> reg = paramreg.CoupledGroupLasso(1.0, channels=2, members=("conv.weight", "bn.weight"), shapes=((2, 2), (2,)))
        >>> reg.joint_penalty([w, gamma])                 # sqrt(9 + 16) + sqrt(0.09 + 0.16)
        tensor(5.5000)
        >>> reg.prox_([w, gamma], t=1.0); w, gamma        # channel 0 scaled by 1 − 1/5, channel 1 zeroed
        (tensor([[2.4000, 0.0000],
                [0.0000, 0.0000]]), tensor([3.2000, 0.0000]))

    Reference: Yuan & Lin (2006), group lasso; Fang et al. (2023), "DepGraph: Towards Any
    Structural Pruning" (the coupled groups).
    """

    strength: float
    channels: int
    members: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    adaptive = True
    joint = True
    unit = "channels"  # what one group of the map is (a sparsity target counts them)
    strengths = ("strength",)

    def __post_init__(self):
        object.__setattr__(self, "strength", check_strength("CoupledGroupLasso strength", self.strength))
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ParamregError(f"CoupledGroupLasso channels must be an int >= 1, got {self.channels!r}")
        members = tuple(self.members)
        if not all(isinstance(m, str) for m in members):
            raise ParamregError(f"CoupledGroupLasso members are canonical parameter names (str), got {self.members!r}")
        try:
            shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        except TypeError:
            raise ParamregError(f"CoupledGroupLasso shapes must be a tuple of shapes, got {self.shapes!r}") from None
        if shapes and len(shapes) != len(members):
            raise ParamregError(f"CoupledGroupLasso has {len(members)} members but {len(shapes)} shapes")
        bad = [s for s in shapes if not s or s[0] != self.channels]
        if bad:
            raise ParamregError(f"CoupledGroupLasso members need dim 0 of size channels={self.channels}, got shapes {bad}")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "shapes", shapes)

    def check(self, shape):
        if not shape or shape[0] != self.channels:
            return f"CoupledGroupLasso needs dim 0 of size {self.channels} (one entry per channel)"
        if self.shapes and tuple(shape) not in self.shapes:
            return f"CoupledGroupLasso was built for members of shapes {list(self.shapes)}"
        return None

    def penalty(self, w: Tensor) -> Tensor:
        return self.strength * torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).sum()

    def joint_penalty(self, tensors: Sequence[Tensor]) -> Tensor:
        """a·Σ_k sqrt(Σ_m ‖m_k‖²) over all members."""
        squares = sum(w.reshape(w.shape[0], -1).pow(2).sum(1) for w in tensors)
        return self.strength * squares.sqrt().sum()

    def _scale(self, tensors: Sequence[Tensor], threshold: float) -> Tensor:
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in tensors) else torch.float32
        norms = sum(_rows(w, dtype) for w in tensors).sqrt()
        return (1 - threshold / norms).clamp_(min=0)  # a zero channel stays zero: 1 − c/0 = −inf → 0

    def prox(self, w: Tensor, t: float) -> Tensor:
        if float(t) * self.strength == 0.0:
            return w.clone()
        scale = self._scale([w], float(t) * self.strength)
        return w * scale.view(-1, *[1] * (w.dim() - 1)).to(w.dtype)

    def _check_members(self, tensors: list[Tensor]) -> None:
        got, want = sorted(tuple(w.shape) for w in tensors), sorted(self.shapes)
        if self.shapes and got != want:
            raise ParamregError(
                f"CoupledGroupLasso over {', '.join(self.members)} received tensors of shapes {got} in one step, "
                f"expected all {len(want)} members {want}: put every member in one optimizer parameter group "
                f"(one learning rate) and do not freeze some of them"
            )

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        tensors = list(tensors)
        self._check_members(tensors)
        threshold = float(t) * self.strength
        if threshold == 0.0:
            return
        scale = self._scale(tensors, threshold)
        for w in tensors:
            w.mul_(scale.view(-1, *[1] * (w.dim() - 1)).to(w.dtype))

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        """The group lasso map in the metric diag(u), u = ``inverse_steps``, over channels: row k of
        every member concatenated is one group (:func:`paramreg.catalogue.structured.group_shrink_diag_`)."""
        tensors = list(tensors)
        self._check_members(tensors)
        if self.strength == 0.0:
            return
        rows = torch.cat([w.reshape(self.channels, -1) for w in tensors], dim=1)
        inverse = torch.cat([u.reshape(self.channels, -1) for u in inverse_steps], dim=1)
        group_shrink_diag_(rows, inverse, "out", self.strength)
        for w, part in zip(tensors, rows.split([w[0].numel() if w.dim() > 1 else 1 for w in tensors], dim=1), strict=True):
            w.copy_(part.reshape(w.shape))

    def critical(self, tensors: Sequence[Tensor], inverse_steps: Sequence) -> list[Tensor]:
        """sqrt(Σ_m ‖m_k / t_k‖²) per channel k: the prox zeroes the channel in every member exactly
        when the strength is at least that."""
        tensors = list(tensors)
        self._check_members(tensors)
        dtype = torch.float64 if any(w.dtype == torch.float64 for w in tensors) else torch.float32
        return [sum(_rows(w * u, dtype) for w, u in zip(tensors, inverse_steps, strict=True)).sqrt()]
