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
    is the m-th smallest c_g (0 while m = 0), and the proximal map is applied with it, raised by
    2^-18 of itself (``BOUNDARY`` in optim/applying.py: the map tests its threshold in its own
    arithmetic, which would leave the m-th group a few roundings above it about half the time):
    exactly the m groups of smallest critical strength become zero (more only where several lie
    within 2^-18 of the m-th value, ties), every other group is shrunk as L1 or group lasso
    shrinks it at that strength. It is
    the smallest strength that reaches s_k on this step, so the method stays a proximal method
    whose strength follows a path, not a mask. With ``regrow=True`` zeros come back when their
    gradient outweighs it; by default (``regrow=False``, Note [Zeros that do not regrow]) a zero
    stays zero and the path ranks the weights left.
    In an optimizer's metric c_i = abs(w⁺_i)·(sqrt(v̂_i) + eps)/lr for Adam, a weight's magnitude
    times its gradient scale; with SGD it is the magnitude over lr·fill.

    The m-th smallest value is found by selection, not sorting, and the critical strengths are
    never all held at once: ``kth_smallest`` (Note [Exact selection] in optim/order_statistic.py)
    counts histograms of their bit patterns in two passes, each pass computing them again block
    by block (Note [Critical strengths on the fly] in optim/applying.py), each rank its own shard
    with one ``all_reduce`` of the counts per pass; in one process on the CPU, one pass mostly
    (Note [Sampled bracket]). It returns the element ``torch.kthvalue``
    returns on the concatenation, on any device, for shards of any size. Only a few (up to
    ``GATHERED``, 4M values, in one process on the CPU) are gathered, in one pass, into one
    buffer of at most 16 MiB, and selected by ``numpy.partition`` on a copy: there one pass and
    a partition cost less than two counting passes (on this machine's MLP with 1M selected
    weights under AdamW, a target step took 2.5x the ``l1=`` step with two counting passes). What a step costs
    against the default prox: ``benchmarks/target_cost.py`` (docs/at-scale.md).

    The step count k is the count of steps that updated the tensors (``Carrier.calls``), which a
    resumed run restores from the optimizer's state_dict (Note [Resume] in optim/state.py), so a
    resumed run continues the ramp exactly.

Note [Sampled bracket]
    In one process on the CPU, with more than ``GATHERED`` critical strengths, a selection first
    computes the critical strengths of ``SAMPLE`` (2^16) groups drawn at random (the same draw at
    every step; the drawn weights and their optimizer state through the same formula), and takes
    from them a bracket [lo, hi) around the m-th smallest: the drawn values of rank m/N·n ±
    ``SPREAD`` (4) standard deviations of that rank (binomial, sqrt(n·p·(1 − p))). Its one pass
    counts the values below lo and gathers those in [lo, hi), about 8·sqrt(p(1 − p)/n) of them (1.6%
    at p = 0.5), and selects among those (Note [Guessed bracket] in optim/order_statistic.py; for
    a global L0 target that pass also finds what the map zeroes, Note [Selection that zeroes] in
    optim/applying.py); the histogram passes resolve a miss (a draw off by more than 4 standard deviations: rare). A draw is
    never the answer, only where to look: the result is the same value, bit for bit, whatever was
    drawn (tests/test_sparsity.py). Draws at a fixed stride were tried first and missed in 49 of 53
    steps on a 700x700 Linear pair (ad hoc) (the stride divided the rows: the same columns in every
    row, some of them dead inputs); random draws missed none. lo is at least the smallest normal
    float, so the zeros the target keeps (and any denormal) are counted, not gathered, also with
    denormals flushed (``torch.set_flush_denormal``); a bracket expected to hold more than
    ``GUESSED`` (2^22) values is not drawn (at p = 0.5 from about 250M critical strengths on), and
    one that would gather more (ties at its edges) stops gathering and is resolved by histogram
    passes. Past the first steps of a ramp most of the values are the zeros the target holds, and
    a bracket drawn over all of them is wide: the count of drawn zeros alone varies by
    sqrt(n·p0·(1 − p0)), so at p = 0.5 the bracket holds 1.6% of the values, where the step zeroes
    about 0.1% of them. So a global target whose zeros do not regrow passes on how many values its
    selection at the step before left at or below its answer (``held``: the zeros its map left,
    still zero; m where that selection took another way) and draws past them: among the drawn
    values at or above the smallest normal float, around the (m − held)-th of the total − held
    others, where the draw agrees (its count of values below that float, zeros and any NaN or
    denormal score, within ``SPREAD`` standard deviations of held/total·n; a resumed run's first
    step draws over all). Where held >= m (every step after a ramp whose zeros stay, without
    ``keep_zeros``) there is neither a draw nor a pass over the scores: one read of each weight
    counts its zeros (``Criticals.zero_weights``), each of which scores at most 0 (scores are
    never negative), and at least m of them make the answer 0, with which no map runs (a zero
    weight whose metric is inf or NaN, so its score NaN, counts as the zero it is); where they
    are fewer (weights set from outside the step), the one pass counts the +0.0 weights below
    the smallest normal float (``_marked``), and then the histogram passes. Over DTensor shards or
    off the CPU the histogram passes run as before. A selection over
    16.8M AdamW weights (two 2896x2896 Linear layers, a ramp step): 54-55 ms, the draw 5 of them,
    against 92-99 with two passes (ad hoc); the pass's comparisons into two held masks (Note
    [Guessed bracket]) took its numpy work there from 24 to 13 ms a step, and the caps' counts
    below the bracket's top come from that pass (``counted``), where each chunk was compared again
    (5 ms; both ad hoc, under cProfile). ``benchmarks/target_cost.py`` measures the steps
    (docs/at-scale.md).

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
    ranked without it would take past its maximum, then the ranking is redone, until no tensor is
    past its maximum. Whether one is past it is counted per tensor in the selection's last pass
    (its values below the top of that pass's bracket, an upper bound; over DTensor shards one
    ``all_reduce`` of as many counts as there are tensors), so a step where no cap binds costs no
    pass more; an exact comparison pass runs only where that bound exceeds a cap. ``allocation="uniform"`` gives each tensor its own
    strength, the round(s_k·n_i)-th smallest of its own c_i: each tensor reaches the fraction
    itself, and the total is the sum of the rounded counts. A group of coupled tensors
    (``attach_channels``) is one unit for both.

