"""Per-optimizer state: what paramreg keeps of each optimizer, and what travels in its state_dict.

One :class:`OptimizerState` per optimizer (weakly keyed: paramreg never keeps an optimizer
alive) holds everything paramreg knows of it: the momentum fills of its parameter groups, its
cached plan, whether its ``state_dict()`` records paramreg's counts, whether it was warned about,
and whether it wraps another optimizer. Nothing is written into the live ``param_groups``
during training: a value that changed every step would make a compiled ``optimizer.step``
recompile.

Note [Resume]
    A run is resumed the way Lightning and the Hugging Face Trainer do it: build the model, make
    the same ``attach`` calls, then ``model.load_state_dict(...)`` and
    ``optimizer.load_state_dict(...)`` (or DCP's ``get_state_dict``, ``dcp.load`` and
    ``set_state_dict``). The model's state_dict keeps its plain keys; what paramreg needs beyond
    it travels in the optimizer's, in the per-parameter state, which every checkpointer round-trips
    (DCP with ``flatten_optimizer_state_dict=True`` drops unknown parameter-group keys): each
    carried parameter that has optimizer state records its carrier's step count under
    ``STEPS_KEY``, and each parameter of an SGD or RMSprop group the group's momentum fill under
    ``FILL_KEY`` (plain Python numbers: ``load_state_dict`` casts tensors to the parameter's
    dtype). Keys are only added to a parameter's existing state, never make one (Adam takes an
    empty state for a first step), except under SGD, which keeps none for a parameter it steps
    without momentum and reads only the keys it knows. ``state_dict()`` shares the live
    per-parameter dicts, so the keys land in the live state too, which DCP's
    ``flatten_optimizer_state_dict`` needs (it unflattens the keys the live state has); a count
    found in an entry that this run's own ``state_dict()`` wrote into is not restored (it would
    roll the count back to that moment when the carriers change later), only dropped. The hook
    is registered before an optimizer's first step, so that the state_dict DCP takes of a fresh
    optimizer as its template has the keys to fill. When
    the hook first sees the loaded groups (new group dicts), :func:`restore_counts` sets the
    carriers' counts and takes the keys out of the live state, before the plan is built; the fill
    is read back by :func:`first_fill` before that step. A checkpoint written by an older
    paramreg, with the keys in its parameter groups, is read too. So the resumed run continues
    exactly where the saved one stopped. A target that extrapolates keeps the weights of its
    ramp's first step in the live per-parameter state under ``ORIGIN_KEY``, a tensor like the
    optimizer's moments, which every checkpointer saves, loads and shards as it does those (Note
    [Extrapolated paths] in optim/targets.py), and the step it was taken at under
    ``ORIGIN_STEP_KEY``; ``state_dict()`` writes both for each of its parameters that has state,
    outside the ramp a copy of the weight as a placeholder with step -1, so that a fresh
    optimizer's template has the keys DCP fills and every checkpoint has the keys the template
    asks for. A placeholder is never read as an origin (a tensor takes one where the recorded
    step is not past the ramp's start) and is dropped at the next step outside the ramp. DCP
    loads only the keys its template asks for, and requires them: a DCP checkpoint written
    without them (by a paramreg before ``extrapolate=``) loads into attach calls that extrapolate
    with ``dcp.load(..., planner=DefaultLoadPlanner(allow_partial_load=True))``; the origin is
    then taken at each tensor's next step in the ramp (a resume mid-ramp takes it late).

Note [Momentum fill]
    c_k is how much the momentum buffer of SGD or RMSprop has multiplied a constant gradient
    after k steps: the buffer's fill, tracked per optimizer and parameter group by the step hooks
    (optim/hooks.py) with the group's momentum μ_k read at each step, so a momentum schedule
    (``OneCycleLR`` cycles μ) is followed step by step:

        SGD      c_1 = 1,  c_k = μ_k·c_{k−1} + (1 − dampening)   (torch sets buf = g on the first step, undamped)
        RMSprop  c_0 = 0,  c_k = μ_k·c_{k−1} + 1                 (its buffer starts at zero: buf = μ·buf + g/avg)

    At constant μ it rises to the settled value the buffer approaches, (1 − dampening)/(1 − μ)
    for SGD and 1/(1 − μ) for RMSprop (without dampening c_k = (1 − μᵏ)/(1 − μ), whose 1 − μᵏ is
    what Adam's bias correction divides out of its first moment). There SGD + L1(a) solves the
    lasso with strength a (tested against scikit-learn), where t = lr would solve it with
    strength (1 − μ)·a. The first step scales by 1, as the optimizer's did, so the prox does not
    run ahead of the buffer early in training or jump with a momentum schedule.

    Approximations: c is kept per group, and a parameter with no gradient on a step keeps its
    buffer unmoved while its group's c advances. A group first seen with momentum buffers
    already in place (attached mid-training, or an optimizer state loaded from a checkpoint that
    did not record c) starts at the settled value for SGD, and for RMSprop at the value its step
    count gives at the current μ. A group's c goes into the optimizer's ``state_dict()`` under
    ``FILL_KEY`` and is read back from the group after ``load_state_dict()``, so a resumed run
    continues exactly (the live group dicts are not written during training: a value that
    changed every step would make a compiled ``optimizer.step`` recompile).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from ..catalogue.elementwise import L0
from ..errors import ParamregError
from ..modules.carrier import live_carriers
from . import step_sizes

__all__ = ["OptimizerState", "of", "get", "STEPS_KEY", "FILL_KEY", "ORIGIN_KEY", "ORIGIN_STEP_KEY", "POINTS_IN", "drop_origins", "forget_origins", "advance_fills", "fill_of", "save_with", "restore_counts",
           "schedule_value", "carriers_by_param"]

STEPS_KEY = "paramreg_steps"  # where a group's carriers' step counts go in the optimizer's state_dict()
FILL_KEY = "paramreg_momentum_fill"  # where a group's momentum fill goes in the optimizer's state_dict()
ORIGIN_KEY = "paramreg_origin"  # a weight's tensor at its target's ramp's first step (Note [Extrapolated paths] in optim/targets.py)
ORIGIN_STEP_KEY = "paramreg_origin_step"  # the target's step count when ORIGIN_KEY was taken; -1: a placeholder
#: The optimizers in whose metric an L0 target scores points other than the weights (Notes [Looking
#: ahead] and [Extrapolated paths] in optim/targets.py).
POINTS_IN = (torch.optim.Adam, torch.optim.AdamW)


class OptimizerState:
    """What paramreg keeps of one optimizer."""

    __slots__ = ("fills", "signature", "plan", "partition", "saving", "warned", "wrapper", "held", "held_for", "zeros", "written")

    def __init__(self):
        self.fills: list[list] | None = None  # SGD and RMSprop: [group, fill] per parameter group (Note [Momentum fill])
        self.signature: tuple | None = None  # what the plan was built for (optim/plans.py)
        self.plan: list | None = None  # per parameter group: (index, group, buckets) (Note [Plans] in optim/plans.py)
        self.partition = None  # under ZeroRedundancyOptimizer: its targets over every rank (Note [Targets across ZeRO's ranks])
        self.saving = False  # its state_dict() records paramreg's counts and fills (Note [Resume])
        self.warned = False  # warned that paramreg does not know its update (Note [Which optimizers paramreg knows])
        self.wrapper = False  # another optimizer steps inside its step() (Note [Nested steps] in optim/hooks.py)
        # (parameter, its carrier weakly, its group) of its targets with regrow=False (Note [Zeros that do not regrow])
        self.held: list = []
        self.held_for: tuple | None = None  # the plan signature ``held`` was listed for
        self.zeros: list = []  # (parameter, its zero mask) from the step's pre-step hook to its post-step hook
        self.written: dict = {}  # id(parameter) -> the live state entry its state_dict() wrote a count into (Note [Resume])


_STATES: "weakref.WeakKeyDictionary[torch.optim.Optimizer, OptimizerState]" = weakref.WeakKeyDictionary()


def get(optimizer) -> OptimizerState | None:
    """paramreg's state of ``optimizer``, or None if it has none."""
    return _STATES.get(optimizer)


