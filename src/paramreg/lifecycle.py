"""attach and remove: the symmetric lifecycle.

``attach`` validates everything first and only then changes the model, so a failed call leaves no
trace. ``remove`` deletes exactly what ``attach`` added: the user's own parametrizations, every
Parameter object, the classes, the state_dict keys and the parameter order are as they were.
"""

from __future__ import annotations

import torch
from torch import nn

import dataclasses
import math

from . import carrier as _carrier
from .errors import ParamregError
from .regularizers import L1, ElasticNet, Regularizer, build
from .step_sizes import POLICIES
from .regularizers import keywords as registered_keywords
from .selection import resolve
from .sparsity import Budget
from .stepping import install_hook

__all__ = ["attach", "remove", "set_strength"]

_MAX_LISTED = 10


def _regularizer(reg, given: dict, where: str) -> Regularizer:
    """The one regularizer that ``reg=`` or the keywords ask for."""
    known = registered_keywords()
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise ParamregError(
            f"{where}: unknown keyword(s) {', '.join(unknown)}; regularizer keywords are "
            f"{', '.join(f'{k}=' for k in sorted(known))} (l1= and l2= together give ElasticNet; add your own "
            f"with paramreg.register), or pass an object such as reg=paramreg.L1(1e-4)"
        )
    if reg is not None and given:
        raise ParamregError(f"{where}: give the regularizer either as reg= or as keywords ({', '.join(given)}), not both")
    if reg is not None:
        if not isinstance(reg, Regularizer):
            raise ParamregError(
                f"{where}: reg must be a paramreg.Regularizer such as paramreg.L1(1e-4), got {reg!r} ({type(reg).__name__})"
            )
        return reg
    if not given:
        raise ParamregError(f"{where}: no regularizer given; pass l1=..., l2=..., another keyword or reg=paramreg.L1(...)")
    text = ", ".join(f"{k}={v!r}" for k, v in given.items())
    if len(given) > 1 and set(given) != {"l1", "l2"}:
        raise ParamregError(f"{where}: one regularizer per tensor, got {text}; attach them to different tensors")
    if len(given) > 1 and any(callable(v) for v in given.values()):
        raise ParamregError(
            f"{where}: a strength schedule scales every strength of one regularizer; for {text} pass "
            f"reg=paramreg.ElasticNet(l1=..., l2=...) and schedule=<step -> factor>"
        )
    try:
        if set(given) == {"l1", "l2"}:
            return ElasticNet(l1=given["l1"], l2=given["l2"])
        (name, value), = given.items()
        return build(name, 1.0 if _is_schedule(value) else value)
    except ParamregError as e:
        raise ParamregError(f"{where} with {text}: {e}") from None
    except TypeError as e:
        raise ParamregError(f"{where} with {text}: {e}") from None


def _is_schedule(value) -> bool:
    return callable(value) and not isinstance(value, (type, Regularizer))


def _schedule(regularizer: Regularizer, given: dict, schedule, where: str):
    """The strength schedule asked for (``schedule=`` or a callable strength keyword), checked at step 0."""
    from_keyword = next((v for v in given.values() if _is_schedule(v)), None)
    if from_keyword is not None and schedule is not None:
        raise ParamregError(f"{where}: give the schedule either as the strength (a callable) or as schedule=, not both")
    schedule = from_keyword if from_keyword is not None else schedule
    if schedule is None:
        return None
    if not callable(schedule):
        raise ParamregError(f"{where}: schedule must be a callable step -> factor, got {schedule!r}")
    if len(regularizer.strengths) == 0:
        raise ParamregError(f"{where}: {regularizer!r} has no strength for a schedule to set")
    try:
        first = schedule(0)
    except Exception as e:
        raise ParamregError(f"{where}: the strength schedule failed at step 0: {type(e).__name__}: {e}") from None
    if isinstance(first, bool) or not isinstance(first, (int, float)) or not math.isfinite(first) or first < 0:
        raise ParamregError(f"{where}: the strength schedule must return a finite number >= 0, got {first!r} at step 0")
    return schedule


