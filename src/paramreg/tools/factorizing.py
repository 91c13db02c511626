"""Low-rank layers made physically smaller: a Linear or conv of rank r becomes two thin layers."""

from __future__ import annotations

import copy
import math
import numbers
import warnings

import torch
from torch import Tensor, nn

from .folding import check_plain
from ..errors import ParamregError
from ..modules.selection import resolve

__all__ = ["factorize"]


def _rank(s: Tensor, shape: tuple[int, int], dtype: torch.dtype, rank, tol) -> int:
    """The rank to keep, from the singular values ``s`` (descending) of an (out, in) matrix."""
    if rank is not None:
        return rank
    if tol is not None:  # smallest r with ‖W − W_r‖_F / ‖W‖_F <= tol
        total = float(s.pow(2).sum())
        if total == 0.0:
            return 1
        tail = s.pow(2).flip(0).cumsum(0).flip(0)  # tail[r] = Σ_{i >= r} σ_i²
        tail = torch.cat([tail, tail.new_zeros(1)])
        return max(1, next(r for r in range(len(tail)) if math.sqrt(float(tail[r]) / total) <= tol))
    # numerical rank, as torch.linalg.matrix_rank: σ > σ_max·max(out, in)·eps(dtype)
    cutoff = float(s[0]) * max(shape) * torch.finfo(dtype).eps if len(s) else 0.0
    return max(1, int((s > cutoff).sum()))


def _two_layers(module: nn.Module, r: int) -> nn.Sequential:
    """Sequential(first, second) computing ``module`` with its weight truncated to rank r."""
    w = module.weight.detach()
    matrix = w.reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    left = (u[:, :r] * root).to(w.dtype)  # (out, r)
    right = (root[:, None] * vh[:r]).to(w.dtype)  # (r, in·k)
    bias = module.bias is not None
    kw = {"device": w.device, "dtype": w.dtype}
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, r, bias=False, **kw)
        second = nn.Linear(r, module.out_features, bias=bias, **kw)
        first.weight.data.copy_(right)
        second.weight.data.copy_(left)
    else:
        first = nn.Conv2d(
            module.in_channels, r, module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, bias=False, padding_mode=module.padding_mode, **kw,
        )
        second = nn.Conv2d(r, module.out_channels, 1, bias=bias, **kw)
        first.weight.data.copy_(right.reshape(r, *w.shape[1:]))
        second.weight.data.copy_(left.reshape(*left.shape, 1, 1))
    if bias:
        second.bias.data.copy_(module.bias.detach())
    return nn.Sequential(first, second)


def factorize(model: nn.Module, targets, *, rank: int | None = None, tol: float | None = None) -> nn.Module:
    r"""A copy of a plain model whose selected low-rank layers are each replaced by two thin layers.

    For a selected ``Linear`` weight W (out × in), or a ``Conv2d`` weight taken as the matrix
    (out × in·kh·kw), the SVD W = U·diag(σ)·Vᵀ truncated to rank r gives W_r = A·B with
    A = U_r·diag(σ_r)^½ and B = diag(σ_r)^½·V_rᵀ. The layer becomes
    ``Sequential(Linear(in, r, bias=False), Linear(r, out))`` (weights B, A), or for a conv
    ``Sequential(Conv2d(in, r, (kh, kw), same stride/padding/dilation, bias=False), Conv2d(r, out, 1))``;
    the bias stays on the second layer. The output changes by x ↦ (W − W_r)·x only.

    ``targets`` selects weights by name, as in :func:`paramreg.attach`. The rank r is ``rank``,
    or the smallest r with ‖W − W_r‖_F ≤ ``tol``·‖W‖_F, or by default the numerical rank
    (σ > σ_max·max(out, in)·eps, as ``torch.linalg.matrix_rank``), which is exact for a weight
    that :class:`paramreg.NuclearNorm`'s prox left low-rank. A layer is replaced only if
    r·(in·kh·kw + out) < out·in·kh·kw (fewer parameters); otherwise it stays, and a warning
    names it. ``model`` is not changed.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.randn(64, 2) @ torch.randn(2, 64))   # rank 2
        >>> small = paramreg.factorize(model, "0.weight")
        >>> small[0]
        Sequential(
          (0): Linear(in_features=64, out_features=2, bias=False)
          (1): Linear(in_features=2, out_features=64, bias=True)
        )
    """
    if not isinstance(model, nn.Module):
        raise ParamregError(f"factorize: model must be a torch.nn.Module, got {type(model).__name__}")
    where = f"factorize({targets!r})"
    if rank is not None and tol is not None:
        raise ParamregError(f"{where}: give rank= or tol=, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ParamregError(f"{where}: rank must be an int >= 1, got {rank!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < 1):
        raise ParamregError(f"{where}: tol must be a number in [0, 1), got {tol!r}")
    check_plain(model)
    chosen = resolve(model, targets)
    problems = []
    for s in chosen:
        m = s.module
        if s.tensor_name != "weight" or not isinstance(m, (nn.Linear, nn.Conv2d)):
            problems.append(f"{s.describe()} is not the weight of a Linear or Conv2d layer")
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            problems.append(f"{s.describe()} belongs to a grouped conv (groups={m.groups}); only groups=1 can be factorized")
        elif isinstance(m, nn.Conv2d) and isinstance(m.padding, str) and m.padding == "same" and m.stride != (1, 1):
            problems.append(f"{s.describe()}: padding='same' with a stride is not supported")
        elif rank is not None and rank > min(m.weight.shape[0], m.weight[0].numel()):
            problems.append(f"{s.describe()}: rank={rank} exceeds the matrix's smaller side {min(m.weight.shape[0], m.weight[0].numel())}")
        elif not bool(torch.isfinite(m.weight).all()):
            problems.append(f"{s.describe()} holds NaN or Inf")
    if problems:
        raise ParamregError(f"{where}: {len(problems)} selected tensor(s) cannot be factorized:\n  " + "\n  ".join(problems))
    small = copy.deepcopy(model)
    kept = []
    for s in chosen:
        layer = s.name.rsplit(".", 1)[0] if "." in s.name else ""
        m = small.get_submodule(layer)
        w = m.weight.detach()
        out, rest = w.shape[0], w[0].numel()
        sv = torch.linalg.svdvals(w.reshape(out, rest).double())
        r = _rank(sv, (out, rest), w.dtype, rank, tol)
        if r * (rest + out) >= out * rest:
            kept.append(f"'{layer}' (rank {r} of {min(out, rest)})")
            continue
        replacement = _two_layers(m, r)
        if layer == "":
            raise ParamregError(f"{where}: the model itself is the layer; wrap it in a module (nn.Sequential) to factorize it")
        parent_name, _, child = layer.rpartition(".")
        setattr(small.get_submodule(parent_name), child, replacement)
    if kept:
        warnings.warn(f"factorize: {', '.join(kept)} left as they are: two layers of that rank would not have fewer parameters", stacklevel=2)
    return small