def of(optimizer) -> OptimizerState:
    """paramreg's state of ``optimizer``, made on first use."""
    found = _STATES.get(optimizer)
    if found is None:
        found = _STATES[optimizer] = OptimizerState()
    return found


def advance_fills(optimizer, advance: bool = True) -> None:
    """Before a step of ``optimizer``: advance the momentum fill of each of its parameter groups
    to its value after the step about to run (SGD and RMSprop; Note [Momentum fill]). With
    ``advance=False`` (a null step, Note [Null steps] in optim/hooks.py) groups not seen before
    are tracked from their present fill and no fill moves.

    Before the step, because a group seen for the first time is told apart from one whose
    buffers already hold momentum (attached mid-training, a loaded state) only by whether the
    buffers exist yet. An optimizer is tracked from the first step it takes while a carrier is
    live, and then on every step, so that its fills stay current while nothing is attached.
    """
    if step_sizes.resolve(optimizer) not in step_sizes.FILLING:
        return
    found = _STATES.get(optimizer)
    fills = None if found is None else found.fills
    if fills is None:
        if not live_carriers():
            return
        found = of(optimizer)
        fills = found.fills = []
        save_with(optimizer)
    groups = optimizer.param_groups
    if len(fills) > len(groups):
        del fills[len(groups) :]
    for i, group in enumerate(groups):
        fresh = first_fill(optimizer, group) if not advance else None
        if i == len(fills):
            fills.append([group, next_fill(optimizer, group, None) if advance else fresh])
        elif fills[i][0] is not group:  # load_state_dict() installs new group dicts
            fills[i] = [group, next_fill(optimizer, group, None) if advance else fresh]
        elif advance:
            fills[i][1] = next_fill(optimizer, group, fills[i][1])


