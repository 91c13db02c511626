"""Exact selection over many tensors (Note [Exact selection] in optim/order_statistic.py): the m-th smallest
against ``torch.cat(...).kthvalue(m)``, the passes it takes with and without a hint, and a 2-rank
reduce simulated by two threads."""

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paramreg.optim import order_statistic
from paramreg.optim.order_statistic import Selected, kth_smallest

INF, NAN = math.inf, math.nan


def reference(chunks, m):
    """(value, below, equal) from the concatenation: kthvalue, and the counts of smaller and equal
    values (NaN above everything, every NaN equal to a NaN)."""
    flat = torch.cat([c.reshape(-1).float().cpu() for c in chunks])
    value = float(flat.kthvalue(m).values)
    if math.isnan(value):
        nan = int(flat.isnan().sum())
        return value, flat.numel() - nan, nan
    return value, int((flat < value).sum()), int((flat == value).sum())


def check(chunks, m, **options) -> Selected:
    """kth_smallest over ``chunks`` equals the reference, and every pass calls chunks() and reduce once."""
    calls, reduced = [], []
    selected = kth_smallest(lambda: calls.append(1) or iter(chunks), m, reduce=reduced.append, **options)
    value, below, equal = reference(chunks, m)
    assert (math.isnan(selected.value) and math.isnan(value)) or selected.value == value, (selected, value)
    assert (selected.below, selected.equal) == (below, equal)
    assert len(calls) == len(reduced) == selected.passes
    bins = options.get("bins", 1 << 16)
    assert all(c.dtype == torch.int64 and c.shape == (bins + 2,) for c in reduced)
    return selected


