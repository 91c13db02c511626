"""Where a target's ramp step spends its time, against the ``l1=`` step, part by part.

The MLP of benchmarks/target_cost.py (batch 8, AdamW) unregularized, with ``l1=`` and with attach's
default target (``sparsity=0.9``: L0 in Adam's metric, global, its zeros held), its timed steps
after ``--ramp-at`` of a ``--ramp-steps`` ramp (reached as a resumed run reaches it). The four
are stepped in turn; each ``optimizer.step()`` is timed whole and in the parts paramreg runs in
it, each part's time including what it calls (so "the selection's pass" includes the native
pass, or the compiled kernel and numpy's marks and search for the entries it kept, which are
timed where paramreg/optim/fused.py calls them; the floors are taken by the first part that
needs them, the draw here); medians over the steps, in ms. The target runs twice: with the
native kernels (Notes [Native selection] and [Native hold] in optim/native.py), and with the
compiled ones (``native.enabled = False`` during its steps, its warm-up step too: the
selection's pass by the compiled kernel and numpy's search, the held zeros by the compiled
kernel, the floors by a dot product). What no part names is
the optimizer's own update and the hooks' bookkeeping.

    python benchmarks/ramp_parts.py --sizes 25 --ramp-steps 2000 --ramp-at 0.1
    python benchmarks/ramp_parts.py --tiny    # a smoke test of seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import target_cost  # noqa: E402  (the MLP, its build and its jump into the ramp)
from paramreg.optim import applying, fused, hooks, native  # noqa: E402

# (label, the object whose attribute is timed, the attribute), in the order of a step
PARTS = (
    ("the pre-step hold of the zeros (gradient, first moment)", hooks, "_hold_zeros"),
    ("the post-step maps and selections", applying, "run"),
    ("  the draw (with the floors)", applying._Criticals, "sample"),
    ("    the floors (a read of each gradient, or the hold's sum)", fused, "floors"),
    ("  the selection's pass", applying._Criticals, "marked"),
    ("    the native pass", native, "select"),
    ("    numpy's search for the kept entries", "numpy", "flatnonzero"),
    ("    numpy's marks of the kept entries", "numpy", "not_equal"),
    ("  the zeros set by their indices", applying._Criticals, "zero_marked"),
    ("  the l1= map (its floors included)", fused, "map_"),
)


KERNEL = "compiled"  # the target with the compiled kernels where the native ones run


class _Module:
    """A module seen through attributes of its own: what fused.py reads as ``numpy`` while
    timed, so that only its calls of numpy's functions are (the exact selection's in
    order_statistic.py are not)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


@contextlib.contextmanager
def timed_parts(spent: dict):
    """While inside: each of PARTS adds its time per call to ``spent[label]`` when ``spent["on"]``
    is set (the caller clears it before each step)."""
    numpy_seen = _Module(fused.numpy)
    owners = {"numpy": numpy_seen}
    originals = [(owners.get(owner, owner), name, getattr(owners.get(owner, owner), name)) for _, owner, name in PARTS]

    def wrap(label, function):
        def timed(*args, **kwargs):
            if not spent.get("on"):
                return function(*args, **kwargs)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - started
        return timed

    for (label, _, _), (owner, name, function) in zip(PARTS, originals, strict=True):
        setattr(owner, name, wrap(label, function))
    fused.numpy = numpy_seen
    try:
        yield
    finally:
        fused.numpy = numpy_seen._module
        for owner, name, function in originals:
            if owner is not numpy_seen:
                setattr(owner, name, function)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[25], help="selected weights, in millions")
    parser.add_argument("--steps", type=int, default=9, help="timed steps of each variant")
    parser.add_argument("--ramp-steps", type=int, default=2000)
    parser.add_argument("--ramp-at", type=float, default=0.1, metavar="FRACTION")
    parser.add_argument("--tiny", action="store_true", help="0.01M selected weights, 3 steps")
    args = parser.parse_args()
    torch.set_num_threads(2)
    target_cost.TARGET_FORM.clear()
    target_cost.TARGET_FORM["l0"] = True
    target_cost.RAMP.update(steps=args.ramp_steps, at=args.ramp_at)
    sizes, steps = ([0.01], 3) if args.tiny else (args.sizes, args.steps)
    print(f"torch {torch.__version__}, cpu, batch 8, AdamW, the L0 target's ramp of {args.ramp_steps} steps timed after "
          f"{args.ramp_at:g} of it; medians of {steps} steps, ms")
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for size in sizes:
        selected = int(size * 1e6)
        runs = {v: target_cost.build(v, selected, "AdamW", steps) for v in target_cost.VARIANTS}
        runs[KERNEL] = target_cost.build("target", selected, "AdamW", steps)
        for v, (model, opt) in runs.items():
            native.enabled = v != KERNEL
            target_cost.jump(model, opt, x, y)
            target_cost.step(model, opt, x, y)  # the optimizer's state, the plan, the kernels compiled
        spent = {v: {} for v in runs}
        for v in runs:
            for label, *_ in (("optimizer.step()",), *PARTS):
                spent[v][label] = []
        with timed_parts(current := {}):
            for _ in range(steps):
                for v, (model, opt) in runs.items():
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    current.clear()
                    native.enabled = v != KERNEL
                    current["on"] = True
                    started = time.perf_counter()
                    opt.step()
                    whole = time.perf_counter() - started
                    current["on"] = False
                    spent[v]["optimizer.step()"].append(whole)
                    for label, *_ in PARTS:
                        spent[v][label].append(current.get(label, 0.0))
        zero = sum(int((runs["target"][0][i].weight == 0).sum()) for i in (2, 4)) / selected
        print(f"\n{selected / 1e6:.2f}M selected weights, {zero:.1%} zero after the timed steps")
        native.enabled = True
        print(f"{'':58s}  " + "  ".join(f"{v:>7s}" for v in runs))
        for label in ("optimizer.step()", *(label for label, *_ in PARTS)):
            cells = [statistics.median(spent[v][label]) * 1e3 for v in runs]
            print(f"{label:58s}  " + "  ".join(f"{c:7.2f}" for c in cells))
        whole = {v: statistics.median(spent[v]["optimizer.step()"]) for v in runs}
        print(f"target/l1 {whole['target'] / whole['l1']:.2f} (with the compiled kernels {whole[KERNEL] / whole['l1']:.2f}), "
              f"l1/none {whole['l1'] / whole['none']:.2f}", flush=True)


if __name__ == "__main__":
    main()
