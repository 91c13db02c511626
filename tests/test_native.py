"""The native selection (Note [Native selection] in optim/native.py) keeps the entries the compiled
kernel and numpy's search keep, with the same counts and values, bit for bit."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from paramreg.optim import fused, native

TINY = float(torch.finfo(torch.float32).tiny)


def _tensors(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Weights with +0.0, −0.0, denormals, ties, infinities and a NaN; a second moment with zeros,
    denormals, an infinity and a NaN; a third tensor (the origin or the first moment)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 1e-2
    v = torch.rand(n, generator=g) * 1e-4
    x = w + 1e-3 * torch.randn(n, generator=g)
    for k, value in enumerate([0.0, -0.0, 1e-41, -1e-41, 3e-3, -3e-3, float("inf"), float("nan")]):
        w[k::11] = value  # ties: every eleventh weight shares a value
    v[5::13], v[7::17] = 0.0, 1e-42
    v[3::97], v[4::101] = float("inf"), float("nan")
    x[2::19] = w[2::19]  # points on the weights themselves
    return w, v, x


def _kernel(kind: str, w, v, x, floor, c, lo, hi):
    """The compiled kernel of the one pass and numpy's search, as fused._select_blocks runs them."""
    out = torch.empty_like(w)
    name = f"l0{kind}_select"
    args = (out, w, v) + (() if not kind else (x,)) + (torch.tensor(floor), torch.tensor(c, dtype=torch.float32),
                                                       torch.tensor([lo, hi], dtype=torch.float32))
    counts = fused._call(name, *args)
    assert counts is not fused._NOT_COMPILED
    values = out.numpy()
    indices = numpy.flatnonzero(values != 0)
    return counts.tolist(), indices, values[indices]


