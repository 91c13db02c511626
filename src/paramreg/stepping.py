"""When regularizers act: after each optimizer step (``mode="prox"``) or in the loss (``mode="penalty"``).

Note [Why a global optimizer post-step hook]
    ``torch.optim.optimizer.register_optimizer_step_post_hook`` runs after the ``step()`` of every
    ``torch.optim.Optimizer``, whether it was built before or after ``attach``, with no extra line
    in the user's loop. ``GradScaler`` does not call ``step()`` on a step with inf/NaN gradients,
    so the prox is skipped exactly when the step is; with gradient accumulation it runs once per
    real step. Nothing is ever added to gradients (a backward hook would see AMP-scaled gradients
    and fire once per micro-batch). A global pre-step hook, skipped with the step in the same
    way, keeps the momentum fill of SGD and RMSprop (Note [Momentum fill] in step_sizes.py).

Note [Step size]
    A parameter receives prox_{tR} with t from its step policy (Note [Step policies] in
    step_sizes.py): the ``lr`` of the parameter group that just stepped it, read at that moment
    (so LR schedulers apply), times the momentum fill of its group for SGD, or per coordinate in
    the optimizer's own metric. A parameter whose ``.grad`` is None was not updated by the
    optimizer (frozen, or unused this step) and receives no prox either.

Note [Plans]
    The hook must be cheap. For each optimizer it caches a plan: per parameter group, the
    attached parameters bucketed by (regularizer, step policy), so that each regularizer's
    multi-tensor map runs once over all its tensors. The plan is rebuilt when a carrier is bound,
    unbound or changed anywhere, or when the optimizer's parameter groups change. A regularizer
    with ``every = k > 1`` (``NuclearNorm``) is applied to a tensor on every k-th step that
    updates it, with step k·t; each carrier counts its own steps, which is also the step count a
    strength schedule reads.
"""

from __future__ import annotations

import math
import sys
import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import carrier as _carrier
from . import step_sizes
from .errors import ParamregError

__all__ = ["penalty", "prox_step"]

_hook_handle = None
_pre_hook_handle = None
_plans: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()
# SGD and RMSprop -> [group, fill] per parameter group, in the optimizer's order (Note [Momentum fill])
_fills: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list[list]]" = weakref.WeakKeyDictionary()


def install_hook() -> None:
    """Register the global post-step hook (and the pre-step hook that tracks momentum fills) once per process."""
    global _hook_handle, _pre_hook_handle
    if _hook_handle is None:
        _pre_hook_handle = register_optimizer_step_pre_hook(_before_step)
        _hook_handle = register_optimizer_step_post_hook(_after_step)


@torch.compiler.disable  # bookkeeping in Python, like _after_step
def _before_step(optimizer, args, kwargs) -> None:
    """Advance the momentum fill of each parameter group of an SGD or RMSprop optimizer to its
    value after the step about to run (Note [Momentum fill] in step_sizes.py).

    Before the step, because a group seen for the first time is told apart from one whose
    buffers already hold momentum (attached mid-training, a loaded state) only by whether the
    buffers exist yet. An optimizer is tracked from the first step it takes while a carrier is
    live, and then on every step, so that its fills stay current while nothing is attached.
    """
    if type(optimizer) not in step_sizes.FILLING:
        return
    fills = _fills.get(optimizer)
    if fills is None:
        if not _carrier.live_carriers():
            return
        fills = _fills[optimizer] = []
        optimizer.register_state_dict_post_hook(_save_fills)
    groups = optimizer.param_groups
    if len(fills) > len(groups):
        del fills[len(groups) :]
    for i, group in enumerate(groups):
        if i == len(fills):
            fills.append([group, step_sizes.next_fill(optimizer, group, None)])
        elif fills[i][0] is not group:  # load_state_dict() installs new group dicts
            fills[i] = [group, step_sizes.next_fill(optimizer, group, None)]
        else:
            fills[i][1] = step_sizes.next_fill(optimizer, group, fills[i][1])


def _save_fills(optimizer, state_dict) -> None:
    """``state_dict()`` post-hook: record each group's momentum fill, so ``load_state_dict`` resumes it."""
    fills = _fills.get(optimizer)
    if not fills:
        return
    for (group, fill), live, saved in zip(fills, optimizer.param_groups, state_dict["param_groups"], strict=False):
        if group is live and fill:
            saved[step_sizes.FILL_KEY] = fill


