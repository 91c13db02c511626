"""Specs: what is attached to a model, as plain data for a checkpoint, and its re-application.

While attached, ``state_dict()`` already has the plain model's keys (Note [The Parameter stays in
its module] in modules/binding.py). What a checkpoint also needs is *what* is attached: :func:`spec` writes
it as plain JSON-able data (loadable with ``torch.load(..., weights_only=True)``), and
:func:`attach_spec` re-applies it to a freshly built model.
"""

from __future__ import annotations

from torch import nn

from ..catalogue.base import Regularizer
from ..catalogue.elementwise import L0
from ..errors import ParamregError
from ..lifecycle import options
from ..lifecycle.attaching import attach_regularizer
from ..lifecycle.removing import remove
from ..modules.rollback import all_or_nothing
from ..modules.walk import slots
from ..optim.step_sizes import DEFAULT_METRIC_FLOOR
from ..optim.targets import SparsityTarget

__all__ = ["spec", "attach_spec", "FORMAT", "VERSION"]

FORMAT = "paramreg.spec"
#: The spec format this paramreg writes where a target extrapolates (Note [Extrapolated paths] in
#: optim/targets.py); format 2 where one looks ahead (Note [Looking ahead]); every other spec is
#: written as format 1, which older versions read too.
VERSION = 3
READS = (1, 2, 3)


def spec(model: nn.Module) -> dict:
    """What is attached to ``model``, as plain data: canonical name -> regularizer and mode.

    Save it beside the state_dict; :func:`attach_spec` re-applies it.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Linear(3, 2)
        >>> _ = paramreg.attach(model, "weight", l1=1e-4)
        >>> paramreg.spec(model)
        {'format': 'paramreg.spec', 'version': 1, 'attached': {'weight': {'regularizer': {'type': 'L1', 'strength': 0.0001}, 'mode': 'prox'}}}
    """
    attached = {}
    shared: dict[int, int] = {}  # id(target) -> its index: the tensors of one target share it
    for s in slots(model):
        c = s.carrier
        if c is None:
            continue
        entry = {"regularizer": (c.regularizer if c.target is not None else c.current()).to_dict(), "mode": c.mode}
        if c.step != "auto":
            entry["step"] = c.step
        if c.metric_floor != DEFAULT_METRIC_FLOOR:
            entry["metric_floor"] = c.metric_floor
        if c.target is not None:
            # spec format 1 calls the index of the shared target "budget"
            entry["sparsity"] = {**c.target.to_dict(), "budget": shared.setdefault(id(c.target), len(shared))}
        attached[s.name] = entry
    asked = [e.get("sparsity", {}) for e in attached.values()]
    version = VERSION if any("extrapolate" in a for a in asked) else 2 if any("lookahead" in a for a in asked) else 1
    return {"format": FORMAT, "version": version, "attached": attached}


def attach_spec(model: nn.Module, spec: dict) -> list[str]:
    """Attach what ``spec`` (from :func:`spec`) describes to ``model``; return the names attached.

    All or nothing: if any entry fails (a name the model lacks, a tensor already attached), the
    model is left as it was.

    Example:
        >>> import torch, paramreg
        >>> trained = torch.nn.Linear(3, 2)
        >>> _ = paramreg.attach(trained, "weight", l1=1e-4)
        >>> fresh = torch.nn.Linear(3, 2)
        >>> paramreg.attach_spec(fresh, paramreg.spec(trained))
        ['weight']
    """
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("attached"), dict):
        raise ParamregError(f"not a paramreg spec (expected a dict with format {FORMAT!r} from paramreg.spec): {spec!r:.200}")
    if spec.get("version") not in READS:
        raise ParamregError(f"paramreg spec version {spec.get('version')!r} is not supported (this paramreg reads {', '.join(map(str, READS))})")
    # one attach call per equal (regularizer, mode, step, metric floor, target)
    groups: list[tuple[Regularizer, str, str, float, list[str], object]] = []
    shared: dict[int, SparsityTarget] = {}
    for name, entry in spec["attached"].items():
        if not isinstance(entry, dict) or "regularizer" not in entry:
            raise ParamregError(f"paramreg spec entry for {name!r} has no 'regularizer': {entry!r}")
        reg, mode = Regularizer.from_dict(entry["regularizer"]), entry.get("mode", "prox")
        mode = "prox" if mode == "forward" else mode  # a reparametrization's carrier mode
        step, floor = entry.get("step", "auto"), entry.get("metric_floor", DEFAULT_METRIC_FLOOR)
        target = None
        if "sparsity" in entry:
            asked = entry["sparsity"]
            key = asked.get("budget", len(shared))
            target = shared.get(key) or shared.setdefault(
                key, SparsityTarget(asked["target"], asked["steps"], asked.get("allocation", "global"), asked.get("max_sparsity"),
                                    asked.get("start", 0), asked.get("keep_zeros", False), asked.get("regrow", True),
                                    asked.get("lookahead", 0), asked.get("extrapolate", 0.0))
            )
            if (target.lookahead or target.extrapolate) and type(reg) is not L0:
                kind = "lookahead" if target.lookahead else "extrapolate"
                raise ParamregError(f"paramreg spec entry for {name!r}: {kind} belongs to an L0 target, not to {reg!r}")
        group = next((g for g in groups if g[0] == reg and g[1:4] == (mode, step, floor) and g[5] is target), None)
        if group is None:
            groups.append((reg, mode, step, floor, [name], target))
        else:
            group[4].append(name)
    done: list[str] = []
    with all_or_nothing() as undo:
        for reg, mode, step, floor, names, target in groups:
            where = f"attach_spec({names[0]!r}{', ...' if len(names) > 1 else ''})"
            mode = options.checked_mode(reg, mode, where)
            step = options.checked_step(reg, mode, step, where)
            floor = options.checked_metric_floor(floor, step, mode, where)
            attached = attach_regularizer(model, names, reg, mode=mode, step=step, target=target, metric_floor=floor, where=where)
            done += attached
            undo(lambda attached=attached: remove(model, attached))
    return [s.name for s in slots(model) if s.name in set(done)]
