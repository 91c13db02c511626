"""The optimizer hooks: one global pre-step and post-step hook for every torch optimizer, and nesting.

Note [Why a global optimizer post-step hook]
    ``torch.optim.optimizer.register_optimizer_step_post_hook`` runs after the ``step()`` of every
    ``torch.optim.Optimizer``, whether it was built before or after ``attach``, with no extra line
    in the user's loop. ``GradScaler`` does not call ``step()`` on a step with inf/NaN gradients
    (a fused optimizer's it calls, flagged: Note [Skipped fused steps]), so the prox is skipped
    exactly when the step is; with gradient accumulation it runs once per
    real step. Nothing is ever added to gradients (a backward hook would see AMP-scaled gradients
    and fire once per micro-batch). A global pre-step hook, skipped with the step in the same
    way, keeps the momentum fill of SGD and RMSprop (Note [Momentum fill] in optim/state.py).
    Their work shows in ``torch.profiler`` as ``paramreg.before_step`` and ``paramreg.after_step``
    (``record_function``, as torch's optimizers label their steps).

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
"""

from __future__ import annotations

import math
import os
import sys
import threading
import weakref

import torch
from torch.autograd.profiler import record_function
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import ParamregError
from ..modules.carrier import live_carriers
from . import applying, fused, plans, state, step_sizes
from .step_sizes import whole

__all__ = ["install"]

_handles: list = []  # the two global hooks, once registered
# Note [Nested steps]: the optimizers whose step() is running, per thread
_running = threading.local()


def install() -> None:
    """Register the global post-step hook (and the pre-step hook that tracks momentum fills) once per process."""
    if not _handles:
        _handles.append(register_optimizer_step_pre_hook(_before_step))
        _handles.append(register_optimizer_step_post_hook(_after_step))


@torch.compiler.disable  # bookkeeping in Python, like _after_step
def _before_step(optimizer, args, kwargs):
    """Note that ``optimizer`` is stepping (Note [Nested steps]), advance its momentum fills
    (Note [Momentum fill] in optim/state.py) unless the step is a null step (Note [Null steps])
    or a skipped one (Note [Skipped fused steps]), and set the gradient of the zeros a target
    keeps to zero (Note [Zeros that do not regrow] in optim/targets.py); with a closure, after
    the closure has computed it (the step's arguments returned with the closure wrapped)."""
    _enter(optimizer)
    skipped = _skipped(optimizer)
    if live_carriers():
        state.save_with(optimizer)  # before any step, also DCP's null one: its state_dict records paramreg's keys
        _refuse_coupled_targets_across_ranks(optimizer)
    state.advance_fills(optimizer, advance=not (skipped or _null_step(optimizer)))  # reads a loaded fill: before _hold_zeros
    if live_carriers() and not skipped:
        return _hold_zeros(optimizer, args, kwargs)
    return None


@torch.compiler.disable  # bookkeeping in Python: runs eagerly after a compiled optimizer step
def _after_step(optimizer, args, kwargs) -> None:
    wrapper = _leave(optimizer)
    found = state.get(optimizer)
    if found is not None and found.zeros:
        _rezero(found)  # also after a wrapper's step (a lookahead's slow weights) and a null one
    if wrapper or not live_carriers() or _null_step(optimizer) or _skipped(optimizer):
        return
    found = state.of(optimizer)
    signature = plans.signature(optimizer)
    if found.signature != signature:
        by_param = state.carriers_by_param()
        state.restore_counts(optimizer, by_param)  # a loaded state_dict's counts (Note [Resume] in optim/state.py)
        found.plan, guessed = plans.build(optimizer, by_param)
        found.partition = _partition(optimizer, by_param)
        found.signature = signature
        if guessed:
            plans.warn_unknown(optimizer, guessed)
        if found.plan:
            state.save_with(optimizer)
    if found.plan or found.partition:
        with record_function("paramreg.after_step"):
            applying.run(optimizer, found.plan or [], found.partition)