def _step_policy(regularizer: Regularizer, mode: str, step, where: str) -> str:
    if step not in POLICIES:
        raise ParamregError(f"{where}: step must be one of {', '.join(map(repr, POLICIES))}, got {step!r}")
    if step != "auto" and mode != "prox":
        raise ParamregError(f"{where}: step={step!r} sets the proximal step size; it applies to mode='prox' only")
    if step == "adaptive" and not regularizer.adaptive:
        raise ParamregError(
            f"{where}: {regularizer!r} has no map in a diagonal metric, so step='adaptive' cannot apply; "
            f"use step='lr' (or leave step at its default)"
        )
    return step


def _carrier_mode(regularizer: Regularizer, mode, where: str) -> str:
    if mode not in _carrier.MODES:
        raise ParamregError(f"{where}: mode must be 'prox' or 'penalty', got {mode!r}")
    if regularizer.kind == "reparametrization":
        if mode == "penalty":
            raise ParamregError(f"{where}: {regularizer!r} acts in the forward pass; it has no penalty mode")
        return "forward"
    if not regularizer.differentiable and mode == "penalty":
        raise ParamregError(f"{where}: {regularizer!r} has no gradient (it counts non-zeros); it acts by its proximal map, use mode='prox'")
    if regularizer.kind == "constraint" and mode == "penalty":
        raise ParamregError(
            f"{where}: {regularizer!r} is a constraint: it acts by projection after each step, use mode='prox'"
        )
    return mode


def _attached_already(slot: _carrier.Slot, regularizer: Regularizer, mode: str, step: str, schedule, budget=None) -> bool:
    """Whether ``slot`` already carries this very attachment: an equal regularizer, the same mode,
    step policy and schedule, and an equal sparsity target. Attaching it again is then a no-op for
    that tensor (Lightning runs ``configure_optimizers``, where an ``attach`` may sit, once per
    ``fit`` and for ``lr_find``)."""
    c = slot.carrier
    if c is None or c.mode != mode or c.step != step or c.schedule is not schedule:
        return False
    if (c.budget is None) != (budget is None) or (budget is not None and c.budget.to_dict() != budget.to_dict()):
        return False
    try:
        return type(c.regularizer) is type(regularizer) and bool(c.regularizer == regularizer)
    except Exception:  # a user's regularizer whose == does not give one bool
        return False


def _problems(slot: _carrier.Slot, regularizer: Regularizer, mode: str, tied: dict) -> str | None:
    """Why ``slot`` cannot take ``regularizer`` in ``mode``, or None. ``tied``: Parameter id ->
    all its names, for Parameters reachable under several names."""
    if isinstance(slot.param, nn.parameter.UninitializedParameter):
        return f"'{slot.name}' is an uninitialized lazy parameter; run one forward pass before attaching"
    value = slot.value()
    if not value.is_floating_point():
        return f"{slot.describe()} is not a floating-point tensor; regularizers need float weights, exclude it"
    if slot.carrier is not None:
        return (
            f"{slot.describe()} already has {slot.carrier.current()!r} attached (mode={slot.carrier.mode!r}); "
            f"attaching the same again is a no-op, to replace it call paramreg.remove(model, {slot.name!r}) first"
        )
    if mode != "penalty" and slot.plist is not None:
        kinds = ", ".join(type(m).__name__ for m in slot.plist)
        return (
            f"{slot.describe()} is computed by its own parametrization ({kinds}); mode={mode!r} needs the "
            f"stored tensor itself: use mode='penalty' for it, or exclude it"
        )
    if mode == "forward" and id(slot.param) in tied:
        names = ", ".join(repr(n) for n in tied[id(slot.param)])
        return (
            f"{slot.describe()} is one Parameter shared as {names}; {regularizer!r} acts in the forward pass "
            f"and would change one use only: exclude it, or untie the weights"
        )
    requirement = regularizer.check(tuple(value.shape))
    if requirement is not None:
        return f"{slot.describe()}: {requirement}"
    return None


