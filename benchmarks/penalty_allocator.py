"""What an L1 penalty's value costs on the CPU, and how much of it is the memory allocator's.

``w.abs().sum()`` allocates a temporary the size of w. glibc serves a temporary of a few MB either
from its heap (pages already mapped) or from fresh pages (``mmap``, or the heap grown again after
a trim), which the kernel maps and zeroes on first touch; which one depends on the allocation
history of the process, so the same loop can take 4-7x as long from one call site to another.
This runs the suite's models in fresh processes under three allocator settings: glibc's default,
large blocks always from the heap (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` high),
and always fresh pages (``MALLOC_MMAP_THRESHOLD_=65536``), timing per model (median µs):

- ``hand``: the hand-written ``sum(w.abs().sum() for w in weights)``;
- ``vector_norm``: ``sum(torch.linalg.vector_norm(w, 1) ...)``, no temporary;
- ``foreach``: ``torch.stack(torch._foreach_norm(weights, 1)).sum()``, one call for all tensors;
- ``paramreg``: ``paramreg.penalty(model)`` with ``l1=a, mode="penalty"`` on the same weights.

    python benchmarks/penalty_allocator.py [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "glibc default": {},
    "heap": {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"},
    "fresh pages": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


def measure(tiny: bool) -> dict:
    """In this process: {model: {variant: median µs}}."""
    import torch

    import paramreg

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import suite

    torch.set_num_threads(2)
    out = {}
    for name in suite.MODELS:
        model, _, _ = suite.build_model(name, tiny, torch.device("cpu"))
        weights = [p for n, p in model.named_parameters() if suite._weights(n, p)]
        attached = suite.copy.deepcopy(model)
        paramreg.attach(attached, suite._weights, l1=1.0, mode="penalty")
        variants = {
            "hand": lambda ws=weights: sum(w.abs().sum() for w in ws),
            "vector_norm": lambda ws=weights: sum(torch.linalg.vector_norm(w, 1) for w in ws),
            "foreach": lambda ws=weights: torch.stack(torch._foreach_norm(ws, 1)).sum(),
            "paramreg": lambda m=attached: paramreg.penalty(m),
        }
        times = {k: [] for k in variants}
        for _ in range(3 if tiny else 30):  # interleaved rounds of 10 calls
            for k, fn in variants.items():
                fn()
                for _ in range(10):
                    started = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - started)
        out[name] = {k: 1e6 * statistics.median(t) for k, t in times.items()}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, few rounds: a smoke run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.tiny)))
        return
    results = {}
    for label, env in SETTINGS.items():
        done = subprocess.run([sys.executable, __file__, "--child", *(["--tiny"] if args.tiny else [])], env={**os.environ, **env},
                              capture_output=True, text=True, check=True)
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    variants = ["hand", "vector_norm", "foreach", "paramreg"]
    print("| model | allocator | " + " | ".join(f"{v} µs" for v in variants) + " | paramreg / hand |")
    print("| --- | --- |" + " ---: |" * (len(variants) + 1))
    for model in results["glibc default"]:
        for label, by_model in results.items():
            row = by_model[model]
            cells = " | ".join(f"{row[v]:.0f}" for v in variants)
            print(f"| {model} | {label} | {cells} | {row['paramreg'] / row['hand']:.2f} |")


if __name__ == "__main__":
    main()