#: The state that moves a weight with no gradient in the optimizers paramreg knows, whose updates
#: are elementwise: the first moment (Adam, AdamW, NAdam, RAdam, Adamax) or momentum buffer (SGD, RMSprop).
_MOMENTA = ("exp_avg", "momentum_buffer")


def _hold_zeros(optimizer, args, kwargs):
    """Before a step: for the zero weights of every target with ``regrow=False`` whose ramp has
    begun, the gradient set to zero, and either their momentum too (an optimizer paramreg knows:
    its step then leaves them at zero) or their mask kept for :func:`_rezero` (any other
    optimizer); Note [Zeros that do not regrow] in optim/targets.py. With a closure, the step's
    arguments returned with the closure made to set the gradient after computing it. The tensors
    are listed once per plan signature, their carriers weakly; a resumed run's step counts are
    restored here, before its first step, since they decide. A ``ZeroRedundancyOptimizer`` over
    several ranks holds none: its inner optimizer's step, nested in its own, holds the tensors
    this rank owns, and its broadcast brings the others from their owners (its own hold repeated
    the inner one's masks and writes on this rank's tensors)."""
    found = state.of(optimizer)
    found.zeros = []
    signature = plans.signature(optimizer)
    if found.held_for != signature:
        by_param = state.carriers_by_param()
        found.held = [
            (p, weakref.ref(c), g) for g in optimizer.param_groups for p in g["params"]
            if (c := by_param.get(id(p))) is not None and c.mode == "prox" and c.target is not None and not c.target.regrow
        ]
        if found.held:
            state.restore_counts(optimizer, by_param)  # a loaded state_dict's counts (Note [Resume] in optim/state.py)
        if _zero_outer(1) is optimizer:
            found.held = []  # its inner optimizer holds them
        found.held_for = signature
    if not found.held:
        return None
    with record_function("paramreg.before_step"):
        return _hold(optimizer, found, args, kwargs)


def _hold(optimizer, found, args, kwargs):
    """:func:`_hold_zeros`'s masked writes over the tensors it listed in ``found.held``."""
    closure = kwargs.get("closure") if "closure" in kwargs else args[1] if len(args) > 1 else None  # args[0]: the optimizer
    known = step_sizes.resolve(optimizer) in step_sizes.KNOWN
    masks = []
    with torch.no_grad():
        for p, ref, group in found.held:
            c = ref()
            if c is None or not c.target.masks_gradient(c.calls):
                continue
            grad = p.grad
            moving = optimizer.state.get(p) or {} if known else {}
            momenta = [t for key in _MOMENTA if isinstance(t := moving.get(key), torch.Tensor) and t.shape == p.shape]
            if moving:
                _keep_normal(p, moving, step_sizes.decaying(optimizer, group), c.calls)
            if (known and not callable(closure) and grad is not None and not grad.is_sparse and len(momenta) <= 1
                    and fused.hold_(p, momenta[0] if momenta else None)):
                continue  # one compiled pass did what the masked writes below do
            zeros = p.detach() == 0
            if grad is not None and grad.is_sparse:  # no masked write into it: the zeros set back after the step
                found.zeros.append((p, zeros))
                continue
            if known:
                for t in momenta:
                    t.masked_fill_(zeros, 0)
            else:
                found.zeros.append((p, zeros))
            if callable(closure):
                masks.append((p, zeros))
            elif grad is not None:
                grad.masked_fill_(zeros, 0)
    if not masks:
        return None

    def masked():
        loss = closure()
        _mask_gradients(masks)
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": masked}
    return (args[0], masked, *args[2:]), kwargs


#: Note [Decaying state of held zeros]: a decaying state at a held zero is kept at or above
#: tiny·2^FLOOR_BITS of its dtype, by a pass every ln(2^(FLOOR_BITS/2))/ln(1/factor) steps.
FLOOR_BITS = 12
_FLOAT32_TINY = torch.finfo(torch.float32).tiny  # float16's smallest normal is 6e-5, a squared gradient's size: no floor there


