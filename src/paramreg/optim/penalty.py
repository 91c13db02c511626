"""The two calls outside the optimizer hook: ``penalty(model)`` for the loss and ``prox_step(model, lr)``.

``penalty`` is the differentiable sum of the ``mode="penalty"`` regularizers (Note [Penalty
plans]); ``prox_step`` applies the ``mode="prox"`` maps once, for loops without a torch optimizer.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from ..errors import ParamregError
from ..modules.carrier import generation
from ..modules.walk import module_tree, same_tree, slots

__all__ = ["penalty", "prox_step"]


def prox_step(model: nn.Module, lr: float) -> None:
    """Apply every ``mode="prox"`` regularizer attached to ``model`` once, with step ``t = lr``.

    For training loops that use no ``torch.optim`` optimizer (a hand-written update, a closed-form
    step). With a torch optimizer this happens automatically after each ``step()``; do not call
    both, or the prox is applied twice. Every call applies every map once: ``NuclearNorm(every=k)``
    counts only optimizer steps. With no optimizer there is no metric: every step policy takes
    t = lr here, and a strength schedule stays at its current value.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.5, 0.05, -2.0]]))
        >>> _ = paramreg.attach(model, "weight", l1=1.0)
        >>> paramreg.prox_step(model, lr=0.1)
        >>> model.weight.detach()
        tensor([[ 0.4000,  0.0000, -1.9000]])
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float, Tensor)) or not math.isfinite(float(lr)) or lr < 0:
        raise ParamregError(f"prox_step lr must be a finite number >= 0, got {lr!r}")
    buckets: dict[int, tuple] = {}
    for s in slots(model):
        if s.carrier is not None and s.carrier.mode == "prox":
            multiplier = s.carrier.multiplier()
            key = (id(s.carrier.regularizer), multiplier)
            buckets.setdefault(key, (s.carrier.regularizer, multiplier, []))[2].append(s.param)
    with torch.no_grad():
        for regularizer, multiplier, params in buckets.values():
            regularizer.prox_(params, float(lr) * multiplier)


def penalty(model: nn.Module) -> Tensor:
    """The differentiable sum of the penalties of every ``mode="penalty"`` regularizer on ``model``.

    Add it to the loss: ``loss = criterion(model(x), y) + paramreg.penalty(model)``. Regularizers
    attached with ``mode="prox"`` are not included (they act after the step instead), so no
    regularizer ever acts twice. Returns a zero scalar when there is none.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[3.0, -4.0]]))
        >>> _ = paramreg.attach(model, "weight", l2=0.1, mode="penalty")
        >>> paramreg.penalty(model)  # (0.1 / 2) * (9 + 16)
        tensor(1.2500, grad_fn=<MulBackward0>)
    """
    plan = _penalty_plan(model)
    total = None
    for regularizer, values, plain, carriers in plan.buckets:
        tensors = values if plain else [v if isinstance(v, Tensor) else v.value() for v in values]
        if carriers is None:  # no schedule: every scale is 1
            terms = [regularizer.penalty_sum(tensors)]
        else:  # a schedule: the tensors at each current scale together
            by_factor: dict[float, list[Tensor]] = {}
            for ref, tensor in zip(carriers, tensors, strict=True):
                by_factor.setdefault(ref().scale, []).append(tensor)
            terms = [regularizer.scaled(f).penalty_sum(ts) for f, ts in by_factor.items()]
        for term in terms:
            total = term if total is None else total + term
    if total is None:
        first = next(model.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else None)
    return total


class _PenaltyPlan:
    """Note [Penalty plans]
        ``penalty(model)`` runs every training step, and finding the penalty-mode carriers means
        walking every parameter of the model under its canonical name (``modules.walk.slots``): on
        200 small layers that took three times as long as the penalties themselves. So each
        model caches its plan: per regularizer object, the tensors it penalizes (the stored
        Parameters, or the slot whose ``value()`` computes the tensor under a user's
        parametrization). The plan is rebuilt when a carrier is bound, unbound or changed
        anywhere (the generation counter the step plans use), or when the model's module tree
        is no longer the one the plan was built from: a submodule replaced, added or deleted.
        That check compares the modules by identity, in the order of a walk of ``_modules``
        that skips the parametrization containers (what changes in them is a carrier change):
        about one dict per module, against a Slot per parameter for ``slots``. The check walks
        without building a list and stops at the first difference; where the tree reaches no
        module twice (the common case) it keeps no set of the modules seen either, since a
        module newly reached twice shows as an extra entry: 9.8 against 15.1 µs for the suite's
        transformer's 43 modules (ad hoc, stop 34). A tree with shared modules (weight-tied
        layers) or a cycle is checked with that set, as before. Schedules move a carrier's
        scale every step without a rebuild; the plan reads it at each call.

        A cached plan holds the Parameters (which reference no module), the tree through weak
        references, and carriers only where a schedule is (weakly): nothing in it keeps the
        model alive through the weak-keyed cache. A tensor under a user's own parametrization
        is penalized through its slot's ``value()``, and a slot holds its module, list and
        carrier; a plan with such a slot is not cached (when it was, carriers of an earlier
        test's models outlived it into the leak test), and that model takes the walk on every
        call as before, as does a model that cannot be a weak dictionary key (unhashable).
    """

    __slots__ = ("generation", "tree", "shared", "buckets")

    def __init__(self, generation: int, tree: list, shared: bool, buckets: list):
        self.generation, self.tree, self.shared, self.buckets = generation, tree, shared, buckets


# model -> its _PenaltyPlan (Note [Penalty plans]); weak, so paramreg never keeps a model alive
_penalty_plans: "weakref.WeakKeyDictionary[nn.Module, _PenaltyPlan]" = weakref.WeakKeyDictionary()


def _penalty_plan(model: nn.Module) -> _PenaltyPlan:
    try:
        plan = _penalty_plans.get(model)
    except TypeError:  # unhashable: no cache
        plan = None
    if plan is not None and plan.generation == generation() and same_tree(model, plan.tree, plan.shared):
        return plan
    buckets: dict[int, tuple] = {}
    for s in slots(model):  # may bump the generation (walk.sync): read it after
        c = s.carrier
        if c is not None and c.mode == "penalty":
            bucket = buckets.setdefault(id(c.regularizer), (c.regularizer, [], []))
            bucket[1].append(s.param if s.param is not None else s)
            bucket[2].append(c)
    tree, shared = module_tree(model)
    plan = _PenaltyPlan(
        generation(),
        [weakref.ref(m) for m in tree],
        shared,
        [
            (
                regularizer,
                values,
                all(isinstance(v, Tensor) for v in values),
                [weakref.ref(c) for c in carriers] if any(c.schedule is not None for c in carriers) else None,
            )
            for regularizer, values, carriers in buckets.values()
        ],
    )
    if all(plain for _, _, plain, _ in plan.buckets):
        try:
            _penalty_plans[model] = plan
        except TypeError:
            pass
    return plan
