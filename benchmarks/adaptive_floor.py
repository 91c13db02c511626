"""Where the time of paramreg's default L1 step under Adam goes, pass by pass, on the suite's MLP.

The default step under Adam is the L1 prox in Adam's metric, safeguarded (Note [Safeguarded
metric] in paramreg/optim/step_sizes.py), taken on the CPU in blocks of paramreg.optim.applying.BLOCK
elements (Note [Blocks]). Its work after ``optimizer.step()``:

  floors     one reduction over each gradient (the safeguard's RMS)
  sqrt       sqrt(v) of Adam's second moment, a new block
  floor      raise it to the floor (maximum)
  scale      times 1/(lr·sqrt(1 − β2^k))
  eps        plus eps/lr: u = 1/t, the metric's inverse steps
  w·u        the weights times u
  shrink     softshrink(·, a), in place
  /u         divided by u: w ← softshrink(u·w, a)/u

and, last, the fused map (Note [Fused map] in paramreg/optim/fused.py) that takes the floor's
‖g‖₂ from one dot product and runs the rest as one compiled kernel per tensor (its first call,
which compiles, is reported apart), and the least any map in this metric does: the gradients'
norms (``_foreach_norm``) and one compiled ``w ← w/sqrt(v)`` per tensor (one read of g, v and w,
one write of w, one sqrt and one division per weight, no floor, eps or threshold; v = 1 there so
that the weights do not move).

Each of those is timed alone over the same blocks (median of --rounds rounds), next to the
training step's parts measured in the same process and interleaved with them: forward and
backward, Adam's own step (``foreach=False``, as in benchmarks/suite.py), and one in-place
elementwise pass over the weights (``_foreach_mul_``), the cost of any pass after the step. The
table says how many such passes the prox costs and what that is as a fraction of the
unregularized step: the floor of this design without a fused kernel.

    python benchmarks/adaptive_floor.py            # about a minute
    python benchmarks/adaptive_floor.py --tiny     # seconds, a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import paramreg
from paramreg.optim import fused, step_sizes
from paramreg.optim.applying import _blocks


def build(tiny: bool):
    torch.manual_seed(0)
    width = 64 if tiny else 1024
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    return model, torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y = build(args.tiny)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)

    def forward_backward():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    for _ in range(3):
        forward_backward()
        opt.step()
    weights = [p for p in model.parameters() if p.dim() > 1]
    group, states, a, lr = opt.param_groups[0], [opt.state[p] for p in weights], 1e-4, 1e-3
    k = float(states[0]["step"])
    scale, eps = 1.0 / (lr * (1.0 - group["betas"][1] ** k) ** 0.5), group["eps"] / lr
    floors = step_sizes.floors(opt, group, weights, states)
    blocks = [(b, [s["exp_avg_sq"] for s in bs], [floors[i] for i in idx]) for idx, b, bs in _blocks(weights, states, paramreg.L1(a))]
    scratch = {}

    def per_block(fn):
        def run():
            for i, (block, v, f) in enumerate(blocks):
                fn(i, block, v, f)
        return run

    least = torch.compile(lambda w, v: w.copy_(w / torch.sqrt(v)), dynamic=True, fullgraph=True)
    ones = [torch.ones_like(w) for w in weights]  # v = 1: the weights stay as they are, the work is the same

    def sqrt(i, block, v, f):
        scratch[i] = list(torch._foreach_sqrt(v))

    parts = {
        "forward+backward": forward_backward,
        "Adam step": opt.step,
        "one pass": lambda: torch._foreach_mul_(weights, 1.0),
        "floors": lambda: step_sizes.floors(opt, group, weights, states),
        "sqrt": per_block(sqrt),
        "floor": per_block(lambda i, b, v, f: torch._foreach_maximum_(scratch[i], f)),
        "scale": per_block(lambda i, b, v, f: torch._foreach_mul_(scratch[i], scale)),
        "eps": per_block(lambda i, b, v, f: torch._foreach_add_(scratch[i], eps)),
        "w·u": per_block(lambda i, b, v, f: torch._foreach_mul_(b, scratch[i])),
        "shrink": per_block(lambda i, b, v, f: [torch._C._nn.softshrink(w, a, out=w) for w in b]),
        "/u": per_block(lambda i, b, v, f: torch._foreach_div_(b, scratch[i])),
        "fused map": lambda: fused.map_(opt, group, paramreg.L1(a), weights, states, lr, 1.0),
        "least": lambda: (torch._foreach_norm([w.grad for w in weights]), [least(w, v) for w, v in zip(weights, ones, strict=True)]),
    }
    with torch.no_grad():
        started = time.perf_counter()
        left = fused.map_(opt, group, paramreg.L1(a), weights, states, lr, 1.0)
        first = time.perf_counter() - started
    times = {name: [] for name in parts}
    for r in range(args.rounds + 2):
        for name, fn in parts.items():
            start = time.perf_counter()
            if name == "forward+backward":
                fn()
            else:
                with torch.no_grad():
                    fn()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    step = ms["forward+backward"] + ms["Adam step"]
    fused_ms, least_ms = ms.pop("fused map"), ms.pop("least")
    prox = sum(v for name, v in ms.items() if name not in ("forward+backward", "Adam step", "one pass"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {sum(w.numel() for w in weights):,} weights "
          f"in {len(blocks)} blocks, median of {args.rounds} interleaved rounds\n")
    print("| part | ms | passes (one pass = 1) | of the unregularized step |")
    print("|---|---:|---:|---:|")
    for name, v in ms.items():
        print(f"| {name} | {v:.3f} | {v / ms['one pass']:.1f} | {v / step:.3f} |")
    print(f"| **the eager prox, all parts** | {prox:.3f} | {prox / ms['one pass']:.1f} | {prox / step:.3f} |")
    print(f"| **the fused map** ({len(weights) - len(left)} of {len(weights)} tensors: the smaller take the eager map) | {fused_ms:.3f} | "
          f"{fused_ms / ms['one pass']:.1f} | {fused_ms / step:.3f} |")
    print(f"| **the least: norms of g, then w/sqrt(v) compiled** (all tensors) | {least_ms:.3f} | {least_ms / ms['one pass']:.1f} | "
          f"{least_ms / step:.3f} |")
    print(f"\nfused map's first call (compiles unless inductor's disk cache has it): {first:.2f} s")
    print(f"\nunregularized step (forward+backward + Adam step): {step:.3f} ms; with the prox: {(step + prox) / step:.3f}x")


if __name__ == "__main__":
    main()