def floor_period(factor: float) -> int:
    """How many steps apart :func:`_keep_normal` raises a state that decays by ``factor`` a step:
    between two passes it falls by at most 2^(FLOOR_BITS/2), so from its floor tiny·2^FLOOR_BITS it
    stays at or above tiny·2^(FLOOR_BITS/2); 0 where it does not decay (factor 1) or is reset at
    every step (factor 0)."""
    if not 0.0 < factor < 1.0:
        return 0
    return max(1, int(FLOOR_BITS / 2 * math.log(2.0) / -math.log(factor)))


def _keep_normal(p, moving: dict, decaying, calls: int) -> None:
    """Before the step that follows ``calls`` steps of ``p``, every :func:`floor_period` steps:
    where ``p`` is 0, each unsigned decaying state below tiny·2^FLOOR_BITS raised to it and each
    signed one of smaller magnitude set to 0 (Note [Decaying state of held zeros]).

    Note [Decaying state of held zeros]
        A held zero's gradient and first moment are zero before each step (Note [Zeros that do
        not regrow] in optim/targets.py), so Adam's second moment there decays by beta2 a step
        (RMSprop's averages by alpha): from 1e-12 it reaches the smallest normal float32 after
        about 60,000 steps at beta2 = 0.999 (1,200 at 0.95), is denormal for ln(2^23)/ln(1/beta2)
        steps more, then exactly 0. torch's CPU kernels of Adam's step slow down on denormal
        inputs (2.4-8.1x) and its ``sqrt`` on exact zeros (1.4-1.6x the for-loop and foreach
        steps): ``benchmarks/held_zeros_adam.py``. So every 4,156 steps at beta2 = 0.999 (81 at
        0.95) one masked pass raises the second moment of each held zero to a normal floor
        (a signed average, RMSprop's centred one, goes to 0, which stays 0). No weight moves:
        a held zero's update is its first moment (0) over its denominator, and it changes nothing
        a selection reads (a zero's critical strength is 0 whatever its metric); so every weight is
        the same bit for bit as without the pass, and the state differs only where it would have
        decayed below the floor. A resumed run passes at the same steps (its counts restored).
        Not for float16 state, whose smallest normal (6e-5) is a squared gradient's size.
    """
    held = None  # p's zeros, compared once for every state that takes the pass
    for key, factor, signed in decaying:
        t = moving.get(key)
        period = floor_period(float(factor))
        if (not isinstance(t, torch.Tensor) or t.shape != p.shape or not t.is_floating_point() or not period
                or calls % period or torch.finfo(t.dtype).tiny > _FLOAT32_TINY):
            continue
        floor = torch.finfo(t.dtype).tiny * 2.0 ** FLOOR_BITS
        if held is None:
            held = p.detach() == 0
        if signed:
            t.masked_fill_(held & (t.abs() < floor), 0.0)
        else:
            t.masked_fill_(held & (t < floor), floor)


def _mask_gradients(zeros: list) -> None:
    with torch.no_grad():
        for p, mask in zeros:
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0)


def _rezero(found) -> None:
    """After a step, before its proximal maps: the weights :func:`_hold_zeros` found zero set to
    zero again (the optimizer's momentum moved them)."""
    with torch.no_grad():
        for p, zeros in found.zeros:
            p.masked_fill_(zeros, 0)
    found.zeros = []


def _skipped(optimizer) -> bool:
    """Whether a fused optimizer's step under ``GradScaler`` is skipped (Note [Skipped fused steps]).

    Note [Skipped fused steps]
        ``GradScaler.step`` does not call ``step()`` when a gradient is inf or NaN, except for an
        optimizer that handles scaling itself (``fused=True``: ``_step_supports_amp_scaling``):
        that one is called with the gradients still scaled and ``optimizer.found_inf`` set (and
        deleted after the step), and its kernel leaves the weights, moments and step counts as
        they were when ``found_inf`` is not zero. paramreg does the same: no map, no count, no
        fill, no mask on that step (a map there read the inf gradient's norm and made the weights
        NaN). On a step that is not skipped the kernel has unscaled the gradients in place when
        the post-step hook reads them (checked on the CPU).
    """
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf)


