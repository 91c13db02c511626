"""Training-step time: paramreg's L1 prox against weight decay and a hand-written L1 penalty.

Measures the median wall time of one training step (forward, loss, backward, optimizer.step(),
zero_grad()) for four variants of the same model and optimizer, all in one process:

- ``none``: no regularization;
- ``weight_decay``: the optimizer's own ``weight_decay`` on every parameter;
- ``manual L1``: ``loss + l1 * sum(p.abs().sum())`` over the weights;
- ``paramreg L1 prox``: ``paramreg.attach(model, "*.weight", l1=l1)``, soft-thresholding after each step.

Models: an MLP 784-1024-1024-10 and a small CNN on 1x28x28 inputs, batch 64, random data; optimizers:
SGD (momentum 0.9) and Adam, both with ``foreach=False``. Each variant has its own deep copy of one
initial model and its own optimizer. After a warm-up, the variants run round-robin (a few steps each
per round, many rounds), so that drifts in machine speed hit all of them alike.

Run:  python benchmarks/step_time.py            (about two minutes on 2 CPU cores)
      python benchmarks/step_time.py --tiny     (a few seconds; a smoke test, nothing is asserted)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import paramreg

STRENGTH = 1e-4  # weight_decay, manual L1 and paramreg L1 all use this strength
VARIANTS = ("none", "weight_decay", "manual L1", "paramreg L1 prox")
OPTIMIZERS = {
    "SGD(momentum=0.9)": lambda params, wd: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=wd, foreach=False),
    "Adam": lambda params, wd: torch.optim.Adam(params, lr=1e-3, weight_decay=wd, foreach=False),
}


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def cnn(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 14 * 14, 10),
    )


def models(tiny: bool) -> dict[str, nn.Module]:
    width, channels = (16, 4) if tiny else (1024, 32)
    return {
        f"MLP 784-{width}-{width}-10": mlp(width),
        f"CNN conv{channels}-conv{2 * channels}-maxpool-linear": cnn(channels),
    }


def make_step(variant: str, base: nn.Module, make_optimizer, x, y):
    """A fresh copy of ``base`` regularized as ``variant``; return (model, one-training-step function)."""
    model = copy.deepcopy(base)
    weights = [p for name, p in model.named_parameters() if name.endswith(".weight")]
    if variant == "paramreg L1 prox":
        paramreg.attach(model, "*.weight", l1=STRENGTH)
    optimizer = make_optimizer(model.parameters(), STRENGTH if variant == "weight_decay" else 0.0)
    penalized = weights if variant == "manual L1" else []

    def step():
        loss = F.cross_entropy(model(x), y)
        if penalized:
            loss = loss + STRENGTH * sum(p.abs().sum() for p in penalized)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return model, step


def timed(step, device: torch.device) -> float:
    """Run ``step`` once; return its wall time in seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(base: nn.Module, make_optimizer, x, y, args) -> dict[str, float]:
    """Median seconds per step of every variant, interleaved round-robin."""
    built = {v: make_step(v, base, make_optimizer, x, y) for v in VARIANTS}
    for _, step in built.values():
        for _ in range(args.warmup):
            timed(step, x.device)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, (_, step) in built.items():
            times[v].extend(timed(step, x.device) for _ in range(args.steps_per_round))
    for model, _ in built.values():
        paramreg.remove(model)  # no carriers left behind for the next measurement
    return {v: statistics.median(t) for v, t in times.items()}


def table(medians: dict[str, float], markdown: bool) -> str:
    headers = ("variant", "median ms/step", "vs none", "vs weight_decay")
    rows = [
        (v, f"{1e3 * m:.3f}", f"{m / medians['none']:.3f}", f"{m / medians['weight_decay']:.3f}")
        for v, m in medians.items()
    ]
    if markdown:
        lines = [headers, ("---", "---:", "---:", "---:"), *rows]
        return "\n".join("| " + " | ".join(r) + " |" for r in lines)
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells):  # first column left-aligned, numbers right-aligned
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="round-robin rounds per (model, optimizer) (default 30; 2 with --tiny)")
    parser.add_argument("--steps-per-round", type=int, help="timed steps per variant per round (default 5; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default 10; 1 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few rounds: a smoke test of a few seconds")
    parser.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda"')
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = parser.parse_args()
    defaults = {"rounds": 2, "steps_per_round": 2, "warmup": 1} if args.tiny else {"rounds": 30, "steps_per_round": 5, "warmup": 10}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    device = torch.device(args.device)
    batch = 8 if args.tiny else 64
    print(f"torch {torch.__version__}, paramreg {paramreg.__version__}, device {device}, torch.get_num_threads() = {torch.get_num_threads()}")
    print(f"settings: rounds={args.rounds} steps_per_round={args.steps_per_round} warmup={args.warmup} tiny={args.tiny} batch={batch}")
    print(f"all optimizers use foreach=False; regularization strength {STRENGTH:g} (weight_decay, manual L1, paramreg L1)")
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for model_name, base in models(args.tiny).items():
        base.to(device)
        for opt_name, make_optimizer in OPTIMIZERS.items():
            medians = measure(base, make_optimizer, x, y, args)
            print(f"\n{'### ' if args.markdown else ''}{model_name}, {opt_name}, batch {batch}\n")
            print(table(medians, args.markdown), flush=True)


if __name__ == "__main__":
    main()
