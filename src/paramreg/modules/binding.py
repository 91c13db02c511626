"""Binding: register a carrier on one tensor, and take it away again exactly.

Note [The Parameter stays in its module]
    ``register_parametrization`` moves ``module.weight`` to
    ``module.parametrizations.weight.original``, which renames it in ``named_parameters()`` and
    ``state_dict()`` and moves it behind ``bias``. After registering a carrier on a plain tensor,
    paramreg puts the same Parameter object back into ``module._parameters`` at its old
    position. ``module.weight`` is read through paramreg's class (Note [Module classes] in
    modules/classes.py), while ``named_parameters()`` and ``parameters()`` de-duplicate by
    identity and so report the plain name in the plain order: an optimizer built while attached
    sees the parameters in the same order as one built on the plain model, and user code that
    selects parameters by name keeps working. ``state_dict()`` would hold the tensor under both
    keys; a state-dict hook keeps only the plain key, and a load pre-hook accepts either
    (modules/state_dict.py).

Exact removal (:func:`unbind`): only paramreg's own entry is deleted, the Parameter object is
kept, a user's own parametrizations stay, and no property is ever deleted from a class that
other modules use.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from ..catalogue.base import Regularizer
from . import classes, state_dict
from .carrier import Carrier
from .walk import Slot, carried, index_in, plists, sync

__all__ = ["bind", "unbind"]


def bind(slot: Slot, regularizer: Regularizer, mode: str, step: str = "auto", schedule=None, target=None,
         metric_floor: float = 1.0) -> Carrier:
    """Register and bind a carrier on ``slot``, which the caller has validated."""
    module, tname = slot.module, slot.tensor_name
    carrier = Carrier(regularizer, mode, step, schedule, target, metric_floor)
    carrier.name = slot.name  # for messages
    carrier.remember(slot.value())
    order = list(module._parameters)
    parametrize.register_parametrization(module, tname, carrier)
    if slot.plist is None:  # a plain tensor: Note [The Parameter stays in its module]
        module._parameters[tname] = slot.param
        _reorder(module._parameters, order)
        state_dict.install(module)
    carrier.tensor_name = tname
    if plists(module)[tname][0] is carrier:
        classes.watch(plists(module)[tname])
    classes.settle(module)
    carrier.bind(plists(module)[tname])
    slot.carrier, slot.plist = carrier, plists(module)[tname]
    return carrier


def _reorder(params: dict, order: list[str]) -> None:
    rank = {n: i for i, n in enumerate(order)}
    ordered = sorted(params.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    params.clear()
    params.update(ordered)


def unbind(slot: Slot) -> None:
    """Remove paramreg's carrier from ``slot`` and nothing else.

    An identity carrier leaves every value as it is; a reparametrizing one (``SoftThreshold``) is
    folded first: the stored tensor becomes the tensor the module computed with.
    """
    module, tname, plist, carrier = slot.module, slot.tensor_name, slot.plist, slot.carrier
    sync(module)
    if carrier.reparametrizes:  # fold: the stored tensor becomes what the module computed with
        with torch.no_grad():
            plist.original.copy_(carrier(plist.original))
    if len(plist) > 1:
        # The user's own parametrizations stay; ours is the identity, so the chain's value is unchanged.
        first = plist[0] is carrier
        del plist[index_in(plist, carrier)]
        classes.unwatch(plist)
        if first:
            del module._parameters[tname]  # as torch has it for a parametrized tensor
    else:
        found = plists(module)
        del found[tname]
        if len(found) == 0:
            del module._modules["parametrizations"]
    if not carried(module):
        state_dict.uninstall(module)
        classes.restore(module)
    carrier.unbind()
    slot.carrier = None
