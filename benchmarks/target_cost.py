"""What a sparsity target costs against the default ``l1=`` prox, as the model grows.

One process, the variants interleaved round by round, medians: a training step of an MLP whose
hidden layers hold N selected weights (batch 8, so that the optimizer's work dominates), with no
regularization, with ``l1=`` (the default prox) and with a target (``sparsity=0.9`` over the
whole run, so that every timed step calibrates; by default its timed steps are its ramp's first,
``--ramp-at`` times them later in it), under SGD with momentum and AdamW. Also the
time of one pass that only reads the selected weights and their optimizer state (``read``: the
memory floor of each pass of a target's selection), under AdamW the least any map in Adam's
metric does after the step (``floor``: the unregularized step, interleaved with the others,
then the gradients' norms and one compiled w/sqrt(v) into a scratch tensor, as in
benchmarks/adaptive_floor.py; the floor under ``l1/none``), and
the most memory resident during one
step beyond what was resident before it, per variant, each in a
fresh process (the kernel's high-water mark, reset before the step; on Linux), to see what the
target's selection holds beyond the default prox (Note [Critical strengths on the fly] in
paramreg/optim/applying.py). With ``--gpt``, also a GPT-style training step where forward and
backward dominate.

    python benchmarks/target_cost.py                  # 1M and 8M selected weights
    python benchmarks/target_cost.py --sizes 1 8 25   # millions of selected weights
    python benchmarks/target_cost.py --gpt            # and the GPT-style step
    python benchmarks/target_cost.py --tiny --gpt     # a smoke test of seconds
    python benchmarks/target_cost.py --before HEAD~3  # and the target as it was at a revision, interleaved
    python benchmarks/target_cost.py --sizes 25 --ramp-steps 2000 --ramp-at 0.25   # a run's ramp, half the weights zero
    python benchmarks/target_cost.py --sizes 25 --optimizers AdamW --whole-run 400   # every step of a recipe's run
    python benchmarks/target_cost.py --device cuda --sizes 1 8 25 100 250 1000 --gpt
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import paramreg
from paramreg.optim.state import STEPS_KEY
from paramreg.optim import native

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
}
VARIANTS = ("none", "l1", "target")
TARGET_FORM = {"l1": True}  # the target's regularizer: --target-form l1 (the published figures) or l0 (the default)
RAMP = {}  # "steps": the MLP target's ramp (--ramp-steps; by default 10 times the steps the timed run takes);
# "at": the fraction of it passed before the timed steps (--ramp-at)


def mlp(selected: int) -> nn.Module:
    """Two hidden layers of width w, w² ≈ selected/2 each (the selected weights), 64 in, 10 out."""
    width = max(8, int((selected / 2) ** 0.5))
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU(), nn.Linear(width, 10))


BEFORE = {}  # "target @REV" -> paramreg as it was at git revision REV (--before)


def build(variant: str, selected: int, optimizer: str, steps: int, device: str = "cpu"):
    model = mlp(selected).to(device)
    names = ["2.weight", "4.weight"]
    if variant == "l1":
        paramreg.attach(model, names, l1=1e-6)
    elif variant == "target" or variant in BEFORE:
        BEFORE.get(variant, paramreg).attach(model, names, sparsity=0.9,
                                                 sparsity_steps=RAMP.get("steps", 10 * steps), **TARGET_FORM)
    return model, OPTIMIZERS[optimizer](model.parameters())


def jump(model, opt, x, y) -> None:
    """A run taken to step ``RAMP["at"]``·(its ramp) as a resumed run gets there, nothing where
    ``RAMP["at"]`` is 0: one step (the optimizer's state), then the optimizer's state_dict loaded
    with that step count wherever paramreg keeps one (Note [Resume] in
    paramreg/optim/state.py; a target's run then zeroes at once what its ramp asks by then), and
    two more steps; every variant alike (the ``l1=`` run keeps step counts too)."""
    k = round(RAMP.get("at", 0.0) * RAMP.get("steps", 0))
    if not k:
        return
    step(model, opt, x, y)
    saved = copy.deepcopy(opt.state_dict())
    entries = [entry for entry in saved["state"].values() if STEPS_KEY in entry]
    if not entries and any(hasattr(module, "parametrizations") for module in model.modules()):
        raise SystemExit(f"--ramp-at: no {STEPS_KEY!r} in the optimizer's state_dict (a paramreg that keeps it elsewhere?)")
    for entry in entries:
        entry[STEPS_KEY] = k
    opt.load_state_dict(saved)
    step(model, opt, x, y)
    step(model, opt, x, y)


def step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()


def read_pass(model, opt) -> None:
    """One pass that only reads every selected weight and its optimizer state tensor (AdamW's second
    moment, SGD's momentum) in blocks of 2^17: the memory floor of one pass of a target's selection,
    which computes each critical strength from those two."""
    with torch.no_grad():
        for p in (model[2].weight, model[4].weight):
            state = opt.state[p]
            s = (state["exp_avg_sq"] if "exp_avg_sq" in state else state["momentum_buffer"]).view(-1)
            w = p.view(-1)
            for start in range(0, w.numel(), 1 << 17):
                torch.dot(w[start : start + (1 << 17)], s[start : start + (1 << 17)])
    if p.is_cuda:
        torch.cuda.synchronize()


_LEAST = []  # the compiled w <- w/sqrt(v), made on first use


def least_pass(model, opt, scratch) -> None:
    """The least any map in Adam's metric does after the step (as in benchmarks/adaptive_floor.py):
    the selected gradients' norms, for the safeguard's floor, then one compiled w/sqrt(v) per
    selected tensor (one read of g, v and w and one write of a tensor of w's size, a sqrt and a
    division per weight), written to ``scratch`` so that the weights train on unregularized."""
    if not _LEAST:
        _LEAST.append(torch.compile(lambda out, w, v: out.copy_(w / torch.sqrt(v)), dynamic=True, fullgraph=True))
    weights = [model[2].weight, model[4].weight]
    with torch.no_grad():
        torch._foreach_norm([p.grad for p in weights])
        for p, out in zip(weights, scratch, strict=True):
            _LEAST[0](out, p.view(-1), opt.state[p]["exp_avg_sq"].view(-1))
    if p.is_cuda:
        torch.cuda.synchronize()


def cuda_peak(model, opt, x, y) -> int:
    """On CUDA: the allocator's peak during one step beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(model, opt, x, y)
    return torch.cuda.max_memory_allocated() - before


def _status(key: str) -> int:
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_of(variant: str, selected: int, optimizer: str) -> int:
    """In this process: the most memory resident during one step beyond what was resident before it
    (the kernel's high-water mark, reset just before the step)."""
    model, opt = build(variant, selected, optimizer, 100)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    jump(model, opt, x, y)
    for _ in range(3):
        step(model, opt, x, y)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    step(model, opt, x, y)
    return _status("VmHWM") - before


def peak_bytes(variant: str, selected: int, optimizer: str) -> int | None:
    """:func:`peak_of` in a fresh process, whose allocator returns every block of 64 KiB or more to
    the system when it is freed (``MALLOC_MMAP_THRESHOLD_``), so that the high-water mark sees each
    step's temporaries; None where /proc is not there (not Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, __file__, "--peak-of", variant, str(selected), optimizer,
                           "--target-form", *(k for k in TARGET_FORM if k != "regrow"),
                           *(["--regrow"] if TARGET_FORM.get("regrow") else []),
                           *(["--ramp-steps", str(RAMP["steps"])] if "steps" in RAMP else []),
                           *(["--ramp-at", str(RAMP["at"])] if RAMP.get("at") else [])], env=env,
                          capture_output=True, text=True, check=True, timeout=900)
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 8], help="selected weights, in millions")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="0.01M selected weights, 2 rounds")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the allocator's peak)")
    parser.add_argument("--gpt", action="store_true", help="also a GPT-style training step (forward and backward dominate)")
    parser.add_argument("--peak-of", nargs=3, metavar=("VARIANT", "SELECTED", "OPTIMIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--no-target", action="store_true", help="only none and l1 (the target's columns read -)")
    parser.add_argument("--target-form", choices=("l1", "l0"), default="l1",
                        help="the target's regularizer: l1 (default here, as the published figures) or l0 (attach's default)")
    parser.add_argument("--before", metavar="REV",
                        help="also the target as paramreg was at git revision REV, interleaved in the same rounds "
                             "(its ratio to this l1= step in the last column; in the GPT-style step, to none)")
    parser.add_argument("--regrow", action="store_true",
                        help="a target whose zeros may regrow (regrow=True); attach's default keeps them, with a masked "
                             "write of the gradient before each step and of the weights after it")
    parser.add_argument("--ramp-steps", type=int,
                        help="the MLP target's ramp, in steps (default: 10 times the steps the run takes: 140 at --rounds "
                             "4, whose timed steps, the ramp's first, zero 1.6-1.9%% of the weights each; a ramp of 2000 "
                             "steps, a 4000-step run's with total_steps=, zeroes 0.13%%); the GPT-style step keeps its own")
    parser.add_argument("--ramp-at", type=float, default=0.0, metavar="FRACTION",
                        help="time the MLP target's steps after this fraction of its ramp (default 0: its first steps), "
                             "reached as a resumed run reaches it (0.25: about half the weights zero at sparsity 0.9 "
                             "with the cubic ramp; 1: after the ramp, the zeros held unless --regrow)")
    parser.add_argument("--whole-run", type=int, metavar="T",
                        help="instead: every step of a T-step run of the MLP, none, l1= and the recipe (total_steps=T)")
    args = parser.parse_args()
    if args.ramp_steps is not None:
        RAMP["steps"] = args.ramp_steps
    if not 0.0 <= args.ramp_at <= 1.0:
        parser.error(f"--ramp-at must lie in [0, 1], got {args.ramp_at}")
    RAMP["at"] = args.ramp_at
    TARGET_FORM.clear()
    TARGET_FORM[args.target_form] = True
    if args.regrow:
        TARGET_FORM["regrow"] = True
    if args.before:
        from suite import load_before  # git archive of src/paramreg at REV, imported as paramreg_before

        BEFORE[f"target @{args.before}"] = load_before(args.before)
    if args.peak_of:
        variant, selected, optimizer = args.peak_of
        print(peak_of(variant, int(selected), optimizer))
        return
    sizes = [0.01] if args.tiny else args.sizes
    rounds = 2 if args.tiny else args.rounds
    if args.whole_run:
        if args.device == "cpu":
            torch.set_num_threads(2)
        whole_run(args.whole_run, sizes, args.optimizers, args.device)
        return
    RAMP.setdefault("steps", 10 * (rounds * args.steps_per_round + 2))  # the timed runs' ramp, the peaks' too
    device = args.device
    if device == "cpu":
        torch.set_num_threads(2)
    where = torch.cuda.get_device_name() if device == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, {device} ({where}), batch 8, medians of {rounds} interleaved rounds, "
          f"{args.target_form} target{', zeros regrow' if args.regrow else ''}, ramp of "
          + f"{RAMP['steps']} steps" + (f", timed after {RAMP['at']:g} of it" if RAMP["at"] else ""))
    print("selected   optimizer  none ms  l1/none  floor/none  target/none  target/l1  read/l1  peak MB: none / l1 / target"
          + "".join(f"  {v.replace(' ', '')}/l1" for v in BEFORE))
    x, y = torch.randn(8, 64, device=device), torch.randint(0, 10, (8,), device=device)
    for size in sizes:
        selected = int(size * 1e6)
        for optimizer in args.optimizers:
            variants = VARIANTS[:2] if args.no_target else VARIANTS
            runs = {v: build(v, selected, optimizer, rounds * args.steps_per_round + 2, device)
                    for v in (*variants, *(() if args.no_target else BEFORE))}
            for model, opt in runs.values():
                jump(model, opt, x, y)
                step(model, opt, x, y)  # the optimizer's state, the plan
            if optimizer == "AdamW":  # the floor: the unregularized step, then the least any map does
                runs["floor"] = build("none", selected, optimizer, rounds * args.steps_per_round + 2, device)
                step(*runs["floor"], x, y)
                scratch = [torch.empty(runs["floor"][0][i].weight.numel(), device=device) for i in (2, 4)]
                least_pass(*runs["floor"], scratch)  # compiles
            times = {v: [] for v in (*runs, "read")}
            for _ in range(rounds):
                for v, (model, opt) in runs.items():
                    started = time.perf_counter()
                    for _ in range(args.steps_per_round):
                        step(model, opt, x, y)
                        if v == "floor":
                            least_pass(model, opt, scratch)
                    times[v].append((time.perf_counter() - started) / args.steps_per_round)
                started = time.perf_counter()
                read_pass(*runs["l1"])
                times["read"].append(time.perf_counter() - started)
            runs.pop("floor", None)
            median = {v: statistics.median(t) for v, t in times.items() if t}
            if device == "cuda":
                peaks = {v: cuda_peak(*runs[v], x, y) for v in variants}
                del runs
            else:
                del runs
                peaks = {v: peak_bytes(v, selected, optimizer) for v in variants}
            median.setdefault("target", float("nan"))
            peaks.setdefault("target", None)
            floor = f"{median['floor'] / median['none']:.2f}" if "floor" in median else "-"
            peak = " / ".join("-" if b is None else f"{b / 2**20:.1f}" for b in peaks.values())
            print(f"{selected / 1e6:7.2f}M  {optimizer:9s}  {median['none'] * 1e3:7.1f}  {median['l1'] / median['none']:7.2f}  "
                  f"{floor:>10s}  {median['target'] / median['none']:11.2f}  {median['target'] / median['l1']:9.2f}  "
                  f"{median['read'] / median['l1']:7.3f}  {peak}"
                  + "".join(f"  {median[v] / median['l1']:.2f}" for v in BEFORE if v in median), flush=True)
    if args.gpt:
        gpt_step(rounds, args.steps_per_round, tiny=args.tiny, device=device)
    from paramreg.optim import fused

    if fused.compile_seconds:
        print("fused map, first call of each kernel (compilation included; inductor's disk cache may make it shorter): "
              + ", ".join(f"{name} {str(dtype).removeprefix('torch.')} on {dev}: " + ("failed" if sec is None else f"{sec:.1f} s")
                          for (name, dtype, dev), sec in fused.compile_seconds.items()))


def whole_run(total: int, sizes: list[float], optimizers: list[str], device: str = "cpu") -> None:
    """Every step of a ``total``-step run of the MLP, timed: unregularized, with ``l1=`` and with
    the one-call recipe ``sparsity=0.9, total_steps=total`` (attach's defaults: L0 in the
    optimizer's metric, global; no selection before 0.25·total, a ramp to 0.75·total, then the
    zeros kept), the three stepped in turn at each step so that the machine's load falls on
    all alike, after the same run on a tiny MLP that compiles the kernels. Prints the mean step of each and recipe/l1 over the whole run and by phase: what a
    run with a target costs against one with the default prox."""
    print(f"torch {torch.__version__}, {device}, batch 8, the recipe over a {total}-step run against l1= "
          "(means of every step; the variants stepped in turn)")
    print("selected   optimizer  none ms  l1 ms  recipe ms  recipe/l1: run  before  ramp  after  zero at end")
    x, y = torch.randn(8, 64, device=device), torch.randint(0, 10, (8,), device=device)
    names = ["2.weight", "4.weight"]
    native.available()  # the native kernels built (Note [Native build]), untimed: the tiny run below takes none
    for size, printed in [(0.001, False)] + [(size, True) for size in sizes]:  # first the kernels compiled, untimed
        selected = int(size * 1e6)
        for optimizer in optimizers:
            runs = {}
            for variant in ("none", "l1", "recipe"):
                model = mlp(selected).to(device)
                if variant == "l1":
                    paramreg.attach(model, names, l1=1e-6)
                elif variant == "recipe":
                    paramreg.attach(model, names, sparsity=0.9, total_steps=total)
                runs[variant] = model, OPTIMIZERS[optimizer](model.parameters())
            times = {v: [] for v in runs}
            for _ in range(total):
                for v, (model, opt) in runs.items():
                    started = time.perf_counter()
                    step(model, opt, x, y)
                    times[v].append(time.perf_counter() - started)
            model = runs["recipe"][0]
            zero = sum(int((model[i].weight == 0).sum()) for i in (2, 4)) / sum(model[i].weight.numel() for i in (2, 4))
            del runs
            start, end = round(0.25 * total), round(0.75 * total)  # the recipe's ramp, as total_steps= sets it
            phases = [slice(0, total), slice(0, start), slice(start, end + 1), slice(end + 1, total)]
            ratios = "  ".join(f"{sum(times['recipe'][s]) / sum(times['l1'][s]):.2f}" for s in phases)
            mean = {v: sum(t) / len(t) * 1e3 for v, t in times.items()}
            if printed:
                print(f"{selected / 1e6:7.2f}M  {optimizer:9s}  {mean['none']:7.1f}  {mean['l1']:5.1f}  {mean['recipe']:9.1f}  "
                      f"{ratios}  {zero:.1%}", flush=True)


def gpt_step(rounds: int, steps_per_round: int, tiny: bool, device: str = "cpu") -> None:
    """A training step of examples/study_text.py's character transformer (6 blocks of width 384,
    context 256, batch 16: about 10.7M weights, 10.6M of them selected; forward and backward
    dominate), unregularized, with ``l1=`` and with a target on every block's Linear weights,
    under AdamW, interleaved as above. The target selects on every timed step (a ramp longer
    than the run): a ramp step, the most a target costs. ``recipe`` is the one-call recipe over a
    whole run, ``sparsity=0.9, total_steps=T`` with T every step this benchmark takes (no
    selection before 0.25·T, a ramp to 0.75·T, then the zeros kept): its ratio is of total
    times over the same rounds, what the run costs, where the others' are of medians."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from study_text import CharTransformer, Setup

    setup = Setup(data_bytes=0, layers=1 if tiny else 6, width=32 if tiny else 384, heads=4 if tiny else 6,
                  context=16 if tiny else 256, batch=2 if tiny else 16, lr=1e-3)
    weights = r"re:blocks\.\d+\.(qkv|proj|fc1|fc2)\.weight"
    runs = {}
    variants = (*VARIANTS, "recipe", *BEFORE)
    for variant in variants:
        torch.manual_seed(0)
        model = CharTransformer(setup).to(device)
        if variant == "l1":
            paramreg.attach(model, weights, l1=1e-6)
        elif variant == "target" or variant in BEFORE:
            BEFORE.get(variant, paramreg).attach(model, weights, sparsity=0.9, sparsity_steps=10**6, **TARGET_FORM)
        elif variant == "recipe":  # attach's defaults (L0 in the metric, global), the whole run
            paramreg.attach(model, weights, sparsity=0.9, total_steps=1 + rounds * steps_per_round)
        runs[variant] = model, torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (setup.batch, setup.context), generator=g).to(device)
    y = torch.randint(0, 256, (setup.batch, setup.context), generator=g).to(device)
    selected = sum(p.numel() for n, p in runs["none"][0].named_parameters() if re.fullmatch(weights[3:], n))

    def lm_step(model, opt):
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    for model, opt in runs.values():
        lm_step(model, opt)
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v, (model, opt) in runs.items():
            started = time.perf_counter()
            for _ in range(steps_per_round):
                lm_step(model, opt)
            times[v].append((time.perf_counter() - started) / steps_per_round)
    median = {v: statistics.median(t) for v, t in times.items()}
    zeros = sum(int((p == 0).sum()) for n, p in runs["recipe"][0].named_parameters() if re.fullmatch(weights[3:], n)) / selected
    print(f"GPT-style step ({selected / 1e6:.2f}M selected weights, AdamW, batch {setup.batch} x {setup.context}): "
          f"none {median['none'] * 1e3:.1f} ms, l1/none {median['l1'] / median['none']:.3f}, "
          f"target/none {median['target'] / median['none']:.3f} (a ramp step); the recipe over its whole run "
          f"({1 + rounds * steps_per_round} steps, {zeros:.1%} zero at the end): recipe/none "
          f"{sum(times['recipe']) / sum(times['none']):.3f} (total times)"
          + "".join(f"; {v.replace(' ', '')}/none {median[v] / median['none']:.3f}" for v in BEFORE), flush=True)


if __name__ == "__main__":
    main()
