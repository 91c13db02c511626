"""Reparametrizations: regularizers that act in the forward pass, not after the step.

Only for explicit reparametrizations: a soft-threshold in the forward pass has gradient zero where
abs(w) is below the threshold, so those weights stop learning (on a small lasso with init std
0.01 and threshold 0.05 such a model learned nothing); for exact zeros from L1 use ``L1`` (a
proximal step) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ParamregError
from .base import Regularizer, check_strength, register

__all__ = ["SoftThreshold"]


class Shrink(nn.Module):
    """sign(w)·relu(abs(w) − abs(θ)) with θ a per-tensor threshold (a Parameter when learnable)."""

    def __init__(self, init: float, learnable: bool):
        super().__init__()
        tau = torch.tensor(float(init))
        if learnable:
            self.threshold = nn.Parameter(tau)
        else:
            self.register_buffer("threshold", tau)

    def forward(self, w: Tensor) -> Tensor:
        tau = self.threshold.abs().to(w.dtype)
        return torch.sign(w) * torch.relu(w.abs() - tau)


@register("soft_threshold")
@dataclass(frozen=True)
class SoftThreshold(Regularizer):
    r"""Soft threshold in the forward pass (STR, Kusupati et al. 2020): the module computes with

        w_eff = sign(w)·max(abs(w) − τ, 0),   τ = abs(θ), θ initialized to ``init``

    where θ is one learnable scalar per tensor (``learnable=True``: a Parameter your optimizer
    trains, so build the optimizer after attaching, or add it with ``optimizer.add_param_group``;
    ``False``: a fixed buffer). A learnable threshold must start above 0: at exactly 0 its
    gradient is 0 and it would never move. The stored weight w
    stays dense; ``paramreg.remove`` folds w_eff into it, so the plain model has the exact zeros.
    It has no penalty and nothing happens at step time (its prox is the identity).

    Example:
        >>> import torch, paramreg
        >>> layer = torch.nn.Linear(3, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.5, 0.05, -2.0]]))
        >>> _ = paramreg.attach(layer, "weight", soft_threshold=0.1)
        >>> layer.weight.detach()
        tensor([[ 0.4000,  0.0000, -1.9000]])
        >>> paramreg.remove(layer).weight.detach()
        tensor([[ 0.4000,  0.0000, -1.9000]])

    Reference: Kusupati et al. (2020), "Soft Threshold Weight Reparameterization for Learnable
    Sparsity".
    """

    init: float
    learnable: bool = True
    kind = "reparametrization"

    def __post_init__(self):
        object.__setattr__(self, "init", check_strength("SoftThreshold init", self.init))
        if not isinstance(self.learnable, bool):
            raise ParamregError(f"SoftThreshold learnable must be True or False, got {self.learnable!r}")
        if self.learnable and self.init == 0.0:
            raise ParamregError("SoftThreshold(init=0, learnable=True) would never learn: its gradient is 0 at 0; start above 0")

    def transform(self) -> nn.Module:
        """The module the carrier applies in the forward pass."""
        return Shrink(self.init, self.learnable)

    def penalty(self, w: Tensor) -> Tensor:
        return torch.zeros((), dtype=w.dtype, device=w.device)

    def prox(self, w: Tensor, t: float) -> Tensor:
        return w.clone()

    def prox_(self, tensors, t) -> None:
        return None
