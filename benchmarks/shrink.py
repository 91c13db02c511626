"""Channel group lasso, then shrink: how many conv channels go, what accuracy costs, how much faster.

Trains the same residual CNN twice on scikit-learn's digits (8x8 images upsampled to 32x32, a
fixed 80/20 split, same seed and schedule): once plain, once with
``paramreg.attach_channels(model, "conv*.weight", strength, x)``. Then ``paramreg.remove`` and
``paramreg.shrink`` the regularized one and reports the fraction of conv channels removed, test
accuracy of both models, parameters, FLOPs, and the median CPU inference latency at batch 1 and 64
of the regularized model before and after shrinking (measured alternately in this process).

Run:  python benchmarks/shrink.py          (several minutes on 2 CPU cores)
      python benchmarks/shrink.py --tiny   (seconds; a smoke test, nothing is asserted)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.nn import functional as F

import paramreg


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv_b, self.bn_b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))))


class Net(nn.Module):
    """conv-BN-ReLU x2, max-pool, a residual block, max-pool, conv-BN-ReLU, global average pool, linear."""

    def __init__(self, w: int = 32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.block = Block(2 * w)
        self.conv3, self.bn3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(self.block(x), 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def data(size: int, limit: int | None):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    if limit:
        x, y = x[:limit], y[:limit]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train(model, train_set, epochs: int, lr: float, batch: int = 64, label: str = "") -> None:
    x, y = train_set
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=False)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    model.train()
    started = time.perf_counter()
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
        print(f"  {label} epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.perf_counter() - started:.0f} s", flush=True)


def accuracy(model, test_set) -> float:
    x, y = test_set
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def conv_channels(model) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--strength", type=float, default=0.6, help="group lasso strength a of attach_channels")
    parser.add_argument(
        "--step", default="lr", choices=("auto", "lr"),
        help="the prox step policy (default lr: OneCycleLR cycles the momentum, docs/making-models-smaller.md)",
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="digits are upsampled from 8x8 to size x size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, limit, epochs, width, repeats, sizes = (8, 200, 1, 4, 2, (1, 4)) if args.tiny else (args.size, None, args.epochs, args.width, 30, (1, 64))
    train_set, test_set = data(size, limit)
    lr = 0.05

    torch.manual_seed(0)
    dense = Net(width)
    regularized = copy.deepcopy(dense)
    started = time.perf_counter()
    train(dense, train_set, epochs, lr, label="dense")
    paramreg.attach_channels(regularized, "*conv*.weight", args.strength, train_set[0][:2], step=args.step)
    train(regularized, train_set, epochs, lr, label="regularized")
    trained = time.perf_counter() - started
    paramreg.remove(regularized)
    regularized.eval()
    small = paramreg.shrink(regularized, test_set[0][:8])
    removed = 1 - conv_channels(small) / conv_channels(regularized)
    with torch.no_grad():
        diff = float((small(test_set[0]) - regularized(test_set[0])).abs().max())
    acc_dense, acc_reg, acc_small = accuracy(dense, test_set), accuracy(regularized, test_set), accuracy(small, test_set)
    comparisons = {}
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        comparisons[threads] = paramreg.compare(regularized, small, test_set[0][:1], batch_sizes=sizes, repeats=repeats)

    print(f"digits {size}x{size}, Net(width={width}), {epochs} epochs, strength {args.strength}, step {args.step}, "
          f"trained with {args.threads} threads, torch {torch.__version__}, training took {trained:.0f} s")
    print(f"max abs difference shrunk vs regularized on the test set: {diff:.2e}; "
          f"test accuracy regularized {acc_reg:.2%} before shrink, {acc_small:.2%} after")
    print("conv channels per layer after shrink: " + ", ".join(
        f"{n} {m.out_channels}/{regularized.get_submodule(n).out_channels}" for n, m in small.named_modules() if isinstance(m, nn.Conv2d)))
    for threads, comparison in comparisons.items():
        print(f"\n{threads} thread(s):\n{comparison}")
    print()
    print("| threads | conv channels removed | accuracy dense | accuracy regularized = shrunk | change | parameters | FLOPs | "
          + " | ".join(f"latency ratio batch {s}" for s in sizes) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(sizes))
    for threads, comparison in comparisons.items():
        b, a = comparison.before, comparison.after
        print(f"| {threads} | {removed:.1%} | {acc_dense:.2%} | {acc_small:.2%} | {100 * (acc_small - acc_dense):+.2f} pt | "
              f"{b.parameters:,} → {a.parameters:,} | {b.flops / a.flops:.2f}x fewer | "
              + " | ".join(f"{b.latency_ms[s]:.2f} → {a.latency_ms[s]:.2f} ms ({b.latency_ms[s] / a.latency_ms[s]:.2f}x)" for s in sizes) + " |")


if __name__ == "__main__":
    main()
