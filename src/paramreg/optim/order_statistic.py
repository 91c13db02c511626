"""Order statistics over many tensors: the m-th smallest value without concatenating them.

Note [Exact selection]
    ``kth_smallest(chunks, m)`` returns the value that
    ``torch.cat([c.reshape(-1).float() for c in chunks()]).kthvalue(m).values`` returns, without
    the concatenation, without moving the values to the host and without a collective on them.

    Keys. A float32 value x >= 0 viewed as an int32 is a key that orders as x does (IEEE-754:
    exponent above mantissa; denormals below the normals, +inf above every finite value). The key
    used is ``bits & 0x7FFFFFFF``, so -0.0 is the key of 0.0, and every NaN, of either sign, is one
    key above +inf: NaN sorts above +inf, as in ``torch.kthvalue`` and ``numpy.partition``, and the
    result is NaN when m exceeds the number of non-NaN values. The values must be >= 0 (a negative
    value counts as its magnitude). Other floating dtypes are converted to float32 first, as
    ``.float()`` converts them, and the result is exact for the converted values.

    Passes. A pass histograms the keys of every chunk into ``bins`` bins of width 2^s over a window
    [lo, lo + bins·2^s), plus one bin for the keys below the window and one for those above it:
    clamp, subtract, shift and ``torch.bincount``, in place in a staging buffer that small chunks
    share (one kernel per flush, not per chunk). The caller's ``reduce`` sums the (bins + 2,)
    counts across ranks (an ``all_reduce``); the cumulative counts give the bin that holds the
    m-th smallest key, and the next pass covers that bin alone. A bin of width 1 is one value:
    the answer, with the number of values below it and equal to it. With 2^16 bins the first pass
    covers all 2^31 keys in bins of 2^15 and the second resolves that bin: 2 passes. With a
    ``hint`` (the last step's answer) the first pass is a window of 2^16 keys of width 1 centred
    on the hint, about +-0.4% of its value (+-2^15 ulps): 1 pass when the answer stayed in it,
    else it says on which side and 2 more passes resolve that side. Every pass calls ``reduce``
    once, on ``bins + 2`` int64 counts and never on values, so a selection makes at most 3
    collectives with the default bins, and moves 4 numbers to the host per pass.

    Ties. The result is the m-th smallest value, as ``kthvalue`` returns it; ``below`` and
    ``equal`` say how many values are smaller and equal (``below < m <= below + equal``). Which of
    the equal values a caller treats as selected is the caller's concern.

    Why not sort, kthvalue, topk, quantile (GROUND.md section 9): all of them need the values in one
    tensor (400 MB of float32 for 100M values), and on a DTensor sharded along the selected
    dimension they all-gather it; CUDA ``kthvalue`` runs one thread block per slice (0.68 s for
    100M values against 0.03 s to sort); CUDA ``sort``/``topk`` refuse a dimension over INT_MAX;
    ``quantile`` sorts and refuses more than 2^24 values. On the CPU the concatenation and
    ``numpy.partition`` is fast but concatenates, and runs on the host.

    Costs (``benchmarks/order_statistic.py``, torch 2.13 on 2 shared CPU cores with a 480 MB L3,
    float32 values |N(0,1)|·exp(N(0,1)) in one chunk, m = 0.9·N, best of 3-5, ms):

        values   elementwise  cat+partition  cat+kthvalue  cold (2 passes)  hint (1)  far hint (3)
        1M           0.1           1.1           12.4            3.1           1.8         4.9
        8M           0.6          23.4          105.0           23.3          13.9        38.2
        25M          4.6          80.0          392.2           71.4          41.6       111.3
        25M in 25    3.4          81.2          331.4           67.5          40.1       110.5

    A pass costs 1.4-1.8 ns a value, 8-30 in-place elementwise passes (``torch._foreach_mul_``,
    0.07-0.2 ns a value here), not the 1-2 hoped for: every way torch has to count is a serial
    loop or worse (``--primitives``, ns a key over 1M keys: ``x.mul_`` 0.05; ``bincount`` 0.59
    when the keys spread over the bins, 1.94 when most land in bin 0 or bins + 1 as in a window's
    pass, 0.74 in Note [Lanes]; ``index_add_`` 1.69, ``histc`` 1.78, ``scatter_add_`` with its
    int64 index 2.53, ``bucketize`` 7.05; masking and indexing the window's keys 1.42; one
    threshold by a comparison and ``count_nonzero`` 0.33, so a pass per threshold). So on this CPU
    the selection costs what the concatenation and partition cost without a hint, half with one,
    and needs no concatenated copy. With another process busy on both cores, the waits of the
    intra-op threads dominate (``--sizes 25000000 --threads 1``, then 2): 25M values took 108 ms
    cold and 67 ms with a hint on 1 thread, 3.2 s and 154 ms on 2, the concatenation and partition
    98-101 ms on either. On an accelerator ``bincount`` counts with atomics (not measured
    here; it reads its input's extremes to the host, a sync per flush of STAGE keys).

Note [Guessed bracket]
    With ``guess=(lo, hi)``, the first pass compares instead of counting keys: it counts the values
    below lo and gathers those in [lo, hi), and when the m-th smallest lies among them it is their
    (m - below)-th smallest (``numpy.partition``): 1 pass, whatever the window's width in keys.
    Otherwise the answer lies below lo or at or above hi, and histogram passes over that side
    resolve it (at most 2 with the default bins). On the CPU a piece takes two comparisons into held
    boolean masks (x < lo, x < hi), their counts, and where the second count is larger the values
    where the masks differ (numpy's boolean indexing): about 1.2 ms per 2^20 float32 values with 2%
    in the bracket, where counting and masking by separate comparisons, each into a new array, took
    2.2 (ad hoc), and a key's preparation and ``bincount`` take 1.4-1.8 ns a value. Where lo is the
    smallest normal float (a bracket that starts at a target's kept zeros) the pass also counts the
    zeros (one more comparison, x == 0, where this thread does not flush denormals; by their bits
    where it does, since a flushed comparison takes a denormal for 0), and an answer among them is 0
    in that pass (a capped tensor's kept zeros, or every step after a ramp whose zeros stay); above
    it a zero answer is a miss below. A bracket that holds more than ``GUESSED`` values (ties at its
    edges) is counted, not gathered, past that many, and histogram passes over it resolve it, so a
    guess never gathers more. lo is at least the smallest normal float: with denormals flushed
    (``torch.set_flush_denormal``, per thread) a comparison takes a denormal for 0, so a denormal lo
    would misplace denormal values; with a normal lo every denormal lies below it either way. Chunks
    of other dtypes are converted to float32 in the pieces the histogram passes convert. A caller
    whose guess comes from a random sample of the values (a sparsity target's, Note [Sampled
    bracket] in optim/targets.py) gathers a few percent of them; a guess is only a matter of speed,
    never of the result. The gathered values stay in one process, so ``guess`` takes no ``reduce``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import numpy
import torch
from torch import Tensor

__all__ = ["Selected", "kth_smallest"]

# Keys are float32 bit patterns with the sign bit cleared: [0, 2^31). Every NaN is counted as
# _NAN, the key just above +inf (_INF).
_KEYS = 1 << 31
_MAGNITUDE = _KEYS - 1
_INF = 0x7F800000
_NAN = _INF + 1
# Keys are staged in a buffer of STAGE elements (BLOCK on the CPU, where they stay in the caches):
# small chunks are packed together and counted by one kernel, large ones are counted in blocks.
STAGE = 1 << 24
BLOCK = 1 << 20
# Interleaved histograms of a window's pass on the CPU (Note [Lanes]).
LANES = 4
#: At most this many values are gathered by a guess's pass (16 MiB of float32); past it the pass
#: only counts, and histogram passes resolve the bracket (Note [Guessed bracket]).
GUESSED = 1 << 22


class Selected(NamedTuple):
    """What :func:`kth_smallest` found: ``value`` (a float; 0.0 for a zero, also -0.0; NaN when the
    m-th value is a NaN), ``below`` and ``equal`` (how many values are smaller than it and equal
    to it, over every rank; every NaN is equal to a NaN) and ``passes`` (the passes over the chunks,
    each with one call of ``reduce``)."""

    value: float
    below: int
    equal: int
    passes: int


def kth_smallest(
    chunks: Callable[[], Iterable[Tensor]],
    m: int,
    *,
    reduce: Callable[[Tensor], object] | None = None,
    hint: float | None = None,
    bins: int = 1 << 16,
    device: torch.device | str | None = None,
    bracket: Callable[[float, float], object] | None = None,
    guess: tuple[float, float] | None = None,
    counted: Callable[[int], object] | None = None,
) -> Selected:
    """The m-th smallest (1-based) of the values in ``chunks()``, exactly (Note [Exact selection]).

    The same value as ``torch.cat([c.reshape(-1).float() for c in chunks()]).kthvalue(m).values``,
    found by histograms of the float32 bit patterns: a pass over the chunks per histogram, at most
    2 passes with the default ``bins``, 1 when the answer lies within about 0.4% of ``hint``
    (3 when it does not) or in the bracket ``guess`` (at most 3 when it does not).

    Args:
        chunks: a callable that returns an iterable of tensors, called once per pass, so that each
            chunk can be computed on the fly and dropped (values >= 0, any floating dtype, any
            shape and strides, all on one device).
        m: the rank, 1 <= m <= the number of values (over every rank).
        reduce: called once per pass with the local counts, an int64 tensor of ``bins + 2``
            elements on the chunks' device, which it must sum in place over the ranks, e.g.
            ``torch.distributed.all_reduce``; then ``chunks`` yields this rank's local values
            (``DTensor.to_local()``) and ``m`` is the global rank. Every rank must call with the
            same ``m``, ``hint`` and ``bins``.
        hint: a value expected near the answer (the last step's); a window of ``bins`` float32
            values centred on it is counted first.
        bins: the bins of a histogram, a power of two 2^k from 2^9 to 2^22: ceil(31 / k) passes
            without a hint, one more after a hint that missed, the hint's window +-2^(k - 1) floats.
        device: where the counts live when ``chunks()`` yields no tensor (default: the CPU).
        bracket: called before each pass after the first with (lo, hi), float32 values such that
            lo <= the answer < hi (hi may be +inf, or NaN where no float bounds it), so that
            a caller's ``chunks`` can count something up to the answer in the same pass; and
            before a ``guess``'s pass with the guess, which a later pass corrects where the
            answer lies outside it.
        guess: (lo, hi), float32 values, lo at least the smallest normal float32 (so that the
            comparisons are exact with denormals flushed) and below hi: a bracket expected to
            hold the answer (Note [Guessed bracket]). The first pass counts the values below lo
            and gathers those in [lo, hi), and selects among them, 1 pass; else it says on which
            side the answer lies, and at most 2 more passes resolve that side. Values must be
            >= 0 (or -0.0), and ``reduce`` None: the gathered values stay in this process.
        counted: called in a guess's pass after each chunk with how many of its values lie below
            the guess's hi (which the pass compares with anyway), so that a caller's ``chunks``
            need not count up to the bracket's top in that pass.

    Returns:
        :class:`Selected`: the value, how many values are below and equal to it, and the passes.

    Raises:
        ValueError: m outside [1, number of values] (raised on every rank, after the first pass's
            ``reduce``), or ``bins`` not a power of two in range.
        TypeError: a complex chunk, a DTensor chunk, or chunks on more than one device.

    >>> chunks = [torch.tensor([3.0, 1.0]), torch.tensor([[2.0, 2.0], [0.5, -0.0]])]
    >>> kth_smallest(lambda: chunks, 4)
    Selected(value=2.0, below=3, equal=2, passes=2)
    >>> kth_smallest(lambda: chunks, 4, hint=2.001).passes
    1
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an int >= 1 (the rank of the value, 1 for the smallest), got {m!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1 << 9 or bins > 1 << 22 or bins & (bins - 1):
        raise ValueError(f"bins must be a power of two from 2**9 to 2**22, got {bins!r}")
    counter = _Counter(chunks, bins, device)
    a, b = 0, _NAN + 1  # the m-th smallest key lies in [a, b)
    passes = 0
    if guess is not None:
        if reduce is not None:
            raise ValueError("guess= needs every value in this process (reduce=None): the values it gathers are not reduced")
        below_key, above_key = _key(float(guess[0])), _key(float(guess[1]))
        if not _NORMAL_KEY <= below_key < above_key <= _INF:
            raise ValueError(f"guess must be (lo, hi) with the smallest normal float32 <= lo < hi <= inf, got {guess!r}")
        low, high = _value(below_key), _value(above_key)
        if bracket is not None:
            bracket(low, high)
        zeros, below, within, inside, total = counter.gather(low, high, below_key == _NORMAL_KEY, counted)
        passes = 1
        if m > total:
            raise ValueError(f"m must be at most the number of values, {total}, got {m}")
        if m <= zeros:
            return Selected(0.0, 0, zeros, 1)
        if below < m <= below + within and inside is not None:
            value = float(numpy.partition(inside.numpy(), m - below - 1)[m - below - 1])
            return Selected(value, below + int(torch.count_nonzero(inside < value)), int(torch.count_nonzero(inside == value)), 1)
        if m <= below:
            a, b = 0, below_key
        elif m <= below + within:  # more than GUESSED values in the bracket: counted, not gathered
            a, b = below_key, above_key
        else:
            a, b = above_key, _NAN + 1
    if hint is not None and not math.isnan(float(hint)) and not passes:
        lo, shift = max(0, _key(float(hint)) - bins // 2), 0
    else:
        lo, shift = a, _cover(a, b, bins)
    while True:
        if bracket is not None and passes:
            bracket(_value(a), _value(b) if b <= _INF else math.nan)
        counts = counter.count(lo, shift)
        if reduce is not None:
            reduce(counts)
        passes += 1
        j, below, inside, total = _pick(counts, m)
        if passes == 1 and guess is None and m > total:
            raise ValueError(f"m must be at most the number of values, {total}, got {m}")
        if j == 0:  # below the window (a hint's window only)
            b = lo
        elif j == bins + 1:  # above it
            a = lo + (bins << shift)
        else:
            a, b = lo + ((j - 1) << shift), min(b, lo + (j << shift))
            if shift:  # the bin was wider than [a, b): its count is not the key's; one more pass counts it alone
                inside = None
        if b - a == 1 and inside is not None:
            return Selected(math.nan if a == _NAN else _value(a), below, inside, passes)
        lo, shift = a, _cover(a, b, bins)


def _cover(a: int, b: int, bins: int) -> int:
    """The smallest shift s such that ``bins`` bins of width 2^s cover the keys [a, b)."""
    return ((b - a - 1) // bins).bit_length()


# Keys below this are denormal floats, which a thread that flushes them (torch.set_flush_denormal)
# would turn into 0 in a float conversion: they are taken from their multiples of 2^-149 instead.
_NORMAL_KEY = 0x00800000
# A denormal float32: equal to 0 on a thread that flushes denormals (torch.set_flush_denormal).
_DENORMAL = numpy.array([1e-45], dtype=numpy.float32)


def _key(x: float) -> int:
    """The key of the float32 nearest ``x`` (Note [Exact selection])."""
    if abs(x) < math.ldexp(1.0, -126):  # a float32 denormal: x·2^149 rounded to the nearest, ties to even
        return round(abs(x) * 2.0**149)
    bits = int(torch.tensor(x, dtype=torch.float32).view(torch.int32)) & _MAGNITUDE
    return min(bits, _NAN)


def _value(key: int) -> float:
    if key < _NORMAL_KEY:
        return math.ldexp(key, -149)
    return float(torch.tensor(key, dtype=torch.int32).view(torch.float32))


def _pick(counts: Tensor, m: int) -> tuple[int, int, int, int]:
    """(j, below, inside, total): the bin j holding the m-th smallest key, the keys in the bins
    below j and in j, and in all; one transfer of 4 numbers."""
    cum = counts.cumsum(0)
    j = torch.searchsorted(cum, m).clamp_(max=counts.numel() - 1)
    j, below, inside, total = torch.stack([j, cum[j] - counts[j], counts[j], cum[-1]]).tolist()
    return j, below, inside, total


class _Counter:
    """The histograms of one selection, and the staging buffer its passes reuse."""

    def __init__(self, chunks, bins: int, device):
        self.chunks = chunks
        self.bins = bins
        self.device = None if device is None else torch.device(device)
        self.buffer: Tensor | None = None  # int32 keys, up to STAGE (BLOCK on the CPU) of them
        self.masks: tuple | None = None  # a guess's comparisons on the CPU (:meth:`_masks`)

    def _flats(self):
        """Every chunk of a pass, checked, as a flat tensor (a copy only where it is not contiguous)."""
        device = None
        for chunk in self.chunks():
            if chunk.is_complex():
                raise TypeError(f"the values must be real, got a chunk of dtype {chunk.dtype}")
            if hasattr(chunk, "to_local"):
                raise TypeError("chunks must be local tensors: yield dtensor.to_local() and pass reduce")
            if device is not None and chunk.device != device:
                raise TypeError(f"every chunk must be on one device, got {device} and {chunk.device}")
            device = chunk.device
            yield chunk.detach().reshape(-1)
            chunk = None  # nothing of this chunk is held while the next is computed

    def _pieces(self, flat: Tensor):
        """``flat`` in pieces of ``BLOCK`` (CPU) or ``STAGE`` elements, as float32: other dtypes
        converted as :meth:`count` converts them, in the same pieces, into the buffer."""
        size = BLOCK if flat.device.type == "cpu" else STAGE
        for start in range(0, flat.numel(), size):
            piece = flat[start : start + size]
            if piece.dtype != torch.float32:
                if self.buffer is None or self.buffer.numel() < piece.numel() or self.buffer.device != piece.device:
                    self.buffer = torch.empty(size, dtype=torch.int32, device=piece.device)
                piece = self.buffer[: piece.numel()].view(torch.float32).copy_(piece)
            yield piece

    def gather(self, lo: float, hi: float, zeros: bool, counted: Callable[[int], object] | None = None) -> tuple[int, int, int, Tensor | None, int]:
        """One pass: how many values are 0.0 or -0.0 (where ``zeros``, else 0), lie below ``lo``
        and lie in [lo, hi), those in [lo, hi) in float32 on the CPU (None past ``GUESSED`` of
        them), and how many values there are; NaN lies in none of them (Note [Guessed bracket]);
        ``counted`` is called after each chunk with how many of its values lie below ``hi``. On
        the CPU two comparisons into held masks per piece: ``x < hi`` holds wherever ``x < lo``
        does (lo < hi), so the bracket's mask is where they differ and its count the difference
        of theirs."""
        found, below, within, total, inside = 0, 0, 0, 0, []
        flushed = zeros and bool(numpy.equal(_DENORMAL, 0.0)[0])  # this thread compares denormals as 0
        for flat in self._flats():
            under_hi = 0
            for piece in self._pieces(flat):
                n = piece.numel()
                total += n
                if piece.device.type == "cpu":
                    x = piece.numpy()
                    under, bounded = self._masks(n)
                    if zeros and flushed:
                        found += int(numpy.count_nonzero((x.view(numpy.uint32) << 1) == 0))  # by their bits
                    elif zeros:
                        found += int(numpy.count_nonzero(numpy.equal(x, 0.0, out=under)))
                    numpy.less(x, lo, out=under)
                    numpy.less(x, hi, out=bounded)
                    b = int(numpy.count_nonzero(under))
                    k = int(numpy.count_nonzero(bounded)) - b
                    if k and inside is not None and within + k <= GUESSED:
                        numpy.not_equal(under, bounded, out=under)
                        inside.append(torch.from_numpy(x[under]))
                else:
                    if zeros:
                        found += int(torch.count_nonzero((piece.view(torch.int32) & _MAGNITUDE) == 0))
                    b = int(torch.count_nonzero(piece < lo))
                    mask = (piece >= lo) & (piece < hi)
                    k = int(torch.count_nonzero(mask))
                    if k and inside is not None and within + k <= GUESSED:
                        inside.append(piece[mask].cpu())
                below += b
                within += k
                under_hi += b + k
                if within > GUESSED:  # past GUESSED: counted only
                    inside = None
                x = piece = None
            if counted is not None:
                counted(under_hi)
            flat = None
        if inside is not None:
            inside = torch.cat(inside) if inside else torch.empty(0)
        return found, below, within, inside, total

    def _masks(self, n: int) -> tuple:
        """Two boolean arrays of ``n`` elements, views of two held ones of ``BLOCK`` (a pass's
        comparisons write into them: no allocation per piece)."""
        if self.masks is None:
            self.masks = (numpy.empty(BLOCK, dtype=bool), numpy.empty(BLOCK, dtype=bool))
        return self.masks[0][:n], self.masks[1][:n]

    def count(self, lo: int, shift: int) -> Tensor:
        """(bins + 2,) int64 counts: of the keys below ``lo``, in each bin of width 2^shift from
        ``lo`` on, and of the keys above the last bin."""
        counts = None
        fill = 0
        for flat in self._flats():
            if counts is None:
                counts = torch.zeros(self.bins + 2, dtype=torch.int64, device=flat.device)
            size = BLOCK if flat.device.type == "cpu" else STAGE
            for start in range(0, flat.numel(), size):
                piece = flat[start : start + size]
                n = piece.numel()
                if self.buffer is None or fill + n > self.buffer.numel() or self.buffer.device != piece.device:
                    if fill:
                        self._flush(counts, fill, lo, shift)
                        fill = 0
                    if self.buffer is None or self.buffer.device != piece.device:
                        self.buffer = torch.empty(n, dtype=torch.int32, device=piece.device)
                    elif self.buffer.numel() < size:  # grows to the stage's size, so that chunks share flushes
                        self.buffer = torch.empty(min(size, max(n, 2 * self.buffer.numel())), dtype=torch.int32, device=piece.device)
                keys = self.buffer[fill : fill + n]
                if piece.dtype == torch.float32:
                    torch.bitwise_and(piece.view(torch.int32), _MAGNITUDE, out=keys)
                else:
                    keys.view(torch.float32).copy_(piece)
                    keys.bitwise_and_(_MAGNITUDE)
                fill += n
            flat = piece = keys = None  # nothing of this chunk is held while the next is computed
        if counts is None:
            return torch.zeros(self.bins + 2, dtype=torch.int64, device=self.device)
        if fill:
            self._flush(counts, fill, lo, shift)
        return counts

    def _flush(self, counts: Tensor, fill: int, lo: int, shift: int) -> None:
        """Counts the ``fill`` keys staged in the buffer, in place."""
        keys, bins = self.buffer[:fill], self.bins
        if lo == 0 and bins << shift > _NAN:  # the window holds every key: no bin below or above
            keys.clamp_(max=_NAN).bitwise_right_shift_(shift)
            counts[1 : bins + 1] += torch.bincount(keys, minlength=bins)
            return
        # keys below lo go to lo - 2^shift (bin 0), above the window to its end (bin bins + 1), NaNs
        # to _NAN. No int32 overflow: shift <= 22, so _NAN - lo + 2^shift < 2^31.
        base = lo - (1 << shift)
        keys.clamp_(base, min(lo + (bins << shift), _NAN)).sub_(base)
        if shift:
            keys.bitwise_right_shift_(shift)
        if keys.device.type != "cpu" or fill < LANES:
            counts += torch.bincount(keys, minlength=bins + 2)
            return
        # Note [Lanes]: most keys of a window's pass land in bin 0 or bins + 1, and the CPU's
        # bincount, a serial loop, then waits on one counter at every key. Key i counts in
        # histogram i % LANES, and the loop has LANES counters to go round: 1.94 ns a key in one
        # histogram, 0.74 in 4 (``benchmarks/order_statistic.py --primitives``).
        offsets = torch.arange(0, LANES * (bins + 2), bins + 2, dtype=torch.int32)
        whole = fill - fill % LANES
        keys[:whole].view(-1, LANES).add_(offsets)
        keys[whole:].add_(offsets[: fill - whole])
        counts += torch.bincount(keys, minlength=LANES * (bins + 2)).view(LANES, bins + 2).sum(0)