def _fill(optimizer, index: int, group) -> float | None:
    """The momentum fill of ``group`` after the step just taken (None: not tracked)."""
    fills = _fills.get(optimizer)
    if fills is None or index >= len(fills) or fills[index][0] is not group:
        return None
    return fills[index][1]


def _signature(optimizer) -> tuple:
    # load_state_dict() installs new group dicts around the same params lists: key on both
    return (_carrier.generation(), tuple((id(g), id(g["params"]), len(g["params"])) for g in optimizer.param_groups))


class _Bucket:
    """Tensors of one parameter group that share a regularizer object and a step policy."""

    __slots__ = ("regularizer", "policy", "params", "carriers", "counted")

    def __init__(self, regularizer, policy: str):
        self.regularizer, self.policy = regularizer, policy
        self.params: list[Tensor] = []
        self.carriers: list = []
        self.counted = False  # True: per-carrier step counts matter (a schedule, every > 1, penalty mode)


def _policy(carrier, metric: str | None, optimizer) -> str:
    """The step policy of a carrier: "lr", "scalar" (SGD's lr times its momentum factor), "adaptive"
    (per coordinate), or "count" (a scheduled penalty-mode carrier: only its step count moves)."""
    if carrier.mode == "penalty":
        return "count"
    if carrier.step == "adaptive" and metric is None:
        known = ", ".join(sorted(c.__name__ for c in step_sizes.KNOWN))
        raise ParamregError(
            f"'{carrier.name}' was attached with step='adaptive', but paramreg does not know the metric of "
            f"{type(optimizer).__name__} (it knows {known}): attach it with step='lr', or leave step at its default"
        )
    if carrier.regularizer.kind == "constraint" or carrier.step == "lr" or metric is None:
        return "lr"  # a projection takes no step size (Constraint.prox_diag)
    if metric == "scalar":
        return "scalar"  # SGD: lr times its momentum factor, for any regularizer
    return "adaptive" if carrier.regularizer.adaptive else "lr"


def _build_plan(optimizer) -> list:
    by_param = {}
    for c in list(_carrier.live_carriers()):
        if c.mode == "prox" or (c.mode == "penalty" and c.schedule is not None):
            leaf = c.leaf()
            if leaf is not None:
                by_param[id(leaf)] = c
    metric = step_sizes.metric(optimizer)
    plan = []
    for index, group in enumerate(optimizer.param_groups):
        buckets: dict[tuple, _Bucket] = {}
        for p in group["params"]:
            c = by_param.get(id(p))
            if c is None:
                continue
            policy = _policy(c, metric, optimizer)
            bucket = buckets.get((id(c.regularizer), policy))
            if bucket is None:
                bucket = buckets[id(c.regularizer), policy] = _Bucket(c.regularizer, policy)
            bucket.params.append(p)
            bucket.carriers.append(c)
            bucket.counted |= c.schedule is not None or getattr(c.regularizer, "every", 1) != 1 or policy == "count"
        if buckets:
            if "lr" not in group and any(b.policy != "count" for b in buckets.values()):
                raise ParamregError(
                    f"{type(optimizer).__name__} has no 'lr' in its parameter groups, and mode='prox' takes the "
                    f"group's lr as its step size: call paramreg.prox_step(model, lr) after each step instead, "
                    f"or attach with mode='penalty'"
                )
            plan.append((index, group, list(buckets.values())))
    return plan


def _is_wrapper(optimizer) -> bool:
    """True for an optimizer that steps an inner torch optimizer: the hook acts on the inner step.

    ``ZeroRedundancyOptimizer.step`` steps the shard this rank owns with its inner optimizer
    (whose hook applies the prox, in that optimizer's metric), then broadcasts every shard: acting
    again after its own step would apply the prox twice. (Looked up only if the user imported it.)
    """
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer)


