"""How many training runs it takes to land at a sparsity: a strength search against the target mode.

On the quickstart's CNN (digits, the same batches for every run of a seed), under SGD (momentum) and
Adam, for 3 seeds: the strength mode bisects log10(l1) in [-7, -1] until the run's sparsity is
within +-1 point of 90% (at most 12 runs), and the target mode makes one run with
``sparsity=0.9``. Prints the tries, the sparsity reached and the test accuracy of each.

    python benchmarks/tries_to_target.py            # a few minutes on 2 CPU cores
    python benchmarks/tries_to_target.py --tiny     # smoke run
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import paramreg  # noqa: E402
from quickstart import SmallCNN, load_data  # noqa: E402

TARGET = 0.9
OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=3e-3),
}
TARGETS = ["conv*.weight", "fc*.weight"]


def run(data, optimizer, seed, steps, **attach):
    x, x_test, y, y_test = data
    torch.manual_seed(seed)
    model = SmallCNN()
    paramreg.attach(model, TARGETS, **attach)
    opt = OPTIMIZERS[optimizer](model.parameters())
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return paramreg.report(model).sparsity, accuracy


def search(data, optimizer, seed, steps, max_tries):
    lo, hi = -7.0, -1.0
    for tries in range(1, max_tries + 1):
        mid = (lo + hi) / 2
        sparsity, accuracy = run(data, optimizer, seed, steps, l1=10**mid)
        if abs(sparsity - TARGET) <= 0.01:
            return tries, sparsity, accuracy
        lo, hi = (mid, hi) if sparsity < TARGET else (lo, mid)
    return None, sparsity, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = load_data()
    steps, max_tries = (10, 2) if args.tiny else (400, 12)
    print("| optimizer | seed | strength mode: runs to 90% +-1 pt | its sparsity | its accuracy | target mode: runs | sparsity | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for optimizer in OPTIMIZERS:
        found = []
        for seed in range(3):
            tries, s_sparsity, s_accuracy = search(data, optimizer, seed, steps, max_tries)
            t_sparsity, t_accuracy = run(data, optimizer, seed, steps, sparsity=TARGET, sparsity_steps=steps * 3 // 4, l1=True)
            found.append(tries)
            shown = f"{tries}" if tries else f"not within {max_tries}"
            print(
                f"| {optimizer} | {seed} | {shown} | {s_sparsity:.1%} | {s_accuracy:.3f} | 1 | {t_sparsity:.1%} | {t_accuracy:.3f} |",
                flush=True,
            )
        done = [t for t in found if t]
        if done:
            print(f"| {optimizer} | mean | {statistics.mean(done):.1f} | | | 1 | | |", flush=True)


if __name__ == "__main__":
    main()
