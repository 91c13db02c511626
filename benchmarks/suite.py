"""Training-step time, peak memory and prox-pass scaling: paramreg against the alternatives.

Three measurements, all against baselines measured in the same run:

1. Step time. The median wall time of one training step (forward, loss, backward,
   ``optimizer.step()``, ``optimizer.zero_grad()``) of every variant below, for four models (an MLP
   784-1024-1024-10 with batch 64; a small CNN conv32-conv64-maxpool-linear on 1x28x28 with batch 64;
   a 4-layer transformer encoder, d_model 256, 4 heads, feed-forward 1024, sequence 64, batch 16;
   200 x Linear(32, 32) with batch 64) and three optimizers (SGD with momentum 0.9, Adam, AdamW with
   its usual weight_decay=0.01 in every variant), reported as
   ratios against the unregularized step. Each variant has its own deep copy of one initial model
   and its own optimizer; after a warm-up the variants run round-robin (a few steps each per
   round, many rounds), so that drifts in machine speed hit all of them alike.
2. Peak memory. The peak resident set size (``VmHWM``, else ``ru_maxrss``; on CUDA ``max_memory_allocated``) of a
   fresh process per variant that builds the same model and optimizer and runs a few steps; also
   the growth of that peak during the steps, above the peak reached when the model, optimizer and
   batch were built.
3. Scaling. One prox pass (``paramreg.L1(a).prox_`` over a list of 1M-element tensors) over 1M, 10M
   and 100M parameters, against one ``torch._foreach_mul_`` pass over the same tensors: the
   memory-bandwidth floor of any in-place elementwise pass.

Variants (strength 1e-4 everywhere; "the weights" are every parameter with two or more dims):

- ``none``: no regularization;
- ``extra pass``: no regularization, and one ``torch._foreach_mul_(weights, 1.0)`` after each
  step: the cost of any separate in-place pass over the weights, the floor under a prox that runs
  after the optimizer (a post-step hook cannot fuse with the optimizer's own update);
- ``weight_decay``: the optimizer's own ``weight_decay`` (L2, every parameter, as torch applies it);
- ``manual L1``: ``loss + a * sum(p.abs().sum())`` over the weights;
- ``manual norm``: ``loss + a * sum(torch.norm(p, 1))`` over the weights;
- ``grad hook``: a hook on each weight adding a·sign(w) to its gradient (the torchlayers approach,
  written as a tensor hook so that it fires on every layer);
- ``prox L1``: ``paramreg.attach(model, weights, l1=a, step="lr")``: soft-thresholding with step
  t = lr after each optimizer step;
- ``prox group lasso``: ``paramreg.attach(model, weights, group_lasso=a)`` (rows, default step);
- ``prox adaptive L1``: ``paramreg.attach(model, weights, l1=a, step="adaptive")``: the prox in
  Adam's own metric (under the Adam family the fused map where it applies, Note [Fused map] in
  optim/fused.py). Skipped, with a note, where ``attach`` has no ``step=`` keyword or refuses the
  combination (an optimizer without a diagonal metric);
- ``prox adaptive L1 eager``, ``prox group lasso eager``: the same with
  ``paramreg.optim.fused.enabled = False`` during their steps: the eager maps, interleaved with
  the fused ones;
- ``prox target``: ``paramreg.attach(model, weights, sparsity=0.5, sparsity_steps=10**6)``: L1 with
  the strength calibrated on every step (the critical strengths of all weights and one
  ``kthvalue``), default step policy;
- ``penalty L1``: ``paramreg.attach(model, weights, l1=a, mode="penalty")`` and
  ``loss + paramreg.penalty(model)``: the same loss as ``manual L1``.

With ``--before REV`` the ``prox group lasso``, ``penalty L1``, ``prox adaptive L1`` and ``prox target`` variants also run with paramreg
as it was at git revision REV (``git archive`` of ``src/paramreg`` into a temporary folder,
imported as a second package), labelled ``@REV`` and interleaved with the others: a before/after
comparison measured in one process.

4. Penalty value. ``paramreg.penalty(model)`` alone (no backward) against the hand-written
   ``a * sum(p.abs().sum() for p in weights)`` over the same tensors, interleaved, per model (and
   ``@REV``'s ``penalty``).

Optimizers are built with ``foreach=False`` (torch's default on CPU; fixed here because that
setting alone moves small-layer step times by 8-14%); torch uses 2 threads unless ``--threads``.

Run:  python benchmarks/suite.py [--markdown] [--before REV]    (about 15 minutes on 2 CPU cores)
      python benchmarks/suite.py --tiny           (seconds; a smoke test, nothing is asserted)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from torch.nn import functional as F

import paramreg

STRENGTH = 1e-4
VARIANTS = (
    "none",
    "extra pass",
    "weight_decay",
    "manual L1",
    "manual norm",
    "grad hook",
    "prox L1",
    "prox group lasso",
    "prox group lasso eager",
    "prox adaptive L1",
    "prox adaptive L1 eager",
    "prox target",
    "penalty L1",
)
BEFORE_VARIANTS = ("prox group lasso", "penalty L1", "prox adaptive L1", "prox target")  # also measured at --before REV
OPTIMIZERS = {
    "SGD momentum": lambda params, wd: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=wd, foreach=False),
    "Adam": lambda params, wd: torch.optim.Adam(params, lr=1e-3, weight_decay=wd, foreach=False),
    "AdamW": lambda params, wd: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01 + wd, foreach=False),
}
HAS_STEP = "step" in inspect.signature(paramreg.attach).parameters
try:
    from paramreg.optim import fused as FUSED
except ImportError:  # paramreg before the fused map
    FUSED = None


class Skip(Exception):
    """A variant that cannot run here; the message says why."""


# --- models -----------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, d_model: int, layers: int, classes: int = 10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def build_model(name: str, tiny: bool, device: torch.device):
    """(model, x, y) for a model name; random data, fixed seeds."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "MLP":
        width, batch = (16, 8) if tiny else (1024, 64)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        x, classes = torch.randn(batch, 1, 28, 28, generator=g), 10
    elif name == "CNN":
        c, batch = (4, 8) if tiny else (32, 64)
        model = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * c * 14 * 14, 10),
        )
        x, classes = torch.randn(batch, 1, 28, 28, generator=g), 10
    elif name == "transformer":
        d, layers, seq, batch = (16, 1, 8, 4) if tiny else (256, 4, 64, 16)
        model = Encoder(d, layers)
        x, classes = torch.randn(batch, seq, d, generator=g), 10
    elif name == "200 x Linear(32,32)":
        layers, batch = (4, 8) if tiny else (200, 64)
        model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(layers)])
        x, classes = torch.randn(batch, 32, generator=g), 32
    else:
        raise ValueError(f"unknown model {name!r}")
    y = torch.randint(0, classes, (x.shape[0],), generator=g)
    return model.to(device), x.to(device), y.to(device)


