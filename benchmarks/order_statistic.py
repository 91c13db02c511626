"""Exact selection over many tensors (Note [Exact selection]) against the concatenation it replaces.

For N float32 values like critical strengths (|N(0,1)|·exp(N(0,1))) in chunks, the m-th smallest
(m = 0.9·N) by: the concatenation and ``numpy.partition`` (what ``Budget.calibrate`` does on the
CPU), the concatenation and ``torch.kthvalue``, and ``kth_smallest`` without a hint, with a hint
0.1% from the answer and with one 2x from it. Also one elementwise pass over the same chunks
(``torch._foreach_mul_``), the unit in which a counting pass is priced. Best of a few repeats, in ms.

    PYTHONPATH=src python benchmarks/order_statistic.py            # 1M, 8M and 25M values, about a minute
    PYTHONPATH=src python benchmarks/order_statistic.py --large    # and 100M in 4 chunks (2 GB of memory)
    PYTHONPATH=src python benchmarks/order_statistic.py --tiny     # smoke run
"""

import argparse
import time

import torch

from paramreg.order_statistic import kth_smallest


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also 100M values in 4 chunks of 25M")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 100K values")
    args = parser.parse_args()
    sizes = [(100_000, 1)] if args.tiny else [(1 << 20, 1), (8 << 20, 1), (25_000_000, 1), (25_000_000, 25)]
    if args.large:
        sizes.append((100_000_000, 4))
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
