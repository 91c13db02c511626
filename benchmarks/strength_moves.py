"""How far a sparsity target's strength moves from one step to the next in training.

A selection warm-started from the last step's strength resolves the new one in one counting pass
only when it moved by less than the window a pass resolves exactly (2^15 floats either side of
it, about 0.4%; Note [Exact selection] in paramreg/optim/order_statistic.py). This trains the
quickstart's CNN on the digits with a target (90%, the ramp from step 50 to 400, 500 steps of
batch 32) under Adam and SGD with momentum, and prints, over the steps after the ramp's start,
the median and 90th percentile of |a_k / a_(k-1) - 1| and how many steps stayed within 0.4%.

    python benchmarks/strength_moves.py
    python benchmarks/strength_moves.py --steps 60 --tiny   # a smoke test of seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import paramreg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from quickstart import SmallCNN, load_data  # noqa: E402

WINDOW = 2.0**15 / 2.0**23  # 2^15 floats of 2^23 per octave: the least relative width, about 0.4%


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--tiny", action="store_true", help="fewer steps, a smoke test")
    args = parser.parse_args()
    steps = 40 if args.tiny else args.steps
    start, end = steps // 10, 4 * steps // 5
    x, _, y, _ = load_data()
    for name in ("Adam", "SGD"):
        torch.manual_seed(0)
        model = SmallCNN()
        paramreg.attach(model, ["conv*.weight", "fc*.weight"], sparsity=0.9, sparsity_steps=(start, end), l1=True)
        opt = torch.optim.Adam(model.parameters(), 3e-3) if name == "Adam" else torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
        target = model.conv1.parametrizations.weight[0].target
        g = torch.Generator().manual_seed(0)
        strengths = []
        for _ in range(steps):
            b = torch.randint(0, len(x), (32,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
            strengths.append(target.strength or 0.0)
        moves = [abs(b / a - 1.0) for a, b in zip(strengths[start + 1 :], strengths[start + 2 :], strict=False) if a > 0]
        within = sum(m < WINDOW for m in moves)
        print(f"{name:5s} {len(moves)} steps: median move {statistics.median(moves):.3f}, 90th percentile "
              f"{sorted(moves)[int(0.9 * len(moves))]:.3f}, within {WINDOW:.4f}: {within}")


if __name__ == "__main__":
    main()
