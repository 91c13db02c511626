"""Groupings: how a tensor is split into the groups that structured regularizers act on.

A grouping names the dimensions a group keeps; a group is every element that shares one index on
those dimensions, and the group's norm reduces over all the other dimensions:

============  ===========  ======================================================  ==============
``groups``    keeps dims   for ``Linear.weight`` (out, in) / ``Conv2d.weight``      needs
                           (out, in, kh, kw)
============  ===========  ======================================================  ==============
``"out"``     0            a row: one output unit / one filter                      >= 1 dim
``"in"``      1            a column: one input feature / one input channel          >= 2 dims
``"kernel"``  0, 1         one kh x kw kernel                                       >= 3 dims
``d`` (int)   d            every slice ``w.select(d, i)``                           > d dims
============  ===========  ======================================================  ==============

Removing a group of ``"out"`` removes a neuron or a conv filter; a group of ``"in"`` an input
feature or channel. Pure tensor code: nothing here knows about modules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ParamregError

__all__ = ["kept_dims", "reduced_dims", "group_norms", "group_size", "check_groups", "check_groups_option", "accurate_dtype"]

NAMED = {"out": (0,), "in": (1,), "kernel": (0, 1)}


def kept_dims(groups, ndim: int) -> tuple[int, ...]:
    """The dimensions a group keeps (see the table above)."""
    if isinstance(groups, str):
        return NAMED[groups]
    return (groups % ndim,) if ndim else (groups,)


def check_groups(groups, shape: tuple[int, ...]) -> str | None:
    """Why ``shape`` cannot be grouped as ``groups`` asks, or None."""
    if isinstance(groups, bool) or not (isinstance(groups, int) or groups in NAMED):
        return f"groups must be 'out', 'in', 'kernel' or a dim (int), got {groups!r}"
    ndim = len(shape)
    if isinstance(groups, str):
        need = {"out": 1, "in": 2, "kernel": 3}[groups]
        if ndim < need:
            return f"groups={groups!r} needs a tensor with at least {need} dims"
    elif not -ndim <= groups < ndim:
        return f"groups={groups} needs a tensor with more than {groups if groups >= 0 else -groups - 1} dims"
    return None


def reduced_dims(groups, ndim: int) -> tuple[int, ...]:
    keep = kept_dims(groups, ndim)
    return tuple(d for d in range(ndim) if d not in keep)


def group_size(groups, shape: tuple[int, ...]) -> int:
    """Number of elements in one group."""
    return math.prod(shape[d] for d in reduced_dims(groups, len(shape)))


def group_norms(w: Tensor, groups, dtype=None) -> Tensor:
    """‖w_g‖₂ for every group, shaped to broadcast against ``w`` (reduced dims kept as size 1)."""
    dims = reduced_dims(groups, w.dim())
    if not dims:
        return w.abs() if dtype is None else w.abs().to(dtype)
    return torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=dtype)


def check_groups_option(label: str, groups) -> None:
    if isinstance(groups, bool) or not (isinstance(groups, int) or groups in NAMED):
        raise ParamregError(f"{label} groups must be 'out', 'in', 'kernel' or a dim (int), got {groups!r}")


def accurate_dtype(w: Tensor):
    """The dtype to compute norms and factorizations in: float32 for half precision."""
    return torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else None