@torch.compiler.disable  # bookkeeping in Python: runs eagerly after a compiled optimizer step
def _after_step(optimizer, args, kwargs) -> None:
    if not _carrier.live_carriers() or _is_wrapper(optimizer):
        return
    signature = _signature(optimizer)
    cached = _plans.get(optimizer)
    if cached is None or cached[0] != signature:
        cached = (signature, _build_plan(optimizer))
        _plans[optimizer] = cached
    if not cached[1]:
        return
    filling = type(optimizer) in step_sizes.FILLING
    with torch.no_grad():
        for index, group, buckets in cached[1]:
            lr = float(group["lr"]) if "lr" in group else 0.0
            fill = _fill(optimizer, index, group) if filling else None
            for bucket in buckets:
                if not bucket.counted:
                    stepped = [p for p in bucket.params if p.grad is not None]
                    if stepped:
                        _apply(bucket, stepped, lr, optimizer, group, fill)
                    continue
                # per tensor: advance its step count; group the tensors due now by their multiplier
                due: dict[float, list[Tensor]] = {}
                every = getattr(bucket.regularizer, "every", 1)
                for p, c in zip(bucket.params, bucket.carriers, strict=True):
                    if p.grad is None:
                        continue
                    k, factor = c.calls, c.factor  # factor: the schedule's value at step k
                    c.calls += 1
                    if c.schedule is not None:
                        c.factor = _factor(c, c.schedule(c.calls))
                    if bucket.policy != "count" and k % every == every - 1:
                        due.setdefault(factor, []).append(p)
                for factor, tensors in due.items():
                    _apply(bucket, tensors, lr * factor * every, optimizer, group, fill)