def _target(reg, given: dict, mode: str, schedule, sparsity, sparsity_steps, where: str):
    """For ``sparsity=``: the regularizer at unit strength and the target's budget (Note [Target
    sparsity] in sparsity.py); a strength given with it is the budget's first."""
    if sparsity_steps is None:
        raise ParamregError(f"{where}: sparsity={sparsity!r} needs sparsity_steps=n, the optimizer steps over which it ramps up")
    if sparsity is None:
        raise ParamregError(f"{where}: sparsity_steps={sparsity_steps!r} needs sparsity=s, the fraction of zero groups to reach")
    budget = Budget(sparsity, sparsity_steps)
    if schedule is not None or any(_is_schedule(v) for v in given.values()):
        raise ParamregError(f"{where}: a sparsity target sets the strength at every step; it takes no strength schedule")
    # a strength keyword may be True (no starting value): the form alone
    regularizer = _regularizer(reg, {k: 1.0 if v is True else v for k, v in given.items()}, where) if reg is not None or given else L1(1.0)
    if mode != "prox":
        raise ParamregError(f"{where}: a sparsity target acts through the proximal step: use mode='prox'")
    if len(regularizer.strengths) != 1 or type(regularizer).critical is Regularizer.critical:
        raise ParamregError(
            f"{where}: {regularizer!r} cannot take a sparsity target; targets work with a regularizer of one "
            f"strength that zeroes whole groups: l1, group_lasso, or paramreg.attach_channels"
        )
    if reg is not None or any(v is not True for v in given.values()):
        budget.strength = getattr(regularizer, regularizer.strengths[0])
    return dataclasses.replace(regularizer, **{regularizer.strengths[0]: 1.0}), budget


