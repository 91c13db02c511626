"""``remove``: detach paramreg, folding what it carried; the model is plain again.

``remove`` deletes exactly what ``attach`` added (modules/binding.py): the user's own
parametrizations, every Parameter object, the classes, the state_dict keys and the parameter
order are as they were.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ParamregError
from ..modules.binding import unbind
from ..modules.selection import resolve
from ..modules.walk import slots
from ..optim.state import forget_origins
from .attaching import MAX_LISTED

__all__ = ["remove"]


def remove(model: nn.Module, targets=None, *, allow_nonfinite: bool = False) -> nn.Module:
    """Fold and detach paramreg's carriers (all, or those whose canonical names ``targets`` selects).

    The model is then plain again: the original classes, plain state_dict keys, every Parameter
    the same object as before :func:`attach`, parameter order as it was, and outputs bitwise
    identical to those just before the call. Parametrizations the user registered themselves
    (``orthogonal``, ``weight_norm``, ...) stay. Calling it again is a no-op. Returns ``model``.

    A tensor holding NaN or Inf is not folded into a plain model silently: ``remove`` raises
    :class:`ParamregError` naming every such tensor and changes nothing, unless
    ``allow_nonfinite=True``.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Linear(3, 2)
        >>> weight = model.weight
        >>> _ = paramreg.attach(model, "*", l2=0.1)
        >>> paramreg.remove(model, "bias") is model
        True
        >>> [row.name for row in paramreg.report(model).rows]  # still attached
        ['weight']
        >>> _ = paramreg.remove(model)
        >>> list(model.state_dict()), model.weight is weight
        (['weight', 'bias'], True)
    """
    if not isinstance(model, nn.Module):
        raise ParamregError(f"remove: model must be a torch.nn.Module, got {type(model).__name__}")
    candidates = resolve(model, targets) if targets is not None else slots(model)
    attached = [s for s in candidates if s.carrier is not None]
    if not allow_nonfinite:
        with torch.no_grad():
            bad = [s.describe() for s in attached if not bool(torch.isfinite(s.effective()).all())]
        if bad:
            listed = ", ".join(bad[:MAX_LISTED]) + (f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
            raise ParamregError(
                f"{listed} hold NaN or Inf; training diverged? Nothing was removed. Restore a "
                f"checkpoint, or pass allow_nonfinite=True to fold them anyway"
            )
    forget_origins([s.param for s in attached if s.param is not None])  # Note [Extrapolated paths]
    for s in attached:
        unbind(s)
    return model