def spread(n, seed=0, device="cpu"):
    """Values like critical strengths: |N(0,1)|·exp(N(0,1)), several orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g).abs() * torch.randn(n, generator=g).exp()).to(device)


@pytest.mark.parametrize("m", [1, 2, 500, 999, 1000])
def test_random_values_in_chunks(device, m):
    x = spread(1000, device=device)
    chunks = [x[:1], x[1:300].view(13, 23), x[300:]]
    assert check(chunks, m).passes <= 2


CASES = {
    "ties": torch.randint(0, 5, (3000,)).float() / 4,
    "all equal": torch.full((777,), 0.3),
    "zeros and negative zeros": torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, 2.0, -0.0]),
    "only negative zeros": torch.full((5,), -0.0),
    "+inf": torch.tensor([INF, 1.0, INF, 0.0, 3.0, INF]),
    "denormals": torch.tensor([1e-45, 3e-45, 1e-40, 0.0, 1e-38, 2e-38, 1e-45, 1.0]),
    "powers of two": 2.0 ** torch.arange(-149, 128).float(),
    "nan of both signs": torch.tensor([1.0, NAN, 2.0, -NAN, INF, 0.0]),
    "nan from 0*inf": torch.tensor([0.0, 3.0]) * torch.tensor([INF, 1.0]),
    "one value": torch.tensor([4.5]),
}


@pytest.mark.parametrize("bins", [1 << 9, 1 << 16])
@pytest.mark.parametrize("case", list(CASES))
def test_special_values(case, bins):
    x = CASES[case]
    chunks = [x[: len(x) // 2], torch.zeros(0), x[len(x) // 2 :]]
    for m in sorted({1, 2, len(x) // 2 + 1, len(x) - 1, len(x)} & set(range(1, len(x) + 1))):
        check(chunks, m, bins=bins)
        check(chunks, m, bins=bins, hint=reference(chunks, m)[0])


def test_empty_and_single_element_chunks():
    x = spread(50)
    chunks = [torch.zeros(0)] + [v.reshape(()) for v in x[:20]] + [torch.zeros(0, 4), x[20:]]
    for m in (1, 25, 50):
        check(chunks, m)


def test_other_dtypes_are_converted_as_float_does():
    x64 = spread(2000, seed=1).double() * (1 + 1e-12 * torch.rand(2000, dtype=torch.float64))
    x64[:100] = x64[100:200] + 1e-12  # distinct in float64, equal in float32
    halves = [spread(300, seed=2).half(), spread(300, seed=3).bfloat16()]
    for m in (1, 150, 1000, 2000):
        check([x64[:700], x64[700:]], m)
    for m in (1, 300, 600):
        check(halves, m)


def test_non_contiguous_chunks_and_inputs_left_unchanged():
    x = spread(4000).view(40, 100)
    chunks = [x.t(), x[::2, ::3], x[:, 5]]
    before = [c.clone() for c in chunks]
    for m in (1, 2000, sum(c.numel() for c in chunks)):
        check(chunks, m)
    assert all(torch.equal(b, c) for b, c in zip(before, chunks, strict=True))


def test_many_chunks_share_the_staging_buffer(monkeypatch):
    monkeypatch.setattr(order_statistic, "BLOCK", 64)
    monkeypatch.setattr(order_statistic, "STAGE", 64)
    x = spread(5000)
    sizes = [1, 0, 63, 64, 65, 7, 300, 1, 2, 1000]
    chunks, start = [], 0
    while start < len(x):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(x[start : start + size])
        start += size
    for m in (1, 17, 2500, 4999, 5000):
        check(chunks, m)
        check(chunks, m, bins=1 << 9)


def test_passes_without_a_hint():
    chunks = [spread(10_000)]
    assert {check(chunks, m).passes for m in (1, 5000, 10_000)} == {2}
    assert max(check(chunks, m, bins=1 << 9).passes for m in (1, 5000, 10_000)) <= 4


def test_hint_near_the_answer_takes_one_pass():
    chunks = [spread(10_000, seed=s) for s in range(3)]
    for m in (1, 3000, 15_000, 30_000):
        answer = reference(chunks, m)[0]
        for hint in (answer, answer * (1 + 1e-3), answer * (1 - 1e-3)):
            assert check(chunks, m, hint=hint).passes == 1


def test_hint_far_from_the_answer_falls_back():
    chunks = [spread(10_000, seed=s) for s in range(3)]
    for m in (1, 3000, 15_000, 30_000):
        answer = reference(chunks, m)[0]
        for hint in (answer * 1.5, answer / 1.5, 0.0, 1e-40, INF, 1e30):
            assert 2 <= check(chunks, m, hint=hint).passes <= 3
        assert check(chunks, m, hint=NAN).passes == 2  # no hint


def test_hint_of_a_negative_or_infinite_value():
    chunks = [torch.tensor([0.0, 5.0, INF, INF])]
    for m in range(1, 5):
        check(chunks, m, hint=-5.0)  # its magnitude
        check(chunks, m, hint=-INF)


class ThreadAllReduce:
    """A SUM all_reduce between threads: each rank calls it with its counts and gets the sum."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world)
        self.slots = [None] * world

    def __call__(self, rank: int, counts: torch.Tensor) -> None:
        self.slots[rank] = counts.clone()
        self.barrier.wait()
        counts.copy_(torch.stack(self.slots).sum(0))
        self.barrier.wait()  # every rank has read the slots before the next pass writes them


def run_ranks(shards, m, **options):
    """kth_smallest on one thread per rank, each over its own shards, with a reduce between them."""
    reduce = ThreadAllReduce(len(shards))
    results = [None] * len(shards)

    def rank(r):
        try:
            results[r] = kth_smallest(lambda: shards[r], m, reduce=lambda c: reduce(r, c), **options)
        except Exception as error:  # noqa: BLE001 - handed back to the test
            results[r] = error

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


@pytest.mark.parametrize("hint", [None, "near", "far"])
def test_two_ranks_reduce_the_counts(hint):
    x = spread(6000)
    shards = [[x[:1000], x[4000:4001]], [x[1000:4000], torch.zeros(0), x[4001:]]]
    for m in (1, 1234, 3000, 6000):
        answer, below, equal = reference([x], m)
        h = {None: None, "near": answer * 1.0001, "far": answer * 3}[hint]
        results = run_ranks(shards, m, hint=h)
        assert results[0] == results[1]
        assert results[0][:3] == (answer, below, equal)
        assert results[0].passes == {None: 2, "near": 1, "far": 3}[hint]


