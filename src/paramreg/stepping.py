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

Note [Nested steps]
    An optimizer that wraps another (``ZeroRedundancyOptimizer``, a SAM-style or lookahead-style
    wrapper, accelerate's ``AcceleratedOptimizer``) calls the inner optimizer's ``step()`` inside
    its own, and the global hooks fire for both. The prox belongs to the inner step: that
    optimizer updated the tensor, and its group's lr, momentum fill or metric is the step size.
    So the pre-step hook pushes each optimizer onto a per-thread stack and the post-step hook pops
    it; an optimizer inside whose ``step()`` another optimizer stepped is remembered as a wrapper,
    and a wrapper's own post-step hook applies nothing, also on a later step in which its inner
    optimizer does not step (a skipped or accumulating step). A ``step()`` that raised (an
    interrupt in a notebook) never reaches its post-step hook, so each entry also holds the
    Python frame running that step (torch's hook-calling wrapper), and an entry whose frame is no
    longer on the call stack is dropped when the next step begins: a step is nested only in steps
    that are still running.

Note [Plans]
    The hook must be cheap. For each optimizer it caches a plan: per parameter group, the
    attached parameters bucketed by (regularizer, step policy), so that each regularizer's
    multi-tensor map runs once over all its tensors. The plan is rebuilt when a carrier is bound,
    unbound or changed anywhere, or when the optimizer's parameter groups change. A regularizer
    with ``every = k > 1`` (``NuclearNorm``) is applied to a tensor on every k-th step that
    updates it, with step k·t; each carrier counts its own steps, which is also the step count a
    strength schedule and a sparsity target read.

Note [Which optimizers paramreg knows]
    An optimizer's step policy depends on the update it runs (Note [Step policies] in
    step_sizes.py). A subclass that does not override ``step`` (a logging or configuration
    subclass) runs its base class's update and is treated as that class; one that overrides
    ``step``, and any optimizer paramreg does not know (``Adafactor``, third-party ones), takes
    t = lr, and the first step warns once per optimizer, naming it, the tensors and the policy. The
    policy each tensor's last step took shows in ``report`` and ``print(model)``
    (``adaptive(Adam)``, ``sgd(SGD)``, ``lr``, ``projection``).

Note [Resume]
    A run is resumed the way Lightning and the Hugging Face Trainer do it: build the model, make
    the same ``attach`` calls, then ``model.load_state_dict(...)`` and
    ``optimizer.load_state_dict(...)``. The model's state_dict keeps its plain keys; what paramreg
    needs beyond it travels in the optimizer's: each parameter group records the step counts of
    its scheduled, targeted and ``every``-k tensors under ``STEPS_KEY`` (and SGD's and RMSprop's
    momentum fill under ``FILL_KEY``). The first step after ``load_state_dict`` sets the carriers'
    counts from there and removes the key from the live group, so the resumed run continues
    exactly where the saved one stopped.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import carrier as _carrier
from . import step_sizes
from .errors import ParamregError

__all__ = ["penalty", "prox_step"]

STEPS_KEY = "paramreg_steps"  # where a group's carriers' step counts go in the optimizer's state_dict()

_hook_handle = None
_pre_hook_handle = None
_plans: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()
# SGD and RMSprop -> [group, fill] per parameter group, in the optimizer's order (Note [Momentum fill])
_fills: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list[list]]" = weakref.WeakKeyDictionary()
# Optimizers whose state_dict() paramreg writes into (Note [Resume]), and those warned about.
_saving: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_warned: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
# Note [Nested steps]: the optimizers whose step() is running, per thread, and the known wrappers
_running = threading.local()
_wrappers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


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
    Also notes that ``optimizer`` is stepping (Note [Nested steps]).
    """
    _enter(optimizer)
    if step_sizes.resolve(optimizer) not in step_sizes.FILLING:
        return
    fills = _fills.get(optimizer)
    if fills is None:
        if not _carrier.live_carriers():
            return
        fills = _fills[optimizer] = []
        _save_with(optimizer)
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


def _save_with(optimizer) -> None:
    """Make ``optimizer.state_dict()`` record what a resumed run needs (Note [Resume])."""
    if optimizer not in _saving:
        _saving.add(optimizer)
        optimizer.register_state_dict_post_hook(_save_state)


def _save_state(optimizer, state_dict) -> None:
    """``state_dict()`` post-hook: record each group's momentum fill and its carriers' step counts,
    so that ``load_state_dict`` resumes them (Note [Resume])."""
    fills = _fills.get(optimizer) or []
    for (group, fill), live, saved in zip(fills, optimizer.param_groups, state_dict["param_groups"], strict=False):
        if group is live and fill:
            saved[step_sizes.FILL_KEY] = fill
    cached = _plans.get(optimizer)
    if cached is None:
        return
    for index, group, buckets in cached[1]:
        counts = {}
        for bucket in buckets:
            if bucket.counted:
                counts.update({id(p): c.calls for p, c in zip(bucket.params, bucket.carriers, strict=True)})
        if counts and index < len(state_dict["param_groups"]):
            state_dict["param_groups"][index][STEPS_KEY] = [
                [position, counts[id(p)]] for position, p in enumerate(group["params"]) if id(p) in counts
            ]


def _restore_counts(group: dict, by_param: dict) -> None:
    """Set the step counts a loaded optimizer state recorded for ``group`` (Note [Resume])."""
    saved = group.pop(STEPS_KEY, None)
    if not saved:
        return
    params = group["params"]
    for position, calls in saved:
        c = by_param.get(id(params[position])) if position < len(params) else None
        if c is not None:
            c.calls = int(calls)
            if c.schedule is not None:
                c.factor = _factor(c, c.schedule(c.calls))


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

    __slots__ = ("regularizer", "policy", "params", "carriers", "counted", "budget")

    def __init__(self, regularizer, policy: str, budget=None):
        self.regularizer, self.policy, self.budget = regularizer, policy, budget
        self.params: list[Tensor] = []
        self.carriers: list = []
        # True: per-carrier step counts matter (a schedule, a target, every > 1, penalty mode)
        self.counted = budget is not None


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


def _warn_unknown(optimizer, carriers: list) -> None:
    """Once per optimizer: paramreg does not know its update, so t = lr (Note [Which optimizers paramreg knows])."""
    if optimizer in _warned:
        return
    _warned.add(optimizer)
    names = ", ".join(repr(c.name) for c in carriers[:3]) + (f" and {len(carriers) - 3} more" if len(carriers) > 3 else "")
    cls = type(optimizer)
    why = "overrides step()" if any(b in step_sizes.KNOWN for b in cls.__mro__) else "is not one paramreg knows"
    warnings.warn(
        f"paramreg: {cls.__name__} {why}, so paramreg cannot take the proximal step in its metric; {names} take "
        f"the step t = lr (the decoupled form: L1(a) shrinks each weight by lr·a per step), not the step the "
        f"optimizer took. Attach with step='lr' to say that this is intended.",
        stacklevel=4,
    )


def _build_plan(optimizer) -> list:
    by_param = {}
    for c in list(_carrier.live_carriers()):
        if c.mode == "prox" or (c.mode == "penalty" and c.schedule is not None):
            leaf = c.leaf()
            if leaf is not None:
                by_param[id(leaf)] = c
    metric = step_sizes.metric(optimizer)
    plan = []
    guessed = []
    for index, group in enumerate(optimizer.param_groups):
        _restore_counts(group, by_param)
        buckets: dict[tuple, _Bucket] = {}
        for p in group["params"]:
            c = by_param.get(id(p))
            if c is None:
                continue
            policy = _policy(c, metric, optimizer)
            if metric is None and c.step == "auto" and c.mode == "prox" and c.regularizer.kind != "constraint":
                guessed.append(c)
            c.ran = _label(c, policy, optimizer) if policy != "count" else None
            bucket = buckets.get((id(c.regularizer), policy))
            if bucket is None:
                bucket = buckets[id(c.regularizer), policy] = _Bucket(c.regularizer, policy, c.budget)
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
    if guessed:
        _warn_unknown(optimizer, guessed)
    if plan:
        _save_with(optimizer)
    return plan


_HERE = os.path.dirname(os.path.abspath(__file__))
_DYNAMO = f"{os.sep}torch{os.sep}_dynamo{os.sep}"


def _enter(optimizer) -> None:
    """Push ``optimizer`` and the frame running its step onto this thread's stack (Note [Nested steps])."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_HERE) or _DYNAMO in frame.f_code.co_filename):
        frame = frame.f_back  # above paramreg's hook and torch.compiler.disable's wrapper: torch's step wrapper
    stack = getattr(_running, "stack", None)
    if stack is None:
        stack = _running.stack = []
    if stack:  # keep only the steps still running around this one (a step that raised left its entry)
        running, f = set(), frame
        while f is not None:
            running.add(id(f))
            f = f.f_back
        stack[:] = [entry for entry in stack if id(entry[1]) in running]
    stack.append((weakref.ref(optimizer), frame))


