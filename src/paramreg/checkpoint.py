"""Saving, resuming and exporting: specs, export copies, and the plain-model check.

While attached, ``state_dict()`` already has the plain model's keys (Note [The Parameter stays in
its module] in carrier.py). What a checkpoint also needs is *what* is attached: :func:`spec` writes
it as plain JSON-able data (loadable with ``torch.load(..., weights_only=True)``), and
:func:`attach_spec` re-applies it to a freshly built model.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

from . import carrier as _carrier
from .errors import ParamregError
from .lifecycle import _carrier_mode, _step_policy, attach_regularizer, remove
from .regularizers import Regularizer
from .sparsity import Budget

__all__ = ["spec", "attach_spec", "folded", "check_plain"]

FORMAT = "paramreg.spec"
VERSION = 1


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
    budgets: dict[int, int] = {}  # id(budget) -> its index: the tensors of one target share it
    for s in _carrier.slots(model):
        c = s.carrier
        if c is None:
            continue
        entry = {"regularizer": (c.regularizer if c.budget is not None else c.current()).to_dict(), "mode": c.mode}
        if c.step != "auto":
            entry["step"] = c.step
        if c.budget is not None:
            entry["sparsity"] = {**c.budget.to_dict(), "budget": budgets.setdefault(id(c.budget), len(budgets))}
        attached[s.name] = entry
    return {"format": FORMAT, "version": VERSION, "attached": attached}


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
    if spec.get("version") != VERSION:
        raise ParamregError(f"paramreg spec version {spec.get('version')!r} is not supported (this paramreg reads {VERSION})")
    groups: list[tuple[Regularizer, str, str, list[str], object]] = []  # one attach call per equal (regularizer, mode, step, target)
    budgets: dict[int, Budget] = {}
    for name, entry in spec["attached"].items():
        if not isinstance(entry, dict) or "regularizer" not in entry:
            raise ParamregError(f"paramreg spec entry for {name!r} has no 'regularizer': {entry!r}")
        reg, mode = Regularizer.from_dict(entry["regularizer"]), entry.get("mode", "prox")
        mode = "prox" if mode == "forward" else mode  # a reparametrization's carrier mode
        step = entry.get("step", "auto")
        budget = None
        if "sparsity" in entry:
            target = entry["sparsity"]
            key = target.get("budget", len(budgets))
            budget = budgets.get(key) or budgets.setdefault(key, Budget(target["target"], target["steps"]))
        group = next((g for g in groups if g[0] == reg and g[1] == mode and g[2] == step and g[4] is budget), None)
        if group is None:
            groups.append((reg, mode, step, [name], budget))
        else:
            group[3].append(name)
    done: list[str] = []
    try:
        for reg, mode, step, names, budget in groups:
            where = f"attach_spec({names[0]!r}{', ...' if len(names) > 1 else ''})"
            mode = _carrier_mode(reg, mode, where)
            done += attach_regularizer(model, names, reg, mode=mode, step=_step_policy(reg, mode, step, where), budget=budget, where=where)
    except BaseException:
        if done:
            remove(model, done)
        raise
    return [s.name for s in _carrier.slots(model) if s.name in set(done)]


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
    would store each carried tensor twice (Note [Export guard] in carrier.py), nor a pickle.
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
    everything = _carrier.slots(model)
    ours = [s.name for s in everything if s.carrier is not None]
    theirs = [s.name for s in everything if s.plist is not None and any(not isinstance(m, _carrier.Carrier) for m in s.plist)]
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