def fill_of(optimizer, index: int, group) -> float | None:
    """The momentum fill of ``group`` after the step just taken (None: not tracked)."""
    found = _STATES.get(optimizer)
    fills = None if found is None else found.fills
    if fills is None or index >= len(fills) or fills[index][0] is not group:
        return None
    return fills[index][1]


def first_fill(optimizer, group) -> float:
    """The fill of ``group``'s momentum buffers before the step about to run, for a group the
    hooks see for the first time: 0.0 where the buffers have not started."""
    recorded = next((s[FILL_KEY] for s in map(optimizer.state.get, group["params"]) if s and FILL_KEY in s), None)
    if recorded is not None:  # recorded by a state_dict() and restored by load_state_dict() (Note [Resume])
        return float(recorded)
    if FILL_KEY in group:  # a checkpoint of an older paramreg
        return float(group[FILL_KEY])
    momentum = group.get("momentum", 0.0)
    if not momentum:
        return 0.0
    states = [optimizer.state.get(p) for p in group["params"]]
    if step_sizes.resolve(optimizer) is torch.optim.SGD:
        started = any(s and s.get("momentum_buffer") is not None for s in states)
        return step_sizes.settled(momentum, group.get("dampening", 0.0)) if started else 0.0
    counts = [float(s["step"]) for s in states if s and "step" in s]  # RMSprop counts its steps
    return (1.0 - momentum ** max(counts)) / (1.0 - momentum) if counts else 0.0


def next_fill(optimizer, group: dict, previous: float | None) -> float:
    """Before a step of ``optimizer`` (one of FILLING) over ``group``: the fill c of the group's
    momentum buffers after that step, from the fill after the previous step (None: a group not
    seen before). Note [Momentum fill]."""
    if previous is None:
        previous = first_fill(optimizer, group)
    momentum = group.get("momentum", 0.0)
    if not momentum:
        return previous  # no momentum this step: the buffers do not move
    if step_sizes.resolve(optimizer) is torch.optim.SGD:
        return momentum * previous + (1.0 - group["dampening"]) if previous else 1.0  # the first step sets buf = g
    return momentum * previous + 1.0


def save_with(optimizer) -> None:
    """Make ``optimizer.state_dict()`` record what a resumed run needs (Note [Resume])."""
    found = of(optimizer)
    if not found.saving:
        found.saving = True
        optimizer.register_state_dict_post_hook(_save_state)


