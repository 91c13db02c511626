"""The options of ``attach``, checked: the regularizer, its mode, step policy, schedule and target.

Each function takes what the user passed and returns it checked, or raises
:class:`ParamregError` naming the call (``where``) and what to pass instead. ``attach``,
``attach_spec`` and ``attach_channels`` share them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from ..catalogue.base import Regularizer, build
from ..catalogue.base import keywords as registered_keywords
from ..catalogue.elementwise import L0, ElasticNet
from ..errors import ParamregError
from ..modules.carrier import USER_MODES
from ..optim.step_sizes import DEFAULT_METRIC_FLOOR, POLICIES
from ..optim.targets import EXTRAPOLATE, REGROW, SparsityTarget, recipe_steps

__all__ = ["checked_regularizer", "is_schedule", "checked_schedule", "checked_step", "checked_mode", "checked_target", "checked_metric_floor"]


def checked_regularizer(reg, given: dict, where: str) -> Regularizer:
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
        return build(name, 1.0 if is_schedule(value) else value)
    except ParamregError as e:
        raise ParamregError(f"{where} with {text}: {e}") from None
    except TypeError as e:
        raise ParamregError(f"{where} with {text}: {e}") from None


def is_schedule(value) -> bool:
    return callable(value) and not isinstance(value, (type, Regularizer))


def checked_schedule(regularizer: Regularizer, given: dict, schedule, where: str):
    """The strength schedule asked for (``schedule=`` or a callable strength keyword), checked at step 0."""
    from_keyword = next((v for v in given.values() if is_schedule(v)), None)
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


def checked_step(regularizer: Regularizer, mode: str, step, where: str) -> str:
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


def checked_mode(regularizer: Regularizer, mode, where: str) -> str:
    if mode not in USER_MODES:
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


def checked_target(reg, given: dict, mode: str, schedule, sparsity, sparsity_steps, where: str, allocation="global",
                   max_sparsity=None, total_steps=None, regrow=None, lookahead=None, extrapolate=None):
    """For ``sparsity=``: the regularizer at unit strength and the sparsity target (Note [Target
    sparsity] in optim/targets.py); a strength given with it is the target's first. With
    ``total_steps`` the ramp and ``keep_zeros`` take the recipe's defaults (Note [The recipe's
    defaults])."""
    if sparsity is None:
        given_steps = "sparsity_steps" if sparsity_steps is not None else "total_steps"
        raise ParamregError(f"{where}: {given_steps}= needs sparsity=s, the fraction of zero groups to reach")
    if sparsity_steps is not None and total_steps is not None:
        raise ParamregError(
            f"{where}: give sparsity_steps= (the ramp's steps) or total_steps= (the whole run's, the ramp at its "
            f"default place in it), not both"
        )
    if sparsity_steps is None and total_steps is None:
        raise ParamregError(
            f"{where}: sparsity={sparsity!r} needs total_steps=T (the optimizer steps of the whole run) or "
            f"sparsity_steps=n (the steps over which it ramps up)"
        )
    if total_steps is not None:
        start, end = recipe_steps(total_steps)
    else:
        start, end = 0, sparsity_steps
        if isinstance(sparsity_steps, (tuple, list)) and len(sparsity_steps) == 2:
            start, end = sparsity_steps
    keep = given.pop("keep_zeros", total_steps is not None)  # the recipe in one call (Note [Ramp, then keep the zeros])
    if schedule is not None or any(is_schedule(v) for v in given.values()):
        raise ParamregError(f"{where}: a sparsity target sets the strength at every step; it takes no strength schedule")
    # a strength keyword may be True (no starting value): the form alone
    regularizer = checked_regularizer(reg, {k: 1.0 if v is True else v for k, v in given.items()}, where) if reg is not None or given else L0(1.0)
    if mode != "prox":
        raise ParamregError(f"{where}: a sparsity target acts through the proximal step: use mode='prox'")
    if len(regularizer.strengths) != 1 or type(regularizer).critical is Regularizer.critical:
        raise ParamregError(
            f"{where}: {regularizer!r} cannot take a sparsity target; targets work with a regularizer of one "
            f"strength that zeroes whole groups: l1, group_lasso, or paramreg.attach_channels"
        )
    for name, value in (("lookahead", lookahead), ("extrapolate", extrapolate)):
        if value is not None and type(regularizer) is not L0:
            raise ParamregError(
                f"{where}: {name}= belongs to an L0 target (hard thresholding, the default of sparsity=), not to "
                f"{regularizer!r}"
            )
    if type(regularizer) is L0 and extrapolate is None:  # Notes [Extrapolated paths] and [Looking ahead] in optim/targets.py
        # one or the other; a zero that may regrow would rank by the map's jump to zero
        extrapolate = EXTRAPOLATE if lookahead is None and regrow is not True else 0.0
    target = SparsityTarget(sparsity, end, allocation, max_sparsity, start, keep, REGROW if regrow is None else regrow,
                            0 if lookahead is None else lookahead, 0.0 if extrapolate is None else extrapolate)
    if reg is not None or any(v is not True for v in given.values()):
        target.strength = getattr(regularizer, regularizer.strengths[0])
    return dataclasses.replace(regularizer, **{regularizer.strengths[0]: 1.0}), target


def checked_metric_floor(value, step: str, mode: str, where: str) -> float:
    """The safeguard of the adaptive step, checked: a finite number >= 0 (Note [Safeguarded metric]
    in optim/step_sizes.py)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ParamregError(f"{where}: metric_floor must be a finite number >= 0 (0: the plain metric), got {value!r}")
    if float(value) != DEFAULT_METRIC_FLOOR and (mode != "prox" or step == "lr"):
        raise ParamregError(
            f"{where}: metric_floor={value!r} sets the safeguard of the adaptive proximal step; it applies to "
            f"mode='prox' with step='auto' or 'adaptive'"
        )
    return float(value)
