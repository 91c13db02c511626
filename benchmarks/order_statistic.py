"""Exact selection over many tensors (Note [Exact selection]) against the concatenation it replaces.

For N float32 values like critical strengths (|N(0,1)|·exp(N(0,1))) in chunks, the m-th smallest
(m = 0.9·N) by: the concatenation and ``numpy.partition`` (what ``Budget.calibrate`` does on the
CPU), the concatenation and ``torch.kthvalue``, and ``kth_smallest`` without a hint, with a hint
0.1% from the answer and with one 2x from it. Also one elementwise pass over the same chunks
(``torch._foreach_mul_``), the unit in which a counting pass is priced. Best of a few repeats, in ms.

    PYTHONPATH=src python benchmarks/order_statistic.py            # 1M, 8M and 25M values, about a minute
    PYTHONPATH=src python benchmarks/order_statistic.py --large    # and 100M in 4 chunks (2 GB of memory)
    PYTHONPATH=src python benchmarks/order_statistic.py --tiny     # smoke run
    PYTHONPATH=src python benchmarks/order_statistic.py --primitives   # ns a key of the ways to count 1M keys
    PYTHONPATH=src python benchmarks/order_statistic.py --sizes 25000000 --threads 1
"""

import argparse
import time

import torch

from paramreg.optim.order_statistic import kth_smallest


def best(repeats, fn, *args, **kwargs):
    """(fastest time in ms, last result) of ``fn(*args, **kwargs)`` over ``repeats`` calls after a warm-up call."""
    result = fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), result


def cat_partition(chunks, m):
    values = torch.cat([c.reshape(-1).float() for c in chunks])
    array = values.numpy()
    array.partition(m - 1)
    return float(array[m - 1])


def cat_kthvalue(chunks, m):
    return float(torch.cat([c.reshape(-1).float() for c in chunks]).kthvalue(m).values)


def select(chunks, m, hint):
    return kth_smallest(lambda: chunks, m, hint=hint)


def primitives(n=1 << 20, bins=1 << 16, lanes=4):
    """ns a key of the ways to count n keys into bins (Note [Exact selection], Note [Lanes])."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).abs_().mul_(torch.randn(n, generator=g).exp_())
    keys = x.view(torch.int32)
    lo = int(x.kthvalue(round(0.9 * n)).values.view(torch.int32)) - bins // 2
    spread = keys >> 15  # a first pass: the keys spread over the bins
    crowded = keys.clamp(lo - 1, lo + bins) - (lo - 1)  # a window's pass: most in bin 0 or bins + 1
    offsets = torch.arange(0, lanes * (bins + 2), bins + 2, dtype=torch.int32)
    interleaved = (crowded.view(-1, lanes) + offsets).view(-1)
    counts = torch.zeros(bins + 2, dtype=torch.int64)
    ones = torch.ones(n, dtype=torch.int64)
    mask = torch.empty(n, dtype=torch.bool)

    def window_by_mask():
        torch.count_nonzero(keys < lo)
        torch.ge(keys, lo, out=mask).logical_and_(keys < lo + bins)
        return torch.bincount(keys[mask] - lo, minlength=bins)

    cases = {
        "in-place elementwise (x.mul_)": lambda: x.mul_(1.0),
        "bincount, keys spread": lambda: torch.bincount(spread, minlength=bins),
        "bincount, window's pass": lambda: torch.bincount(crowded, minlength=bins + 2),
        f"bincount, window's pass in {lanes} lanes": lambda: torch.bincount(interleaved, minlength=lanes * (bins + 2)),
        "scatter_add_ (int64 index)": lambda: counts.scatter_add_(0, crowded.long(), ones),
        "index_add_": lambda: counts.index_add_(0, crowded, ones),
        "histc": lambda: torch.histc(x, bins=bins, min=0.0, max=float(x.max())),
        "bucketize": lambda: torch.bucketize(keys, torch.arange(lo, lo + bins, dtype=torch.int32), out_int32=True),
        "window by mask and indexing": window_by_mask,
        "one threshold: compare, count_nonzero": lambda: torch.count_nonzero(keys < lo),
    }
    print(f"ns a key, {n:,} keys, {bins} bins, best of 20")
    for name, fn in cases.items():
        ms, _ = best(20, fn)
        print(f"{name:>40} {1e6 * ms / n:6.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also 100M values in 4 chunks of 25M")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 100K values")
    parser.add_argument("--primitives", action="store_true", help="only the ways to count 1M keys")
    parser.add_argument("--sizes", type=int, nargs="+", help="only these numbers of values, in one chunk each")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(THREADS) first")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.primitives:
        return primitives()
    sizes = [(100_000, 1)] if args.tiny else [(1 << 20, 1), (8 << 20, 1), (25_000_000, 1), (25_000_000, 25)]
    if args.large:
        sizes.append((100_000_000, 4))
    if args.sizes:
        sizes = [(n, 1) for n in args.sizes]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times in ms, best of 3-5")
    header = f"{'values':>11} {'chunks':>6} {'elementwise':>11} {'cat+partition':>13} {'cat+kthvalue':>12}"
    header += f" {'cold':>14} {'hint 0.1%':>14} {'hint 2x':>14} {'per pass':>9}"
    print(header)
    g = torch.Generator().manual_seed(0)
    for n, parts in sizes:
        repeats = 5 if n <= 8 << 20 else 3
        chunks = [torch.randn(n // parts, generator=g).abs_().mul_(torch.randn(n // parts, generator=g).exp_()) for _ in range(parts)]
        m = round(0.9 * n)
        elementwise, _ = best(repeats, torch._foreach_mul_, chunks, 1.0)
        partition, answer = best(repeats, cat_partition, chunks, m)
        kthvalue, other = best(1 if n > 25_000_000 else repeats, cat_kthvalue, chunks, m)
        assert other == answer
        row = f"{n:>11,} {parts:>6} {elementwise:>11.1f} {partition:>13.1f} {kthvalue:>12.1f}"
        per_pass = []
        for hint in (None, answer * 1.001, answer * 2):
            ms, selected = best(repeats, select, chunks, m, hint)
            assert selected.value == answer, (selected, answer)
            per_pass.append(ms / selected.passes)
            row += f" {ms:>7.1f} ({selected.passes} p)"
        ratio = min(per_pass) / elementwise
        print(row + f" {min(per_pass):>5.1f} = {ratio:.0f}x elementwise", flush=True)


if __name__ == "__main__":
    main()