@pytest.mark.parametrize("build", ["as built here", "portable"])
@pytest.mark.parametrize("kind", ["", "_extended", "_ahead"], ids=["weights", "extended", "ahead"])
@pytest.mark.parametrize("n", [1, 15, 17, 1000, 70_001])
@pytest.mark.parametrize("floor", [0.0, 3e-3, float("nan")])
def test_the_native_pass_keeps_what_the_kernel_and_numpy_keep(build, kind, n, floor):
    library = native._load(("PARAMREG_PORTABLE",)) if build == "portable" else native._load()
    assert library is not None  # a C compiler is on this machine: the test checks the native pass, not a fallback
    w, v, x = _tensors(n, seed=n)
    c = [0.7, 1e-5, 3.0 if kind == "_extended" else 2.5]
    scores = fused._KERNELS[f"l0{kind}_critical"]
    all_scores = torch.empty_like(w)
    scores(all_scores, w, v, *(() if not kind else (x,)), torch.tensor(floor), torch.tensor(c))
    finite = all_scores[torch.isfinite(all_scores) & (all_scores > 0)].sort().values
    lo = max(float(finite[len(finite) // 4]), TINY) if len(finite) else TINY
    hi = float(finite[len(finite) // 2]) if len(finite) > 1 else float("inf")
    expected = _kernel(kind, w, v, x, floor, c, lo, hi)
    found = native.select(kind, w, v, x if kind else None, floor, *c[:2], c[2] if kind else 0.0, lo, hi, cap=1 << 20, library=library)
    counts, indices, values = found
    assert indices is not None and counts == expected[0]
    assert numpy.array_equal(indices, expected[1]) and numpy.array_equal(values.view(numpy.int32), expected[2].view(numpy.int32))
    if n >= 1000 and floor == floor:  # every kind of entry: new zeros, bracketed scores, weights kept out (a NaN floor: every score NaN)
        assert (values == -1).any() and (values > 0).any() and len(values) < n


def test_past_its_room_the_native_pass_counts_what_it_could_not_write():
    """Past ``cap`` entries in a thread's range the pass still counts, and gives no indices or
    values (what it wrote is not a prefix of what it kept); with ``keep_fresh`` False only the
    bracket's scores count as kept."""
    assert native.available()
    w, v, _ = _tensors(5000, seed=1)
    full = native.select("", w, v, None, 0.0, 0.7, 1e-5, 0.0, 1e-9, 1e-7, cap=1 << 20)
    short = native.select("", w, v, None, 0.0, 0.7, 1e-5, 0.0, 1e-9, 1e-7, cap=10)
    assert full[1] is not None and len(full[1]) > 10 * torch.get_num_threads()
    assert short[0] == full[0] and short[1] is None and short[2] is None
    scored = native.select("", w, v, None, 0.0, 0.7, 1e-5, 0.0, 1e-9, 1e-7, cap=1 << 20, keep_fresh=False)
    assert numpy.array_equal(scored[2], full[2][full[2] >= 0]) and numpy.array_equal(scored[1], full[1][full[2] >= 0])
    assert scored[0][:2] == full[0][:2] and scored[0][2] == len(scored[1]) < len(full[1])


def test_a_thread_past_its_guessed_room_runs_the_pass_again_with_room_for_what_it_kept(monkeypatch):
    """The room is guessed from the last pass over the same tensor (Note [Native selection]): a
    guess too small gives the same entries, by a second pass with room for exactly what the
    fullest thread kept, and the next guess is twice that (at most a thread's range)."""
    assert native.available()
    monkeypatch.setattr(native, "ROOM", 1)
    w, v, _ = _tensors(5000, seed=5)
    full = native.select("", w, v, None, 0.0, 0.7, 1e-5, 0.0, 1e-9, 1e-7, cap=1 << 20)
    most = native._kept[w]
    assert most > 10 and len(full[1]) > most  # every thread kept entries, more than the guess below
    calls = []
    passes = native._library.paramreg_select
    monkeypatch.setattr(native._library, "paramreg_select", lambda *a: (calls.append(a[14]), passes(*a))[1])
    native._kept[w] = 3
    again = native.select("", w, v, None, 0.0, 0.7, 1e-5, 0.0, 1e-9, 1e-7, cap=1 << 20)
    assert calls == [6, most] and native._kept[w] == most  # the guess (twice 3), then room for what was kept
    assert again[0] == full[0] and numpy.array_equal(again[1], full[1]) and numpy.array_equal(again[2], full[2])
    native.select("", w, v, None, 0.0, 0.7, 1e-5, 0.0, 1e-9, 1e-7, cap=1 << 20)
    assert calls == [6, most, min(2 * most, -(-5000 // native._threads(native._library)) + 16)]  # room enough: one pass


@pytest.mark.parametrize("n", [0, 1, 9, 10_007])
def test_the_kept_entries_are_parted_as_numpys_masks_part_them(n):
    """``native.split`` gives the new zeros' indices, then the bracket's indices and scores, as
    ``values >= 0`` and its complement select them (NaN and -1 on the zeros' side, ±0.0 on the
    scores'), in order."""
    assert native.available()
    g = torch.Generator().manual_seed(n)
    values = torch.rand(n, generator=g).numpy()
    values[torch.rand(n, generator=g).numpy() < 0.6] = -1.0
    values[3::7], values[5::11], values[6::13] = 0.0, -0.0, float("nan")
    indices = numpy.sort(torch.randint(0, 1 << 40, (n,), generator=g).numpy())
    fresh, at, inside = native.split(indices, values)
    scored = values >= 0
    assert numpy.array_equal(fresh, indices[~scored]) and numpy.array_equal(at, indices[scored])
    assert numpy.array_equal(inside.view(numpy.int32), values[scored].view(numpy.int32))


def test_the_native_kernels_take_only_float32_contiguous_cpu_tensors_of_one_size():
    """Anything else (float64, a view that is not contiguous, another size, an ahead pass without
    its first moment) gets None or False, and nothing is written."""
    assert native.available()
    w, v, x = _tensors(1000, seed=4)
    assert native.select("", w.double(), v.double(), None, 0.0, 0.7, 1e-5, 0.0, 1e-9, 1e-7, cap=100) is None
    assert native.select("_ahead", w, v, None, 0.0, 0.7, 1e-5, 2.0, 1e-9, 1e-7, cap=100) is None
    assert native.select("_extended", w, v, x[:999], 0.0, 0.7, 1e-5, 2.0, 1e-9, 1e-7, cap=100) is None
    g = x.clone()
    assert not native.hold(w, g.view(10, 100).t(), None) and not native.hold(w, g[:999], None)
    assert torch.equal(g.view(torch.int32), x.view(torch.int32)) and native.squares(g.double()) is None


def test_without_a_compiler_the_kernel_and_numpy_run_with_a_warning(monkeypatch):
    """No C compiler: one warning, and ``select`` answers None (``fused.select_pieces`` then takes
    the compiled kernel's blocks)."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "build_flags", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(UserWarning, match="native kernels could not be built"):
        assert not native.available()
    assert native.build_flags == ()
    w, v, _ = _tensors(100, seed=2)
    assert native.select("", w, v, None, 0.0, 0.7, 1e-5, 0.0, 1e-9, 1e-7, cap=100) is None


def _squares_in_order(g: torch.Tensor) -> float:
    """Note [Native hold]'s sum of squares in numpy, in its order: chunks of 4096, 64 float32
    lanes each adding its squares in order, the lanes then the chunks added in order in float64."""
    total = 0.0
    x = g.numpy()
    for start in range(0, len(x), 4096):
        chunk = x[start:start + 4096]
        rows = numpy.zeros((-(-len(chunk) // 64), 64), dtype=numpy.float32)
        rows.reshape(-1)[:len(chunk)] = chunk * chunk
        lanes = numpy.cumsum(rows, axis=0, dtype=numpy.float32)[-1]  # each lane in order (a zero added is exact)
        chunk_total = 0.0
        for lane in lanes:
            chunk_total += float(lane)
        total += chunk_total
    return total


@pytest.mark.parametrize("build", ["as built here", "portable"])
@pytest.mark.parametrize("n", [1, 17, 4096, 4097, 70_001])
@pytest.mark.parametrize("momentum", [True, False])
def test_the_native_hold_writes_what_masked_fill_writes_and_sums_the_squares_in_one_order(build, n, momentum, monkeypatch):
    library = native._load(("PARAMREG_PORTABLE",)) if build == "portable" else native._load()
    assert library is not None
    monkeypatch.setattr(native, "_load", lambda defines=(): library)
    w, v, _ = _tensors(n, seed=n + 1)
    g, m = torch.randn(n, generator=torch.Generator().manual_seed(n)), v.clone()
    g[1::23] = float("nan")
    expected_g, expected_m = g.clone(), m.clone()
    expected_g.masked_fill_(w == 0, 0)
    expected_m.masked_fill_(w == 0, 0)
    versions = g._version, m._version
    assert native.hold(w, g, m if momentum else None)
    assert torch.equal(g.view(torch.int32), expected_g.view(torch.int32))  # the bits: +0.0 written, NaN kept
    assert torch.equal(m.view(torch.int32), (expected_m if momentum else v).view(torch.int32))
    assert g._version > versions[0] and (m._version > versions[1]) == momentum
    held = native._squares[g][1]
    assert math.isnan(held) == bool(g.isnan().any())  # a NaN gradient kept: its sum NaN
    g[g.isnan()] = 0.0  # written: summed again
    assert math.isfinite(_squares_in_order(g))  # a number: the comparisons below can fail
    summed, before = {}, torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            summed[threads] = native.squares(g)  # written since the hold: summed again
        finally:
            torch.set_num_threads(before)
    assert summed[1] == summed[2] == summed[3] == _squares_in_order(g)
    fresh = torch.randn(n)
    assert native.squares(fresh) == _squares_in_order(fresh)


def test_the_floor_takes_the_held_zeros_sum_until_the_gradient_is_written():
    """``fused._floor`` takes the sum of squares the held zeros' pass took (no read of its own),
    and sums again once the gradient was written."""
    assert native.available()
    w, _, _ = _tensors(10_000, seed=3)
    g = torch.randn(10_000)
    m = torch.zeros_like(g)
    assert native.hold(w, g, m)
    version, held = native._squares[g]
    assert held == _squares_in_order(g)
    native._squares[g] = (version, 4.0)  # as if the pass had summed 4: the floor takes it
    assert float(fused._floor(g, 0.5)) == 1.0
    g.mul_(2.0)  # written: the sum is taken again
    assert float(fused._floor(g, 0.5)) == pytest.approx(0.5 * 2.0 * held ** 0.5, rel=1e-6)