def _leave(optimizer) -> bool:
    """Pop ``optimizer``'s step; True if it is a wrapper, whose step applies no prox (Note [Nested steps])."""
    stack = getattr(_running, "stack", None) or []
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0]() is optimizer:
            del stack[i:]
            outer = stack[-1][0]() if stack else None
            if outer is not None and outer is not optimizer:
                _wrappers.add(outer)
            break
    return optimizer in _wrappers


@torch.compiler.disable  # bookkeeping in Python: runs eagerly after a compiled optimizer step
def _after_step(optimizer, args, kwargs) -> None:
    if _leave(optimizer) or not _carrier.live_carriers():
        return
    signature = _signature(optimizer)
    cached = _plans.get(optimizer)
    if cached is None or cached[0] != signature:
        cached = (signature, _build_plan(optimizer))
        _plans[optimizer] = cached
    if not cached[1]:
        return
    filling = step_sizes.resolve(optimizer) in step_sizes.FILLING
    targeted: dict[int, tuple] = {}  # id(budget) -> (budget, [(bucket, tensors, lr, group, fill)])
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
                if bucket.budget is not None:
                    stepped = []
                    for p, c in zip(bucket.params, bucket.carriers, strict=True):
                        if p.grad is not None:
                            c.calls += 1
                            stepped.append(p)
                    if stepped:
                        work = targeted.setdefault(id(bucket.budget), (bucket.budget, []))[1]
                        work.append((bucket, stepped, lr, group, fill))
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
        for budget, work in targeted.values():
            _apply_target(budget, work, optimizer)


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