def attach(
    model: nn.Module,
    targets,
    reg=None,
    *,
    exclude=None,
    l1=None,
    l2=None,
    mode="prox",
    step="auto",
    schedule=None,
    sparsity=None,
    sparsity_steps=None,
    **keywords,
) -> list[str]:
    r"""Attach a regularizer to every parameter that ``targets`` selects; return their canonical names.

    Args:
        model: the ``nn.Module`` to regularize, in place.
        targets: pattern(s) over canonical parameter names: shell-style (``"conv*.weight"``, where
            ``*`` also matches dots), ``"re:<regex>"`` (full match), a callable ``(name, tensor) -> bool``,
            or a list of these. See :mod:`paramreg.selection`.
        reg: a :class:`paramreg.Regularizer` object, e.g. ``paramreg.L1(1e-4)``. Or use keywords:
        l1: strength a of a·Σ abs(w).
        l2: strength b of (b/2)·Σ w² (torch's ``weight_decay=b`` convention). ``l1`` and ``l2``
            together give :class:`paramreg.ElasticNet`. A strength keyword may also be a
            callable of the step count k (0 at the first step), e.g. a warm-up
            ``l1=lambda k: 1e-4 * min(1.0, k / 1000)``: a strength schedule.
        **keywords: any other registered regularizer (:func:`paramreg.register`), e.g.
            ``group_lasso=a``, ``nuclear_norm=a``, ``non_negative=True``, ``max_norm=c``,
            ``box=(lo, hi)``, ``top_k=k``, ``nm=(2, 4)``, ``soft_threshold=init``: ``True`` builds
            ``cls()``, a number ``cls(value)``, a tuple ``cls(*value)``, a dict ``cls(**value)``.
        exclude: names to leave out, in the same forms as ``targets``.
        mode: ``"prox"`` (default): after every ``step()`` of any torch optimizer that updates the
            parameter, w ← prox_{tR}(w) with t the step that optimizer took (``step`` below), which
            gives exact zeros for L1. ``"penalty"``: nothing happens at step time; add
            :func:`paramreg.penalty` to the loss. Constraints act in ``"prox"`` mode only;
            reparametrizations (``SoftThreshold``) act in the forward pass (leave mode as it is).
        step: the proximal step size policy (Note [Step policies] in :mod:`paramreg.step_sizes`):
            ``"lr"``: t = the group's lr. ``"adaptive"``: per coordinate in the optimizer's own
            metric, t_i = lr / (sqrt(v̂_i) + eps) for Adam (also AdamW, NAdam, RAdam, Adamax,
            RMSprop, Adagrad); for SGD t = lr·c_k, c_k the fill of its momentum buffer after k
            steps (1 without momentum; with momentum μ, 1 on the first step, rising to
            (1 − dampening)/(1 − μ): Note [Momentum fill]). ``"auto"`` (default): adaptive where
            the optimizer and the regularizer have that form, else lr.
        schedule: a callable k -> factor that multiplies the regularizer's strengths at step k
            (the number of optimizer steps that have updated the tensor so far);
            :func:`paramreg.report` shows the current strengths.
        sparsity: a target: the fraction s of exactly zero groups (elements for ``l1``, the
            default; groups for ``group_lasso``) that the tensors selected by this call reach
            together after ``sparsity_steps`` optimizer steps, along a cubic ramp, and keep from
            then on. The strength is then set at every step, the smallest that gives the ramp's
            fraction on that step (Note [Target sparsity] in :mod:`paramreg.sparsity`); a strength
            given with it is only the value reported before the first step.
        sparsity_steps: n, the optimizer steps of the ramp (with ``sparsity``).

    Each selected tensor gets one paramreg carrier (an identity ``torch.nn.utils.parametrize``
    parametrization, visible in ``print(model)``). A Parameter tied under several names is
    regularized once. Attaching again what a tensor already carries (an equal regularizer, the
    same mode, step and schedule object) leaves it as it is, so ``attach`` may sit in code that runs
    more than once (Lightning's ``configure_optimizers``); a different regularizer on an attached
    tensor is an error. Bad input raises :class:`paramreg.ParamregError` and changes nothing.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> paramreg.attach(model, "*.weight", l1=1e-3)
        ['0.weight', '2.weight']
        >>> paramreg.attach(model, "*.bias", l2=1e-2, mode="penalty")
        ['0.bias', '2.bias']
        >>> model[0].parametrizations.weight[0]
        Carrier(L1(strength=0.001), mode='prox')
        >>> _ = paramreg.remove(model)
        >>> type(model[0]).__name__, [n for n, _ in model.named_parameters()]
        ('Linear', ['0.weight', '0.bias', '2.weight', '2.bias'])
    """
    if not isinstance(model, nn.Module):
        raise ParamregError(f"attach: model must be a torch.nn.Module, got {type(model).__name__}")
    where = f"attach({targets!r})"
    given = {k: v for k, v in (("l1", l1), ("l2", l2), *keywords.items()) if v is not None}
    budget = None
    if sparsity is not None or sparsity_steps is not None:
        regularizer, budget = _target(reg, given, mode, schedule, sparsity, sparsity_steps, where)
    else:
        regularizer = _regularizer(reg, given, where)
    mode = _carrier_mode(regularizer, mode, where)
    step = _step_policy(regularizer, mode, step, where)
    schedule = _schedule(regularizer, given, schedule, where)
    return attach_regularizer(model, targets, regularizer, exclude=exclude, mode=mode, step=step, schedule=schedule, budget=budget)