MODELS = ("MLP", "CNN", "transformer", "200 x Linear(32,32)")
MODEL_LABELS = {
    "MLP": "MLP 784-1024-1024-10, batch 64",
    "CNN": "CNN conv32-conv64-maxpool-linear, batch 64",
    "transformer": "transformer encoder 4 x d256, seq 64, batch 16",
    "200 x Linear(32,32)": "200 x Linear(32, 32), batch 64",
}


def _weights(name: str, tensor) -> bool:
    return tensor.dim() >= 2


# --- variants ---------------------------------------------------------------------------------


def load_before(rev: str):
    """paramreg as it was at git revision ``rev``, imported as the package ``paramreg_before``."""
    root = pathlib.Path(__file__).resolve().parent.parent
    folder = pathlib.Path(tempfile.mkdtemp(prefix="paramreg_before_"))
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src/paramreg"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    package = folder / "src" / "paramreg"
    spec = importlib.util.spec_from_file_location("paramreg_before", package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["paramreg_before"] = module
    spec.loader.exec_module(module)
    return module


LIBS = {"": paramreg}  # label suffix -> paramreg package ("@REV" -> the --before one)


def make_step(variant: str, base: nn.Module, optimizer_name: str, x, y):
    """A fresh copy of ``base`` regularized as ``variant``; return (model, one-training-step function)."""
    model = copy.deepcopy(base)
    weights = [p for n, p in model.named_parameters() if _weights(n, p)]
    variant, _, rev = variant.partition(" @")
    lib = LIBS["@" + rev if rev else ""]
    if variant.startswith("prox") or variant == "penalty L1":
        try:
            if variant == "prox L1":
                lib.attach(model, _weights, l1=STRENGTH, **({"step": "lr"} if HAS_STEP else {}))
            elif variant.startswith("prox group lasso"):
                if variant.endswith("eager") and FUSED is None:
                    raise Skip("paramreg has no fused map yet")
                lib.attach(model, _weights, group_lasso=STRENGTH)
            elif variant == "penalty L1":
                lib.attach(model, _weights, l1=STRENGTH, mode="penalty")
            elif variant == "prox target":
                if "sparsity" not in inspect.signature(lib.attach).parameters:
                    raise Skip("paramreg.attach has no sparsity= keyword yet")
                lib.attach(model, _weights, sparsity=0.5, sparsity_steps=10**6, l1=True)
            else:
                if not HAS_STEP:
                    raise Skip("paramreg.attach has no step= keyword yet")
                if variant.endswith("eager") and FUSED is None:
                    raise Skip("paramreg has no fused map yet")
                lib.attach(model, _weights, l1=STRENGTH, step="adaptive")
        except lib.ParamregError as e:
            raise Skip(str(e).splitlines()[0]) from None
    optimizer = OPTIMIZERS[optimizer_name](model.parameters(), STRENGTH if variant == "weight_decay" else 0.0)
    if variant == "grad hook":
        for p in weights:
            p.register_hook(lambda grad, p=p: grad + STRENGTH * p.detach().sign())
    penalty = {
        "manual L1": lambda: STRENGTH * sum(p.abs().sum() for p in weights),
        "manual norm": lambda: STRENGTH * sum(torch.norm(p, 1) for p in weights),
        "penalty L1": lambda: lib.penalty(model),
    }.get(variant)

    extra_pass = variant == "extra pass"
    eager = variant.endswith(" eager")

    def step():
        loss = F.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        if eager:
            FUSED.enabled = False
        try:
            optimizer.step()
        finally:
            if eager:
                FUSED.enabled = True
        if extra_pass:
            with torch.no_grad():
                torch._foreach_mul_(weights, 1.0)
        optimizer.zero_grad()

    return model, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def measure_steps(model_name: str, optimizer_name: str, args, device, notes: list) -> dict[str, float]:
    """Median seconds per step of every variant that runs, interleaved round-robin."""
    base, x, y = build_model(model_name, args.tiny, device)
    built = {}
    for v in all_variants():
        try:
            built[v] = make_step(v, base, optimizer_name, x, y)
        except Skip as e:
            notes.append((v, str(e), f"{model_name}, {optimizer_name}"))
    for _, step in built.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {v: [] for v in built}
    for _ in range(args.rounds):
        for v, (_, step) in built.items():
            times[v].extend(timed(step, device) for _ in range(args.steps_per_round))
    for v, (model, _) in built.items():
        lib = LIBS["@" + v.partition(" @")[2] if " @" in v else ""]
        lib.remove(model, allow_nonfinite=True)  # no carriers left behind for the next measurement
    return {v: statistics.median(t) for v, t in times.items()}


CHOSEN = list(VARIANTS)  # --variants


def all_variants() -> list[str]:
    return [*CHOSEN, *(f"{v} {label}" for label in LIBS if label for v in BEFORE_VARIANTS if v in CHOSEN)]


def measure_penalty(model_name: str, args, device) -> dict[str, float]:
    """Median seconds of one penalty value (no backward): hand-written, paramreg.penalty (and @REV's),
    interleaved round-robin (``args.rounds`` rounds of 10 calls each)."""
    base, _, _ = build_model(model_name, args.tiny, device)
    calls = {}
    for label, lib in LIBS.items():
        model = copy.deepcopy(base)
        lib.attach(model, _weights, l1=STRENGTH, mode="penalty")
        calls[f"penalty{' ' + label if label else ''}"] = (lib, model, lambda lib=lib, model=model: lib.penalty(model))
    weights = [p for n, p in base.named_parameters() if _weights(n, p)]
    calls = {"hand-written": (None, None, lambda: STRENGTH * sum(p.abs().sum() for p in weights)), **calls}
    for _, _, fn in calls.values():
        fn()
    times = {k: [] for k in calls}
    for _ in range(args.rounds):
        for k, (_, _, fn) in calls.items():
            times[k].extend(timed(fn, device) for _ in range(10))
    for lib, model, _ in calls.values():
        if lib is not None:
            lib.remove(model)
    return {k: statistics.median(t) for k, t in times.items()}


# --- memory: one fresh process per variant ----------------------------------------------------


def _maxrss_mib() -> float:
    """This process's peak RSS. Linux: VmHWM, since ru_maxrss carries the parent's peak over fork and exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_child(model_name: str, optimizer_name: str, variant: str, steps: int, tiny: bool, device: str, threads: int) -> None:
    """Runs in a fresh process: print {"start": MiB, "peak": MiB} as JSON (or {"skip": why})."""
    torch.set_num_threads(threads)
    base, x, y = build_model(model_name, tiny, torch.device(device))
    try:
        model, step = make_step(variant, base, optimizer_name, x, y)
    except Skip as e:
        print(json.dumps({"skip": str(e)}))
        return
    del base
    cuda = torch.device(device).type == "cuda"  # there the GPU's peak allocation counts, not the RSS

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mib()

    start = peak()
    for _ in range(steps):
        step()
    print(json.dumps({"start": start, "peak": peak()}))


def measure_memory(model_name: str, optimizer_name: str, variants, args) -> dict[str, dict]:
    out = {}
    for v in variants:
        command = [
            sys.executable, __file__, "--memory-child", json.dumps([model_name, optimizer_name, v]),
            "--memory-steps", str(args.memory_steps), "--device", args.device, "--threads", str(args.threads),
        ] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {model_name}/{optimizer_name}/{v} failed:\n{done.stderr[-2000:]}")
        out[v] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# --- scaling: one prox pass against one _foreach_mul_ pass ------------------------------------


def measure_scaling(sizes: list[int], chunk: int, rounds: int, device) -> list[tuple[int, float, float]]:
    regularizer = paramreg.L1(STRENGTH)
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        tensors = [torch.randn(min(chunk, n - i), generator=g).to(device) for i in range(0, n, chunk)]
        passes = {
            "prox": lambda ts=tensors: regularizer.prox_(ts, 1e-3),
            "foreach_mul": lambda ts=tensors: torch._foreach_mul_(ts, 0.9999),
        }
        for fn in passes.values():
            fn()
        times = {k: [] for k in passes}
        for _ in range(rounds):
            for k, fn in passes.items():
                times[k].append(timed(fn, device))
        rows.append((n, statistics.median(times["prox"]), statistics.median(times["foreach_mul"])))
        del tensors, passes
    return rows


# --- tables -----------------------------------------------------------------------------------


def render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        align = ["---"] + ["---:"] * (len(headers) - 1)
        return "\n".join("| " + " | ".join(r) + " |" for r in [headers, align, *rows])
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells):
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def step_table(results: dict, markdown: bool) -> str:
    variants = all_variants()[1:]
    headers = ["model, optimizer", "none ms/step", *variants, "manual L1 / prox L1", "prox L1 − extra pass", "penalty L1 / manual L1",
               "issue 24: adaptive L1 <= 1.10, group lasso <= 1.5"]
    rows = []
    for (model_name, optimizer_name), medians in results.items():
        none = medians["none"]
        cells = [f"{model_name}, {optimizer_name}", f"{1e3 * none:.2f}"]
        cells += [f"{medians[v] / none:.3f}" if v in medians else "skipped" for v in variants]
        both = "manual L1" in medians and "prox L1" in medians
        cells.append(f"{medians['manual L1'] / medians['prox L1']:.2f}" if both else "-")
        cells.append(f"{(medians['prox L1'] - medians['extra pass']) / none:+.3f}" if "prox L1" in medians else "-")
        both = "manual L1" in medians and "penalty L1" in medians
        cells.append(f"{medians['penalty L1'] / medians['manual L1']:.3f}" if both else "-")
        cells.append(", ".join(_held(medians, v, limit) for v, limit in (("prox adaptive L1", 1.10), ("prox group lasso", 1.5)))
                     if optimizer_name != "SGD momentum" and model_name == "MLP" else "-")
        rows.append(cells)
    return render(headers, rows, markdown)


def _held(medians: dict, variant: str, limit: float) -> str:
    """Issue 24's targets for the Adam-family default paths on the MLP: at most ``limit`` times the unregularized step."""
    if variant not in medians:
        return "-"
    return "held" if medians[variant] / medians["none"] <= limit else "not held"


def penalty_table(results: dict, markdown: bool) -> str:
    labels = [k for k in next(iter(results.values())) if k != "hand-written"]
    headers = ["model", "hand-written µs", *(f"{k} / hand-written" for k in labels)]
    rows = [
        [model_name, f"{1e6 * medians['hand-written']:.0f}", *(f"{medians[k] / medians['hand-written']:.3f}" for k in labels)]
        for model_name, medians in results.items()
    ]
    return render(headers, rows, markdown)


def memory_table(results: dict, markdown: bool) -> str:
    headers = ["model, optimizer", "none peak MiB (growth)", *CHOSEN[1:]]
    rows = []
    for (model_name, optimizer_name), by_variant in results.items():
        none = by_variant["none"]
        cells = [f"{model_name}, {optimizer_name}", f"{none['peak']:.0f} (+{none['peak'] - none['start']:.0f})"]
        for v in CHOSEN[1:]:
            r = by_variant.get(v)
            if r is None or "skip" in r:
                cells.append("-" if r is None else "skipped")
            else:
                cells.append(f"{r['peak'] / none['peak']:.3f} (+{r['peak'] - r['start']:.0f})")
        rows.append(cells)
    return render(headers, rows, markdown)


def scaling_table(rows: list[tuple[int, float, float]], markdown: bool) -> str:
    headers = ["parameters", "L1 prox_ ms", "_foreach_mul_ ms", "prox / foreach_mul"]
    body = [[f"{n / 1e6:g}M", f"{1e3 * p:.2f}", f"{1e3 * m:.2f}", f"{p / m:.3f}"] for n, p, m in rows]
    return render(headers, body, markdown)


# --- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, few rounds: a smoke test of seconds")
    parser.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda"')
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="MODEL", help=f"subset of {MODELS}")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS), metavar="OPTIMIZER",
                        help=f"subset of {list(OPTIMIZERS)}")
    parser.add_argument("--rounds", type=int, help="round-robin rounds per (model, optimizer) (default 20; 2 with --tiny)")
    parser.add_argument("--steps-per-round", type=int, help="timed steps per variant per round (default 5; 1 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default 5; 1 with --tiny)")
    parser.add_argument("--memory-steps", type=int, help="steps per memory process (default 5; 2 with --tiny)")
    parser.add_argument("--no-steps", action="store_true", help="skip the step-time measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--no-scaling", action="store_true", help="skip the prox-pass scaling row")
    parser.add_argument("--no-penalty", action="store_true", help="skip the penalty-value table")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT", help="subset of the variants ('none' always runs)")
    parser.add_argument("--before", metavar="REV", help="also measure paramreg at git revision REV (variants labelled @REV)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = {"rounds": 2, "steps_per_round": 1, "warmup": 1, "memory_steps": 2}
    full = {"rounds": 20, "steps_per_round": 5, "warmup": 5, "memory_steps": 5}
    for name, value in (tiny if args.tiny else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(*json.loads(args.memory_child), args.memory_steps, args.tiny, args.device, args.threads)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.before:
        LIBS["@" + args.before] = load_before(args.before)
    if args.variants:
        CHOSEN[:] = ["none", *(v for v in VARIANTS if v in args.variants and v != "none")]
    h = "### " if args.markdown else ""
    print(f"torch {torch.__version__}, paramreg {paramreg.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"settings: tiny={args.tiny} rounds={args.rounds} steps_per_round={args.steps_per_round} warmup={args.warmup} "
          f"memory_steps={args.memory_steps}; foreach=False; strength {STRENGTH:g}; attach has step=: {HAS_STEP}")
    notes: list[tuple[str, str, str]] = []  # (variant, why skipped, where)
    steps = {}
    for model_name in [] if args.no_steps else args.models:
        for optimizer_name in args.optimizers:
            steps[model_name, optimizer_name] = measure_steps(model_name, optimizer_name, args, device, notes)
            print(f"  measured {model_name}, {optimizer_name}", file=sys.stderr, flush=True)
    if steps:
        print(f"\n{h}Step time / unregularized step (median; lower is better)\n")
        print(step_table(steps, args.markdown))
        if FUSED is not None and FUSED.compile_seconds:
            print("\nfused map, first call of each kernel (compilation included; inductor's disk cache may make it shorter): "
                  + ", ".join(f"{name} {str(dtype).removeprefix('torch.')} on {dev}: " + ("failed" if sec is None else f"{sec:.1f} s")
                              for (name, dtype, dev), sec in FUSED.compile_seconds.items()))
    skipped: dict[tuple[str, str], list[str]] = {}
    for variant, why, where in notes:
        skipped.setdefault((variant, why), []).append(where)
    for (variant, why), where in skipped.items():
        print(f"\nnote: '{variant}' skipped ({'; '.join(where)}): {why}")
    if not args.no_memory:
        memory = {}
        memory_models = args.models[:1] if args.tiny else args.models
        for model_name in memory_models:
            for optimizer_name in list(OPTIMIZERS)[: 1 if args.tiny else None]:
                variants = ("none", "prox L1") if args.tiny else CHOSEN
                memory[model_name, optimizer_name] = measure_memory(model_name, optimizer_name, variants, args)
                print(f"  memory {model_name}, {optimizer_name}", file=sys.stderr, flush=True)
        what = "Peak CUDA allocation" if device.type == "cuda" else "Peak RSS"
        print(f"\n{h}{what} / unregularized peak, one process per variant ({args.memory_steps} steps; "
              f"in brackets: MiB the peak grew during the steps)\n")
        print(memory_table(memory, args.markdown))
    if not args.no_penalty:
        penalties = {m: measure_penalty(m, args, device) for m in args.models}
        print(f"\n{h}paramreg.penalty(model) against the hand-written sum over the same tensors (value only, median)\n")
        print(penalty_table(penalties, args.markdown))
    if not args.no_scaling:
        sizes = [10_000, 100_000] if args.tiny else [1_000_000, 10_000_000, 100_000_000]
        rows = measure_scaling(sizes, chunk=1_000_000, rounds=3 if args.tiny else 15, device=device)
        print(f"\n{h}One L1 prox pass against one torch._foreach_mul_ pass over the same 1M-element tensors\n")
        print(scaling_table(rows, args.markdown))


if __name__ == "__main__":
    main()
