"""Applying the maps: after an optimizer step, each bucket's proximal map over the tensors the step updated.

Note [Step size]
    A parameter receives prox_{tR} with t from its step policy (Note [Step policies] in
    optim/step_sizes.py): the ``lr`` of the parameter group that just stepped it, read at that
    moment (so LR schedulers apply), times the momentum fill of its group for SGD, or per
    coordinate in the optimizer's own metric. A parameter whose ``.grad`` is None was not updated
    by the optimizer (frozen, or unused this step) and receives no prox either.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from typing import NamedTuple

import numpy
import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..catalogue.elementwise import L0
from ..errors import ParamregError

from . import fused, native, step_sizes
from .state import ORIGIN_KEY, ORIGIN_STEP_KEY, POINTS_IN, drop_origins, fill_of, schedule_value
from .plans import Bucket

__all__ = ["run", "Partition", "BLOCK", "local_part"]


class Partition(NamedTuple):
    """The sparsity targets of a ``ZeroRedundancyOptimizer``'s inner optimizer.

    Note [Targets across ZeRO's ranks]
        ``ZeroRedundancyOptimizer`` gives each parameter to one rank, whose inner optimizer alone
        steps it (then the outer one broadcasts it), so each rank's post-step hook sees only the
        tensors it owns, and a rank may own none of a target's. A target still selects over all
        of its tensors: every rank takes part in the selection of every target over the outer
        optimizer's parameters, in the order of the outer parameter groups (the same on every
        rank), with a unit per tensor on every rank. A rank computes the critical strengths of
        the tensors it stepped and counts nothing for the others; the counts are summed over the
        ranks as over DTensor shards (Note [Exact selection] in optim/order_statistic.py). Two
        small collectives come first: the largest step count (a rank that owns none of a
        target's tensors has no count of its own) and, per unit, its number of groups where its
        owner stepped it (a tensor in a group whose lr is 0, or without a gradient, takes no
        part, as in one process). Then each rank maps what it owns with the strengths found, and
        the outer optimizer's broadcast brings the zeros to every rank: the same zero set as one
        process (``tests/test_training_setups.py``). A step with every lr 0 (a warm-up's first)
        selects nothing on any rank: a rank whose own tensors have no gradient then takes a null
        step and skips the hook (Note [Null steps] in optim/hooks.py), and the others must not
        wait for it. A target that couples its tensors is refused before the first step moves
        anything. With ``allocation="uniform"`` each tensor's selection is its owner's alone, with
        no collective; then one collective of one number gives every rank the largest strength
        (the one ``report`` shows).
    """

    group: object  # the outer optimizer's process group
    targets: list  # (target, [(parameter, carrier)] of its tensors over every rank)


def run(optimizer, plan: list, partition: Partition | None = None) -> None:
    """After a step of ``optimizer``: the proximal maps of its plan over every tensor the step
    updated (a parameter whose ``.grad`` is None was not updated: Note [Step size]), advancing
    the step counts of counted tensors, then each sparsity target's maps (Note [Target sparsity]
    in optim/targets.py), over every rank's tensors under ``partition`` (Note [Targets across
    ZeRO's ranks])."""
    filling = step_sizes.resolve(optimizer) in step_sizes.FILLING
    targeted: dict[int, tuple] = {}  # id(target) -> (target, [(bucket, tensors, lr, group, fill)])
    with torch.no_grad():
        for index, group, buckets in plan:
            lr = float(group["lr"]) if "lr" in group else 0.0
            fill = fill_of(optimizer, index, group) if filling else None
            for bucket in buckets:
                if not bucket.counted:
                    stepped = [p for p in bucket.params if p.grad is not None]
                    if stepped:
                        _apply(bucket, stepped, lr, optimizer, group, fill)
                    continue
                if bucket.target is not None:
                    stepped = []
                    for p, c in zip(bucket.params, bucket.carriers, strict=True):
                        if p.grad is not None:
                            c.calls += 1
                            stepped.append(p)
                    if stepped:
                        work = targeted.setdefault(id(bucket.target), (bucket.target, []))[1]
                        work.append((bucket, stepped, lr, group, fill))
                    continue
                # per tensor: advance its step count; group the tensors due now by their multiplier
                due: dict[float, list[Tensor]] = {}
                every = bucket.regularizer.every
                for p, c in zip(bucket.params, bucket.carriers, strict=True):
                    if p.grad is None:
                        continue
                    k, scale = c.calls, c.scale  # scale: the schedule's value at step k
                    c.calls += 1
                    if c.schedule is not None:
                        c.scale = schedule_value(c, c.calls)
                    if bucket.policy != "count" and k % every == every - 1:
                        due.setdefault(scale, []).append(p)
                for scale, tensors in due.items():
                    _apply(bucket, tensors, lr * scale * every, optimizer, group, fill)
        if partition is None:
            for target, work in targeted.values():
                _apply_target(target, work, optimizer)
            return
        if all(float(group.get("lr", 0.0)) == 0.0 for group in optimizer.param_groups):
            return  # every rank alike (ZeRO copies the lr): a rank whose step is null has skipped the hook (Note [Null steps])
        for target, everything in partition.targets:  # every rank, every target, in one order
            _apply_target(target, targeted.get(id(target), (target, []))[1], optimizer, partition.group, everything)


def _inverse(bucket: Bucket, tensors: list[Tensor], t: float, optimizer, group, fill: float | None, states=None, floors=None):
    """The step of ``bucket``'s policy for ``tensors``: inverse steps 1/t_i (a tensor per tensor) in
    an optimizer's metric, else the step t itself (a number)."""
    if bucket.policy == "scalar":
        return t * step_sizes.sgd_factor(group, fill)
    if bucket.policy == "adaptive":
        if states is None:
            states = [optimizer.state[p] for p in tensors]
            floors = step_sizes.floors(optimizer, group, tensors, states, bucket.metric_floor)
        inverse = step_sizes.inverse_steps(optimizer, group, states, t, fill, floors)
        if inverse is not None:
            return list(inverse)
    return t


def _inverses(step, n: int) -> list:
    """The inverse steps of ``n`` tensors from :func:`_inverse`'s result: its list, or 1/t for each
    (inf for t = 0), as :meth:`Regularizer.critical` takes them."""
    return step if isinstance(step, list) else [1.0 / step if step else math.inf] * n


def _map(regularizer, tensors: list[Tensor], step) -> None:
    """The proximal map over ``tensors`` with ``step`` from :func:`_inverse` (inverse steps are consumed)."""
    if isinstance(step, list):
        regularizer.prox_diag_(tensors, step)
    else:
        regularizer.prox_(tensors, step)


def _points(tensors: list[Tensor], states: list[dict], inverse: list, group: dict, horizon: int, extrapolate: float = 0.0
           ) -> list[Tensor]:
    """The points whose L0 scores an L0 target ranks, 0 where w is 0 (which points:
    :func:`fused.points_of`): with ``lookahead=h``, y = w − h·t·m̂ (Note [Looking ahead] in
    optim/targets.py), ``inverse`` the metric's inverse steps 1/t of ``tensors``
    (:func:`_inverses`), ``states`` their Adam states (or the same slices); with
    ``extrapolate=α``, y = w + α·(w − w⁰), w⁰ the origin in the state (Note [Extrapolated
    paths]). A tensor without that state of its shape is its own point."""
    out = []
    for w, state, u in zip(tensors, states, inverse, strict=True):
        kind, extra, factor = fused.points_of(state, group, horizon, extrapolate)
        if (not kind or not isinstance(extra, Tensor) or extra.shape != w.shape
                or (kind == "_ahead" and not isinstance(u, Tensor))):
            out.append(w)
            continue
        y = w - factor * (extra / u) if kind == "_ahead" else w + factor * (w - extra)
        out.append(torch.where(w == 0, 0.0, y))
    return out


def _apply_points(criticals: "_Criticals", bucket: Bucket, tensors: list[Tensor], lr: float, group, fill, strength: float,
                 floors) -> None:
    """An L0 target's map when it scores points other than the weights (:func:`_points`): every
    weight of ``tensors`` whose score at its point is at most ``strength`` set to zero, the scores
    computed as the selection computed them (the same blocks, the same function), the others
    left as they are."""
    optimizer = criticals.optimizer
    states = [optimizer.state[p] for p in tensors]
    if floors is None:
        floors = step_sizes.floors(optimizer, group, tensors, states, bucket.metric_floor)
    left = fused.map_points_(optimizer, group, tensors, states, lr, floors, criticals.lookahead, criticals.extrapolate,
                            strength)  # Note [Fused map]
    tensors, states = [tensors[i] for i in left], [states[i] for i in left]
    floors = None if floors is None else [floors[i] for i in left]
    if not tensors:
        return
    for indices, block, block_states in _blocks(tensors, states, bucket.regularizer):
        block_floors = None if floors is None else [floors[i] for i in indices]
        inverse = _inverses(_inverse(bucket, block, lr, optimizer, group, fill, block_states, block_floors), len(block))
        points = _points(block, block_states, inverse, group, criticals.lookahead, criticals.extrapolate)
        scores = bucket.regularizer.critical(points, inverse)
        for w, score in zip(block, scores, strict=True):
            w.masked_fill_(score <= strength, 0.0)


def _apply(bucket: Bucket, tensors: list[Tensor], t: float, optimizer, group, fill: float | None, regularizer=None, floors=None) -> None:
    """One multi-tensor proximal map over ``tensors`` with step ``t`` (scaled by SGD's momentum
    factor, or per coordinate by the optimizer's metric under the adaptive policy; ``fill``: the
    group's momentum fill, Note [Momentum fill]). ``regularizer``: the map (default the
    bucket's); ``floors``: the safeguard's floors of ``tensors`` if already taken."""
    regularizer = bucket.regularizer if regularizer is None else regularizer
    if regularizer.remembers:
        memories = {id(p): _memory(c, p) for p, c in zip(bucket.params, bucket.carriers, strict=True)}
        regularizer.project_(tensors, [memories[id(p)] for p in tensors])
        return
    if t == 0.0 and regularizer.kind != "constraint":
        return
    if bucket.policy != "adaptive":
        _map(regularizer, tensors, _inverse(bucket, tensors, t, optimizer, group, fill))
        return
    states = [optimizer.state[p] for p in tensors]
    left = fused.map_(optimizer, group, regularizer, tensors, states, t, bucket.metric_floor, floors)  # Note [Fused map] in optim/fused.py
    if not left:
        return
    if len(left) < len(tensors):
        tensors, states = [tensors[i] for i in left], [states[i] for i in left]
        floors = None if floors is None else [floors[i] for i in left]
    if floors is None:
        floors = step_sizes.floors(optimizer, group, tensors, states, bucket.metric_floor)
    for indices, block, block_states in _blocks(tensors, states, regularizer):
        block_floors = None if floors is None else [floors[i] for i in indices]
        _map(regularizer, block, _inverse(bucket, block, t, optimizer, group, fill, block_states, block_floors))


def _memory(carrier, p: Tensor) -> Tensor:
    """The carrier's memory of ``p`` (``KeepZeros``: its zeros), laid out as ``p`` is. A memory
    taken before ``fully_shard`` is a whole plain tensor (FSDP2 leaves buffers as they are) while
    ``p`` became a DTensor shard: it is sharded like ``p`` once, each rank keeping its own slice
    (``src_data_rank=None``: nothing is communicated)."""
    memory = carrier.memory
    if hasattr(p, "device_mesh") and not hasattr(memory, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        memory = carrier.memory = distribute_tensor(memory, p.device_mesh, p.placements, src_data_rank=None)
    return memory


# The target's map runs at its strength raised by this relative amount, so that the group whose critical
# strength is the strength (the m-th) is zero however the map rounds its own test: the map compares in
# its own arithmetic (softshrink's threshold t·a against abs(w) under a scalar step, a group's norm in
# another dtype or order), which puts that group a few float32 roundings (each 2^-24) on either side
# of the map's threshold, left nonzero about half the time (one group short of the budget). Groups
# within this relative amount above the m-th count as tied with it (Note [Target sparsity] in
# optim/targets.py).
BOUNDARY = 2.0**-18

#: Note [Selection that zeroes]: the one pass keeps at most 1/KEPT_SHARE as many indices (over all
#: tensors) as the largest selected tensor has weights, so that what it holds until the map (an
#: index, a value and numpy's copies of them) stays below that tensor's size; KEPT_LEAST (a few
#: MB) on any model.
KEPT_SHARE = 16
KEPT_LEAST = 1 << 16


def _apply_target(target, work: list[tuple], optimizer, process_group=None, everything: list | None = None) -> None:
    """The proximal maps of one sparsity target over everything the step updated, with the strength
    calibrated on this step's iterate (Note [Target sparsity] in optim/targets.py). A group whose
    lr is 0 takes no part: its map is the identity, and the step moved none of its tensors.
    ``everything``: the target's tensors over every rank of ``process_group``, of which
    ``work`` holds those this rank stepped (Note [Targets across ZeRO's ranks])."""
    work = [item for item in work if item[2] != 0.0]
    if not work and everything is None:
        return
    carriers = {id(p): c for bucket, *_ in work for p, c in zip(bucket.params, bucket.carriers, strict=True)}
    stepped = [p for _, tensors, *_ in work for p in tensors]
    k = max((carriers[id(p)].calls for p in stepped), default=0)
    if everything is not None:
        k = int(_largest_over_ranks(k, process_group, everything[0][0].device))
        if not k:  # no rank stepped a tensor of this target
            return
    if target.holds(k):  # after the ramp: its zeros kept (Note [Ramp, then keep the zeros] in optim/targets.py)
        if target.regrow:  # else the pre-step hold keeps every zero (Note [Zeros that do not regrow])
            for p in stepped:
                p.masked_fill_(_memory(carriers[id(p)], p), 0)
        if target.extrapolate:
            drop_origins(optimizer, stepped)  # Note [Extrapolated paths]: no longer read
        return
    if target.extrapolate and k <= target.start:
        drop_origins(optimizer, stepped)  # placeholders a state_dict() wrote: not held before the ramp
    criticals = _Criticals(work, optimizer, process_group, everything, target.lookahead,
                           target.extrapolate if k > target.start else 0.0, (target.start, k))
    strengths = target.calibrate(criticals, k)
    for w, (bucket, tensors, lr, group, fill, floors) in enumerate(criticals.work if any(strengths) else []):
        by_strength: dict[float, list[int]] = {}  # strength -> indices into tensors, mapped at once
        for u in criticals.of_work[w]:
            if strengths[u]:
                by_strength.setdefault(strengths[u], []).extend(criticals.units[u][1])
        for strength, indices in by_strength.items():
            threshold = strength * (1.0 + BOUNDARY)
            if type(bucket.regularizer) is L0 and bucket.policy == "adaptive":  # Note [Selection that zeroes]
                indices = [indices[j] for j in criticals.zero_marked([tensors[i] for i in indices], threshold)]
                if not indices:
                    continue
            chosen = [tensors[i] for i in indices]
            chosen_floors = None if floors is None else [floors[i] for i in indices]
            if criticals.scores_points(bucket):
                _apply_points(criticals, bucket, chosen, lr, group, fill, threshold, chosen_floors)
            else:
                _apply(bucket, chosen, lr, optimizer, group, fill, bucket.regularizer.scaled(threshold), chosen_floors)
    if target.keep_zeros and k == target.steps:  # the ramp's last step: its zeros are the ones kept
        for p in stepped:
            carriers[id(p)].remember(p)


class _Criticals:
    """The critical strengths of one target's units, computed where a pass needs them.

    Note [Critical strengths on the fly]
        A target's step ranks the critical strengths of every group it holds (Note [Target
        sparsity] in optim/targets.py). They are never all held at once: each pass of the
        selection computes them again, on the CPU in the cache-sized blocks of the prox itself
        (Note [Blocks]: the optimizer's inverse steps of a block, then ``Regularizer.critical``),
        or by a compiled kernel in blocks of 2^20 where the fused map takes the tensor (Note
        [Fused map] in optim/fused.py: an L1 or L0 target in the Adam family's metric),
        elsewhere one tensor (or one coupled group of tensors) at a time, and drops each block
        before the next is computed. The selection takes two passes (Note [Exact selection] in
        optim/order_statistic.py; a few values on the CPU, one pass into a buffer; more in one
        process on the CPU, mostly one pass after a random draw: Note [Sampled bracket] in
        optim/targets.py), then the map runs blockwise as the default prox runs (a global L0
        target's is found by that one pass where it holds the answer: Note [Selection that
        zeroes]). So a target's
        step holds, beyond what the default prox holds, the selection's counts and staging
        buffer and one block (one tensor off the CPU; with a drawn bracket, the draw and at most
        ``GUESSED`` values of the bracket, Note [Guessed bracket] in optim/order_statistic.py, and
        for the one pass that also finds the zeros at most ``GUESSED`` indices with them, and
        no more than ``KEPT_LEAST`` or 1/``KEPT_SHARE`` of the largest tensor's size: Note [Selection that
        zeroes]), and
        reads every weight and its optimizer state once or twice more than the default prox
        (once, where that one pass maps). A read of both is not what costs (``benchmarks/target_cost.py``, ``read/l1``: a few
        percent of an AdamW ``l1=`` step at 8M-25M selected weights on this machine); the
        strengths' elementwise computation and the histogram's ``bincount`` are (Note [Exact
        selection]).
        The safeguard's floors (Note [Safeguarded metric] in optim/step_sizes.py) are taken once
        per step over whole tensors and serve every pass and the map. Over DTensor shards each
        rank computes its own shard's strengths (a replicated value is counted on one rank).

    A unit is one tensor, or the tensors of a bucket whose map couples them (``attach_channels``).
    """

    def __init__(self, work: list[tuple], optimizer, process_group=None, everything: list | None = None, lookahead: int = 0,
                 extrapolate: float = 0.0, ramp: tuple[int, int] = (0, 0)):
        self.optimizer = optimizer
        # Notes [Looking ahead] and [Extrapolated paths] in optim/targets.py: only in the metric of Adam or AdamW
        adam = step_sizes.resolve(optimizer) in POINTS_IN
        self.lookahead = lookahead if adam else 0
        self.extrapolate = extrapolate if adam else 0.0
        self._stepped = work  # (bucket, tensors, lr, group, fill)
        self._work: list[tuple] | None = None  # the same with the floors, taken on first use (:attr:`work`)
        self.units: list[tuple[int | None, list[int]]] = []  # (index into work or None: another rank's, indices into its tensors)
        self.of_work: list[list[int]] = []
        self.sizes: list[int] = []
        self.reduce = None
        self.owned: set[int] | None = None
        self.process_group = process_group
        self._marks = None  # (lo, hi, per tensor what the map zeroes) from marked()
        self.zeros: int | None = None  # how many scores lie at or below the answer the one pass found (targets._marked)
        self.device = work[0][1][0].device if work else everything[0][0].device
        for bucket, tensors, *_ in work:
            if self.extrapolate and self.scores_points(bucket):  # the origins, at a tensor's first step of the ramp
                start, k = ramp  # (the ramp's start, this step's count)
                for p in tensors:
                    state = optimizer.state[p]
                    if state and state.get(ORIGIN_STEP_KEY, -1) <= start:  # none, a placeholder, or a stale one
                        state[ORIGIN_KEY] = p.detach().clone(memory_format=torch.contiguous_format)
                        state[ORIGIN_STEP_KEY] = k
        if everything is not None:
            self._partitioned(everything, process_group)
            return
        for w, (bucket, tensors, *_) in enumerate(work):
            regularizer = bucket.regularizer
            sizes = _critical_sizes(regularizer, tensors)
            if len(sizes) == len(tensors):  # a unit per tensor
                units = [[i] for i in range(len(tensors))]
            else:  # a map that couples its tensors: one unit
                units, sizes = [list(range(len(tensors)))], [sum(sizes)]
            self.of_work.append(list(range(len(self.units), len(self.units) + len(units))))
            self.units += [(w, indices) for indices in units]
            self.sizes += sizes
            for p in tensors:
                if type(p) is not Tensor and hasattr(p, "device_mesh") and self.reduce is None:
                    self.reduce = _reducer(p.device_mesh.get_group())

    @property
    def work(self) -> list[tuple]:
        """Per bucket the step updated, (bucket, tensors, lr, group, fill, floors): the
        safeguard's floors of an adaptive bucket (Note [Safeguarded metric] in
        optim/step_sizes.py), taken once, where a pass or the map first needs them (a selection
        answered by counting zero weights needs none), else None."""
        if self._work is None:
            self._work = []
            for bucket, tensors, lr, group, fill in self._stepped:
                floors = None
                if bucket.policy == "adaptive":  # Note [Fused map] in optim/fused.py: the map takes these as they are
                    states = [self.optimizer.state[p] for p in tensors]
                    floors = fused.floors(self.optimizer, group, tensors, states, bucket.metric_floor)
                self._work.append((bucket, tensors, lr, group, fill, floors))
        return self._work

    def _partitioned(self, everything: list, process_group) -> None:
        """A unit per tensor of ``everything`` (every rank's), its size summed over the ranks from
        the rank that stepped it (Note [Targets across ZeRO's ranks])."""
        import torch.distributed as dist

        where = {id(p): (w, i) for w, (_, tensors, *_) in enumerate(self._stepped) for i, p in enumerate(tensors)}
        self.of_work = [[] for _ in self._stepped]
        local = []
        for p, carrier in everything:
            w, i = where.get(id(p), (None, None))
            if w is None:
                self.units.append((None, []))
                local.append(0)
                continue
            self.of_work[w].append(len(self.units))
            self.units.append((w, [i]))
            local += _critical_sizes(carrier.regularizer, [p])
        sizes = torch.tensor(local, dtype=torch.int64, device=self.device)
        dist.all_reduce(sizes, group=process_group)
        self.sizes = sizes.tolist()
        self.reduce = _reducer(process_group)
        self.owned = {u for u, (w, _) in enumerate(self.units) if w is not None}

    def scores_points(self, bucket) -> bool:
        """Whether ``bucket``'s critical strengths are taken at points other than its weights (Notes
        [Looking ahead] and [Extrapolated paths] in optim/targets.py)."""
        return bool(self.lookahead or self.extrapolate) and bucket.policy == "adaptive" and type(bucket.regularizer) is L0

    def largest(self, value: float) -> float:
        """The largest ``value`` over the ranks under ZeRO (one collective of one number), else ``value``."""
        return value if self.owned is None else _largest_over_ranks(value, self.process_group, self.device)

    def chunks(self, units=None, limits=None):
        """(unit, this rank's critical strengths of some of its groups) for every group of ``units``
        (default all), in blocks on the CPU; a unit in ``limits`` has its values above its limit as
        +inf (Note [Allocation] in optim/targets.py)."""
        chosen = range(len(self.units)) if units is None else units
        by_work: dict[int, list[int]] = {}
        for u in chosen:
            if self.units[u][0] is not None:  # None: another rank's tensor
                by_work.setdefault(self.units[u][0], []).append(u)
        for w, us in by_work.items():
            bucket, tensors, lr, group, fill, floors = self.work[w]
            indices = [i for u in us for i in self.units[u][1]]
            unit_of = {i: u for u in us for i in self.units[u][1]}
            for block_indices, values in self._blocks(bucket, tensors, indices, lr, group, fill, floors):
                u = unit_of[block_indices[0]]
                if limits and u in limits:
                    values = torch.where(values <= limits[u], values, math.inf)
                if type(values) is not Tensor and hasattr(values, "device_mesh"):
                    values = local_part(values)
                yield u, values
                del values  # not held while the next is computed

    def zero_weights(self) -> list[int] | None:
        """Per unit, how many of its weights are zero (±0.0), by one read of each; None where a
        unit is not one elementwise tensor of this rank's, or with a collective. A zero weight's
        critical strength is 0 (Notes [Looking ahead] and [Extrapolated paths] in
        optim/targets.py: the points are 0 where the weights are; NaN only where its metric is
        inf or NaN), so at least these many values of each unit are at most 0."""
        if self.reduce is not None or self.owned is not None:
            return None
        counts = []
        for w, indices in self.units:
            bucket, tensors, *_ = self._stepped[w]
            p = tensors[indices[0]]
            if len(indices) != 1 or bucket.regularizer.split(p.dim()) != "elements" or type(p) not in (Tensor, nn.Parameter):
                return None
            counts.append(fused.zero_count(p))
        return counts

    def sample(self, units=None, limits=None, count: int = 1 << 16) -> Tensor | None:
        """The critical strengths of about ``count`` groups drawn at random (the same draw at every
        step, in proportion to each unit's size) from ``units``, in float32, with ``limits`` as in
        :meth:`chunks`; None where a unit cannot be sampled (not elementwise, not a plain
        contiguous tensor with its state, another rank's, or off the CPU). Drawn weights and their
        state, the same formula (Note [Sampled bracket] in optim/targets.py)."""
        chosen = range(len(self.units)) if units is None else units
        total = sum(self.sizes[u] for u in chosen)
        if self.reduce is not None or self.device.type != "cpu" or not total:
            return None
        out = []
        for u in chosen:
            w, indices = self.units[u]
            if w is None or len(indices) != 1:
                return None
            bucket, tensors, lr, group, fill, floors = self.work[w]
            i = indices[0]
            p = tensors[i]
            state = self.optimizer.state[p] if bucket.policy == "adaptive" else {}
            if bucket.regularizer.split(p.dim()) != "elements" or not _sliceable(p, state) or p.device.type != "cpu":
                return None
            if not p.numel():
                continue
            draws = _draws(p, max(1, count * p.numel() // total), u)
            drawn = p.detach().reshape(-1).index_select(0, draws)
            drawn_state = _Drawn(state, p, draws)
            step = _inverse(bucket, [drawn], lr, self.optimizer, group, fill, [drawn_state], None if floors is None else [floors[i]])
            inverse = _inverses(step, 1)
            points = _points([drawn], [drawn_state], inverse, group, self.lookahead, self.extrapolate) if self.scores_points(bucket) else [drawn]
            values = bucket.regularizer.critical(points, inverse)[0].float()
            if limits and u in limits:
                values = torch.where(values <= limits[u], values, math.inf)
            out.append(values)
        return torch.cat(out) if out else None

    # Note [Selection that zeroes]
    #     An L0 target's map only sets weights to zero and leaves the others as the step put them,
    #     so the pass that selects can find which as well. In one process on the CPU, where a drawn
    #     bracket [lo, hi) is expected to hold the m-th smallest score (Note [Sampled bracket] in
    #     optim/targets.py) and every tensor of a global target is float32 and taken by a compiled
    #     kernel (``fused.select_pieces``, the rule of Note [Fused map] in optim/fused.py), one
    #     pass computes each block's scores by the critical strengths' formula, counts those below
    #     lo and below hi, and keeps the flat indices of two kinds of weight with their scores: the
    #     scores in [lo, hi), and the weights that score below lo and are not +0.0 (zeroed at any
    #     strength from lo on; a few percent of the weights). The native pass writes them as it
    #     goes (Note [Native selection] in optim/native.py), and parts them into new zeros and
    #     bracketed scores in one loop (``native.split``); where it is not built, the kernel
    #     marks them in each block and numpy finds and parts them. Where the m-th score
    #     lies in the bracket it is the (m − below)-th smallest kept score, and the map at the
    #     threshold θ (the strength raised by ``BOUNDARY``) with lo <= θ < hi is ``index_fill_`` at
    #     the kept indices whose score is at most θ: the weights the map's pass would set to 0, bit
    #     for bit (the held zeros are +0.0 already; −0.0 and denormals are kept, because that pass
    #     writes +0.0 over them). That holds for any θ in [lo, hi), whichever unit's (a capped
    #     tensor's too) and whichever selection found it. Where at least m +0.0 weights score
    #     below lo the answer is 0 (``targets._marked``) and nothing is mapped. Where the m-th
    #     score lies outside the bracket or is another zero, the guessed pass (again) and the
    #     histogram passes find it (Note [Guessed bracket] in optim/order_statistic.py); the map runs as a pass where θ lies
    #     outside [lo, hi) or where no indices were kept (more than ``GUESSED``, or than the
    #     larger of ``KEPT_LEAST`` and the largest tensor's weights over ``KEPT_SHARE``, as at a step that
    #     zeroes most weights at once); and for another regularizer, a tensor the kernel does not
    #     take, a collective or float64 the earlier passes and map run: nothing was written. A ramp
    #     step then reads the selected weights and their optimizer state once where it read them
    #     twice (the selection's pass, the map's), and holds the kept indices and scores (int64
    #     and float32, a few percent of the weights, at most ``GUESSED`` and the larger of
    #     ``KEPT_LEAST`` and the largest tensor's size over ``KEPT_SHARE``: with the native pass's arrays and numpy's copies, at most
    #     about 60 bytes an entry, so below that tensor's size) until its map. ``benchmarks/target_cost.py`` measures the step (docs/at-scale.md); the fused and
    #     the eager path zero the same weights (tests/test_fused.py, misses and signed zeros too).

    def marked(self, lo: float, hi: float) -> list[tuple[int, int, numpy.ndarray]] | None:
        """A guessed selection over every unit in one pass that also finds what its map zeroes
        (Note [Selection that zeroes]): per unit, (its scores below ``lo``, below ``hi``, its
        scores in [lo, hi) in float32, how many of its weights other than +0.0 score below lo:
        the others there are +0.0 weights, whose score is 0), and kept until :meth:`zero_marked`, per
        tensor, the flat indices of its weights to be zeroed at any strength from lo on and
        those of its scores in [lo, hi) with the scores, unless there are more than ``GUESSED``
        of them or than the larger of ``KEPT_LEAST`` and the largest tensor's weights over ``KEPT_SHARE`` (a step that zeroes many weights at once: then its map runs as a pass). None,
        before anything is computed, where a unit is not an L0 target's float32 tensor that a
        compiled kernel scores (Note [Fused map] in optim/fused.py), or with a collective; None
        also where the bracket holds more than ``GUESSED`` scores (ties at its edges), or a
        kernel cannot be compiled."""
        from .order_statistic import GUESSED

        if self.reduce is not None or self.owned is not None:
            return None
        units = [(self.work[w], indices) for w, indices in self.units]
        if any(len(indices) != 1 or bucket.policy != "adaptive" or type(bucket.regularizer) is not L0
               for (bucket, *_), indices in units):
            return None
        limit = min(GUESSED, max(KEPT_LEAST, max(work[1][indices[0]].numel() for work, indices in units) // KEPT_SHARE))
        passes = []  # (tensor, its pieces), unit by unit
        for (bucket, tensors, lr, group, _, floors), (i,) in units:
            pointed = self.scores_points(bucket)
            p = tensors[i]
            pieces = fused.select_pieces(self.optimizer, group, bucket.regularizer, p, self.optimizer.state[p], lr,
                                         None if floors is None else floors[i], self.lookahead if pointed else 0,
                                         self.extrapolate if pointed else 0.0, (lo, hi), cap=lambda: room)
            if pieces is None:
                return None
            passes.append((p, pieces))
        out, kept, count, within = [], {}, 0, 0  # count: the indices found; within: the bracket's scores
        for p, pieces in passes:
            room = 0 if kept is None else limit - count  # what the native pass of this tensor may keep, per thread
            below = under = fresh = 0  # fresh: the weights other than +0.0 that score below lo
            picked, found = [], []  # per piece: its kept values, and their flat indices
            for piece in pieces:
                if piece is None:  # the kernel could not be compiled: nothing was written
                    return None
                (b, n, marked), indices, values = piece
                below, under, count, within = below + b, under + n, count + marked, within + n - b
                fresh += marked - (n - b)
                if within > GUESSED:  # ties at the bracket's edges: the passes count them (Note [Guessed bracket])
                    return None
                if kept is not None and (count > limit or indices is None):  # too many new zeros to keep: the map's pass zeroes them
                    kept = found = None
                if kept is None:  # no indices kept: the bracket's scores alone (at most GUESSED)
                    picked.append(values[values >= 0])
                    continue
                picked.append(values)
                found.append(indices)
            picked = _joined(picked, numpy.float32)
            if kept is None:
                inside = picked[picked >= 0]  # the bracket's scores; the others (-1) are new zeros
            else:
                kept[id(p)] = _parted(_joined(found, numpy.int64), picked)
                inside = kept[id(p)][2]
            del picked, found
            out.append((below, under, inside, fresh))
        self._marks = None if kept is None else (lo, hi, kept)
        return out

    def zero_marked(self, tensors: list[Tensor], threshold: float) -> list[int]:
        """Sets to zero, in each of ``tensors``, the weights whose score the last :meth:`marked`
        pass found at most ``threshold`` (as float32), by their indices, where that pass's bracket
        [lo, hi) holds the threshold; returns the indices into ``tensors`` of those it did not
        map (their map runs as a pass)."""
        if self._marks is None:
            return list(range(len(tensors)))
        lo, hi, kept = self._marks
        threshold = numpy.float32(threshold)
        if not lo <= threshold < hi:
            return list(range(len(tensors)))
        left = []
        for j, p in enumerate(tensors):
            if id(p) not in kept:
                left.append(j)
                continue
            zeroed, at, inside = kept[id(p)]
            chosen = numpy.concatenate([zeroed, at[inside <= threshold]])
            if len(chosen):
                p.view(-1).index_fill_(0, torch.from_numpy(chosen), 0.0)
        return left

    def _blocks(self, bucket, tensors, indices, lr, group, fill, floors):
        """(indices into ``tensors`` of one unit, their critical strengths) per block: the blocks
        of Note [Blocks] on the CPU, else one unit at a time."""
        regularizer = bucket.regularizer
        pointed = self.scores_points(bucket)
        if bucket.policy == "adaptive" and not regularizer.joint:  # Note [Fused map] in optim/fused.py
            eager = []
            for i in indices:
                p = tensors[i]
                found = fused.critical_blocks(self.optimizer, group, regularizer, p, self.optimizer.state[p], lr,
                                              None if floors is None else floors[i], self.lookahead if pointed else 0,
                                              self.extrapolate if pointed else 0.0)
                if found is None:
                    eager.append(i)
                    continue
                for values in found:
                    yield [i], values
            indices = eager
            if not indices:
                return
        chosen = [tensors[i] for i in indices]
        states = [self.optimizer.state[p] for p in chosen]
        chosen_floors = None if floors is None else [floors[i] for i in indices]
        if regularizer.joint:
            blocks = [(range(len(chosen)), chosen, states)]
        elif chosen[0].device.type == "cpu":
            blocks = _blocks(chosen, states if bucket.policy == "adaptive" else [{} for _ in chosen], regularizer)
        else:
            blocks = (([j], [p], [state]) for j, (p, state) in enumerate(zip(chosen, states, strict=True)))
        for js, block, block_states in blocks:
            block_floors = None if chosen_floors is None else [chosen_floors[j] for j in js]
            step = _inverse(bucket, block, lr, self.optimizer, group, fill, block_states, block_floors)
            inverse = _inverses(step, len(block))
            points = _points(block, block_states, inverse, group, self.lookahead, self.extrapolate) if pointed else block
            found = regularizer.critical(points, inverse)
            del step, inverse
            if regularizer.joint:
                yield [indices[j] for j in js], found[0]
                continue
            for j, values in zip(js, found, strict=True):
                yield [indices[j]], values


class _Drawn(Mapping):
    """A parameter's optimizer ``state`` read at ``draws``: each tensor of the parameter's shape
    gathered when it is first read (by ``[]``, ``get``, ``items`` or ``values``), once, so that a
    draw reads only the state its formula reads (a draw from a large tensor is about a cache miss
    per tensor read: the draws of a 25M-weight target took about 5 ms a step with Adam's first
    moment gathered too, 3.3 without, ad hoc); the rest as it is. The state is not written."""

    def __init__(self, state: dict, p: Tensor, draws: Tensor):
        self._state, self._p, self._draws, self._read = state, p, draws, {}

    def __getitem__(self, key):
        if key not in self._read:
            value = self._state[key]
            self._read[key] = value.reshape(-1).index_select(0, self._draws) if _alike(value, self._p) else value
        return self._read[key]

    def __iter__(self):
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def _joined(pieces: list[numpy.ndarray], dtype) -> numpy.ndarray:
    """The pieces end to end: the one piece itself where there is one (no copy)."""
    return pieces[0] if len(pieces) == 1 else numpy.concatenate(pieces) if pieces else numpy.empty(0, dtype=dtype)


def _parted(indices: numpy.ndarray, values: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """(the new zeros' indices, the bracket's indices, their scores) of a pass's kept entries, whose
    values are −1 for a new zero, else the score: by the native loop (``native.split``), else
    numpy's masks."""
    parted = native.split(indices, values)
    if parted is None:
        scored = values >= 0
        parted = (indices[~scored], indices[scored], values[scored])
    return parted


def _draws(p: Tensor, count: int, seed: int) -> Tensor:
    """``count`` indices below ``p.numel()`` drawn at random with ``seed``, sorted: the same at every
    step, kept with ``p`` (weakly) for the next (sorted, the reads of a tensor at them took 0.9
    against 1.6 ms for 32,768 of 12.5M weights and five tensors, ad hoc); never written."""
    key = (p.numel(), count, seed)
    kept = _drawn.get(p)
    if kept is None or kept[0] != key:
        kept = (key, torch.randint(0, p.numel(), (count,), generator=torch.Generator().manual_seed(seed)).sort().values)
        _drawn[p] = kept
    return kept[1]


# parameter -> ((numel, count, seed), its draws), by identity (weak: nothing kept alive)
_drawn = WeakIdKeyDictionary()


def _critical_sizes(regularizer, tensors: list[Tensor]) -> list[int]:
    """How many critical strengths ``regularizer`` has for ``tensors``: taken on meta tensors once
    per regularizer and shapes, and kept while the regularizer lives (meta tensors hold no data,
    but their operations are dispatched: on 24 weights of a GPT-style model they took 19 ms a
    step, 1.6% of it, ad hoc)."""
    shapes = tuple((tuple(p.shape), p.dtype) for p in tensors)
    try:
        known = _sizes.setdefault(regularizer, {})
    except TypeError:  # no dictionary key or no weak reference: taken each time
        known = {}
    if shapes not in known:
        meta = [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in shapes]
        known[shapes] = [c.numel() for c in regularizer.critical(meta, meta)]
    return list(known[shapes])


# regularizer -> {shapes and dtypes: the numbers of its critical strengths} (weak: nothing kept alive)
_sizes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _largest_over_ranks(value: float, group, device) -> float:
    """The largest ``value`` over the ranks of ``group`` (float64: exact for step counts too)."""
    import torch.distributed as dist

    found = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return float(found)


def _reducer(group):
    import torch.distributed as dist

    def reduce(counts: Tensor) -> None:
        dist.all_reduce(counts, group=group)

    return reduce


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


def local_part(c) -> Tensor:
    """This rank's part of the DTensor ``c``, each value on exactly one rank: its shard, or, for a
    replicated value, all of it on the mesh's first rank and none on the others (a redistribution
    from Replicate to Shard takes a local slice; nothing is communicated)."""
    from torch.distributed.tensor import Replicate, Shard

    if any(not isinstance(p, (Shard, Replicate)) for p in c.placements):
        c = c.redistribute(c.device_mesh, [Replicate()] * c.device_mesh.ndim)  # partial sums: reduced once
    if c.dim() == 0:
        c = c.reshape(1)
    if all(isinstance(p, Replicate) for p in c.placements):
        c = c.redistribute(c.device_mesh, [Shard(0)] + [Replicate()] * (c.device_mesh.ndim - 1))
    if c.device_mesh.ndim > 1:
        raise ParamregError("a sparsity target over DTensors supports a one-dimensional device mesh")
    return c.to_local()