def attach_regularizer(model: nn.Module, targets, regularizer: Regularizer, *, exclude=None, mode="prox", step="auto",
                       schedule=None, budget=None, where: str | None = None) -> list[str]:
    """:func:`attach` with its options checked: select, validate every tensor, then change the model."""
    where = where or f"attach({targets!r})"
    chosen = resolve(model, targets, exclude)
    tied = {id(s.param): [s.name, *(a.name for a in s.aliases)] for s in _carrier.slots(model) if s.aliases}
    fresh = [s for s in chosen if not _attached_already(s, regularizer, mode, step, schedule, budget)]
    problems = [p for p in (_problems(s, regularizer, mode, tied) for s in fresh) if p is not None]
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ParamregError(f"{where}: {len(problems)} selected tensor(s) cannot be regularized:\n  {listed}{more}")

    done: list[_carrier.Slot] = []
    try:
        for s in fresh:
            s.carrier = _carrier.attach(s, regularizer, mode, step, schedule, budget)
            s.plist = _carrier._plists(s.module)[s.tensor_name]
            done.append(s)
    except BaseException:
        for s in reversed(done):
            _carrier.detach(s)
        raise
    install_hook()
    canonical = {id(s.param): s.name for s in _carrier.slots(model) if s.param is not None}
    return [canonical.get(id(s.param), s.name) for s in chosen]  # a tied tensor under its first name


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
    candidates = resolve(model, targets) if targets is not None else _carrier.slots(model)
    attached = [s for s in candidates if s.carrier is not None]
    if not allow_nonfinite:
        with torch.no_grad():
            bad = [s.describe() for s in attached if not bool(torch.isfinite(s.effective()).all())]
        if bad:
            listed = ", ".join(bad[:_MAX_LISTED]) + (f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else "")
            raise ParamregError(
                f"{listed} hold NaN or Inf; training diverged? Nothing was removed. Restore a "
                f"checkpoint, or pass allow_nonfinite=True to fold them anyway"
            )
    for s in attached:
        _carrier.detach(s)
    return model


def set_strength(model: nn.Module, targets, value) -> list[str]:
    """Change the strength of the regularizers attached to the tensors ``targets`` selects, in place.

    ``value`` is a number, or a schedule (a callable of the step count k, as in :func:`attach`).
    For regularizers with one strength (``L1``, ``L2``, ``GroupLasso``, ``NuclearNorm``); for
    others, scale them with ``remove`` and ``attach(..., reg=..., schedule=...)``. Takes effect
    at the next optimizer step. A regularizer that couples tensors (:func:`paramreg.attach_channels`)
    changes on every tensor it couples, also those not selected. A tensor with a sparsity target is
    refused (its strength is set at every step). Returns the canonical names changed.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Linear(4, 2)
        >>> _ = paramreg.attach(model, "weight", l1=1e-3)
        >>> paramreg.set_strength(model, "weight", 1e-2)
        ['weight']
        >>> paramreg.report(model).rows[0].regularizer
        'L1(strength=0.01)'
    """
    where = f"set_strength({targets!r})"
    chosen = [s for s in resolve(model, targets) if s.carrier is not None]
    if not chosen:
        raise ParamregError(f"{where}: no selected tensor has a paramreg regularizer attached")
    # a map that couples tensors (attach_channels) changes for all of them together
    coupled = {id(s.carrier.regularizer) for s in chosen if s.carrier.regularizer.joint}
    picked = {id(s.param) for s in chosen}
    chosen += [
        s for s in _carrier.slots(model)
        if s.carrier is not None and id(s.carrier.regularizer) in coupled and id(s.param) not in picked
    ]
    for s in chosen:
        if s.carrier.budget is not None:
            raise ParamregError(
                f"{where}: {s.describe()} has a sparsity target, which sets its strength at every step; "
                f"remove it and attach it again to change the target"
            )
        if len(s.carrier.regularizer.strengths) != 1:
            raise ParamregError(
                f"{where}: {s.describe()} has {s.carrier.regularizer!r}, which has strengths "
                f"{s.carrier.regularizer.strengths or 'none'}; remove it and attach it again with the new values"
            )
    scheduled = _is_schedule(value)
    replaced: dict[int, Regularizer] = {}
    for s in chosen:
        old = s.carrier.regularizer
        try:
            new = replaced.get(id(old)) or dataclasses.replace(old, **{old.strengths[0]: 1.0 if scheduled else value})
        except (ParamregError, TypeError) as e:
            raise ParamregError(f"{where} with {value!r}: {e}") from None
        replaced[id(old)] = new
    schedule = _schedule(next(iter(replaced.values())), {}, value, where) if scheduled else None
    for s in chosen:
        c = s.carrier
        c.regularizer, c.schedule = replaced[id(c.regularizer)], schedule
        c.factor = 1.0 if schedule is None else schedule(c.calls)
    _carrier.changed()
    return [s.name for s in chosen]
