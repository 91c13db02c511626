"""Forward-pass cost of paramreg's carriers on a model of many small layers.

Measures, in one process with the variants interleaved, the median time of

- an inference forward (``no_grad``), a forward+backward (gradients cleared through the list of
  parameters, as ``optimizer.zero_grad()`` does) and an SGD training step of 200 x Linear(32, 32),
  batch 64: a plain model against the same model with L1 attached to every weight, and against
  the attached model with a class per module (paramreg's class copied for each module: what the
  shared class of Note [Module classes] in modules/classes.py saves; all deep copies of one model);
- ``model.zero_grad()``, which walks the module tree, where the carriers are modules too;
- one read of ``module.weight`` (timeit): a plain ``nn.Linear``, one with paramreg's identity
  carrier (Note [Fast identity reads] in modules/classes.py), and torch's own identity
  parametrization (parametrize's property calls the ``ParametrizationList`` on every read).

Run:  python benchmarks/forward_overhead.py [--layers 200] [--rounds 30]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import timeit

import torch
from torch import nn
from torch.nn.utils import parametrize

import paramreg


class Identity(nn.Module):
    def forward(self, x):
        return x


def _timed(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3


def model_rows(layers: int, rounds: int) -> None:
    base = nn.Sequential(*[nn.Linear(32, 32) for _ in range(layers)])
    models = {"plain": copy.deepcopy(base), "attached": copy.deepcopy(base), "class per module": copy.deepcopy(base)}
    paramreg.attach(models["attached"], "*.weight", l1=1e-4)
    paramreg.attach(models["class per module"], "*.weight", l1=1e-4)
    for m in models["class per module"]:  # the same class, copied for each module
        cls = type(m)
        m.__class__ = type(cls)(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
    params = {k: list(m.parameters()) for k, m in models.items()}
    optimizers = {k: torch.optim.SGD(params[k], lr=1e-3, momentum=0.9, foreach=False) for k in models}
    x = torch.randn(64, 32)

    def infer(key):
        with torch.no_grad():
            models[key](x)

    def train(key):
        for p in params[key]:
            p.grad = None
        models[key](x).sum().backward()

    def step(key):
        optimizers[key].zero_grad()
        models[key](x).sum().backward()
        optimizers[key].step()

    def walk(key):
        models[key].zero_grad(set_to_none=True)

    rows = (("inference forward", infer), ("forward+backward", train), ("SGD training step", step), ("model.zero_grad()", walk))
    for label, fn in rows:
        times = {k: [] for k in models}
        for k in models:
            for _ in range(3):
                fn(k)
        for _ in range(rounds):  # interleaved
            for k in models:
                times[k].append(_timed(lambda f=fn, k=k: f(k), 5))
        p, a, own = (statistics.median(times[k]) for k in models)
        print(f"{label:18s}  plain {p:8.3f} ms  attached {a:8.3f} ms  ratio {a / p:.3f}  (a class per module: {own / p:.3f})")


def read_rows(number: int) -> None:
    plain = nn.Linear(32, 32)
    carried = copy.deepcopy(plain)
    paramreg.attach(carried, "weight", l1=1e-4)
    torch_identity = copy.deepcopy(plain)
    parametrize.register_parametrization(torch_identity, "weight", Identity())
    variants = {
        "plain nn.Linear": plain,
        "paramreg carrier": carried,
        "torch identity parametrization": torch_identity,
    }
    best = {k: float("inf") for k in variants}
    for _ in range(5):  # interleaved repeats, best of each
        for k, m in variants.items():
            best[k] = min(best[k], timeit.timeit(lambda m=m: m.weight, number=number) / number * 1e6)
    for k, t in best.items():
        print(f"read module.weight, {k:32s} {t:6.3f} µs  ({t / best['plain nn.Linear']:.2f}x plain)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reads", type=int, default=100_000, help="reads per timeit repeat")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.layers} x Linear(32, 32), batch 64, threads {torch.get_num_threads()}")
    model_rows(args.layers, args.rounds)
    read_rows(args.reads)


if __name__ == "__main__":
    main()
