"""Plain models: a folded copy for export, and the check that nothing parametrizes a model any more.

:func:`folded` is ``remove`` on a deep copy, so the training model stays attached;
:func:`check_plain` is the guard before an export that paramreg does not see itself
(Note [Export guard] in modules/export_guard.py) or a pickle.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

from ..errors import ParamregError
from ..lifecycle.removing import remove
from ..modules.carrier import Carrier
from ..modules.walk import slots

__all__ = ["folded", "check_plain"]


def folded(model: nn.Module, *, allow_nonfinite: bool = False) -> nn.Module:
    """A deep copy of ``model`` with paramreg's carriers removed; ``model`` keeps them.

    For exporting or evaluating in the middle of training. Costs one copy of the weights. Like
    :func:`paramreg.remove`, it refuses tensors holding NaN or Inf unless ``allow_nonfinite=True``.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Linear(3, 2)
        >>> _ = paramreg.attach(model, "weight", l1=1e-4)
        >>> plain = paramreg.folded(model)
        >>> type(plain).__name__, type(model).__name__
        ('Linear', 'ParametrizedLinear')
    """
    if not isinstance(model, nn.Module):
        raise ParamregError(f"folded: model must be a torch.nn.Module, got {type(model).__name__}")
    return remove(copy.deepcopy(model), allow_nonfinite=allow_nonfinite)


def check_plain(model: nn.Module) -> nn.Module:
    """Raise :class:`ParamregError` unless ``model`` has no parametrization left; return ``model``.

    Call it before exporting or pickling a model with ``torch.save(model)``. paramreg refuses most
    exports of an attached model by itself, but not ``torch.export.export(..., strict=True)``, which
    would store each carried tensor twice (Note [Export guard] in modules/export_guard.py), nor a pickle.
    The message names every parameter still attached and how to fix it.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Linear(3, 2)
        >>> _ = paramreg.attach(model, "weight", l1=1e-4)
        >>> paramreg.check_plain(model)
        Traceback (most recent call last):
        ...
        paramreg.errors.ParamregError: Linear is not a plain model: paramreg is attached to 'weight'; call paramreg.remove(model) first, or export paramreg.folded(model)
    """
    everything = slots(model)
    ours = [s.name for s in everything if s.carrier is not None]
    theirs = [s.name for s in everything if s.plist is not None and any(not isinstance(m, Carrier) for m in s.plist)]
    problems = []
    if ours:
        problems.append(
            f"paramreg is attached to {_names(ours)}; call paramreg.remove(model) first, or export paramreg.folded(model)"
        )
    if theirs:
        problems.append(
            f"{_names(theirs)} still carry parametrizations of your own; fold them with "
            f"torch.nn.utils.parametrize.remove_parametrizations(module, name, leave_parametrized=True)"
        )
    if problems:
        raise ParamregError(f"{parametrize.type_before_parametrizations(model).__name__} is not a plain model: " + "; ".join(problems))
    return model


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