def _zero_outer(depth: int):
    """The ``ZeroRedundancyOptimizer`` over more than one rank whose step runs ``depth`` entries
    below the top of this thread's stack of running steps (Note [Nested steps]), or None."""
    stack = getattr(_running, "stack", None) or []
    outer = stack[-depth][0]() if len(stack) >= depth else None
    if type(outer).__name__ != "ZeroRedundancyOptimizer" or getattr(outer, "world_size", 1) <= 1:
        return None
    return outer


def _targets_of(outer, by_param: dict) -> dict[int, tuple]:
    """id(target) -> (target, [(parameter, carrier)]) over ``outer``'s parameters, in its groups' order."""
    targets: dict[int, tuple] = {}
    for group in outer.param_groups:
        for p in group["params"]:
            c = by_param.get(id(p))
            if c is not None and c.target is not None and c.mode == "prox":
                targets.setdefault(id(c.target), (c.target, []))[1].append((p, c))
    return targets


def _refuse_coupled_targets_across_ranks(optimizer) -> None:
    """Before the inner step of a ``ZeroRedundancyOptimizer`` over several ranks: a sparsity target
    whose map couples its tensors (``attach_channels``) is refused, on every rank alike and
    before anything moved, since its tensors may be stepped on different ranks. Checked where the
    step will build its plan anew (the carriers or the groups changed), not on every step."""
    outer = _zero_outer(2)  # this optimizer's own step is on top
    found = state.get(optimizer)
    if outer is None or (found is not None and found.signature == plans.signature(optimizer)):
        return  # not under ZeRO, or its plan was built (and these carriers checked) at an earlier step
    for _, tensors in _targets_of(outer, state.carriers_by_param()).values():
        c = tensors[0][1]
        if c.regularizer.joint:
            raise ParamregError(
                f"a sparsity target over coupled tensors ({c.name}) under ZeroRedundancyOptimizer on "
                f"{outer.world_size} ranks: its tensors may be stepped on different ranks; train it with DDP "
                "and a plain optimizer, or with FSDP2 (fully_shard)"
            )


def _partition(optimizer, by_param: dict) -> applying.Partition | None:
    """Where ``optimizer`` is the inner optimizer of a ``ZeroRedundancyOptimizer`` over more than one
    rank: the sparsity targets over the outer optimizer's parameters, each with all its tensors in
    the order of the outer parameter groups, which every rank holds alike (Note [Targets across
    ZeRO's ranks] in optim/applying.py); else None."""
    outer = _zero_outer(1)  # this optimizer's own step has left the stack
    if outer is None:
        return None
    targets = _targets_of(outer, by_param)
    return applying.Partition(outer.process_group, list(targets.values())) if targets else None


def _null_step(optimizer) -> bool:
    """Whether the step moves nothing: every group's lr is 0 and every gradient is zero.

    Note [Null steps]
        ``torch.distributed.checkpoint``'s ``get_state_dict`` on an optimizer without state sets
        every group's lr to 0, gives every parameter a zero gradient and calls ``step()``, only to
        make the optimizer create its state (the standard FSDP2 resume path). Such a step moves
        no weight and teaches nothing, so paramreg does not count it: no proximal map (under Adam
        its inverse steps would divide by lr = 0), no step count (a ramp or a schedule would run
        one step ahead), no momentum fill (SGD's buffer holds a zero gradient after it, so the
        next real step is still its first). A step with lr = 0 and a non-zero gradient (a warm-up
        from 0) is a step as any other. The check reads the groups' lr first; only when all are 0
        does it take one norm of each gradient.
    """
    groups = optimizer.param_groups
    if not groups or any("lr" not in g or float(g["lr"]) != 0.0 for g in groups):
        return False
    return all(
        p.grad is None or float(whole(torch.linalg.vector_norm(p.grad))) == 0.0 for g in groups for p in g["params"]
    )


_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the paramreg package
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
                state.of(outer).wrapper = True
            break
    found = state.get(optimizer)
    return found is not None and found.wrapper
