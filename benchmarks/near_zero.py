"""What a tiny strength does under each Adam-family policy: the measurement behind the default.

For the quickstart's CNN on digits and for a bag-of-embeddings model whose rows are used unevenly,
under SGD (momentum), Adam and AdamW, and for each step policy (``metric``: the prox in the
optimizer's plain metric; ``safeguarded``: the default, each coordinate's denominator floored at
the root mean square of its tensor's, Note [Safeguarded metric]; ``lr``: t = lr), it finds a50,
the strength that holds 50% of the weights at zero (the strength a sparsity=0.5 target settles
on), then trains with a constant strength a50/1000 and reports the exact zeros it adds over
unregularized training, and the rarely used embedding rows it wipes.

    python benchmarks/near_zero.py            # about 3 minutes on 2 CPU cores
    python benchmarks/near_zero.py --tiny     # smoke run
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import paramreg  # noqa: E402
from quickstart import SmallCNN, load_data  # noqa: E402

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
}
POLICIES = {"metric": ("auto", 0.0), "safeguarded": ("auto", 1.0), "lr": ("lr", 1.0)}


class Bag(nn.Module):
    """Mean of token embeddings -> class; tokens 0-89 frequent, 90-99 rare (one batch in 100)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))


def bag_batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        tokens = torch.randint(0, 90, (32, 8), generator=g)
        if k % 100 == 0:
            tokens[:, 0] = torch.randint(90, 100, (32,), generator=g)
        yield tokens, tokens[:, 1] % 4


def cnn_batches(steps, seed=0):
    x, _, y, _ = load_data()
    g = torch.Generator().manual_seed(seed)
    while True:
        for batch in torch.randperm(len(x), generator=g).split(32):
            if steps == 0:
                return
            steps -= 1
            yield x[batch], y[batch]


def run(task, optimizer, policy, steps, *, l1=None, sparsity=None):
    torch.manual_seed(0)
    model = SmallCNN() if task == "cnn" else Bag()
    targets = ["conv*.weight", "fc*.weight"] if task == "cnn" else ["embedding.weight", "head.weight"]
    step, floor = POLICIES[policy]
    if sparsity is not None:
        paramreg.attach(model, targets, sparsity=sparsity, sparsity_steps=steps // 2, l1=True, step=step, metric_floor=floor)
    elif l1 is not None:
        paramreg.attach(model, targets, l1=l1, step=step, metric_floor=floor)
    opt = OPTIMIZERS[optimizer](model.parameters())
    for x, y in (cnn_batches if task == "cnn" else bag_batches)(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    r = paramreg.report(model)
    strength = r.rows[0].strength if sparsity is not None else None
    zeros = sum(row.zeros for row in r.rows if row.name in paramreg.select(model, targets))
    numel = sum(row.numel for row in r.rows if row.name in paramreg.select(model, targets))
    rare = int((model.embedding.weight[90:] == 0).all(1).sum()) if task == "bag" else None
    return zeros / numel, strength, rare


def a50_of(task, optimizer, policy, steps, tries):
    """The constant strength that leaves 50% exact zeros: bisection on log10(strength)."""
    lo, hi = -9.0, 1.0
    for _ in range(tries):
        mid = (lo + hi) / 2
        sparsity, _, _ = run(task, optimizer, policy, steps, l1=10**mid)
        lo, hi = (mid, hi) if sparsity < 0.5 else (lo, mid)
    return 10 ** ((lo + hi) / 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps = 20 if args.tiny else 540
    print("| task | optimizer | policy | a50 | zeros at a50/1000 | unregularized | added | rare rows wiped (of 10) |")
    print("|---|---|---|---|---|---|---|---|")
    for task in ("cnn", "bag"):
        for optimizer in OPTIMIZERS:
            base, _, base_rare = run(task, optimizer, "safeguarded", steps)
            for policy in POLICIES:
                if optimizer == "SGD" and policy == "metric":
                    continue  # SGD has one step per group: the policies coincide
                a50 = a50_of(task, optimizer, policy, steps, 4 if args.tiny else 8)
                tiny, _, rare = run(task, optimizer, policy, steps, l1=a50 / 1000)
                wiped = "" if rare is None else f"{rare} (unregularized {base_rare})"
                print(
                    f"| {task} | {optimizer} | {policy} | {a50:.3g} | {tiny:.1%} | {base:.1%} | "
                    f"{100 * (tiny - base):+.1f} pt | {wiped} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
