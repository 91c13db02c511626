"""Sparsity against quality on a character-level transformer: paramreg against the pruning recipes people use.

The data is text every Python installation has offline: the source files of Python's own standard
library (``sysconfig.get_paths()["stdlib"]``, sorted, test folders and site-packages left out,
the first DATA_BYTES bytes of whole files), split by file into train / validation / test (every
tenth file, offsets 8 and 9). Tokens are the files' UTF-8 bytes (vocabulary 256; the stdlib is
ASCII but for a few hundred characters, so a byte is a character). The model is a small
decoder-only transformer (LAYERS blocks, width WIDTH, context CONTEXT); the metric is test bits
per character, the mean cross-entropy of the next byte in bits.

Every method trains for the same TOTAL = DENSE + PRUNE + FINE_TUNE AdamW steps on the same batches
(batch k depends on the seed and k only) with the same learning-rate schedule (linear warm-up,
cosine decay over TOTAL), and starts from the same dense checkpoint after DENSE steps (after
DENSE + PRUNE for one-shot magnitude pruning, which prunes a fully trained dense model):

  paramreg-target       paramreg.attach(model, WEIGHTS, sparsity=s, sparsity_steps=PRUNE, l1=True): L1 whose
                        strength follows the cubic ramp to s (AdamW, the default step policy: the prox
                        in Adam's metric, safeguarded), then keep_zeros=True for FINE_TUNE steps
  paramreg-target-plain the same with Adam's plain metric (metric_floor=0): the policy the
                        safeguard replaced, side by side
  paramreg-target-l0    the same target with l0=True (paramreg.L0: hard thresholding, the exact
                        proximal map of a·count(w != 0), which zeroes without shrinking the rest)
  gradual-magnitude     torch.ao.pruning's WeightNormSparsifier (per layer, unstructured) with the
                        CubicSL scheduler (Zhu and Gupta 2017) over PRUNE steps, masks updated every
                        10 steps, then FINE_TUNE steps with the masks fixed
  magnitude-pruning     torch.nn.utils.prune.global_unstructured (L1 magnitude, all weights together)
                        after DENSE + PRUNE dense steps, then FINE_TUNE steps with the mask
  penalty-threshold     loss + a·Σ|w| for PRUNE steps, every weight below the global magnitude
                        quantile s set to zero, FINE_TUNE steps with that mask; a from MANUAL_STRENGTHS,
                        chosen per level on validation
  paramreg-channels     paramreg.attach_channels on the MLP's first layers, sparsity=s of the hidden
                        neurons over PRUNE steps, keep_zeros for FINE_TUNE steps, paramreg.shrink, and
                        the CPU latency of the shrunk model against the dense one (paramreg.compare)
  dense                 TOTAL dense steps

WEIGHTS are all Linear weights of the blocks (attention qkv and output, MLP in and out); the
embeddings, the norms and the output layer are left dense, the same selection for every method.
Sparsity is the fraction of exact zeros over WEIGHTS. Selection rule: for each method and level the
setting run for the level (only the manual recipe has several: its strengths) with the lowest mean
validation bits per character; its mean test bits ± the standard deviation over seeds is reported,
with the sparsity it reached.

Writes into --out (default docs/study/text/): results.csv, summary.md, bits_vs_sparsity.png and
layer_sparsity.png; with the default --out it also rewrites the table in docs/study.md between its
marker comments.

    python examples/study_text.py              # the full study, 2 worker processes of one thread
    python examples/study_text.py --quick --out /tmp/text   # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import hashlib
import math
import multiprocessing
import pathlib
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL
from torch.nn.utils import prune
from tqdm import tqdm

import paramreg
from study_pages import read_csv, write_between  # examples/ is on the path when run as a script

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "study" / "text"
DOCS_PAGE = ROOT / "docs" / "study.md"
MARK_BEGIN, MARK_END = "<!-- study-text:begin -->", "<!-- study-text:end -->"

LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95)
KINDS = ("qkv", "proj", "fc1", "fc2")  # the Linear layers of a block
WEIGHTS = [f"blocks.*.{kind}.weight" for kind in KINDS]
MANUAL_STRENGTHS = (1e-5, 1e-4)
METHODS = {
    "paramreg-target": "paramreg target sparsity, then zeros kept (AdamW, default step)",
    "paramreg-target-plain": "the same, Adam's plain metric (the former default)",
    "paramreg-target-l0": "paramreg target sparsity with l0=True, then zeros kept (AdamW, default step)",
    "gradual-magnitude": "gradual magnitude pruning, cubic (torch.ao.pruning)",
    "magnitude-pruning": "global magnitude pruning + fine-tune",
    "penalty-threshold": "L1 penalty in the loss + threshold + fine-tune",
    "paramreg-channels": "paramreg channels: MLP neurons removed, shrunk (sparsity = neurons)",
    "dense": "dense",
}
FIELDS = ["method", "level", "strength", "seed", "sparsity", "neurons_removed", "val_bpc", "test_bpc", "steps",
          "parameters", "latency_ratio", "seconds", *(f"sparsity:{k}" for k in KINDS)]


@dataclass(frozen=True)
class Setup:
    data_bytes: int = 3_000_000
    layers: int = 4
    width: int = 64
    heads: int = 4
    context: int = 128
    batch: int = 16
    dense: int = 500
    prune: int = 250
    fine_tune: int = 250
    lr: float = 3e-3
    warmup: int = 50
    val_windows: int = 64
    test_windows: int = 256

    @property
    def total(self):
        return self.dense + self.prune + self.fine_tune


QUICK = Setup(data_bytes=200_000, layers=2, width=32, context=32, batch=8, dense=6, prune=4, fine_tune=4, warmup=2,
              val_windows=8, test_windows=8)


# --- data ----------------------------------------------------------------------------------------

def stdlib_files():
    """The standard library's .py files, sorted, without test folders and installed packages."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    return root, sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def load_corpus(data_bytes):
    """{"train"|"val"|"test": uint8 tensor}, and the corpus' description (files, bytes, sha256)."""
    root, files = stdlib_files()
    parts = {"train": [], "val": [], "test": []}
    total, digest, used = 0, hashlib.sha256(), 0
    for i, path in enumerate(files):
        if total >= data_bytes:
            break
        data = path.read_bytes()
        split = "val" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
        parts[split].append(data)
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + data)
        total += len(data)
        used += 1
    corpus = {k: torch.frombuffer(bytearray(b"".join(v)), dtype=torch.uint8).long() for k, v in parts.items()}
    about = {"python": platform.python_version(), "files": used, "bytes": total, "sha256": digest.hexdigest()[:16],
             **{f"{k}_bytes": len(v) for k, v in corpus.items()}}
    return corpus, about