def _inverse(bucket: _Bucket, tensors: list[Tensor], t: float, optimizer, group, fill: float | None, states=None, floors=None):
    """The step of ``bucket``'s policy for ``tensors``: inverse steps 1/t_i (a tensor per tensor) in
    an optimizer's metric, else the step t itself (a number)."""
    if bucket.policy == "scalar":
        return t * step_sizes.sgd_factor(group, fill)
    if bucket.policy == "adaptive":
        if states is None:
            states = [optimizer.state[p] for p in tensors]
            floors = step_sizes.floors(optimizer, group, tensors, states)
        inverse = step_sizes.inverse_steps(optimizer, group, states, t, fill, floors)
        if inverse is not None:
            return list(inverse)
    return t


def _map(regularizer, tensors: list[Tensor], step) -> None:
    """The proximal map over ``tensors`` with ``step`` from :func:`_inverse` (inverse steps are consumed)."""
    if isinstance(step, list):
        regularizer.prox_diag_(tensors, step)
    else:
        regularizer.prox_(tensors, step)


def _apply(bucket: _Bucket, tensors: list[Tensor], t: float, optimizer, group, fill: float | None) -> None:
    """One multi-tensor proximal map over ``tensors`` with step ``t`` (scaled by SGD's momentum
    factor, or per coordinate by the optimizer's metric under the adaptive policy; ``fill``: the
    group's momentum fill, Note [Momentum fill])."""
    regularizer = bucket.regularizer
    if regularizer.remembers:
        memories = {id(p): c.memory for p, c in zip(bucket.params, bucket.carriers, strict=True)}
        regularizer.project_(tensors, [memories[id(p)] for p in tensors])
        return
    if t == 0.0 and regularizer.kind != "constraint":
        return
    if bucket.policy != "adaptive":
        _map(regularizer, tensors, _inverse(bucket, tensors, t, optimizer, group, fill))
        return
    states = [optimizer.state[p] for p in tensors]
    floors = step_sizes.floors(optimizer, group, tensors, states)
    for indices, block, block_states in _blocks(tensors, states, regularizer):
        block_floors = None if floors is None else [floors[i] for i in indices]
        _map(regularizer, block, _inverse(bucket, block, t, optimizer, group, fill, block_states, block_floors))