def test_a_rank_without_values():
    x = spread(100)
    results = run_ranks([[x], []], 37, device="cpu")
    assert results[0] == results[1] and results[0].value == reference([x], 37)[0]


def test_m_beyond_the_values_raises_on_every_rank():
    results = run_ranks([[torch.ones(3)], [torch.ones(2)]], 6)
    assert all(isinstance(r, ValueError) and "at most the number of values, 5" in str(r) for r in results)
    with pytest.raises(ValueError, match="at most the number of values, 0"):
        kth_smallest(lambda: [], 1)


@pytest.mark.parametrize("m", [0, -1, 1.0, True, None])
def test_bad_m(m):
    with pytest.raises(ValueError, match="m must be an int >= 1"):
        kth_smallest(lambda: [torch.ones(3)], m)


@pytest.mark.parametrize("bins", [256, 1000, 1 << 23, True])
def test_bad_bins(bins):
    with pytest.raises(ValueError, match="bins must be a power of two"):
        kth_smallest(lambda: [torch.ones(3)], 1, bins=bins)


def test_complex_chunks_are_refused():
    with pytest.raises(TypeError, match="must be real"):
        kth_smallest(lambda: [torch.ones(3, dtype=torch.complex64)], 1)


def test_chunks_on_two_devices_are_refused():
    with pytest.raises(TypeError, match="on one device"):
        kth_smallest(lambda: [torch.ones(3), torch.ones(3, device="meta")], 1)


values = st.floats(min_value=0.0, allow_infinity=True, allow_subnormal=True, width=32) | st.sampled_from([NAN, -NAN, -0.0])


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.lists(values, max_size=12), min_size=1, max_size=5),
    rank=st.floats(min_value=0.0, max_value=1.0),
    hint=st.none() | values,
    bins=st.sampled_from([1 << 9, 1 << 16]),
)
def test_matches_kthvalue(chunks, rank, hint, bins):
    tensors = [torch.tensor(c, dtype=torch.float32) for c in chunks]
    n = sum(len(c) for c in chunks)
    if n == 0:
        return
    m = 1 + min(n - 1, int(rank * n))
    selected = check(tensors, m, hint=hint, bins=bins)
    assert selected.passes <= (5 if bins == 1 << 9 else 3)  # ceil(31 / 9) or 2, and 1 for a hint


def test_empty_chunks_count_nothing():
    """A rank whose shard is empty (an uneven split, a replicated value counted on another rank)
    yields empty chunks among the others."""
    values = torch.tensor([3.0, 1.0, 2.0])
    chunks = [torch.empty(0), values[:2], torch.empty(0, 4), values[2:], torch.empty(0)]
    assert kth_smallest(lambda: chunks, 2).value == 2.0


def check_guessed(chunks, m, guess, **options) -> Selected:
    """kth_smallest over ``chunks`` with a guessed bracket equals the reference, and every pass
    calls chunks() once; one pass where the answer lies in the guess."""
    calls, brackets, counted = [], [], []
    selected = kth_smallest(lambda: calls.append(1) or iter(chunks), m, guess=guess, bracket=lambda lo, hi: brackets.append((lo, hi)),
                            counted=counted.append, **options)
    value, below, equal = reference(chunks, m)
    assert (math.isnan(selected.value) and math.isnan(value)) or selected.value == value, (selected, value)
    assert (selected.below, selected.equal) == (below, equal)
    assert len(calls) == selected.passes
    lo, hi = brackets[0]  # the guess, as float32 values, before its pass
    assert (lo, hi) == tuple(float(torch.tensor(x, dtype=torch.float32)) for x in guess)
    assert counted == [int((c.float() < hi).sum()) for c in chunks]  # per chunk, in the guess's pass alone
    within = sum(int(((c.float() >= lo) & (c.float() < hi)).sum()) for c in chunks)
    if (lo <= value < hi and within <= order_statistic.GUESSED) or (value == 0.0 and lo == NORMAL):  # its pass counts the zeros
        assert selected.passes == 1
    return selected


