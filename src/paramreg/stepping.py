"""When regularizers act: after each optimizer step (``mode="prox"``) or in the loss (``mode="penalty"``).

Note [Why a global optimizer post-step hook]
    ``torch.optim.optimizer.register_optimizer_step_post_hook`` runs after the ``step()`` of every
    ``torch.optim.Optimizer``, whether it was built before or after ``attach``, with no extra line
    in the user's loop. ``GradScaler`` does not call ``step()`` on a step with inf/NaN gradients,
    so the prox is skipped exactly when the step is; with gradient accumulation it runs once per
    real step. Nothing is ever added to gradients (a backward hook would see AMP-scaled gradients
    and fire once per micro-batch).

Note [Step size]
    A parameter receives prox_{tR} with t = the ``lr`` of the parameter group that just stepped
    it, read at that moment (so LR schedulers apply). A parameter whose ``.grad`` is None was not
    updated by the optimizer (frozen, or unused this step) and receives no prox either.

Note [Plans]
    The hook must be cheap. For each optimizer it caches a plan: per parameter group, the
    attached parameters bucketed by regularizer, so that each regularizer's ``prox_`` runs once
    over all its tensors. The plan is rebuilt when a carrier is bound or unbound anywhere, or
    when the optimizer's parameter groups change. A regularizer with ``every = k > 1``
    (``NuclearNorm``) is applied to a tensor on every k-th step that updates it, with step k·t;
    each carrier counts its own steps.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import carrier as _carrier
from .errors import ParamregError

__all__ = ["penalty", "prox_step"]

_hook_handle = None
_plans: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()


def install_hook() -> None:
    """Register the global post-step hook once per process."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_step)


def _signature(optimizer) -> tuple:
    # load_state_dict() installs new group dicts around the same params lists: key on both
    return (_carrier.generation(), tuple((id(g), id(g["params"]), len(g["params"])) for g in optimizer.param_groups))


def _build_plan(optimizer) -> list:
    by_param = {}
    for c in list(_carrier.live_carriers()):
        leaf = c.leaf() if c.mode == "prox" else None
        if leaf is not None:
            by_param[id(leaf)] = c
    plan = []
    for group in optimizer.param_groups:
        buckets = _buckets((by_param[id(p)], p) for p in group["params"] if id(p) in by_param)
        if buckets:
            if "lr" not in group:
                raise ParamregError(
                    f"{type(optimizer).__name__} has no 'lr' in its parameter groups, and mode='prox' takes the "
                    f"group's lr as its step size: call paramreg.prox_step(model, lr) after each step instead, "
                    f"or attach with mode='penalty'"
                )
            plan.append((group, buckets))
    return plan


def _buckets(pairs) -> list:
    """[(regularizer, [tensors], [carriers])] from (carrier, tensor) pairs: one bucket per
    regularizer object (attach shares one object among the tensors of a call)."""
    by_id: dict[int, tuple] = {}
    for carrier, p in pairs:
        bucket = by_id.setdefault(id(carrier.regularizer), (carrier.regularizer, [], []))
        bucket[1].append(p)
        bucket[2].append(carrier)
    return list(by_id.values())


def _after_step(optimizer, args, kwargs) -> None:
    if not _carrier.live_carriers():
        return
    signature = _signature(optimizer)
    cached = _plans.get(optimizer)
    if cached is None or cached[0] != signature:
        cached = (signature, _build_plan(optimizer))
        _plans[optimizer] = cached
    if not cached[1]:
        return
    with torch.no_grad():
        for group, buckets in cached[1]:
            t = group["lr"]
            for regularizer, params, carriers in buckets:
                every = getattr(regularizer, "every", 1)
                if every == 1:
                    stepped = [p for p in params if p.grad is not None]
                else:  # a lazy prox: step every·t once every `every` steps of each tensor
                    stepped = [p for p, c in zip(params, carriers, strict=True) if p.grad is not None and _count(c) % every == 0]
                if stepped:
                    regularizer.prox_(stepped, t * every if every != 1 else t)


def _count(carrier) -> int:
    carrier.calls += 1
    return carrier.calls


def prox_step(model: nn.Module, lr: float) -> None:
    """Apply every ``mode="prox"`` regularizer attached to ``model`` once, with step ``t = lr``.

    For training loops that use no ``torch.optim`` optimizer (a hand-written update, a closed-form
    step). With a torch optimizer this happens automatically after each ``step()``; do not call
    both, or the prox is applied twice. Every call applies every map once: ``NuclearNorm(every=k)``
    counts only optimizer steps.

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
    buckets = _buckets((s.carrier, s.param) for s in _carrier.slots(model) if s.carrier is not None and s.carrier.mode == "prox")
    with torch.no_grad():
        for regularizer, params, _ in buckets:
            regularizer.prox_(params, lr)


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
    terms = [
        s.carrier.regularizer.penalty(s.value())
        for s in _carrier.slots(model)
        if s.carrier is not None and s.carrier.mode == "penalty"
    ]
    if not terms:
        first = next(model.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else None)
    return sum(terms[1:], terms[0])
