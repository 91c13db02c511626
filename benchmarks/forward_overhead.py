"""Forward-pass cost of paramreg's carriers on a model of many small layers.

Measures, in one process with the two variants interleaved, the median time of a training step
without optimizer (forward, backward) and of an inference forward (no_grad) for 200 x
Linear(32, 32), batch 64: plain model vs the same model with L1 attached to every weight.
Identity carriers read the stored Parameter directly (Note [Fast identity reads] in carrier.py).

Run:  python benchmarks/forward_overhead.py [--layers 200] [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import paramreg


def _timed(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Linear(32, 32) for _ in range(args.layers)])
    attached = copy.deepcopy(plain)
    paramreg.attach(attached, "*.weight", l1=1e-4)
    x = torch.randn(64, 32)

    def train(model):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def infer(model):
        with torch.no_grad():
            model(x)

    print(f"torch {torch.__version__}, {args.layers} x Linear(32, 32), batch 64, threads {torch.get_num_threads()}")
    for label, fn in (("forward+backward", train), ("inference forward", infer)):
        times = {"plain": [], "attached": []}
        for model in (plain, attached):
            for _ in range(5):
                fn(model)
        for _ in range(args.rounds):  # interleaved
            times["plain"].append(_timed(lambda f=fn: f(plain), 5))
            times["attached"].append(_timed(lambda f=fn: f(attached), 5))
        p, a = statistics.median(times["plain"]), statistics.median(times["attached"])
        print(f"{label:18s}  plain {p:7.3f} ms  attached {a:7.3f} ms  ratio {a / p:.3f}")


if __name__ == "__main__":
    main()