def _apply_target(budget, work: list[tuple], optimizer) -> None:
    """The proximal maps of one sparsity target over everything the step updated, with the strength
    calibrated on this step's iterate (Note [Target sparsity] in sparsity.py)."""
    steps, criticals = [], []
    k = 0
    for bucket, tensors, lr, group, fill in work:
        step = _inverse(bucket, tensors, lr, optimizer, group, fill)
        steps.append(step)
        inverse = step if isinstance(step, list) else [1.0 / step if step else math.inf] * len(tensors)
        criticals += bucket.regularizer.critical(tensors, inverse)
        k = max(k, max(c.calls for p, c in zip(bucket.params, bucket.carriers, strict=True) if p.grad is not None))
    strength = budget.calibrate(criticals, k)
    for (bucket, tensors, *_), step in zip(work, steps, strict=True):
        for c in bucket.carriers:
            c.factor = strength
        if strength:
            _map(bucket.regularizer.scaled(strength), tensors, step)


# Elements per block of the adaptive prox on the CPU: its scratch tensors (the inverse steps) and
# the slices it reads stay in the cores' L2 caches between its passes (Note [Blocks]).
BLOCK = 1 << 17


def _blocks(tensors: list[Tensor], states: list[dict], regularizer):
    """(indices into ``tensors``, tensors, optimizer states) in blocks of about ``BLOCK`` elements.

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
        tensor subclass such as DTensor, a non-contiguous tensor or state, a map that couples
        tensors) is one block. The safeguard's floors (Note [Safeguarded metric]) are taken over
        whole tensors before blocking, so blocks change no value.
    """
    if tensors[0].device.type != "cpu" or regularizer.joint:
        yield range(len(tensors)), tensors, states
        return
    small: list[int] = []
    filled = 0
    for i, (p, state) in enumerate(zip(tensors, states, strict=True)):
        n = p.numel()
        split = regularizer.split(p.dim()) if n > BLOCK and _sliceable(p, state) else None
        if split is None:
            small.append(i)
            filled += n
            if filled >= BLOCK:
                yield small, [tensors[j] for j in small], [states[j] for j in small]
                small, filled = [], 0
            continue
        if split == "elements":
            p, state = p.view(-1), {k: v.view(-1) if _alike(v, p) else v for k, v in state.items()}
        step = max(1, BLOCK * p.shape[0] // n)  # elements: BLOCK; rows: as many rows as fit
        for start in range(0, p.shape[0], step):
            end = start + step
            yield [i], [p[start:end]], [{k: v[start:end] if _alike(v, p) else v for k, v in state.items()}]
    if small:
        yield small, [tensors[j] for j in small], [states[j] for j in small]


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
        if len(tree) == len(plan.tree) and all(ref() is m for ref, m in zip(plan.tree, tree, strict=True)):
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