TINY = float(torch.tensor(1, dtype=torch.int32).view(torch.float32))  # the smallest positive float32
NORMAL = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32: a guess's least lo


@pytest.mark.parametrize("case", list(CASES))
def test_a_guess_takes_one_pass_when_it_holds_the_answer_and_resolves_a_miss(case):
    """Note [Guessed bracket]: a bracket around the answer, one below it and one above it, over
    ties, zeros of both signs, infinities, denormals and NaN."""
    x = CASES[case].abs()
    chunks = [x[: len(x) // 2], torch.zeros(0), x[len(x) // 2 :]]
    for m in sorted({1, 2, len(x) // 2 + 1, len(x) - 1, len(x)} & set(range(1, len(x) + 1))):
        value = reference(chunks, m)[0]
        finite = [v for v in x.tolist() if math.isfinite(v) and v > 0] or [1.0]
        guesses = [(NORMAL, INF), (max(min(finite), NORMAL), max(finite) * 2), (max(finite) * 4, INF), (NORMAL, max(min(finite), 2 * NORMAL))]
        if math.isfinite(value) and value > 0:
            guesses.append((value, value * 1.5))
        for lo, hi in guesses:
            if NORMAL <= float(torch.tensor(lo, dtype=torch.float32)) < float(torch.tensor(hi, dtype=torch.float32)):
                assert check_guessed(chunks, m, (lo, hi)).passes <= 3, (lo, hi, m)


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.lists(values, max_size=12), min_size=1, max_size=5),
    rank=st.floats(min_value=0.0, max_value=1.0),
    lo=st.floats(min_value=float(torch.finfo(torch.float32).tiny), allow_infinity=False, width=32),
    width=st.floats(min_value=1.0, max_value=2.0**100, width=32),
    bins=st.sampled_from([1 << 9, 1 << 16]),
)
def test_a_guess_matches_kthvalue(chunks, rank, lo, width, bins):
    tensors = [torch.tensor(c, dtype=torch.float32).abs() for c in chunks]
    n = sum(len(c) for c in chunks)
    hi = lo * width
    if n == 0 or not float(torch.tensor(hi, dtype=torch.float32)) > float(torch.tensor(lo, dtype=torch.float32)):
        return
    m = 1 + min(n - 1, int(rank * n))
    selected = check_guessed(tensors, m, (lo, hi), bins=bins)
    assert selected.passes <= (5 if bins == 1 << 9 else 3)  # the guess's pass, then ceil(31 / 9) or 2 at most


@pytest.mark.parametrize("guess", [(0.0, 1.0), (2.0, 2.0), (3.0, 1.0), (INF, INF), (-1.0, 1.0), (1e-45, 1.0)])
def test_a_guess_must_be_an_increasing_pair_of_positive_floats(guess):
    with pytest.raises(ValueError, match="guess must be"):
        kth_smallest(lambda: [torch.ones(3)], 1, guess=guess)


def test_a_guess_takes_no_reduce():
    """The values a guess gathers stay in the process: no collective could complete them."""
    with pytest.raises(ValueError, match="guess= needs every value in this process"):
        kth_smallest(lambda: [torch.ones(3)], 1, guess=(0.5, 2.0), reduce=lambda counts: None)


def test_a_bracket_holding_more_than_guessed_values_is_counted_not_gathered(monkeypatch):
    """Note [Guessed bracket]: ties at a bracket's edge can put most values in it; past GUESSED
    values the pass only counts, and histogram passes over the bracket resolve it."""
    x = torch.cat([torch.zeros(100), torch.full((900,), 0.5), torch.tensor([0.25, 0.75])])
    gathered = []
    original = order_statistic._Counter.gather

    def gather(self, *args, **kwargs):
        found = original(self, *args, **kwargs)
        gathered.append(None if found[3] is None else found[3].numel())
        return found

    monkeypatch.setattr(order_statistic._Counter, "gather", gather)
    monkeypatch.setattr(order_statistic, "GUESSED", 10)
    for m in (50, 101, 500, 1001, 1002):
        selected = check_guessed([x[:400], x[400:]], m, (0.4, 0.6))
        assert selected.passes == 3, m  # the guess's pass and two more on one side or in it (a zero lies below its lo: a miss)
    assert gathered == [None, None, None, None, None]


def test_equal_counts_only_the_answers_key_where_a_bin_is_cut_at_one_key(monkeypatch):
    """A histogram bin wider than one key, cut by the bracket's top to one key (a hint's window
    just above the answer, a guess's hi just above it), counts values above the answer too: one
    more pass counts the key alone, so ``equal`` is the number of values equal to it (found by a
    review in stop 34; ``value`` and ``below`` were right)."""
    key = 0x3E800000  # 0.25
    as_float = lambda k: torch.tensor(k, dtype=torch.int32).view(torch.float32).item()  # noqa: E731
    x = torch.tensor([0.1] * 5 + [0.25] * 3 + [as_float(key + 5)] * 4)
    assert check([x], 8, hint=as_float(key + 1 + (1 << 15))).equal == 3
    monkeypatch.setattr(order_statistic, "GUESSED", 10)
    y = torch.cat([torch.full((40,), 0.1), torch.full((10,), 0.25), torch.full((5,), 0.2501)])
    selected = check_guessed([y], 45, (float(torch.finfo(torch.float32).tiny), as_float(key + 1)))
    assert (selected.below, selected.equal) == (40, 10)


def test_a_guess_with_denormals_flushed_takes_denormal_bounds_and_answers_as_the_histogram():
    """With ``torch.set_flush_denormal(True)`` a float conversion on this thread turns a denormal
    into 0 and a comparison takes one for 0: keys and values of denormals are taken from their
    multiples of 2^-149, a guess's lo is a normal float, and float64 chunks are converted in the
    pieces the histogram converts, so both paths see the same values."""
    x = torch.cat([torch.full((1 << 20,), 1e-40, dtype=torch.float64), torch.ones(1 << 20, dtype=torch.float64)])
    small = torch.tensor([0.0, 1e-45, 3e-45, 1.0])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        found = [kth_smallest(lambda: [x], m, guess=(0.5, 2.0)) for m in (1, 1 << 20, (1 << 20) + 1)]
        counted = [kth_smallest(lambda: [x], m) for m in (1, 1 << 20, (1 << 20) + 1)]
        tiny = [kth_smallest(lambda: [small], 2, guess=(NORMAL, 1.0)), kth_smallest(lambda: [small], 2)]
    finally:
        torch.set_flush_denormal(False)
    assert [f._replace(passes=0) for f in found] == [c._replace(passes=0) for c in counted]
    assert [t._replace(passes=0) for t in tiny] == [Selected(TINY, 1, 1, 0)] * 2  # not 0.0: a denormal answer is kept


def test_a_guess_over_many_pieces_gathers_every_value_in_its_bracket():
    """The guess's pass compares pieces of BLOCK values into held masks: a chunk of several pieces
    and a short float64 chunk (converted into the buffer) give the reference's answer in one pass."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2 * order_statistic.BLOCK + 12345, generator=g)
    chunks = [x, torch.rand(1000, generator=g, dtype=torch.float64), torch.zeros(77)]
    for m in (78, 1 << 20, len(x) - 5):
        value = reference(chunks, m)[0]
        assert check_guessed(chunks, m, (value * 0.99, value * 1.01)).passes == 1
        assert check_guessed(chunks, m, (value * 1.01, value * 1.02)).passes == 3  # a miss below: two histogram passes
