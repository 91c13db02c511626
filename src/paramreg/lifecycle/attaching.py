"""``attach`` and ``set_strength``: validate everything, then change the model.

``attach`` checks its options (lifecycle/options.py) and every selected tensor first and raises
one :class:`ParamregError` listing every problem; only then does it bind carriers, all or nothing
(modules/rollback.py), so a failed call leaves no trace.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..catalogue.base import Regularizer
from ..errors import ParamregError
from ..modules import binding
from ..modules.carrier import changed
from ..modules.rollback import all_or_nothing
from ..modules.selection import resolve
from ..modules.walk import Slot, slots
from ..optim import hooks
from . import options

__all__ = ["attach", "attach_regularizer", "set_strength", "MAX_LISTED"]

MAX_LISTED = 10  # problems listed in one message


def _attached_already(slot: Slot, regularizer: Regularizer, mode: str, step: str, schedule, target=None, metric_floor: float = 1.0) -> bool:
    """Whether ``slot`` already carries this very attachment: an equal regularizer, the same mode,
    step policy, schedule and metric floor, and an equal sparsity target. Attaching it again is then a no-op for
    that tensor (Lightning runs ``configure_optimizers``, where an ``attach`` may sit, once per
    ``fit`` and for ``lr_find``)."""
    c = slot.carrier
    if c is None or c.mode != mode or c.step != step or c.schedule is not schedule or c.metric_floor != metric_floor:
        return False
    if (c.target is None) != (target is None) or (target is not None and c.target.to_dict() != target.to_dict()):
        return False
    try:
        return type(c.regularizer) is type(regularizer) and bool(c.regularizer == regularizer)
    except Exception:  # a user's regularizer whose == does not give one bool
        return False


def _problems(slot: Slot, regularizer: Regularizer, mode: str, tied: dict) -> str | None:
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
    total_steps=None,
    allocation="global",
    max_sparsity=None,
    regrow=None,
    lookahead=None,
    extrapolate=None,
    metric_floor=1.0,
    **keywords,
) -> list[str]:
    r"""Attach a regularizer to every parameter that ``targets`` selects; return their canonical names.

    Args:
        model: the ``nn.Module`` to regularize, in place.
        targets: pattern(s) over canonical parameter names: shell-style (``"conv*.weight"``, where
            ``*`` also matches dots), ``"re:<regex>"`` (full match), a callable ``(name, tensor) -> bool``,
            or a list of these. See :mod:`paramreg.modules.selection`.
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
        step: the proximal step size policy (Note [Step policies] in :mod:`paramreg.optim.step_sizes`):
            ``"lr"``: t = the group's lr. ``"adaptive"``: per coordinate in the optimizer's own
            metric, t_i = lr / (sqrt(v̂_i) + eps) for Adam (also AdamW, NAdam, RAdam, Adamax,
            RMSprop, Adagrad); for SGD t = lr·c_k, c_k the fill of its momentum buffer after k
            steps (1 without momentum; with momentum μ, 1 on the first step, rising to
            (1 − dampening)/(1 − μ): Note [Momentum fill]). ``"auto"`` (default): adaptive where
            the optimizer and the regularizer have that form, else lr.
        metric_floor: the safeguard of the adaptive step (Note [Safeguarded metric] in
            :mod:`paramreg.optim.step_sizes`): each coordinate's denominator, sqrt(v̂_i) for Adam, is at
            least ``metric_floor`` times the root mean square of the tensor's gradient at that
            step, so that a coordinate without gradient is not zeroed by a tiny strength. 1 by
            default; 0 takes the optimizer's plain metric.
        schedule: a callable k -> factor that multiplies the regularizer's strengths at step k
            (the number of optimizer steps that have updated the tensor so far);
            :func:`paramreg.report` shows the current strengths.
        sparsity: a target: the fraction s of exactly zero groups (elements for the default ``L0``
            and for ``l1``; groups for ``group_lasso``) that the tensors selected by this call reach
            together, along a cubic ramp, and keep from then on. The strength is then set at every
            step, the smallest that gives the ramp's fraction on that step (Note [Target sparsity]
            in :mod:`paramreg.optim.targets`); a strength given with it is only the value reported
            before the first step. Without a regularizer the target takes ``L0`` in the
            optimizer's metric (hard thresholding: zeros without shrinking the weights kept);
            ``l1=True`` gives an L1 target.
        total_steps: with ``sparsity``, the whole recipe from the optimizer steps of the run, T:
            the ramp from step round(0.25·T) to round(0.75·T), then the zeros kept while every other
            weight trains on to the end (``keep_zeros=True``), the L0 score taken under Adam at each
            weight's path since the ramp began, extended 4 times (``extrapolate``). Defaults chosen
            across four tasks
            (Note [The recipe's defaults]; docs/sparsity-recipe.md).
        sparsity_steps: instead of ``total_steps``, the ramp itself: n (from step 0 to n) or
            ``(start, end)``: nothing is zeroed before step ``start``, the ramp ends at ``end``. With
            ``keep_zeros=True`` as well, the zero set of step ``end`` is then kept while every other
            weight trains on (Note [Ramp, then keep the zeros] in :mod:`paramreg.optim.targets`).
        allocation: how a target shares its zeros among its tensors (Note [Allocation] in
            :mod:`paramreg.optim.targets`): ``"global"`` (default) ranks all their groups together,
            ``"uniform"`` gives each tensor the fraction itself.
        max_sparsity: with a global target, the largest fraction of one tensor's groups that may
            be zero; default 0.99 (or ``sparsity``, if higher), so that no tensor is emptied.
        regrow: with a target, whether a weight it zeroed may come back. ``False`` (default,
            chosen across four tasks with the recipe's other defaults): a zero stays zero, as
            under a pruning mask: from the step after the ramp's first on, the gradient and the
            momentum of every exactly zero weight are set to zero before each optimizer step, so
            the step leaves it at zero (Note [Zeros that do not regrow] in
            :mod:`paramreg.optim.targets`).
            ``True``: the proximal path, a zero returns when its gradient outweighs the strength.
        lookahead: with an ``L0`` target under Adam or AdamW, the optimizer steps h to look ahead:
            the weights are ranked by the L0 score of w − h·t·m̂, where Adam's momentum would carry
            them in h steps, so that weights training drives toward zero go first (Note [Looking
            ahead] in :mod:`paramreg.optim.targets`). Default 0: the weights as they are. Not
            with ``extrapolate`` (giving it sets that one's default to 0).
        extrapolate: with an ``L0`` target under Adam or AdamW, α: the weights are ranked by the L0
            score of w + α·(w − w⁰), w⁰ each weight after the ramp's first step: its path since
            then extended α times as far, so that weights training has been driving toward zero
            go first (Note [Extrapolated paths] in :mod:`paramreg.optim.targets`). Keeps w⁰ in the
            optimizer's per-parameter state from the ramp's first step until the zeros are kept
            (one tensor per selected weight, saved with ``optimizer.state_dict()``). 0: the
            weights as they are. Default: 4 (chosen across four tasks with the recipe's other
            defaults), 0 where ``lookahead`` or ``regrow=True`` is given (it needs zeros that do
            not regrow). Under SGD (as under any other optimizer) it does nothing, though
            ``print`` shows it.

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
    target = None
    if sparsity is not None or sparsity_steps is not None or total_steps is not None:
        regularizer, target = options.checked_target(reg, given, mode, schedule, sparsity, sparsity_steps, where, allocation,
                                                     max_sparsity, total_steps, regrow, lookahead, extrapolate)
    elif (allocation != "global" or max_sparsity is not None or regrow is not None or lookahead is not None
          or extrapolate is not None):
        raise ParamregError(
            f"{where}: allocation=, max_sparsity=, regrow=, lookahead= and extrapolate= belong to a sparsity target: give sparsity=s "
            f"and total_steps=T too"
        )
    else:
        regularizer = options.checked_regularizer(reg, given, where)
    mode = options.checked_mode(regularizer, mode, where)
    step = options.checked_step(regularizer, mode, step, where)
    metric_floor = options.checked_metric_floor(metric_floor, step, mode, where)
    schedule = options.checked_schedule(regularizer, given, schedule, where)
    return attach_regularizer(model, targets, regularizer, exclude=exclude, mode=mode, step=step, schedule=schedule, target=target,
                              metric_floor=metric_floor)


def attach_regularizer(model: nn.Module, targets, regularizer: Regularizer, *, exclude=None, mode="prox", step="auto",
                       schedule=None, target=None, metric_floor: float = 1.0, where: str | None = None) -> list[str]:
    """:func:`attach` with its options checked: select, validate every tensor, then change the model."""
    where = where or f"attach({targets!r})"
    chosen = resolve(model, targets, exclude)
    tied = {id(s.param): [s.name, *(a.name for a in s.aliases)] for s in slots(model) if s.aliases}
    fresh = [s for s in chosen if not _attached_already(s, regularizer, mode, step, schedule, target, metric_floor)]
    problems = [p for p in (_problems(s, regularizer, mode, tied) for s in fresh) if p is not None]
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ParamregError(f"{where}: {len(problems)} selected tensor(s) cannot be regularized:\n  {listed}{more}")

    with all_or_nothing() as undo:
        for s in fresh:
            binding.bind(s, regularizer, mode, step, schedule, target, metric_floor)
            undo(lambda s=s: binding.unbind(s))
    hooks.install()
    canonical = {id(s.param): s.name for s in slots(model) if s.param is not None}
    return [canonical.get(id(s.param), s.name) for s in chosen]  # a tied tensor under its first name


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
        s for s in slots(model)
        if s.carrier is not None and id(s.carrier.regularizer) in coupled and id(s.param) not in picked
    ]
    for s in chosen:
        if s.carrier.target is not None:
            raise ParamregError(
                f"{where}: {s.describe()} has a sparsity target, which sets its strength at every step; "
                f"remove it and attach it again to change the target"
            )
        if len(s.carrier.regularizer.strengths) != 1:
            raise ParamregError(
                f"{where}: {s.describe()} has {s.carrier.regularizer!r}, which has strengths "
                f"{s.carrier.regularizer.strengths or 'none'}; remove it and attach it again with the new values"
            )
    scheduled = options.is_schedule(value)
    replaced: dict[int, Regularizer] = {}
    for s in chosen:
        old = s.carrier.regularizer
        try:
            new = replaced.get(id(old)) or dataclasses.replace(old, **{old.strengths[0]: 1.0 if scheduled else value})
        except (ParamregError, TypeError) as e:
            raise ParamregError(f"{where} with {value!r}: {e}") from None
        replaced[id(old)] = new
    schedule = options.checked_schedule(next(iter(replaced.values())), {}, value, where) if scheduled else None
    for s in chosen:
        c = s.carrier
        c.regularizer, c.schedule = replaced[id(c.regularizer)], schedule
        c.scale = 1.0 if schedule is None else schedule(c.calls)
    changed()
    return [s.name for s in chosen]
