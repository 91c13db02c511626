"""Sparsity targets: a strength set at every step so that a chosen fraction of groups is exactly zero.

Note [Target sparsity]
    ``attach(..., sparsity=s, sparsity_steps=n)`` asks that after n optimizer steps the tensors
    selected by that call hold, together, the fraction s of exactly zero groups (elements for
    ``l1``, groups for ``group_lasso``, channels for ``attach_channels``), and keep it from then
    on. The fraction asked at step k (k = 1 for the first step) is the cubic ramp of Zhu & Gupta
    (2017), which prunes fast while the network has redundancy and slowly near the end::

        s_k = s·(1 − (1 − min(k, n)/n)³)

    The strength is calibrated on each step's own iterate. After the optimizer's update w⁺, every
    group g has a *critical strength* c_g: the smallest strength at which the proximal map, with
    the step its step policy gives (t_g, or t_i per coordinate in an optimizer's metric), maps the
    group to zero (``Regularizer.critical``)::

        L1                  c_i = abs(w⁺_i) / t_i
        group lasso         c_g = ‖w⁺_g / t_g‖₂ / c          (c = sqrt(group size) if weighted)
        coupled channels    c_k = sqrt(Σ_m ‖m⁺_k / t_k‖²)     (every member m of channel k)

    With N groups in the tensors that the step updated and m = round(s_k·N), the step's strength
    is the m-th smallest c_g (0 while m = 0), and the proximal map is applied with it: exactly the
    m groups of smallest critical strength become zero (more only where several share the m-th
    value), every other group is shrunk as L1 or group lasso shrinks it at that strength. It is
    the smallest strength that reaches s_k on this step, so the method stays a proximal method
    whose strength follows a path, not a mask: zeros come back when their gradient outweighs it.
    In an optimizer's metric c_i = abs(w⁺_i)·(sqrt(v̂_i) + eps)/lr for Adam, a weight's magnitude
    times its gradient scale; with SGD it is the magnitude over lr·fill.

    The m-th smallest value is found by selection, not sorting. For plain tensors on the CPU:
    numpy's partition (a vectorized introselect, in place on the concatenation; with it the
    target mode's step on benchmarks/suite.py's MLP under Adam went from 4.87x to 1.56x the
    unregularized step, where it was ``torch.kthvalue``). On an accelerator and over DTensor
    shards (FSDP2): ``kth_smallest`` (Note [Exact selection] in optim/order_statistic.py), which
    counts histograms of the values' bit patterns where they lie, each rank its own shard, with
    one ``all_reduce`` of the counts per pass (at most 3, of 65,538 int64), warm-started from the
    last step's strength: no concatenated copy, nothing gathered, and shards of any size. All
    return the element ``torch.kthvalue`` returns. On the CPU the concatenation stays: there the
    counting passes cost what the copy and partition cost (Note [Exact selection]), and slow down
    badly when another process takes a core.

    The step count k is the count of steps that updated the tensors (``Carrier.calls``), which a
    resumed run restores from the optimizer's state_dict (Note [Resume] in optim/state.py), so a
    resumed run continues the ramp exactly.

Note [Allocation]
    A global target (``allocation="global"``, the default) ranks the critical strengths of all its
    tensors together, so a tensor whose weights matter little can lose nearly all of them, and on
    some models one does lose all (JaxPruner's T5 at 80%: global magnitude pruning collapsed where
    per-tensor pruning did not). So each tensor may lose at most ``max_sparsity`` of its groups
    (0.99 by default, or the target itself when that is higher): with c_i the critical strengths
    of tensor i and L_i its floor(max_sparsity·n_i)-th smallest, the values above L_i are left out
    of the ranking (+inf), the strength a is the m-th smallest of what is left, and tensor i takes
    min(a, L_i). So a tensor at its cap has exactly floor(max_sparsity·n_i) zero groups, the
    others share the rest, and the total is the m asked (more only where several groups share a
    value at a strength, as without caps). L_i is found only for a tensor that the strength
    ranked without it would take past its maximum (a count per tensor, one comparison pass; over
    DTensor shards one ``all_reduce`` of as many counts as there are tensors), then the ranking is
    redone, until no tensor is past its maximum: a step where no cap binds costs that one count. ``allocation="uniform"`` gives each tensor its own
    strength, the round(s_k·n_i)-th smallest of its own c_i: each tensor reaches the fraction
    itself, and the total is the sum of the rounded counts. A group of coupled tensors
    (``attach_channels``) is one unit for both.

Note [Ramp, then keep the zeros]
    ``sparsity_steps=(start, end)`` runs the ramp from optimizer step ``start`` (nothing is zeroed
    before) to ``end``; an int n is (0, n). With ``keep_zeros=True`` the target is the whole
    recipe in one call: after the ramp's last step the zero set is frozen (each carrier takes a
    mask of its tensor's zeros then, as ``KeepZeros`` does at attach) and from the next step on the
    zeros are set again after every step while every other weight trains on without shrinkage:
    the two-phase form (``remove``, then ``attach(..., keep_zeros=True)``) without leaving the
    target. A resumed run takes the mask from the loaded weights (the state-dict load hook), so it
    continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ParamregError
from .order_statistic import kth_smallest

__all__ = ["SparsityTarget", "ramp"]


def ramp(sparsity: float, steps: int, k: int, start: int = 0) -> float:
    """The fraction of zero groups asked at step k: s·(1 − (1 − d)³), d = (k − start)/(n − start)
    clamped to [0, 1] (0 before the ramp's start, 1 from its end n on).

    >>> [round(ramp(0.9, 10, k), 4) for k in (0, 1, 5, 10, 20)]
    [0.0, 0.2439, 0.7875, 0.9, 0.9]
    >>> [round(ramp(0.9, 10, k, start=5), 4) for k in (0, 5, 6, 10)]
    [0.0, 0.0, 0.4392, 0.9]
    """
    done = min(max(k - start, 0), steps - start) / (steps - start)
    return sparsity * (1.0 - (1.0 - done) ** 3)


def _fraction(label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ParamregError(f"{label} must be a number strictly between 0 and 1 (a fraction of groups), got {value!r}")
    return float(value)


ALLOCATIONS = ("global", "uniform")
#: The default per-tensor maximum of a global target: no tensor loses more than 99% of its groups
#: (raised to the target itself when that is higher, so that the total stays reachable).
MAX_SPARSITY = 0.99


@dataclass
class SparsityTarget:
    """One sparsity target shared by the tensors of one ``attach`` call (Note [Target sparsity]).

    ``allocation``: ``"global"`` (one strength for all tensors, so that together they reach the
    fraction asked, each tensor at most ``max_sparsity``; Note [Allocation]) or ``"uniform"``
    (each tensor reaches the fraction itself). ``strength`` is the strength the last step used
    (None before the first step; the largest, when tensors took different ones), ``asked`` the
    fraction that step asked for.
    """

    sparsity: float
    steps: int
    allocation: str = "global"
    max_sparsity: float | None = None
    start: int = 0
    keep_zeros: bool = False
    strength: float | None = None
    asked: float = 0.0

    def __post_init__(self):
        self.sparsity = _fraction("sparsity", self.sparsity)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ParamregError(
                f"sparsity_steps must be an int >= 1 (the optimizer steps over which sparsity ramps up to "
                f"{self.sparsity}), got {self.steps!r}"
            )
        if isinstance(self.start, bool) or not isinstance(self.start, int) or not 0 <= self.start < self.steps:
            raise ParamregError(
                f"sparsity_steps=(start, end) needs 0 <= start < end (the optimizer steps where the ramp begins and "
                f"ends), got start {self.start!r} and end {self.steps!r}"
            )
        if not isinstance(self.keep_zeros, bool):
            raise ParamregError(f"keep_zeros with a sparsity target must be True or False, got {self.keep_zeros!r}")
        if self.allocation not in ALLOCATIONS:
            raise ParamregError(f"allocation must be one of {', '.join(map(repr, ALLOCATIONS))}, got {self.allocation!r}")
        if self.max_sparsity is None:
            self.max_sparsity = max(MAX_SPARSITY, self.sparsity)
        value = self.max_sparsity
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.sparsity <= float(value) <= 1.0:
            raise ParamregError(
                f"max_sparsity must be a number from the target sparsity ({self.sparsity}) to 1 (the most of one "
                f"tensor's groups that may be zero), got {value!r}"
            )
        self.max_sparsity = float(value)

    def calibrate(self, criticals: list[Tensor], k: int) -> list[float]:
        """The strength of step ``k`` for each of ``criticals`` (the critical strengths of the groups
        of each tensor, or of each coupled group of tensors, that the step updated)."""
        self.asked = ramp(self.sparsity, self.steps, k, self.start)
        if self.allocation == "uniform":
            strengths = [_kth([c], round(self.asked * c.numel()), None) for c in criticals]
        else:
            strengths = self._global(criticals)
        finite = [s if math.isfinite(s) else 0.0 for s in strengths]
        self.strength = max(finite, default=0.0)
        return finite

    def _global(self, criticals: list[Tensor]) -> list[float]:
        """One strength for every tensor, each tensor's capped at its maximum (Note [Allocation])."""
        m = round(self.asked * sum(c.numel() for c in criticals))  # numel of a DTensor: the whole tensor's
        if not m:
            return [0.0] * len(criticals)
        strength = _kth(criticals, m, self.strength)
        limits = [math.inf] * len(criticals)
        if self.max_sparsity >= 1.0:
            return [strength] * len(criticals)
        caps = [math.floor(self.max_sparsity * c.numel()) for c in criticals]
        while True:  # cap the tensors over their maximum at this strength, until none is
            counts = _at_most(criticals, strength)
            over = [i for i, (n, cap) in enumerate(zip(counts, caps, strict=True)) if n > cap and limits[i] == math.inf]
            if not over:
                return [min(strength, limit) for limit in limits]
            for i in over:
                limits[i] = _kth([criticals[i]], caps[i], None)
            capped = [c if limit == math.inf else torch.where(c <= limit, c, math.inf) for c, limit in zip(criticals, limits, strict=True)]
            strength = _kth(capped, m, strength)

    def holds(self, k: int) -> bool:
        """Whether step ``k`` comes after the ramp of a target that then keeps its zeros."""
        return self.keep_zeros and k > self.steps

    def to_dict(self) -> dict:
        out = {"target": self.sparsity, "steps": self.steps}
        if self.start:
            out["start"] = self.start
        if self.keep_zeros:
            out["keep_zeros"] = True
        if self.allocation != "global":
            out["allocation"] = self.allocation
        if self.max_sparsity != max(MAX_SPARSITY, self.sparsity):
            out["max_sparsity"] = self.max_sparsity
        return out


def _kth(criticals: list[Tensor], m: int, hint: float | None) -> float:
    """The m-th smallest value over all ``criticals`` (1-based; 0.0 for m <= 0)."""
    if m <= 0:
        return 0.0
    if all(type(c) is Tensor and c.device.type == "cpu" for c in criticals):
        return _smallest(torch.cat([c.reshape(-1).float() for c in criticals]), m)  # a new tensor
    return _selected(criticals, m, hint)


def _selected(criticals: list[Tensor], m: int, hint: float | None) -> float:
    """The m-th smallest critical strength on an accelerator or over DTensor shards, by
    :func:`~paramreg.optim.order_statistic.kth_smallest` (Note [Target sparsity]): each rank counts
    its own shard, and one ``all_reduce`` of the counts per pass completes them."""
    local, reduce = _local(criticals)
    return float(kth_smallest(lambda: local, m, reduce=reduce, hint=hint).value)


def _local(criticals: list[Tensor]):
    """Each rank's part of ``criticals`` (DTensor shards, Note [Target sparsity]) and the sum over
    ranks of a count tensor (None without DTensors)."""
    local, group = [], None
    for c in criticals:
        if isinstance(c, Tensor) and type(c) is not Tensor and hasattr(c, "device_mesh"):  # a DTensor
            c, group = _shard(c), c.device_mesh.get_group()
        local.append(c)
    if group is None:
        return local, None
    import torch.distributed as dist

    def reduce(counts: Tensor) -> None:
        dist.all_reduce(counts, group=group)

    return local, reduce


def _at_most(criticals: list[Tensor], value: float) -> list[int]:
    """Per tensor, how many of its critical strengths are at most ``value`` (one comparison pass;
    over DTensor shards one ``all_reduce`` of as many counts as there are tensors)."""
    local, reduce = _local(criticals)
    counts = torch.stack([(c <= value).sum() for c in local]) if local else torch.zeros(0, dtype=torch.int64)
    if reduce is not None:
        reduce(counts)
    return [int(n) for n in counts.tolist()]


def _shard(c) -> Tensor:
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


def _smallest(values: Tensor, m: int) -> float:
    """The m-th smallest of the 1-D ``values`` (1-based), as ``values.kthvalue(m)`` gives it
    (Note [Target sparsity]: by ``numpy.ndarray.partition`` on the CPU, which reorders
    ``values`` in place: pass a scratch tensor).

    >>> _smallest(torch.tensor([3.0, 1.0, 2.0, 2.0]), 3)
    2.0
    """
    if type(values) is Tensor and values.device.type == "cpu":
        array = values.numpy()
        array.partition(m - 1)
        return float(array[m - 1])
    return float(values.kthvalue(m).values)