def _factor(carrier, value) -> float:
    """A schedule's value, checked: a finite number >= 0."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ParamregError(
            f"the strength schedule of '{carrier.name}' returned {value!r} at step {carrier.calls}; "
            f"it must return a finite number >= 0"
        )
    return float(value)


def _apply(bucket: _Bucket, tensors: list[Tensor], t: float, optimizer, group, fill: float | None) -> None:
    """One multi-tensor proximal map over ``tensors`` with step ``t`` (scaled by SGD's momentum
    factor, or per coordinate by the optimizer's metric under the adaptive policy; ``fill``: the
    group's momentum fill, Note [Momentum fill])."""
    if t == 0.0 and bucket.regularizer.kind != "constraint":
        return
    if bucket.policy == "scalar":
        t *= step_sizes.sgd_factor(group, fill)
    elif bucket.policy == "adaptive":
        regularizer = bucket.regularizer
        states = [optimizer.state[p] for p in tensors]
        for block, block_states in _blocks(tensors, states, regularizer):
            inverse = step_sizes.inverse_steps(optimizer, group, block_states, t, fill)
            if inverse is None:
                regularizer.prox_(block, t)
            else:
                regularizer.prox_diag_(block, inverse)
        return
    bucket.regularizer.prox_(tensors, t)


# Elements per block of the adaptive prox on the CPU: its scratch tensors (the inverse steps) and
# the slices it reads stay in the cores' L2 caches between its passes (Note [Blocks]).
BLOCK = 1 << 17


def _blocks(tensors: list[Tensor], states: list[dict], regularizer):
    """(tensors, optimizer states) in blocks of about ``BLOCK`` elements.

    Note [Blocks]
        The adaptive prox takes several elementwise passes (the optimizer's steps from its state,
        then the map; the group lasso's Newton iterations take many). On an accelerator each pass
        is one multi-tensor kernel over everything. On the CPU a pass over a tensor larger than
        the caches goes to memory, so several passes cost several memory round trips; in blocks
        of ``BLOCK`` elements only the first read and the last write do. Measured for L1 under
        Adam (2 CPU cores): over 20M weights, more than the L3 cache holds, 40 ms a step against
        69-100 ms in whole tensors; over an MLP's 1.8M, which the L3 cache holds, the same within
        noise. A map may cut a tensor where it says
        (``Regularizer.split``): an elementwise map into flat slices, a group map whose groups lie
        within rows into slices of rows, each with the same slices of the optimizer's state.
        Small tensors are gathered until a block is full. Anything else (an accelerator, a
        tensor subclass such as DTensor, a non-contiguous tensor or state) is one block.
    """
    if tensors[0].device.type != "cpu":
        yield tensors, states
        return
    small: list[Tensor] = []
    small_states: list[dict] = []
    filled = 0
    for p, state in zip(tensors, states, strict=True):
        n = p.numel()
        split = regularizer.split(p.dim()) if n > BLOCK and _sliceable(p, state) else None
        if split is None:
            small.append(p)
            small_states.append(state)
            filled += n
            if filled >= BLOCK:
                yield small, small_states
                small, small_states, filled = [], [], 0
            continue
        if split == "elements":
            p, state = p.view(-1), {k: v.view(-1) if _alike(v, p) else v for k, v in state.items()}
        step = max(1, BLOCK * p.shape[0] // n)  # elements: BLOCK; rows: as many rows as fit
        for start in range(0, p.shape[0], step):
            end = start + step
            yield [p[start:end]], [{k: v[start:end] if _alike(v, p) else v for k, v in state.items()}]
    if small:
        yield small, small_states


def _alike(value, p: Tensor) -> bool:
    return isinstance(value, Tensor) and value.shape == p.shape


def _sliceable(p: Tensor, state: dict) -> bool:
    """A plain contiguous tensor whose same-shaped state tensors are plain and contiguous."""
    tensors = [p, *(v for v in state.values() if _alike(v, p))]
    return all(type(x) in (Tensor, nn.Parameter) and x.is_contiguous() for x in tensors)


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
    for s in _carrier.slots(model):
        if s.carrier is not None and s.carrier.mode == "prox":
            key = (id(s.carrier.regularizer), s.carrier.factor)
            buckets.setdefault(key, (s.carrier.regularizer, s.carrier.factor, []))[2].append(s.param)
    with torch.no_grad():
        for regularizer, factor, params in buckets.values():
            regularizer.prox_(params, float(lr) * factor)


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
        if carriers is None:  # no schedule: every factor is 1
            terms = [regularizer.penalty_sum(tensors)]
        else:  # a schedule: the tensors at each current factor together
            by_factor: dict[float, list[Tensor]] = {}
            for ref, tensor in zip(carriers, tensors, strict=True):
                by_factor.setdefault(ref().factor, []).append(tensor)
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
        walking every parameter of the model under its canonical name (``carrier.slots``): on
        200 small layers that took three times as long as the penalties themselves. So each
        model caches its plan: per regularizer object, the tensors it penalizes (the stored
        Parameters, or the slot whose ``value()`` computes the tensor under a user's
        parametrization). The plan is rebuilt when a carrier is bound, unbound or changed
        anywhere (the generation counter the step plans use), or when the model's module tree
        is no longer the one the plan was built from: a submodule replaced, added or deleted.
        That check compares the modules by identity, found by a walk of ``_modules`` that skips
        the parametrization containers (what changes in them is a carrier change): about one
        dict per module, against a Slot per parameter for ``slots``. Schedules move a
        carrier's factor every step without a rebuild; the plan reads it at each call.

        A cached plan holds the Parameters (which reference no module), the tree through weak
        references, and carriers only where a schedule is (weakly): nothing in it keeps the
        model alive through the weak-keyed cache. A tensor under a user's own parametrization
        is penalized through its slot's ``value()``, and a slot holds its module, list and
        carrier; a plan with such a slot is not cached (when it was, carriers of an earlier
        test's models outlived it into the leak test), and that model takes the walk on every
        call as before, as does a model that cannot be a weak dictionary key (unhashable).
    """

    __slots__ = ("generation", "tree", "buckets")

    def __init__(self, generation: int, tree: list, buckets: list):
        self.generation, self.tree, self.buckets = generation, tree, buckets


# model -> its _PenaltyPlan (Note [Penalty plans]); weak, so paramreg never keeps a model alive
_penalty_plans: "weakref.WeakKeyDictionary[nn.Module, _PenaltyPlan]" = weakref.WeakKeyDictionary()


def _submodules(model: nn.Module) -> list[nn.Module]:
    """Every submodule of ``model`` once, depth first, without the parametrization containers
    (a parametrized module's ``parametrizations``, a ``ModuleDict``)."""
    found, seen, stack = [], {id(model)}, [model]
    while stack:
        for name, child in stack.pop()._modules.items():
            if child is None or (name == "parametrizations" and type(child) is nn.ModuleDict):
                continue
            if id(child) not in seen:
                seen.add(id(child))
                found.append(child)
                stack.append(child)
    return found


def _penalty_plan(model: nn.Module) -> _PenaltyPlan:
    try:
        plan = _penalty_plans.get(model)
    except TypeError:  # unhashable: no cache
        plan = None
    if plan is not None and plan.generation == _carrier.generation():
        tree = _submodules(model)
        if len(tree) == len(plan.tree) and all(ref() is m for ref, m in zip(plan.tree, tree)):
            return plan
    buckets: dict[int, tuple] = {}
    for s in _carrier.slots(model):  # may bump the generation (carrier._sync): read it after
        c = s.carrier
        if c is not None and c.mode == "penalty":
            bucket = buckets.setdefault(id(c.regularizer), (c.regularizer, [], []))
            bucket[1].append(s.param if s.param is not None else s)
            bucket[2].append(c)
    plan = _PenaltyPlan(
        _carrier.generation(),
        [weakref.ref(m) for m in _submodules(model)],
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