def batch_at(train, setup, seed, k):
    """Batch k of seed's run: random windows of the training bytes, the same for every method."""
    g = torch.Generator().manual_seed(1_000_003 * seed + k)
    starts = torch.randint(0, len(train) - setup.context - 1, (setup.batch,), generator=g)
    windows = torch.stack([train[s:s + setup.context + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def windows_of(stream, setup, count):
    """Up to count non-overlapping windows, spread evenly over the split."""
    n = (len(stream) - 1) // setup.context
    picks = torch.linspace(0, n - 1, min(n, count)).long().tolist()
    w = torch.stack([stream[i * setup.context:i * setup.context + setup.context + 1] for i in picks])
    return w[:, :-1], w[:, 1:]


# --- the model -----------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """A decoder-only transformer over bytes (pre-norm blocks, learned positions)."""

    def __init__(self, setup: Setup):
        super().__init__()
        self.embed = nn.Embedding(256, setup.width)
        self.position = nn.Embedding(setup.context, setup.width)
        self.blocks = nn.ModuleList(Block(setup.width, setup.heads) for _ in range(setup.layers))
        self.norm = nn.LayerNorm(setup.width)
        self.head = nn.Linear(setup.width, 256)

    def forward(self, tokens):
        h = self.embed(tokens) + self.position.weight[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def selected(model):
    """{name: weight} of WEIGHTS, in model order (the plain model's names)."""
    return {n: p for n, p in model.named_parameters() if n.startswith("blocks.") and n.split(".")[-2] in KINDS
            and n.endswith(".weight")}


def linears(model):
    return [m for n, m in model.named_modules() if n.startswith("blocks.") and n.split(".")[-1] in KINDS]


def sparsity_of(model):
    ws = selected(model)
    out = {"sparsity": sum(int((w == 0).sum()) for w in ws.values()) / sum(w.numel() for w in ws.values())}
    for kind in KINDS:
        group = [w for n, w in ws.items() if n.split(".")[-2] == kind]
        out[f"sparsity:{kind}"] = sum(int((w == 0).sum()) for w in group) / sum(w.numel() for w in group)
    return out


@torch.no_grad()
def bits_per_char(model, windows):
    model.eval()
    x, y = windows
    nats = sum(F.cross_entropy(model(x[i:i + 32]).flatten(0, 1), y[i:i + 32].flatten(), reduction="sum").item()
               for i in range(0, len(x), 32))
    model.train()
    return nats / y.numel() / math.log(2)


# --- training ------------------------------------------------------------------------------------

def lr_at(setup, k):
    """Linear warm-up, then cosine from lr to lr/10 over the whole budget (the same for every method)."""
    if k < setup.warmup:
        return setup.lr * (k + 1) / setup.warmup
    done = (k - setup.warmup) / max(1, setup.total - setup.warmup)
    return setup.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def optimizer_for(model, state=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    if state is not None:
        opt.load_state_dict(state)
    return opt


def train(model, opt, ctx, seed, start, stop, *, penalty=None, after_step=None):
    """Optimizer steps start..stop-1 on batches batch_at(seed, k); returns the number taken."""
    for k in range(start, stop):
        for group in opt.param_groups:
            group["lr"] = lr_at(ctx.setup, k)
        x, y = batch_at(ctx.train, ctx.setup, seed, k)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # paramreg's prox or projection, when attached, runs right after this
        if after_step is not None:
            after_step(k)
    return stop - start


class Context:
    """What every job needs: the setup, the data, the dense checkpoints' folder."""

    def __init__(self, setup, folder, levels):
        self.setup, self.folder, self.levels = setup, pathlib.Path(folder), levels
        corpus, self.about = load_corpus(setup.data_bytes)
        self.train = corpus["train"]
        self.val = windows_of(corpus["val"], setup, setup.val_windows)
        self.test = windows_of(corpus["test"], setup, setup.test_windows)

    def checkpoint(self, seed, step):
        return self.folder / f"dense-seed{seed}-step{step}.pt"

    def resume(self, seed, step):
        """The dense model and its optimizer after `step` steps of seed's run."""
        saved = torch.load(self.checkpoint(seed, step), weights_only=True)
        model = CharTransformer(self.setup)
        model.load_state_dict(saved["model"])
        return model, optimizer_for(model, saved["optimizer"])

    def row(self, method, model, seed, steps, started, level="", strength="", **extra):
        assert steps == self.setup.total, (method, steps)  # the same budget for every method
        measured = {"val_bpc": bits_per_char(model, self.val), "test_bpc": bits_per_char(model, self.test), **sparsity_of(model)}
        return {"method": method, "level": level, "strength": strength, "seed": seed, "steps": steps,
                **{k: round(v, 6) for k, v in measured.items()},
                "seconds": round(time.perf_counter() - started, 1), **extra}


def _fixed_masks(model):
    """Hold the current zeros of the selected weights with torch.nn.utils.prune masks."""
    for m in linears(model):
        prune.custom_from_mask(m, "weight", mask=m.weight.detach() != 0)


def _unmask(model):
    for m in linears(model):
        prune.remove(m, "weight")


# --- the methods, one job each -------------------------------------------------------------------

def job_dense(ctx, seed):
    started, s = time.perf_counter(), ctx.setup
    torch.manual_seed(seed)
    model = CharTransformer(s)
    opt = optimizer_for(model)
    steps = 0
    for stop in (s.dense, s.dense + s.prune):
        steps += train(model, opt, ctx, seed, steps, stop)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ctx.checkpoint(seed, stop))
    steps += train(model, opt, ctx, seed, steps, s.total)
    return [ctx.row("dense", model, seed, steps, started)]


def job_target(ctx, seed, level, plain=False, l0=False):
    started, s = time.perf_counter(), ctx.setup
    model, opt = ctx.resume(seed, s.dense)
    floor = 0.0 if plain else 1.0
    paramreg.attach(model, WEIGHTS, sparsity=level, sparsity_steps=s.prune, metric_floor=floor, **({"l0": True} if l0 else {"l1": True}))
    steps = s.dense + train(model, opt, ctx, seed, s.dense, s.dense + s.prune)
    paramreg.remove(model)
    paramreg.attach(model, WEIGHTS, keep_zeros=True)
    steps += train(model, opt, ctx, seed, steps, s.total)
    paramreg.remove(model)
    method = "paramreg-target-plain" if plain else "paramreg-target-l0" if l0 else "paramreg-target"
    return [ctx.row(method, model, seed, steps, started, level)]


def job_gradual(ctx, seed, level):
    started, s = time.perf_counter(), ctx.setup
    model, opt = ctx.resume(seed, s.dense)
    sparsifier = WeightNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": n} for n in selected(model)])
    every = max(1, s.prune // 25)
    scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=every, total_t=s.prune // every)

    def update(k):
        if k < s.dense + s.prune:  # the ramp; the masks are fixed while fine-tuning
            sparsifier.step()
            scheduler.step()

    sparsifier.step()
    steps = s.dense + train(model, opt, ctx, seed, s.dense, s.total, after_step=update)
    sparsifier.squash_mask()
    return [ctx.row("gradual-magnitude", model, seed, steps, started, level)]


def job_magnitude(ctx, seed, level):
    started, s = time.perf_counter(), ctx.setup
    model, opt = ctx.resume(seed, s.dense + s.prune)
    prune.global_unstructured([(m, "weight") for m in linears(model)], pruning_method=prune.L1Unstructured, amount=level)
    steps = s.dense + s.prune + train(model, opt, ctx, seed, s.dense + s.prune, s.total)
    _unmask(model)
    return [ctx.row("magnitude-pruning", model, seed, steps, started, level)]


def job_penalty(ctx, seed, strength):
    started, s = time.perf_counter(), ctx.setup
    model, opt = ctx.resume(seed, s.dense)
    train(model, opt, ctx, seed, s.dense, s.dense + s.prune,
          penalty=lambda m: strength * sum(w.abs().sum() for w in selected(m).values()))
    rows = []
    for level in ctx.levels:
        pruned = copy.deepcopy(model)
        magnitudes = torch.cat([w.detach().abs().flatten() for w in selected(pruned).values()])
        threshold = magnitudes.kthvalue(max(1, round(level * magnitudes.numel()))).values
        with torch.no_grad():
            for w in selected(pruned).values():
                w.masked_fill_(w.abs() <= threshold, 0.0)
        tuned = optimizer_for(pruned, opt.state_dict())
        _fixed_masks(pruned)
        steps = s.dense + s.prune + train(pruned, tuned, ctx, seed, s.dense + s.prune, s.total)
        _unmask(pruned)
        rows.append(ctx.row("penalty-threshold", pruned, seed, steps, started, level, strength))
    return rows


def job_channels(ctx, seed, level):
    started, s = time.perf_counter(), ctx.setup
    model, opt = ctx.resume(seed, s.dense)
    example = ctx.val[0][:1]
    paramreg.attach_channels(model, "blocks.*.fc1.weight", example_inputs=example, sparsity=level, sparsity_steps=s.prune)
    steps = s.dense + train(model, opt, ctx, seed, s.dense, s.dense + s.prune)
    paramreg.remove(model)
    paramreg.attach(model, ["blocks.*.fc1.weight", "blocks.*.fc1.bias"], keep_zeros=True)
    steps += train(model, opt, ctx, seed, steps, s.total)
    paramreg.remove(model)
    fc1 = [m.fc1.weight for m in model.blocks]
    removed = sum(int((w.abs().sum(1) == 0).sum()) for w in fc1) / sum(w.shape[0] for w in fc1)
    small = paramreg.shrink(model, example)
    comparison = paramreg.compare(model, small, ctx.val[0][:1], batch_sizes=(16,), repeats=20)
    latency = comparison.before.latency_ms[16] / comparison.after.latency_ms[16]
    row = ctx.row("paramreg-channels", small, seed, steps, started, level, neurons_removed=round(removed, 6),
                  parameters=comparison.after.parameters, latency_ratio=round(latency, 3))
    row.update(sparsity=round(removed, 6))  # structured: the fraction of hidden neurons removed
    return [row]


JOBS = {"paramreg-target": job_target, "paramreg-target-plain": functools.partial(job_target, plain=True),
        "paramreg-target-l0": functools.partial(job_target, l0=True),
        "gradual-magnitude": job_gradual, "magnitude-pruning": job_magnitude, "paramreg-channels": job_channels}

_CTX = None


def _init_worker(setup, folder, levels):
    global _CTX
    torch.set_num_threads(1)
    _CTX = Context(setup, folder, levels)


def _run(job):
    method, seed, arg = job
    if method == "dense":
        return job_dense(_CTX, seed)
    if method == "penalty-threshold":
        return job_penalty(_CTX, seed, arg)
    return JOBS[method](_CTX, seed, arg)


def sweep(setup, seeds, levels, workers, methods=tuple(METHODS)):
    """The jobs of ``methods``; the dense runs first (the others start from their checkpoints)."""
    later = [(m, seed, level) for seed in seeds for m in JOBS if m in methods for level in levels]
    later += [("penalty-threshold", seed, a) for seed in seeds for a in MANUAL_STRENGTHS if "penalty-threshold" in methods]
    rows = []
    with tempfile.TemporaryDirectory() as folder, multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker, initargs=(setup, folder, levels)
    ) as pool:
        for stage, jobs in (("dense", [("dense", seed, None) for seed in seeds]), ("methods", later)):
            with tqdm(total=len(jobs), desc=stage, unit="run") as bar:
                for new in pool.imap_unordered(_run, jobs):
                    rows += [r for r in new if r["method"] in methods]
                    bar.update(1)
                    bar.set_postfix(last=f"{new[-1]['method']} {new[-1]['test_bpc']:.3f}")
    return sorted(rows, key=lambda r: (list(METHODS).index(r["method"]), str(r["level"]), str(r["strength"]), r["seed"]))


# --- summary -------------------------------------------------------------------------------------

def configurations(rows):
    """{(method, level, strength): mean sparsity, val and test bits, test std, latency ratio, seeds}."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["level"], r["strength"]), []).append(r)
    out = {}
    for key, rs in by.items():
        test = [float(r["test_bpc"]) for r in rs]
        latency = [float(r["latency_ratio"]) for r in rs if r["latency_ratio"]]
        out[key] = {"sparsity": statistics.fmean(float(r["sparsity"]) for r in rs),
                    "val": statistics.fmean(float(r["val_bpc"]) for r in rs), "test": statistics.fmean(test),
                    "std": statistics.stdev(test) if len(test) > 1 else 0.0, "seeds": len(rs),
                    "latency": statistics.fmean(latency) if latency else None,
                    "reached": [float(r["sparsity"]) for r in rs]}
    return out


def best_at(rows, levels):
    """{method: {level: stats or None}}: among the method's settings run for the level (several only for
    the manual recipe's strengths), the lowest mean validation bits."""
    configs = configurations(rows)
    best = {}
    for method in METHODS:
        if method == "dense":
            continue
        best[method] = {}
        for level in levels:
            ok = [s for k, s in configs.items() if k[0] == method and k[1] and float(k[1]) == level]
            best[method][level] = min(ok, key=lambda s: s["val"]) if ok else None
    return best


def summary_markdown(rows, about):
    levels = sorted({float(r["level"]) for r in rows if r["level"]})
    best = best_at(rows, levels)
    seeds = sorted({int(r["seed"]) for r in rows})
    dense = [s for k, s in configurations(rows).items() if k[0] == "dense"]
    lines = [
        f"Test bits per character (lower is better), mean ± standard deviation over seeds {', '.join(map(str, seeds))}, "
        f"{rows[0]['steps']} AdamW steps for every method; Python {about['python']} standard library, "
        f"{about['files']} files, {about['bytes']:,} bytes (sha256 {about['sha256']}). Each cell: the setting run for the "
        f"level with the lowest mean validation bits (only the manual recipe has several, its strengths); in brackets "
        f"the mean sparsity reached (structured: hidden neurons removed) and the shrunk model's speed-up.",
        "",
        "| method | " + " | ".join(f"{level:.0%} sparse" for level in levels) + " |",
        "|---|" + "---:|" * len(levels),
    ]
    for method, cells in best.items():
        shown = []
        for level in levels:
            s = cells[level]
            if s is None:
                shown.append("not run")
                continue
            extra = f", {s['latency']:.2f}x faster" if s["latency"] else ""
            shown.append(f"{s['test']:.3f} ± {s['std']:.3f} ({s['sparsity']:.1%}{extra})")
        lines.append(f"| {METHODS[method]} | " + " | ".join(shown) + " |")
    if dense:
        lines += ["", f"Dense: {dense[0]['test']:.3f} ± {dense[0]['std']:.3f} bits per character."]
    targets = [x for k, s in configurations(rows).items() if k[0].startswith("paramreg-target") for x in
               (abs(r - float(k[1])) for r in s["reached"])]
    if targets:
        lines += ["", f"paramreg's target mode, every seed and level: reached sparsity within {100 * max(targets):.2f} "
                      f"points of the level asked, in one run."]
    for ours in ("paramreg-target", "paramreg-target-l0"):
        lines += ["", f"{METHODS[ours]} against the best magnitude-pruning baseline at each level:", ""]
        lines += _against_magnitude(best, ours, levels)
    return "\n".join(lines) + "\n"


def _against_magnitude(best, ours, levels):
    lines = []
    for level in levels:
        mine = best[ours][level]
        theirs = [(best[m][level], m) for m in ("gradual-magnitude", "magnitude-pruning") if best[m][level] is not None]
        if mine is None or not theirs:
            continue
        other, name = min(theirs, key=lambda t: t[0]["test"])
        diff = mine["test"] - other["test"]
        noise = max(mine["std"], other["std"])
        word = "better" if diff < 0 else ("worse, within one seed std" if diff <= noise else "worse")
        lines.append(f"- {level:.0%}: {word} ({mine['test']:.3f} vs {other['test']:.3f} for {METHODS[name]}, "
                     f"{diff:+.3f} bits)")
    return lines


def update_docs_page(summary, page=DOCS_PAGE):
    write_between(page, MARK_BEGIN, MARK_END, summary)


COLORS = {"paramreg-target": "C3", "paramreg-target-plain": "C9", "paramreg-target-l0": "C6", "gradual-magnitude": "C2", "magnitude-pruning": "C1",
          "penalty-threshold": "C7", "paramreg-channels": "C4"}


def plot_all(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({float(r["level"]) for r in rows if r["level"]})
    best = best_at(rows, levels)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, cells in best.items():
        points = [(level, s) for level, s in cells.items() if s is not None]
        ax.errorbar([100 * level for level, _ in points], [s["test"] for _, s in points], yerr=[s["std"] for _, s in points],
                    marker="o", ms=4, capsize=2, color=COLORS[method], label=METHODS[method])
    dense = [float(r["test_bpc"]) for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(statistics.fmean(dense), color="k", ls=":", lw=1, label="dense")
    ax.set(xlabel="sparsity of the blocks' Linear weights (%) / MLP neurons removed (%)", ylabel="test bits per character",
           title="Character-level transformer on the Python standard library")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bits_vs_sparsity.png", dpi=110)
    plt.close(fig)

    level = 0.9 if 0.9 in levels else levels[-1]
    seed = min(int(r["seed"]) for r in rows)
    chosen = [r for r in rows if r["level"] and float(r["level"]) == level and int(r["seed"]) == seed
              and r["method"] not in ("paramreg-channels", "penalty-threshold")]
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    width = 0.8 / max(1, len(chosen))
    for i, r in enumerate(chosen):
        xs = [j + (i - (len(chosen) - 1) / 2) * width for j in range(len(KINDS))]
        ax.bar(xs, [100 * float(r[f"sparsity:{k}"]) for k in KINDS], width, color=COLORS[r["method"]], label=METHODS[r["method"]])
    ax.set_xticks(range(len(KINDS)), ["attention qkv", "attention out", "MLP in", "MLP out"])
    ax.set(ylabel="exact zeros (%)", ylim=(0, 105), title=f"Where the zeros are at {level:.0%} (seed {seed})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "layer_sparsity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: 1 seed, 2 levels, a few steps")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder (default docs/study/text/)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one thread each")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="run only these methods; the other methods' rows are kept from --out's results.csv")
    args = parser.parse_args(argv)
    setup, seeds, levels = (QUICK, [0], (0.5, 0.9)) if args.quick else (Setup(), list(range(args.seeds)), LEVELS)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _, about = load_corpus(setup.data_bytes)
    rows = sweep(setup, seeds, levels, args.workers, tuple(args.methods))
    if set(args.methods) != set(METHODS):  # the other methods' rows as the last full run left them
        rows = [{k: v for k, v in r.items() if k in FIELDS} for r in read_csv(args.out / "results.csv")
                if r["method"] not in args.methods] + rows
        rows.sort(key=lambda r: (list(METHODS).index(r["method"]), str(r["level"]), str(r["strength"]), int(r["seed"])))
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS + list(about), restval="")
        writer.writeheader()
        writer.writerows({**r, **about} for r in rows)
    rows = read_csv(args.out / "results.csv")  # the summary is a function of the CSV alone
    summary = summary_markdown(rows, about_of(rows))
    plot_all(rows, args.out)
    elapsed = time.perf_counter() - started
    command = "python examples/study_text.py" + (" --quick" if args.quick else "")
    if set(args.methods) != set(METHODS):
        command += " --methods " + " ".join(args.methods)
    (args.out / "summary.md").write_text(
        f"{summary}\n`{command}`: {len(rows)} result rows in {elapsed:.0f} s ({args.workers} worker processes of one "
        f"thread, torch {torch.__version__}, setup {asdict(setup)}).\n"
    )
    if args.out.resolve() == DEFAULT_OUT.resolve() and not args.quick:
        update_docs_page(summary)
    print(summary)
    print(f"wrote {args.out}/results.csv, summary.md and 2 PNGs in {elapsed:.0f} s", file=sys.stderr)


def about_of(rows):
    """The corpus description stored in every CSV row."""
    first = rows[0]
    return {k: (int(first[k]) if k in ("files", "bytes") else first[k]) for k in ("python", "files", "bytes", "sha256")}


if __name__ == "__main__":
    main()
