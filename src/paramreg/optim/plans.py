"""Plans: per optimizer, the attached tensors of each parameter group bucketed by the map that treats them.

Note [Plans]
    The hook must be cheap. For each optimizer it caches a plan: per parameter group, the
    attached parameters bucketed by (regularizer, step policy, metric floor), so that each regularizer's
    multi-tensor map runs once over all its tensors. The plan is rebuilt when a carrier is bound,
    unbound or changed anywhere, or when the optimizer's parameter groups change. A regularizer
    with ``every = k > 1`` (``NuclearNorm``) is applied to a tensor on every k-th step that
    updates it, with step k·t; each carrier counts its own steps, which is also the step count a
    strength schedule and a sparsity target read.

Note [Which optimizers paramreg knows]
    An optimizer's step policy depends on the update it runs (Note [Step policies] in
    optim/step_sizes.py). A subclass that does not override ``step`` (a logging or configuration
    subclass) runs its base class's update and is treated as that class; one that overrides
    ``step``, and any optimizer paramreg does not know (``Adafactor``, third-party ones), takes
    t = lr, and the first step warns once per optimizer, naming it, the tensors and the policy. The
    policy each tensor's last step took shows in ``report`` and ``print(model)``
    (``adaptive(Adam)``, ``sgd(SGD)``, ``lr``, ``projection``).
"""

from __future__ import annotations

import warnings

from torch import Tensor

from ..errors import ParamregError
from ..modules.carrier import generation
from . import state, step_sizes

__all__ = ["Bucket", "signature", "build", "warn_unknown"]


def signature(optimizer) -> tuple:
    """What a plan depends on: the carriers (their generation) and the optimizer's groups;
    ``load_state_dict()`` installs new group dicts around the same params lists: key on both."""
    return (generation(), tuple((id(g), id(g["params"]), len(g["params"])) for g in optimizer.param_groups))


class Bucket:
    """Tensors of one parameter group that share a regularizer object and a step policy."""

    __slots__ = ("regularizer", "policy", "params", "carriers", "counted", "target", "metric_floor")

    def __init__(self, regularizer, policy: str, target=None, metric_floor: float = step_sizes.DEFAULT_METRIC_FLOOR):
        self.regularizer, self.policy, self.target, self.metric_floor = regularizer, policy, target, metric_floor
        self.params: list[Tensor] = []
        self.carriers: list = []
        # True: per-carrier step counts matter (a schedule, a target, every > 1, penalty mode)
        self.counted = target is not None


def _policy(carrier, metric: str | None, optimizer) -> str:
    """The step policy of a carrier: "lr", "scalar" (SGD's lr times its momentum factor), "adaptive"
    (per coordinate), or "count" (a scheduled penalty-mode carrier: only its step count moves)."""
    if carrier.mode == "penalty":
        return "count"
    if carrier.step == "adaptive" and metric is None:
        known = ", ".join(sorted(c.__name__ for c in step_sizes.KNOWN))
        raise ParamregError(
            f"'{carrier.name}' was attached with step='adaptive', but paramreg does not know the metric of "
            f"{type(optimizer).__name__} (it knows {known} and subclasses that do not override step()): "
            f"attach it with step='lr', or leave step at its default"
        )
    if carrier.regularizer.kind == "constraint" or carrier.step == "lr" or metric is None:
        return "lr"  # a projection takes no step size (Constraint.prox_diag)
    if metric == "scalar":
        return "scalar"  # SGD: lr times its momentum factor, for any regularizer
    return "adaptive" if carrier.regularizer.adaptive else "lr"


def _label(carrier, policy: str, optimizer) -> str:
    """What ``report`` and ``print(model)`` show as the step policy that ran (Note [Which optimizers paramreg knows])."""
    if carrier.regularizer.kind == "constraint":
        return "projection"
    known = step_sizes.resolve(optimizer)
    if policy == "adaptive":
        return f"adaptive({known.__name__})"
    if policy == "scalar":
        return f"sgd({known.__name__})"
    return "lr"


def warn_unknown(optimizer, carriers: list) -> None:
    """Once per optimizer: paramreg does not know its update, so t = lr (Note [Which optimizers paramreg knows])."""
    found = state.of(optimizer)
    if found.warned:
        return
    found.warned = True
    names = ", ".join(repr(c.name) for c in carriers[:3]) + (f" and {len(carriers) - 3} more" if len(carriers) > 3 else "")
    cls = type(optimizer)
    why = "overrides step()" if any(b in step_sizes.KNOWN for b in cls.__mro__) else "is not one paramreg knows"
    warnings.warn(
        f"paramreg: {cls.__name__} {why}, so paramreg cannot take the proximal step in its metric; {names} take "
        f"the step t = lr (the decoupled form: L1(a) shrinks each weight by lr·a per step), not the step the "
        f"optimizer took. Attach with step='lr' to say that this is intended.",
        stacklevel=3,
    )


def build(optimizer, by_param: dict) -> tuple[list, list]:
    """The plan of ``optimizer`` (per parameter group with attached tensors: (index, group,
    buckets)) and the carriers whose step policy paramreg had to guess (t = lr, an optimizer it
    does not know). Sets each carrier's label, the policy it runs (``Carrier.ran``), and whether
    its target would score points other than its weights (``Carrier.points``)."""
    metric = step_sizes.metric(optimizer)
    points = step_sizes.resolve(optimizer) in state.POINTS_IN  # Note [Extrapolated paths]
    plan = []
    guessed = []
    for index, group in enumerate(optimizer.param_groups):
        buckets: dict[tuple, Bucket] = {}
        for p in group["params"]:
            c = by_param.get(id(p))
            if c is None:
                continue
            policy = _policy(c, metric, optimizer)
            if metric is None and c.step == "auto" and c.mode == "prox" and c.regularizer.kind != "constraint":
                guessed.append(c)
            c.ran = _label(c, policy, optimizer) if policy != "count" else None
            c.points = points and policy == "adaptive"
            key = (id(c.regularizer), policy, c.metric_floor)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(c.regularizer, policy, c.target, c.metric_floor)
            bucket.params.append(p)
            bucket.carriers.append(c)
            bucket.counted |= c.schedule is not None or c.regularizer.every != 1 or policy == "count"
        if buckets:
            if "lr" not in group and any(b.policy != "count" for b in buckets.values()):
                raise ParamregError(
                    f"{type(optimizer).__name__} has no 'lr' in its parameter groups, and mode='prox' takes the "
                    f"group's lr as its step size: call paramreg.prox_step(model, lr) after each step instead, "
                    f"or attach with mode='penalty'"
                )
            plan.append((index, group, list(buckets.values())))
    return plan, guessed
