"""What a sparsity target's steps allocate beyond the default ``l1=`` step, by torch.profiler.

The MLP of benchmarks/target_cost.py (two hidden layers hold the selected weights; batch 8;
AdamW) trains a whole run of T steps three ways, each in turn in one process: with ``l1=``, with
the recipe (``sparsity=0.9, total_steps=T``: the default L0 target, whose paths extend from the
ramp's first step, Note [Extrapolated paths] in paramreg/optim/targets.py) and with the recipe
at ``extrapolate=0``. Every step runs under ``torch.profiler.profile(profile_memory=True)``; from
the allocator's events of each step (the total allocated after each allocation and free, in the
order they happened) it takes the most allocated during the step beyond what was allocated when
it began (``peak``) and what the step left allocated (``kept``). It prints, per phase of the run
(before the ramp, the ramp's first step, the rest of the ramp, after it), the largest of each
over the phase's steps, in MB, and the selected weights' own size for scale; in brackets the
most allocated during paramreg's own hooks (``paramreg.before_step`` and ``paramreg.after_step``
in the profile) beyond what was allocated as each began, and the most numpy and Python
allocated during the step beyond its start (``tracemalloc``, to which numpy reports its arrays:
the selection's kept indices and scores are numpy's; the native kernels' C code allocates
nothing). Pages allocated but never touched count in full.

    python benchmarks/target_memory.py                   # 25M and 100M selected weights, 40 steps
    python benchmarks/target_memory.py --sizes 8 --steps 80
    python benchmarks/target_memory.py --tiny            # a smoke test of seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tracemalloc

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import target_cost  # noqa: E402  (the MLP, its step)
import paramreg  # noqa: E402
from paramreg.optim import native  # noqa: E402
from paramreg.optim.targets import recipe_steps  # noqa: E402

VARIANTS = {
    "l1": dict(l1=1e-6),
    "recipe": {},
    "recipe, extrapolate=0": dict(extrapolate=0),
}
PHASES = {"before": "before the ramp", "first": "the ramp's first step", "ramp": "the rest of the ramp", "after": "after it"}


def _peak(events: list[tuple[int, int, int]]) -> tuple[int, int]:
    """(the most allocated beyond the start, what is left allocated beyond it) over ``events``,
    the allocator's (time, bytes allocated (negative: freed), total allocated after it)."""
    if not events:
        return 0, 0
    events = sorted(events)
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start, events[-1][2] - start


def step_memory(model, opt, x, y) -> tuple[int, int, int, int]:
    """One training step under the profiler, in bytes: the most allocated during the step beyond
    its start, what the step left allocated beyond it, and the most allocated during paramreg's
    hooks (``paramreg.before_step``, ``paramreg.after_step``) beyond what was allocated as each
    began (from the allocator's events in the profiler's event tree, those torch's own memory
    timeline reads); and the most numpy and Python allocated during the step beyond its start
    (tracemalloc, which must be tracing)."""
    from torch._C._profiler import _EventType

    tracemalloc.reset_peak()
    traced = tracemalloc.get_traced_memory()[0]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        target_cost.step(model, opt, x, y)
    traced = tracemalloc.get_traced_memory()[1] - traced

    def allocations(nodes) -> list[tuple[int, int, int]]:
        out, stack = [], list(nodes)
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                out.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        return out

    roots = list(prof.profiler.kineto_results.experimental_event_tree())
    peak, kept = _peak(allocations(roots))
    hooks, stack = [], list(roots)
    while stack:
        node = stack.pop()
        if node.name.startswith("paramreg."):
            hooks.append(_peak(allocations([node]))[0])
        else:
            stack.extend(node.children)
    return peak, kept, max(hooks, default=0), traced


def run(variant: str, selected: int, total: int) -> dict[str, tuple[int, ...]]:
    """The largest of each of :func:`step_memory`'s figures over each phase's steps of one run of ``variant``."""
    model = target_cost.mlp(selected)
    names = ["2.weight", "4.weight"]
    if variant == "l1":
        paramreg.attach(model, names, **VARIANTS[variant])
    else:
        paramreg.attach(model, names, sparsity=0.9, total_steps=total, **VARIANTS[variant])
    opt = target_cost.OPTIMIZERS["AdamW"](model.parameters())
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    start, end = recipe_steps(total)
    phases: dict[str, tuple[int, ...]] = {}
    for k in range(total):
        phase = "before" if k < start else "first" if k == start else "ramp" if k < end else "after"
        figures = step_memory(model, opt, x, y)
        phases[phase] = tuple(max(a, b) for a, b in zip(phases.get(phase, (0,) * len(figures)), figures, strict=True))
    selected_weights = [model[i].weight for i in (2, 4)]
    phases["zero"] = (sum(int((w == 0).sum()) for w in selected_weights), sum(w.numel() for w in selected_weights))
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[25, 100], help="selected weights, in millions")
    parser.add_argument("--steps", type=int, default=40, help="the run's optimizer steps (the recipe's total_steps)")
    parser.add_argument("--tiny", action="store_true", help="0.01M selected weights")
    args = parser.parse_args()
    torch.set_num_threads(2)
    native.available()  # built before the profiled steps
    tracemalloc.start()
    sizes = [0.01] if args.tiny else args.sizes
    start, end = recipe_steps(args.steps)
    print(f"torch {torch.__version__}, cpu, AdamW, batch 8, {args.steps} steps (the ramp from step {start} to {end}); MB beyond "
          "each step's start, the largest over the phase's steps: the most allocated during the step / left allocated "
          "after it (the most allocated in paramreg's hooks; by numpy and Python)")
    print(f"{'selected':>8s}  {'variant':22s}  zero at the end  " + "".join(f"{p:30s}" for p in PHASES.values()))
    for size in sizes:
        for variant in VARIANTS:
            phases = run(variant, int(size * 1e6), args.steps)
            zeros, selected = phases["zero"]
            cells = "".join(f"{f'{a / 2**20:.1f} / {b / 2**20:.1f} ({c / 2**20:.1f}; {d / 2**20:.1f})':30s}" for a, b, c, d in map(phases.get, PHASES))
            print(f"{selected / 1e6:7.2f}M  {variant:22s}  {zeros / selected:15.1%}  {cells}", flush=True)
        print(f"{'':8s}  (the selected weights: two tensors of {selected * 2 / 2**20:.1f} MB, {selected * 4 / 2**20:.1f} MB in all)")


if __name__ == "__main__":
    main()
