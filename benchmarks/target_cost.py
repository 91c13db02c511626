"""What a sparsity target costs against the default ``l1=`` prox, as the model grows.

One process, the variants interleaved round by round, medians: a training step of an MLP whose
hidden layers hold N selected weights (batch 8, so that the optimizer's work dominates), with no
regularization, with ``l1=`` (the default prox) and with a target (``sparsity=0.9`` over the
whole run, so that every timed step calibrates), under SGD with momentum and AdamW. Also the
memory a step allocates at its peak beyond the step before it (``torch.profiler`` with
``profile_memory=True`` on the CPU: the largest allocation total in flight during one step, per
variant), to see what the target's selection adds: the critical strengths and, on plain CPU
tensors, their concatenation (Note [Target sparsity] in paramreg/optim/targets.py).

    python benchmarks/target_cost.py                  # 1M and 8M selected weights
    python benchmarks/target_cost.py --sizes 1 8 25   # millions of selected weights
    python benchmarks/target_cost.py --tiny           # a smoke test of seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import paramreg

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
}
VARIANTS = ("none", "l1", "target")


def mlp(selected: int) -> nn.Module:
    """Two hidden layers of width w, w² ≈ selected/2 each (the selected weights), 64 in, 10 out."""
    width = max(8, int((selected / 2) ** 0.5))
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU(), nn.Linear(width, 10))


def build(variant: str, selected: int, optimizer: str, steps: int):
    model = mlp(selected)
    names = ["2.weight", "4.weight"]
    if variant == "l1":
        paramreg.attach(model, names, l1=1e-6)
    elif variant == "target":
        paramreg.attach(model, names, sparsity=0.9, sparsity_steps=10 * steps)
    return model, OPTIMIZERS[optimizer](model.parameters())


def step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def peak_bytes(model, opt, x, y) -> int:
    """The most memory in flight during one step, beyond what was allocated before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, opt, x, y)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 8], help="selected weights, in millions")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="0.01M selected weights, 2 rounds")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--no-target", action="store_true", help="only none and l1 (the target's columns read -)")
    args = parser.parse_args()
    sizes = [0.01] if args.tiny else args.sizes
    rounds = 2 if args.tiny else args.rounds
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 8, medians of {rounds} interleaved rounds")
    print("selected   optimizer  none ms  l1/none  target/none  target/l1  peak MB: none / l1 / target")
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for size in sizes:
        selected = int(size * 1e6)
        for optimizer in args.optimizers:
            variants = VARIANTS[:2] if args.no_target else VARIANTS
            runs = {v: build(v, selected, optimizer, rounds * args.steps_per_round + 2) for v in variants}
            for model, opt in runs.values():
                step(model, opt, x, y)  # the optimizer's state, the plan
            times = {v: [] for v in variants}
            for _ in range(rounds):
                for v, (model, opt) in runs.items():
                    started = time.perf_counter()
                    for _ in range(args.steps_per_round):
                        step(model, opt, x, y)
                    times[v].append((time.perf_counter() - started) / args.steps_per_round)
            median = {v: statistics.median(t) for v, t in times.items()}
            peaks = {v: peak_bytes(*runs[v], x, y) / 2**20 for v in variants}
            median.setdefault("target", float("nan"))
            peaks.setdefault("target", float("nan"))
            print(f"{selected / 1e6:7.2f}M  {optimizer:9s}  {median['none'] * 1e3:7.1f}  {median['l1'] / median['none']:7.2f}  "
                  f"{median['target'] / median['none']:11.2f}  {median['target'] / median['l1']:9.2f}  "
                  f"{peaks['none']:.1f} / {peaks['l1']:.1f} / {peaks['target']:.1f}", flush=True)
            del runs
    try:
        from paramreg.optim import fused
    except ImportError:  # paramreg before the fused map
        return
    if fused.compile_seconds:
        print("fused map, first call of each kernel (compilation included; inductor's disk cache may make it shorter): "
              + ", ".join(f"{name} {str(dtype).removeprefix('torch.')} on {dev}: " + ("failed" if sec is None else f"{sec:.1f} s")
                          for (name, dtype, dev), sec in fused.compile_seconds.items()))


if __name__ == "__main__":
    main()