Note [Ramp, then keep the zeros]
    ``sparsity_steps=(start, end)`` runs the ramp from optimizer step ``start`` (nothing is zeroed
    before) to ``end``; an int n is (0, n). With ``keep_zeros=True`` the target is the whole
    recipe in one call: after the ramp's last step the zero set is frozen and every other weight
    trains on without shrinkage: the two-phase form (``remove``, then ``attach(...,
    keep_zeros=True)``) without leaving the target. With ``regrow=True`` each carrier takes a mask
    of its tensor's zeros then, as ``KeepZeros`` does at attach, and from the next step on the
    zeros are set again after every step; a resumed run takes the mask from the loaded weights
    (the state-dict load hook), so it continues exactly. With ``regrow=False`` (the default) the
    pre-step hold that kept every zero in the ramp keeps them on (Note [Zeros that do not
    regrow]), with no mask and no write after the step: a mask's ``masked_fill_`` wrote nothing
    that hold had not kept, and cost a bool a weight and a pass after each step (at 100M
    weights, a recipe's steps after the ramp took 1.23 of the ``l1=`` run's with it, 0.92
    without, in two runs that vary: ``benchmarks/target_cost.py --whole-run``, docs/at-scale.md).

Note [Zeros that do not regrow]
    With ``regrow=False`` (``attach``'s default, Note [The recipe's defaults]) a weight the
    target zeroed stays zero, as under a pruning mask (torch.ao.pruning's or
    ``torch.nn.utils.prune``'s, which multiply the weight by its mask). Before every optimizer
    step from the one after the ramp's first step on (a tensor's step count above the ramp's
    start: before it the target has zeroed nothing, so a weight initialized at zero, LoRA's B,
    still trains), the global pre-step hook (optim/hooks.py) sets the gradient of each exactly
    zero weight of the target's tensors to zero (after DDP reduced it; with ``step(closure)``,
    after the closure computed it), and its momentum too: the first moment of the Adam family,
    the momentum buffer of SGD and RMSprop. In every optimizer paramreg knows the update is
    elementwise, so a weight with no gradient and no momentum does not move, and the step leaves
    the zeros at zero. Under any other optimizer (or a wrapping one, a lookahead's slow weights)
    the hook keeps each tensor's zero mask instead and sets those weights back to zero after the
    step. Nothing is added to a gradient. So a zero's critical strength is 0, the zero set only
    grows along the ramp, and the strength still follows the proximal path for the weights left
    (it is 0 at a step whose fraction the zeros kept already reach, as at the end of a ramp whose
    last steps ask for no new zero). Setting only the gradient is not enough: under Adam, every
    weight zeroed at one step and moved by its decaying momentum alone moves by the same amount
    (Adam's step is scale-free), and where the metric's floor binds they tie in critical
    strength, so the map zeroed up to 8% more than asked on a small tensor. Zeroing the momentum
    gives the weights that setting them back after the step gives (only the moment's entries of
    the zeros differ; checked on the study's runs, the same metrics to every digit), without a
    mask held across the step. A resumed run masks from the same step: the counts are restored
    before its first step, and the zeros are the loaded weights'. Ties at a step (Note [Target
    sparsity]) are kept as well: a tensor initialized at zero whose ramp starts at its first Adam
    step, which moves every weight by lr, ties many critical strengths there (start its ramp a
    step or more later). A sparse gradient (``Embedding(sparse=True)``) takes no masked write:
    those zeros are set back after the step. Adam with ``eps=0``: a kept zero's second moment may
    decay to exactly 0 (with flushed denormals), and its step is then 0/0, as for a weight that
    never had a gradient. ``attach_channels`` takes no ``regrow``: its targets regrow. The cost:
    one compiled pass per tensor and step that reads the weight, its gradient and momentum and
    writes the latter two (Note [Held zeros, fused] in optim/fused.py), or where that pass does
    not take the tensor one comparison and two masked writes (three and a held mask under an
    optimizer paramreg does not know).

Note [Looking ahead]
    An ``L0`` target ranks the weights by their score in the optimizer's metric, w²/(2t). With
    ``lookahead=h`` (optimizer steps) under Adam or AdamW, where the map is in their metric, it
    ranks them by the score of the point that Adam's momentum would carry each weight to in h
    steps::

        y_i = w_i − h·t_i·m̂_i,     c_i = y_i²/(2·t_i)      (y_i = 0 where w_i = 0)

    with m̂ = m/(1 − β₁ᵏ) Adam's bias-corrected first moment and t_i the metric's step (Note
    [Safeguarded metric] in optim/step_sizes.py), so t_i·m̂_i is Adam's update from its momentum
    (less where the safeguard's floor raises the denominator).
    The m weights of smallest c_i are set to zero and the others are left as the optimizer put
    them, as without a horizon. Expanded, c_i = w_i²/(2t_i) − h·w_i·m̂_i + h²·t_i·m̂_i²/2: the L0
    score, plus h times −w·m̂, the score of movement pruning (Sanh et al. 2020: −w·∂L/∂w, summed
    over steps; here the gradient averaged by Adam's momentum), plus the square of the distance
    travelled. So a weight that training drives toward zero goes first, one that it drives away
    from zero stays; h = 0 is the plain score. It reads the optimizer's state only: nothing is
    kept across steps. The selection and the map compute y and c with the same function (the
    same compiled formula where the fused map takes the tensor, Note [Fused map] in
    optim/fused.py: one more read, of m, in each pass), so exactly the m smallest are zero (ties
    aside). Under any other optimizer, or ``step="lr"``, the horizon is 0: SGD's momentum
    buffer is no step in a metric (it grows with the gradient), and with it a long horizon emptied
    the digits CNN's accuracy in a probe (ad hoc). ``attach``'s default horizon is 0: the recipe's
    default extends each weight's own path instead (Note [Extrapolated paths]), which ranked above
    every horizon tried (Note [The recipe's defaults]).

Note [Extrapolated paths]
    With ``extrapolate=α`` under Adam or AdamW, an ``L0`` target ranks each weight by the L0
    score of its path since the ramp began, extended α times as far::

        y_i = w_i + α·(w_i − w⁰_i),     c_i = y_i²/(2·t_i)      (y_i = 0 where w_i = 0)

    with w⁰ the weights after the ramp's first optimizer step (taken then, before that step's
    selection) and t_i the metric's step. Where Note [Looking ahead] extends one step of Adam's
    momentum, this extends what the weight actually travelled since the ramp began, a sum of every
    step since then: a weight the new task has been driving toward zero goes first, one that has
    grown stays, and, for large α, a weight that moved far in either direction ranks above one
    that did not move (the score tends to α²·(w − w⁰)²/(2t), the squared distance travelled).
    With α = 0 it is the plain score. The cost: w⁰, one tensor the size of each selected weight,
    in the optimizer's per-parameter state under ``ORIGIN_KEY``, with the step it was taken at
    under ``ORIGIN_STEP_KEY`` (so ``optimizer.state_dict()``, DCP and the trainers' checkpoints
    carry it and a resumed run continues exactly, Note [Resume] in optim/state.py). A tensor
    takes it at its first step of the ramp (one without a gradient at the ramp's first step, at
    its next), keeps it while the target ranks (with ``keep_zeros=True``, as in the recipe, to
    the ramp's last step; without, to the end of the run) and ``remove`` drops it. Each pass of
    the selection and the map reads it (one more read, as the horizon's m). The selection and
    the map compute y and c with one function, eagerly or in one compiled formula (Note [Fused
    map] in optim/fused.py), so exactly the m smallest are zero (ties aside). Only with
    ``regrow=False``: a zero that came back would rank by the map's jump to zero, as if it had
    travelled that far, and come back again (zeros churned in a probe), so ``regrow=True`` makes
    the default α 0 and refuses another. Under any other optimizer, or ``step="lr"``, the
    weights are scored as they are. ``lookahead=`` and ``extrapolate=`` are not taken together.
    A compiled ``optimizer.step`` recompiles once, when the state first holds the new keys.

Note [The recipe's defaults]
    ``attach(model, targets, sparsity=s, total_steps=T)`` is the recipe with its defaults: the
    ramp from step round(0.25·T) to round(0.75·T) (``RECIPE_RAMP``), then the zeros kept to the
    end (``keep_zeros=True``), with ``L0`` in the optimizer's metric (hard thresholding; the
    default regularizer of every ``sparsity=`` target) scoring under Adam and AdamW each weight's
    path since the ramp began extended 4 times as far (``EXTRAPOLATE``, every L0 target's default;
    Note [Extrapolated paths]), zeros that do not regrow (``REGROW``, also every ``sparsity=``
    target's default) and the global allocation, each tensor at most ``MAX_SPARSITY`` zero. These
    were chosen by one rule across four tasks (a CNN on digits, a transformer on Python source,
    the same transformer fine-tuned on C, a GRU on English), not per task: among 21 candidates (L1
    or L0, global or uniform, the ramp ending at 0.5 or 0.75 of the budget, always starting at
    0.25, zeros that regrow or not; L0 looking T/8 steps ahead along Adam's momentum, global,
    zeros kept, over either ramp; and L0 extending the paths 4, 8 or 16 times, global, zeros
    kept, the 0.25-0.75 ramp), the best mean rank on validation over every task and level. The
    looking-ahead and then the extending candidates were added after the fine-tuning task was
    lost to movement pruning, their horizons and extensions from ad hoc probes of the four tasks'
    validation sets. ``examples/study_tasks.py`` runs that study; docs/sparsity-recipe.md has its
    tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import numpy
import torch
from torch import Tensor

from ..errors import ParamregError
from .order_statistic import GUESSED, kth_smallest

__all__ = ["SparsityTarget", "ramp", "recipe_steps", "RECIPE_RAMP", "REGROW", "EXTRAPOLATE", "MAX_EXTRAPOLATE"]

RECIPE_RAMP = (0.25, 0.75)  # Note [The recipe's defaults]: the ramp's start and end, fractions of total_steps
REGROW = False  # Note [The recipe's defaults]: attach's sparsity targets keep every zero they make
#: Note [Extrapolated paths]: an L0 target's default extension of each weight's path (Note [The recipe's defaults]).
EXTRAPOLATE = 4.0
#: The largest extension ``extrapolate=`` takes (beyond it the path's float32 rounding rules the score).
MAX_EXTRAPOLATE = 1e6


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


def recipe_steps(total_steps) -> tuple[int, int]:
    """The ramp's (start, end) for ``total_steps`` (Note [The recipe's defaults]).

    >>> recipe_steps(1000)
    (250, 750)
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 4:
        raise ParamregError(
            f"total_steps must be an int >= 4 (the optimizer steps of the whole run: the ramp takes "
            f"{RECIPE_RAMP[0]:g}-{RECIPE_RAMP[1]:g} of them, then the zeros are kept), got {total_steps!r}"
        )
    return round(RECIPE_RAMP[0] * total_steps), round(RECIPE_RAMP[1] * total_steps)


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
    regrow: bool = True
    lookahead: int = 0
    extrapolate: float = 0.0
    strength: float | None = None
    asked: float = 0.0
    #: (step, groups asked) of this target's last global selection: the zeros the next one finds,
    #: where they are held (Note [Sampled bracket]); not saved (a resumed run's first step draws without)
    zeroed: tuple[int, int] | None = field(default=None, repr=False, compare=False)

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
        if not isinstance(self.regrow, bool):
            raise ParamregError(f"regrow must be True or False (whether a weight the target zeroed may come back), got {self.regrow!r}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or not 0 <= self.lookahead < 2**31:
            raise ParamregError(
                f"lookahead must be an int >= 0 and below 2**31 (the optimizer steps an L0 target looks ahead along "
                f"Adam's momentum; 0: the weights as they are), got {self.lookahead!r:.60}"
            )
        value = self.extrapolate
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_EXTRAPOLATE:
            raise ParamregError(
                f"extrapolate must be a number from 0 to {MAX_EXTRAPOLATE:g} (how many times its path since the ramp's "
                f"first step an L0 target extends each weight's; 0: the weights as they are), got {value!r:.60}"
            )
        self.extrapolate = float(value)
        if self.extrapolate and self.regrow:
            raise ParamregError(
                f"extrapolate={self.extrapolate:g} needs regrow=False: a zero that comes back would rank by the map's "
                f"jump to zero as if it had travelled that far (give extrapolate=0 to let zeros regrow)"
            )
        if self.lookahead and self.extrapolate:
            raise ParamregError(
                f"give lookahead= (along Adam's momentum) or extrapolate= (along each weight's path since the ramp "
                f"began), not both: got lookahead={self.lookahead} and extrapolate={self.extrapolate:g}"
            )
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

    def calibrate(self, criticals: "Criticals", k: int) -> list[float]:
        """The strength of step ``k`` for each unit of ``criticals`` (a tensor, or a coupled group
        of tensors, that the step updated; Note [Critical strengths on the fly] in optim/applying.py)."""
        self.asked = ramp(self.sparsity, self.steps, k, self.start)
        if self.allocation == "uniform" and criticals.owned is not None:  # each tensor on its owner alone
            alone = _Alone(criticals)
            strengths = [_kth(alone, round(self.asked * n), [u]) if u in criticals.owned else 0.0 for u, n in enumerate(criticals.sizes)]
        elif self.allocation == "uniform":
            strengths = [_kth(criticals, round(self.asked * n), [u]) for u, n in enumerate(criticals.sizes)]
        else:
            strengths = self._global(criticals, k)
        finite = [s if math.isfinite(s) else 0.0 for s in strengths]
        self.strength = max(finite, default=0.0)
        if self.allocation == "uniform" and criticals.owned is not None:
            self.strength = criticals.largest(self.strength)  # the same on every rank, as report shows it
        return finite

    def _global(self, criticals: "Criticals", k: int) -> list[float]:
        """One strength for every unit at step ``k``, each unit's capped at its maximum (Note [Allocation])."""
        sizes = criticals.sizes
        m = round(self.asked * sum(sizes))  # sizes over every rank
        if not m:
            return [0.0] * len(sizes)
        # the zeros the last selection left, where it was the step before and they are held
        held = self.zeroed[1] if not self.regrow and self.zeroed is not None and self.zeroed[0] == k - 1 else None
        # The selection's last pass also counts, per unit, the values below the top of its bracket:
        # if no unit is over its cap there, none is at the strength, which lies below it.
        below = None if self.max_sparsity >= 1.0 else [0] * len(sizes)
        strength = _kth(criticals, m, counting=below, held=held)
        self.zeroed = (k, max(m, getattr(criticals, "zeros", None) or 0))  # ties with the answer too
        if strength == 0.0:  # m values are 0: under any caps the m-th smallest is 0 still (limits are >= 0)
            return [0.0] * len(sizes)
        caps = [math.floor(self.max_sparsity * n) for n in sizes]
        if below is None or all(n <= cap for n, cap in zip(below, caps, strict=True)):
            return [strength] * len(sizes)
        self.zeroed = (k, m)  # capped units: m zeros in all, at strengths of their own
        limits: dict[int, float] = {}
        while True:  # cap the units over their maximum at this strength, until none is
            counts = _at_most(criticals, strength, limits)
            over = [u for u, (n, cap) in enumerate(zip(counts, caps, strict=True)) if n > cap and u not in limits]
            if not over:
                return [min(strength, limits.get(u, math.inf)) for u in range(len(sizes))]
            for u in over:
                limits[u] = _kth(criticals, caps[u], [u])
            strength = _kth(criticals, m, limits=limits)

    def masks_gradient(self, calls: int) -> bool:
        """Whether, before the step that follows ``calls`` steps of a tensor, the gradient of its
        zero weights is set to zero (Note [Zeros that do not regrow])."""
        return not self.regrow and calls > self.start

    def holds(self, k: int) -> bool:
        """Whether step ``k`` comes after the ramp of a target that then keeps its zeros."""
        return self.keep_zeros and k > self.steps

    def to_dict(self) -> dict:
        out = {"target": self.sparsity, "steps": self.steps}
        if self.start:
            out["start"] = self.start
        if self.keep_zeros:
            out["keep_zeros"] = True
        if not self.regrow:
            out["regrow"] = False
        if self.lookahead:
            out["lookahead"] = self.lookahead
        if self.extrapolate:
            out["extrapolate"] = self.extrapolate
        if self.allocation != "global":
            out["allocation"] = self.allocation
        if self.max_sparsity != max(MAX_SPARSITY, self.sparsity):
            out["max_sparsity"] = self.max_sparsity
        return out


class Criticals(Protocol):
    """What a target calibrates from (Note [Critical strengths on the fly] in optim/applying.py):
    the critical strengths of its units, computed again for every pass over them."""

    #: Per unit, its number of groups (over every rank).
    sizes: list[int]
    #: The sum over ranks of a count tensor, in place (None in one process).
    reduce: Callable[[Tensor], object] | None
    #: Where the counts live.
    device: torch.device
    #: Under ZeroRedundancyOptimizer, the units this rank stepped, each on this rank alone (None
    #: elsewhere: every unit's groups are counted over every rank alike).
    owned: set[int] | None
    #: How many values lie at or below the answer of a selection's one pass that also finds the
    #: zeros (None where none answered): the zeros after the map, for the next step's draw.
    zeros: int | None

    def chunks(self, units: Iterable[int] | None = None, limits: dict[int, float] | None = None) -> Iterator[tuple[int, Tensor]]:
        """(unit, this rank's critical strengths of some of its groups) over ``units`` (default all),
        every group once; a unit in ``limits`` has its values above the limit as +inf."""

    def largest(self, value: float) -> float:
        """The largest ``value`` over the ranks (``value`` in one process)."""

    def sample(self, units: Iterable[int] | None = None, limits: dict[int, float] | None = None, count: int = 1 << 16) -> Tensor | None:
        """About ``count`` critical strengths of ``units`` drawn at random, as float32 values, or
        None where they cannot be drawn (Note [Sampled bracket])."""

    def zero_weights(self) -> list[int] | None:
        """Per unit, how many of its weights are zero, each a value that is at most 0; None where
        they are not counted so (Note [Sampled bracket])."""


class _Alone:
    """The units of ``criticals`` this rank owns, selected here without a collective (Note
    [Targets across ZeRO's ranks] in optim/applying.py)."""

    def __init__(self, criticals: Criticals):
        self.sizes, self.device, self.chunks, self.reduce = criticals.sizes, criticals.device, criticals.chunks, None

    def sample(self, units=None, limits=None, count: int = 1 << 16) -> None:
        return None  # its tensors' state is another optimizer's shard: the histogram passes

    def zero_weights(self) -> None:
        return None


def _kth(criticals: Criticals, m: int, units=None, limits=None, counting: list[int] | None = None,
         held: int | None = None) -> float:
    """The m-th smallest critical strength of ``units`` (1-based; 0.0 for m <= 0), by
    :func:`~paramreg.optim.order_statistic.kth_smallest`: each rank counts its own values, one
    ``all_reduce`` of the counts per pass completes them. ``counting``: per unit, set to how many
    of its values lie below the top of the last pass's bracket (all of them, without one), an
    upper bound of how many lie at or below the result. ``held``: about how many of the values
    are zeros held since the last step (Note [Sampled bracket]; only where to look).

    No hint: in training the strength moves from step to step by far more than the window one
    exact pass resolves (about 0.4%, Note [Exact selection]). ``python benchmarks/strength_moves.py``
    (the digits CNN with a target over 500 steps): a median move of 18% under Adam and 10% under
    SGD, 4 and 5 of 448 steps within the window, so a hint would cost a third pass in nearly
    every step."""
    if m <= 0:
        return 0.0
    guess = None
    if criticals.reduce is None and criticals.device.type == "cpu":
        total = sum(criticals.sizes[u] for u in (range(len(criticals.sizes)) if units is None else units))
        if total <= GATHERED:
            return _gathered(criticals, m, total, units, limits, counting)
        if SAMPLE and held is not None and held >= m and units is None and not limits:
            zeros = criticals.zero_weights()
            if zeros is not None and sum(zeros) >= m:  # the held zeros are the answer, counted by one read of w
                criticals.zeros = sum(zeros)
                if counting is not None:
                    counting[:] = zeros
                return 0.0
            guess = (_NORMAL, 2 * _NORMAL)  # the held zeros are the answer: one pass counts them, no draw
        elif SAMPLE:
            drawn = criticals.sample(units, limits, SAMPLE)
            guess = None if drawn is None else _bracket(drawn, m, total, held)
        if guess is not None and units is None and not limits:
            found = _marked(criticals, m, guess, counting)
            if found is not None:
                return found
    top = [math.nan]
    current = [None, guess is not None]  # the unit of the chunk being counted; whether the pass is a guess's

    def bracket(lo: float, hi: float) -> None:
        top[0] = hi

    def chunks():
        if counting is not None:
            counting[:] = [0] * len(counting)
        for u, c in criticals.chunks(units, limits):
            current[0] = u
            if counting is not None and not current[1]:  # a guess's pass counts below its top itself (counted)
                counting[u] += c.numel() if math.isnan(top[0]) else _below(c, top[0])
            yield c
            del c  # not held while the next is computed
        current[1] = False

    def counted(n: int) -> None:
        counting[current[0]] += n

    found = kth_smallest(chunks, m, reduce=criticals.reduce, device=criticals.device, bracket=bracket, guess=guess,
                         counted=None if counting is None else counted)
    if counting is not None:
        counting[:] = _summed(criticals, counting)
    return float(found.value)


def _marked(criticals: Criticals, m: int, guess: tuple[float, float], counting: list[int] | None) -> float | None:
    """:func:`_kth` of every unit by one pass that also finds what the map zeroes
    (``Criticals.marked``, Note [Selection that zeroes] in optim/applying.py): the m-th smallest
    among the values gathered in the bracket; None where that pass does not run or the m-th
    value lies outside the bracket. Where at least m +0.0 weights score below lo (held zeros:
    every step after a ramp whose zeros do not regrow, without ``keep_zeros``), 0: a score is
    y²·u/2 with u > 0 and y = 0 where w is (Notes [Looking ahead] and [Extrapolated paths]), so
    no score is negative and a +0.0 weight scores 0 (or NaN, never below lo); any other zero
    answer (a weight other than +0.0 whose score is 0) is left to the guessed pass and the
    histogram passes, which tell zeros from denormals by their bits. Sets ``criticals.zeros``
    where it answers."""
    marked = getattr(criticals, "marked", None)
    lo, hi = (float(numpy.float32(x)) for x in guess)  # as kth_smallest rounds a guess
    if hi <= lo:
        return None
    units = marked(lo, hi) if marked is not None else None
    if units is None:
        return None
    below, under, fresh = (sum(unit[j] for unit in units) for j in (0, 1, 3))
    if m <= below - fresh:  # the m-th smallest is the score of a +0.0 weight: 0 (scores are never negative)
        found, criticals.zeros = 0.0, below - fresh
    elif below < m <= under:
        values = numpy.concatenate([unit[2] for unit in units])
        found = float(numpy.partition(values, m - below - 1)[m - below - 1])
        criticals.zeros = below + int(numpy.count_nonzero(values <= found))
    else:
        return None
    if counting is not None:
        counting[:] = _summed(criticals, [unit[1] for unit in units])
    return found


def _below(values: Tensor, top: float) -> int:
    """How many of ``values`` lie below the float32 value ``top``: bfloat16 and float16 values
    compared in float32 (their own comparison would round ``top`` down: an undercount), float64
    in float64 (at most an overcount of values that convert to ``top``: still an upper bound);
    numpy's comparison on the CPU, half torch's time here."""
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    if values.device.type == "cpu":
        return int(numpy.count_nonzero(values.detach().numpy() < top))
    return int(torch.count_nonzero(values < top))


#: Critical strengths drawn per selection to bracket it, in one process on the CPU (Note [Sampled
#: bracket]); 0: none, every selection takes the histogram passes.
SAMPLE = 1 << 16
#: The bracket's half-width in standard deviations of the drawn rank.
SPREAD = 4.0
_NORMAL = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32: kept with flushed denormals


def _bracket(drawn: Tensor, m: int, total: int, held: int | None = None) -> tuple[float, float] | None:
    """(lo, hi) around the m-th smallest of ``total`` values, from ``drawn`` values drawn from them
    at random (Note [Sampled bracket]): the drawn values of rank m/total·n ± SPREAD standard
    deviations (binomial), lo at least the smallest normal float (every zero lies below it),
    hi just above the drawn value (+inf past the last); None where the draw brackets nothing
    (an infinite or NaN value at lo) or where the bracket would hold more than ``GUESSED``
    values (order_statistic.py). With ``held`` (fewer than m) values known to lie below the
    smallest normal float, and a draw that agrees (its count of them within SPREAD standard
    deviations of held/total·n) and draws at or above it, the same among those, around the
    (m − held)-th of the other total − held."""
    n = drawn.numel()
    if held is not None and 0 <= held < m:
        values = drawn.numpy()
        normal = values[values >= _NORMAL]  # NaN too is left out: it lies in no bracket
        share = held / total
        if normal.size and abs(n - normal.size - share * n) <= SPREAD * math.sqrt(n * share * (1.0 - share)) + 1.0:
            drawn, m, total = torch.from_numpy(normal), m - held, total - held
            n = drawn.numel()
    p = m / total
    rank, spread = p * n, SPREAD * math.sqrt(n * p * (1.0 - p)) + 1.0
    a, b = math.floor(rank - spread) - 1, math.ceil(rank + spread)  # 0-based ranks in the draw
    if (min(b, n) - max(a, 0)) * total > GUESSED * n:  # expected to gather more than a guess may (GUESSED values)
        return None
    picks = [r for r in (a, b) if 0 <= r < n]
    values = drawn.numpy()
    if picks:
        values = numpy.partition(values, picks)
    lo = float(values[a]) if a >= 0 else 0.0
    hi = float(numpy.nextafter(values[b], numpy.float32(math.inf))) if b < n else math.inf
    lo = max(lo, _NORMAL)
    return (lo, hi) if math.isfinite(lo) and hi > lo else None


#: Up to this many critical strengths in one process on the CPU, a target gathers them into one
#: float32 buffer (16 MiB) in one pass and partitions a copy (Note [Target sparsity]).
GATHERED = 1 << 22


def _gathered(criticals: Criticals, m: int, total: int, units, limits, counting: list[int] | None) -> float:
    """:func:`_kth` for a few values on the CPU: one pass gathers them, ``numpy.partition`` (a
    vectorized introselect) selects on a copy, and ``counting`` gets exact counts at the result."""
    values = torch.empty(total, dtype=torch.float32)
    spans, filled = [], 0
    for u, c in criticals.chunks(units, limits):
        n = c.numel()
        values[filled : filled + n] = c.reshape(-1)
        spans.append((u, filled, filled + n))
        filled += n
        del c
    array = values.numpy().copy()
    array.partition(m - 1)
    found = float(array[m - 1])
    if counting is not None:
        counting[:] = [0] * len(counting)
        for u, start, end in spans:
            counting[u] += int(torch.count_nonzero(values[start:end] <= found))
    return found


def _at_most(criticals: Criticals, value: float, limits: dict[int, float]) -> list[int]:
    """Per unit, how many of its critical strengths are at most ``value`` (one comparison pass;
    over DTensor shards one ``all_reduce`` of as many counts as there are units)."""
    counts = [0] * len(criticals.sizes)
    for u, c in criticals.chunks(None, limits):
        counts[u] += int(torch.count_nonzero(c <= value))
    return _summed(criticals, counts)


def _summed(criticals: Criticals, counts: list[int]) -> list[int]:
    """Per-unit ``counts`` summed over ranks (one ``all_reduce``; as they are in one process)."""
    if criticals.reduce is None:
        return counts
    total = torch.tensor(counts, dtype=torch.int64, device=criticals.device)
    criticals.reduce(total)
    return total.tolist()