def _save_state(optimizer, state_dict) -> None:
    """``state_dict()`` post-hook: record the carriers' step counts and the groups' momentum fills
    in the per-parameter state, so that ``load_state_dict`` resumes them (Note [Resume])."""
    by_param = carriers_by_param()
    saved_state = state_dict["state"]
    found = of(optimizer)
    # SGD keeps no state for a parameter it steps without momentum, and reads no key it does not
    # know: there the keys go into a state entry made for them
    tolerant = step_sizes.resolve(optimizer) is torch.optim.SGD
    extending = step_sizes.resolve(optimizer) in POINTS_IN
    for index, (live, saved) in enumerate(zip(optimizer.param_groups, state_dict["param_groups"], strict=False)):
        fill = fill_of(optimizer, index, live)
        for p, key in zip(live["params"], saved["params"], strict=False):
            entry = saved_state.get(key)
            if not entry:
                if not tolerant:
                    continue  # no optimizer state yet: never make one (Note [Resume])
                entry = saved_state[key] = optimizer.state[p]  # the live entry, as state_dict() shares the others
            c = by_param.get(id(p))
            if c is not None:
                entry[STEPS_KEY] = c.calls
                found.written[id(p)] = entry  # in the live state: not a loaded count (restore_counts)
                if extending and _extends(c) and ORIGIN_KEY not in entry and "exp_avg" in entry:
                    # a template's key that a load fills (DCP loads only the keys its template has); outside
                    # the ramp a placeholder, never read as an origin (Note [Extrapolated paths])
                    entry[ORIGIN_KEY], entry[ORIGIN_STEP_KEY] = p.detach().clone(), -1
            if fill is not None:  # 0.0 too: a template's key that a load fills
                entry[FILL_KEY] = fill


def _extends(c) -> bool:
    """Whether carrier ``c`` holds an L0 target that extrapolates in the optimizer's metric."""
    return c.target is not None and bool(c.target.extrapolate) and type(c.regularizer) is L0 and c.step != "lr"


def drop_origins(optimizer, params) -> None:
    """Take the origins of Note [Extrapolated paths] (and placeholders) of ``params`` out of
    ``optimizer``'s state."""
    for p in params:
        state = optimizer.state.get(p)
        if state and ORIGIN_KEY in state:
            del state[ORIGIN_KEY]
            state.pop(ORIGIN_STEP_KEY, None)


def forget_origins(params) -> None:
    """:func:`drop_origins` in every optimizer paramreg knows: they are no longer read (``remove``)."""
    for optimizer in list(_STATES):
        drop_origins(optimizer, params)


def restore_counts(optimizer, by_param: dict) -> None:
    """Set the step counts a loaded optimizer state recorded (``STEPS_KEY``) on the carriers of
    ``by_param`` (id(Parameter) -> carrier), and take paramreg's keys out of the live state
    (Note [Resume])."""
    written = of(optimizer).written
    for group in optimizer.param_groups:
        params = group["params"]
        for position, calls in group.pop(STEPS_KEY, None) or []:  # a checkpoint of an older paramreg
            if position < len(params):
                _restore(by_param.get(id(params[position])), calls)
        group.pop(FILL_KEY, None)
        for p in params:
            live = optimizer.state.get(p)
            if live:
                live.pop(FILL_KEY, None)
                if STEPS_KEY in live:
                    calls = live.pop(STEPS_KEY)
                    if written.get(id(p)) is not live:  # a loaded entry, not one a state_dict() of this run wrote into
                        _restore(by_param.get(id(p)), calls)
    written.clear()


def _restore(c, calls) -> None:
    if c is not None:
        c.calls = int(calls)
        if c.schedule is not None:
            c.scale = schedule_value(c, c.calls)


def carriers_by_param() -> dict:
    """id(Parameter) -> its live carrier, for the carriers an optimizer step acts on (prox mode,
    and penalty mode with a schedule, whose step count moves)."""
    by_param = {}
    for c in list(live_carriers()):
        if c.mode == "prox" or (c.mode == "penalty" and c.schedule is not None):
            leaf = c.leaf()
            if leaf is not None:
                by_param[id(leaf)] = c
    return by_param



def schedule_value(carrier, k: int) -> float:
    """The carrier's strength schedule at step ``k``, checked: a finite number >= 0."""
    value = carrier.schedule(k)
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ParamregError(
            f"the strength schedule of '{carrier.name}' returned {value!r} at step {k}; "
            f"it must return a finite number >= 0"
        )
    return float(value)
