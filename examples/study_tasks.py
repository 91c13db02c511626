"""The sparse recipe across four tasks: paramreg's defaults chosen by one rule, against the pruning baselines.

Four tasks, data that ships with Python, scikit-learn or the system, none of it made for a method:

  digits-cnn         a CNN (two convolutions, two Linear layers) on scikit-learn's 8x8 digits, SGD with
                     momentum; metric: test accuracy
  python-transformer a 2-block character transformer on Python's standard library source, AdamW;
                     metric: test bits per character
  c-finetune         that transformer, trained dense on Python (python-transformer's dense run), sparsified
                     while fine-tuned on the C headers of /usr/include: pruning during fine-tuning
  english-gru        a GRU language model on the English text of Python's own documentation
                     (pydoc_data/topics.py); the selected weights are the recurrent layer's, not Linear

and two tasks held aside (HELD_OUT), which the rule does not see, run after the default was frozen,
where paramreg is the library's own call attach(model, SELECTED, sparsity=s, total_steps=BUDGET):

  resnet-digits      a small ResNet (torchvision's BasicBlock: convolutions, BatchNorm, residual
                     connections) on the digits under AdamW; every convolution selected
  gru-finetune       english-gru's dense model (its whole budget on English) sparsified while fine-tuned
                     on Python's standard library source: pruning during fine-tuning, recurrent weights

Every method of a task trains for the same BUDGET optimizer steps of the task (the run that
sparsifies: from scratch, or from the pretrained model for c-finetune), on the same batches (batch k
depends on the seed and k only), with the same learning-rate schedule, and starts from the same dense
checkpoint at 0.25 of the budget, where every method's pruning starts (one-shot pruning from the dense
run's checkpoint at 0.5 or 0.75). Methods, each with two settings but paramreg's recipe:

  paramreg     attach(model, SELECTED, sparsity=s, sparsity_steps=(start, end), keep_zeros=True,
               allocation=..., regrow=..., l1=True or l0=True): one call that ramps (cubic) from `start`
               to `end`, then keeps its zeros; the default step policy of the optimizer. CANDIDATES (21):
               L1 or L0, global (capped at 99% per tensor) or uniform allocation, the ramp over 0.25-0.5
               or 0.25-0.75 of the budget, zeros that may regrow or not (regrow=False: a zero weight's
               gradient and momentum are set to zero before each step); and L0 looking budget/8 steps
               ahead along Adam's momentum (lookahead=, global, zeros kept, both ramps; under SGD the
               same as L0); and L0 scoring each weight's path since the ramp began extended 4, 8 or 16
               times as far (extrapolate=, global, zeros kept, the 0.25-0.75 ramp; under SGD the same
               as L0). One of them becomes the default by RULE, the same for every task.
  gmp-tensor   gradual magnitude pruning, the same fraction in every tensor, on torch.ao.pruning's
               sparsifier (BaseSparsifier's masks, ranking the masked weights' magnitudes as its
               WeightNormSparsifier does, which refuses 4-d conv weights) with its CubicSL scheduler
               (Zhu and Gupta 2017), masks recomputed every step of the ramp (a pruned weight scores 0:
               masks only grow), then fixed; ramp 0.25-0.5 or 0.25-0.75
  gmp-global   the same schedule with one magnitude threshold over all selected tensors (a sparsifier
               of torch.ao.pruning's BaseSparsifier that ranks every tensor together)
  movement     hard movement pruning (Sanh et al. 2020), per tensor: scores -sum_k w*dL/dw from the ramp's
               start, the top (1 - level) kept, on the CubicSL schedule; a pruned weight's score stops
               moving (no straight-through estimator); the fine-tuning tasks only, ramp 0.25-0.5 or 0.25-0.75
  one-shot     torch.nn.utils.prune.global_unstructured on the dense run at 0.5 or 0.75 of the budget,
               then fine-tuned with the mask
  manual-l1    loss + a*sum|w| over 0.25-0.75 of the budget, the global magnitude quantile cut, then
               fine-tuned with the mask; a = 1e-5 or 1e-4
  dense        no sparsity

RULE (the recipe's defaults): for every task and level, rank paramreg's candidates by their mean
validation metric over the seeds (ties share their mean place); the default is the candidate with the
best mean rank over all tasks and levels. Each baseline gets, per task and level, the better of its
two settings on validation: a choice paramreg's recipe does not get. Reported: mean test metric +- the standard deviation over seeds.

Writes into --out (default docs/study/tasks/): results.csv and summary.md; with the default --out it
also rewrites the tables of docs/sparsity-recipe.md between its marker comments.

    python examples/study_tasks.py                    # the full study, 2 worker processes of one thread
    python examples/study_tasks.py --quick --out /tmp/tasks   # a smoke run of a few seconds
    python examples/study_tasks.py --tasks resnet-digits      # one task again; the others' rows stay
    python examples/study_tasks.py --methods manual-l1        # one method again (and the dense runs)
    python examples/study_tasks.py --seeds 3 4                # new seeds; the others' rows stay
    python examples/study_tasks.py --methods paramreg --settings l0-ahead/global/0.25-0.5/no-regrow   # one candidate
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import math
import multiprocessing
import pathlib
import statistics
import sysconfig
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL
from torch.nn.utils import prune
from tqdm import tqdm

import paramreg
from quickstart import SmallCNN  # examples/ is on the path when run as a script
from study_digits import load_data as load_digits_splits
from study_pages import read_csv, write_between
from study_text import CharTransformer, Setup, stdlib_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "study" / "tasks"
DOCS_PAGE = ROOT / "docs" / "sparsity-recipe.md"
MARKS = {"tables": ("<!-- study-tasks:begin -->", "<!-- study-tasks:end -->")}

LEVELS = (0.5, 0.8, 0.9, 0.95)
SEEDS = (0, 1, 2, 3, 4)
PRUNE_FROM = 0.25  # every method's pruning starts here (a fraction of the budget); before it, all share one dense run
WINDOWS = ((0.25, 0.5), (0.25, 0.75))  # ramp (start, end) as fractions of the budget: hold the rest
ONE_SHOT_AT = (0.5, 0.75)
MANUAL_STRENGTHS = (1e-5, 1e-4)
REGROWTH = ("regrow", "no-regrow")  # attach(..., regrow=True / False)
CANDIDATES = tuple(f"{reg}/{alloc}/{a}-{b}/{regrow}" for reg in ("l1", "l0") for alloc in ("global", "uniform")
                   for a, b in WINDOWS for regrow in REGROWTH)
# L0 looking LOOKAHEAD·budget optimizer steps ahead along Adam's momentum (Note [Looking ahead] in
# paramreg/optim/targets.py; the plain L0 candidates look 0 steps ahead): global, zeros kept, both ramps.
LOOKAHEAD = 1 / 8
CANDIDATES += tuple(f"l0-ahead/global/{a}-{b}/no-regrow" for a, b in WINDOWS)
# L0 scoring each weight's path since the ramp began, extended α times as far (extrapolate=α, Note
# [Extrapolated paths] in paramreg/optim/targets.py): global, zeros kept, the longer ramp.
EXTENSIONS = (4, 8, 16)
CANDIDATES += tuple(f"l0-extend{a}/global/0.25-0.75/no-regrow" for a in EXTENSIONS)
METHODS = {
    "paramreg": "paramreg, one call (the recipe's default)",
    "gmp-tensor": "gradual magnitude, per tensor (torch.ao.pruning)",
    "gmp-global": "gradual magnitude, global",
    "movement": "movement pruning, per tensor",
    "one-shot": "one-shot global magnitude + fine-tune",
    "manual-l1": "L1 penalty + threshold + fine-tune",
}
FIELDS = ["task", "method", "setting", "level", "seed", "sparsity", "max_tensor_sparsity", "val", "test", "steps", "seconds"]


# --- the tasks -------------------------------------------------------------------------------------

class Task:
    """What a method needs from a task: the model, the selected weights, the optimizer and its schedule,
    the batches and the metric (``higher`` tells whether higher is better)."""

    name: str
    metric: str
    higher: bool
    budget: int
    selected: list[str]

    def lr_at(self, k):
        """Linear warm-up over the first 5% of the budget, then cosine to lr/10 (the same for every method)."""
        warmup = max(1, self.budget // 20)
        if k < warmup:
            return self.lr * (k + 1) / warmup
        done = (k - warmup) / max(1, self.budget - warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))

    def weights(self, model):
        """{name: weight} of the selected tensors (the plain model's names)."""
        names = set(paramreg.select(model, self.selected))
        return {n: p for n, p in model.named_parameters() if n in names}


class Digits(Task):
    name, metric, higher, lr = "digits-cnn", "accuracy", True, 0.05
    selected = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]

    def __init__(self, quick):
        splits = load_digits_splits()  # the digits study's 60/20/20 split
        self.train, self.val, self.test = splits["train"], splits["val"], splits["test"]
        self.batch, self.budget = 32, 8 if quick else 600

    def fresh(self, seed):
        torch.manual_seed(seed)
        return SmallCNN(), None

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9)

    def loss(self, model, seed, k):
        per_epoch = len(self.train[0]) // self.batch
        order = torch.randperm(len(self.train[0]), generator=torch.Generator().manual_seed(1_000_003 * seed + k // per_epoch))
        i = order[(k % per_epoch) * self.batch:(k % per_epoch + 1) * self.batch]
        return F.cross_entropy(model(self.train[0][i]), self.train[1][i])

    @torch.no_grad()
    def evaluate(self, model, split):
        x, y = getattr(self, split)
        model.eval()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
        model.train()
        return accuracy


class Text(Task):
    """A character-level language model on a byte stream split into train / validation / test."""

    metric, higher = "bits/char", False
    context, batch = 64, 16

    def split(self, parts, quick):
        cut = 200_000 if quick else None
        self.train_bytes, val, test = (torch.frombuffer(bytearray(p[:cut]), dtype=torch.uint8).long() for p in parts)
        val_count, test_count = (8, 8) if quick else (64, 256)
        self.val, self.test = self.windows(val, val_count), self.windows(test, test_count)

    def windows(self, stream, count):
        n = (len(stream) - 1) // self.context
        picks = torch.linspace(0, n - 1, min(n, count)).long().tolist()
        w = torch.stack([stream[i * self.context:i * self.context + self.context + 1] for i in picks])
        return w[:, :-1], w[:, 1:]

    def optimizer(self, model):
        return torch.optim.AdamW(model.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.01)

    def loss(self, model, seed, k):
        g = torch.Generator().manual_seed(1_000_003 * seed + k)
        starts = torch.randint(0, len(self.train_bytes) - self.context - 1, (self.batch,), generator=g)
        w = torch.stack([self.train_bytes[s:s + self.context + 1] for s in starts.tolist()])
        return F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())

    @torch.no_grad()
    def evaluate(self, model, split):
        x, y = getattr(self, split)
        model.eval()
        nats = sum(F.cross_entropy(model(x[i:i + 64]).flatten(0, 1), y[i:i + 64].flatten(), reduction="sum").item()
                   for i in range(0, len(x), 64))
        model.train()
        return nats / y.numel() / math.log(2)


def _by_file(files, limit):
    """Whole files up to `limit` bytes, every tenth to validation and test (offsets 8 and 9)."""
    parts, total = ([], [], []), 0
    for i, path in enumerate(files):
        if total >= limit:
            break
        data = path.read_bytes()
        parts[1 if i % 10 == 8 else 2 if i % 10 == 9 else 0].append(data)
        total += len(data)
    return [b"".join(p) for p in parts]


class PythonTransformer(Text):
    name, lr, selected = "python-transformer", 3e-3, ["blocks.*.qkv.weight", "blocks.*.proj.weight", "blocks.*.fc1.weight",
                                                     "blocks.*.fc2.weight"]

    def __init__(self, quick):
        _, files = stdlib_files()
        parts = _by_file(files, 1_000_000)
        self.split(parts, quick)
        self.setup = Setup(layers=2, width=32 if quick else 64, heads=4, context=self.context)
        self.budget = 8 if quick else 800

    def fresh(self, seed):
        torch.manual_seed(seed)
        return CharTransformer(self.setup), None


class CFinetune(PythonTransformer):
    """python-transformer's dense model (its whole budget on Python), fine-tuned on C headers."""

    name, lr = "c-finetune", 1e-3

    def __init__(self, quick):
        super().__init__(quick)
        parts = _by_file(sorted(pathlib.Path("/usr/include").glob("*.h")), 1_000_000)
        self.split(parts, quick)
        self.budget = 8 if quick else 400

    def fresh(self, seed):
        """The pretrained model; a new optimizer, as fine-tuning starts."""
        model = CharTransformer(self.setup)
        model.load_state_dict(torch.load(self.pretrained(seed), weights_only=True)["model"])
        return model, None


class GRULanguageModel(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(256, width), nn.GRU(width, hidden, batch_first=True), nn.Linear(hidden, 256)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


class EnglishGRU(Text):
    name, lr, selected = "english-gru", 3e-3, ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]

    def __init__(self, quick):
        path = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
        text = path.read_bytes()
        a, b = int(0.8 * len(text)), int(0.9 * len(text))
        self.split((text[:a], text[a:b], text[b:]), quick)
        self.width, self.hidden = (16, 32) if quick else (64, 128)
        self.budget = 8 if quick else 500

    def fresh(self, seed):
        torch.manual_seed(seed)
        return GRULanguageModel(self.width, self.hidden), None


class GRUFinetune(EnglishGRU):
    """Held aside: english-gru's dense model (its whole budget on English), fine-tuned on Python
    source (python-transformer's files); added after the default was frozen."""

    name, lr = "gru-finetune", 1e-3

    def __init__(self, quick):
        super().__init__(quick)
        _, files = stdlib_files()
        self.split(_by_file(files, 1_000_000), quick)
        self.budget = 8 if quick else 300

    def fresh(self, seed):
        """The pretrained model; a new optimizer, as fine-tuning starts."""
        model = GRULanguageModel(self.width, self.hidden)
        model.load_state_dict(torch.load(self.pretrained(seed), weights_only=True)["model"])
        return model, None


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convolutions with BatchNorm, and the residual."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetDigits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        self.layer1, self.layer2 = BasicBlock(16, 16, 1), BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class ResNetDigitsAdamW(Digits):
    """Held aside: a residual CNN (torchvision's BasicBlock, BatchNorm) on the digits under AdamW,
    every convolution selected; run after the default was frozen, with the library's own call."""

    name, lr = "resnet-digits", 3e-3
    selected = ["conv1.weight", "layer*.conv*.weight", "layer*.downsample.0.weight"]

    def fresh(self, seed):
        torch.manual_seed(seed)
        return ResNetDigits(), None

    def optimizer(self, model):
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)


TASKS = {t.name: t for t in (Digits, PythonTransformer, CFinetune, EnglishGRU, ResNetDigitsAdamW, GRUFinetune)}
HELD_OUT = ("resnet-digits", "gru-finetune")  # not seen by the rule: the default runs there as the library's total_steps= call
PRETRAINED_ON = {"c-finetune": "python-transformer", "gru-finetune": "english-gru"}  # fine-tuning task -> the dense run it starts from
RECIPE = "recipe"  # paramreg's setting on a held-out task: attach(..., sparsity=s, total_steps=budget)


# --- training --------------------------------------------------------------------------------------

class Runner:
    """One task's data and its dense checkpoints' folder, in one worker process."""

    def __init__(self, task, folder):
        self.task, self.folder = task, pathlib.Path(folder)
        task.pretrained = lambda seed: self.checkpoint(PRETRAINED_ON[task.name], seed, "end")

    def checkpoint(self, name, seed, at):
        return self.folder / f"{name}-seed{seed}-{at}.pt"

    def at(self, fraction):
        return round(fraction * self.task.budget)

    def train(self, model, opt, seed, start, stop, *, penalty=None, before_step=None, after_step=None):
        task = self.task
        for k in range(start, stop):
            for group in opt.param_groups:
                group["lr"] = task.lr_at(k)
            loss = task.loss(model, seed, k)
            if penalty is not None:
                loss = loss + penalty * sum(w.abs().sum() for w in task.weights(model).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step()
            opt.step()  # paramreg's prox, when attached, runs right after this
            if after_step is not None:
                after_step(k)
        return stop - start

    def resume(self, seed, fraction):
        """The dense model and its optimizer at `fraction` of the budget, from the dense run."""
        saved = torch.load(self.checkpoint(self.task.name, seed, fraction), weights_only=True)
        model, _ = self.task.fresh(seed)
        model.load_state_dict(saved["model"])
        opt = self.task.optimizer(model)
        opt.load_state_dict(saved["optimizer"])
        return model, opt

    def row(self, method, setting, level, seed, model, steps, started):
        assert steps == self.task.budget, (method, steps)  # the same budget for every method
        ws = list(self.task.weights(model).values())
        zeros = [int((w == 0).sum()) for w in ws]
        return {"task": self.task.name, "method": method, "setting": setting, "level": level, "seed": seed,
                "sparsity": round(sum(zeros) / sum(w.numel() for w in ws), 6),
                "max_tensor_sparsity": round(max(z / w.numel() for z, w in zip(zeros, ws, strict=True)), 6),
                "val": round(self.task.evaluate(model, "val"), 6), "test": round(self.task.evaluate(model, "test"), 6),
                "steps": steps, "seconds": round(time.perf_counter() - started, 1)}

    # the methods, one job each

    def dense(self, seed, setting, level):
        started, task = time.perf_counter(), self.task
        model, _ = task.fresh(seed)
        opt = task.optimizer(model)
        steps = 0
        for fraction in (PRUNE_FROM, *ONE_SHOT_AT, 1.0):
            steps += self.train(model, opt, seed, steps, self.at(fraction))
            at = "end" if fraction == 1.0 else fraction
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, self.checkpoint(task.name, seed, at))
        return [self.row("dense", "", "", seed, model, steps, started)]

    def paramreg(self, seed, setting, level):
        started = time.perf_counter()
        if setting == RECIPE:  # the one call with the library's defaults, from step 0 (the same first quarter as dense)
            model, _ = self.task.fresh(seed)
            opt = self.task.optimizer(model)
            paramreg.attach(model, self.task.selected, sparsity=level, total_steps=self.task.budget)
            steps = self.train(model, opt, seed, 0, self.task.budget)
            paramreg.remove(model)
            return [self.row("paramreg", setting, level, seed, model, steps, started)]
        reg, allocation, window, regrowth = setting.split("/")
        start, end = (self.at(float(f)) for f in window.split("-"))
        model, opt = self.resume(seed, PRUNE_FROM)
        here = self.at(PRUNE_FROM)
        assert start >= here, setting  # nothing acts before the ramp: the shared prefix is the same run
        # attached at the shared checkpoint: nothing acts before the ramp starts, so this is the call
        # sparsity_steps=(start, end) made at step 0 (tests/test_sparsity.py, test_one_call_...)
        horizon = {"l0": {"lookahead": 0, "extrapolate": 0}, "l0-ahead": {"lookahead": round(LOOKAHEAD * self.task.budget)},
                   **{f"l0-extend{a}": {"extrapolate": a} for a in EXTENSIONS}}.get(reg, {})
        paramreg.attach(model, self.task.selected, sparsity=level, sparsity_steps=(start - here, end - here), keep_zeros=True,
                        allocation=allocation, regrow=regrowth == "regrow", **horizon,
                        **{reg.split("-")[0]: True})  # named either way: the target's defaults are whatever the rule chose
        steps = here + self.train(model, opt, seed, here, self.task.budget)
        paramreg.remove(model)
        return [self.row("paramreg", setting, level, seed, model, steps, started)]

    def _sparsified(self, method, seed, setting, level, sparsifier, *, scores=None):
        """A torch.ao.pruning sparsifier on the CubicSL schedule over the window, masks fixed after it."""
        started = time.perf_counter()
        start, end = (self.at(float(f)) for f in setting.split("-"))
        assert start == self.at(PRUNE_FROM), setting  # the ramp starts at the shared checkpoint
        model, opt = self.resume(seed, PRUNE_FROM)
        sparsifier.prepare(model, [{"tensor_fqn": n} for n in self.task.weights(model)])
        every = max(1, (end - start) // 25)
        scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=every, total_t=max(1, (end - start) // every))

        def update(k):
            if k < end:  # the ramp, at its level by step `end`; the masks are fixed while fine-tuning
                scheduler.step()
                sparsifier.step()

        sparsifier.step()
        steps = start + self.train(model, opt, seed, start, self.task.budget, after_step=update, before_step=scores)
        sparsifier.squash_mask()
        return self.row(method, setting, level, seed, model, steps, started)

    def gmp_tensor(self, seed, setting, level):
        return [self._sparsified("gmp-tensor", seed, setting, level, Magnitude(level, per_tensor=True))]

    def gmp_global(self, seed, setting, level):
        return [self._sparsified("gmp-global", seed, setting, level, Magnitude(level, per_tensor=False))]

    def movement(self, seed, setting, level):
        sparsifier = Movement(level)
        return [self._sparsified("movement", seed, setting, level, sparsifier, scores=sparsifier.accumulate)]

    def one_shot(self, seed, setting, level):
        started, fraction = time.perf_counter(), float(setting)
        model, opt = self.resume(seed, fraction)
        tensors = [(m, n.rsplit(".", 1)[1]) for n in self.task.weights(model) for m in [model.get_submodule(n.rsplit(".", 1)[0])]]
        prune.global_unstructured(tensors, pruning_method=prune.L1Unstructured, amount=level)
        steps = self.at(fraction) + self.train(model, opt, seed, self.at(fraction), self.task.budget)
        for m, n in tensors:
            prune.remove(m, n)
        return [self.row("one-shot", setting, level, seed, model, steps, started)]

    def manual_l1(self, seed, setting, levels):
        """One penalty run serves every level: each is cut from it and fine-tuned on its own."""
        started = time.perf_counter()
        model, opt = self.resume(seed, PRUNE_FROM)
        start, end = self.at(PRUNE_FROM), self.at(WINDOWS[-1][1])
        self.train(model, opt, seed, start, end, penalty=float(setting))
        state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())  # copies: each level from here
        rows = []
        for level in levels:
            model.load_state_dict(state)
            opt.load_state_dict(opt_state)
            ws = self.task.weights(model)
            magnitudes = torch.cat([w.detach().abs().flatten() for w in ws.values()])
            threshold = magnitudes.kthvalue(max(1, round(level * magnitudes.numel()))).values
            tensors = [(model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in ws]
            for (m, n), w in zip(tensors, ws.values(), strict=True):
                prune.custom_from_mask(m, n, mask=w.detach().abs() > threshold)
            steps = end + self.train(model, opt, seed, end, self.task.budget)
            for m, n in tensors:
                prune.remove(m, n)
            rows.append(self.row("manual-l1", setting, level, seed, model, steps, started))
        return rows


class Magnitude(BaseSparsifier):
    """Gradual magnitude pruning on torch.ao.pruning's sparsifier (its masks, its CubicSL scheduler):
    the (1 - level) largest scores kept, in each tensor (``per_tensor``) or over all selected tensors
    together. (torch.ao's WeightNormSparsifier would rank per tensor, but refuses 4-d conv weights.)"""

    def __init__(self, sparsity_level, per_tensor):
        super().__init__(defaults={"sparsity_level": sparsity_level})
        self.per_tensor = per_tensor

    def scores(self, config):
        """The magnitude of the masked weight, as torch.ao's WeightNormSparsifier ranks: a pruned
        weight scores 0 and stays pruned (masks only grow along the ramp)."""
        return getattr(config["module"], config["tensor_name"]).detach().abs()

    @torch.no_grad()
    def step(self, use_path=True):
        if not self.enable_mask_update:
            return
        level = self.groups[0]["sparsity_level"]  # CubicSL moves every group's level together
        scores = [self.scores(c).flatten() for c in self.groups]
        for part in ([[s] for s in scores] if self.per_tensor else [scores]):
            flat = torch.cat(part)
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.topk(flat.numel() - round(level * flat.numel())).indices] = True
            for s, m in zip(part, keep.split([s.numel() for s in part]), strict=True):
                config = self.groups[next(i for i, t in enumerate(scores) if t is s)]
                mask = getattr(config["module"].parametrizations, config["tensor_name"])[0].mask
                mask.copy_(m.view_as(mask))

    def update_mask(self, module, tensor_name, **kwargs):  # step() above sets every mask at once
        raise NotImplementedError


class Movement(Magnitude):
    """Hard movement pruning per tensor: keep the (1 - level) largest scores S = -sum_k w * dL/dw,
    summed from the ramp's start (a pruned weight's gradient is masked, so its score stops moving)."""

    def __init__(self, sparsity_level):
        super().__init__(sparsity_level, per_tensor=True)

    def accumulate(self):
        for config in self.groups:
            w = getattr(config["module"].parametrizations, config["tensor_name"]).original
            if w.grad is not None:
                self.state.setdefault(config["tensor_fqn"], {}).setdefault("score", torch.zeros_like(w)).sub_(w.detach() * w.grad)

    def scores(self, config):
        w = getattr(config["module"].parametrizations, config["tensor_name"]).original
        return self.state.get(config["tensor_fqn"], {}).get("score", torch.zeros_like(w))


# --- the sweep -------------------------------------------------------------------------------------

_RUNNERS: dict = {}


def _init_worker(quick, folder):
    torch.set_num_threads(1)
    _RUNNERS.update({name: Runner(task(quick), folder) for name, task in TASKS.items()})


def _run(job):
    name, method, setting, level, seed = job
    return getattr(_RUNNERS[name], method.replace("-", "_"))(seed, setting, level)


def jobs_for(names, seeds, levels, methods=None, settings=None):
    """The dense runs (each fine-tuning task's after the one it starts from, also run where that task
    is not in `names`), then the rest."""
    first = [(n, "dense", "", "", s) for n in [*names, *sorted({PRETRAINED_ON[m] for m in names if m in PRETRAINED_ON} - set(names))]
             if n not in PRETRAINED_ON for s in seeds]
    second = [(n, "dense", "", "", s) for n in names if n in PRETRAINED_ON for s in seeds]
    windows = [f"{a}-{b}" for a, b in WINDOWS]
    rest = []
    for name, seed, level in itertools.product(names, seeds, levels):
        rest += [(name, "paramreg", c, level, seed) for c in ((RECIPE,) if name in HELD_OUT else CANDIDATES)]
        rest += [(name, m, w, level, seed) for m in ("gmp-tensor", "gmp-global") for w in windows]
        rest += [(name, "movement", w, level, seed) for w in windows if name in PRETRAINED_ON]
        rest += [(name, "one-shot", str(f), level, seed) for f in ONE_SHOT_AT]
    rest += [(name, "manual-l1", str(a), tuple(levels), seed) for name in names for seed in seeds for a in MANUAL_STRENGTHS]
    rest = [job for job in rest if (methods is None or job[1] in methods) and (settings is None or job[2] in settings)]
    return [first, second, rest]


def sweep(names, seeds, levels, quick, workers, progress=None, methods=None, settings=None):
    """Every job's rows; each also appended to `progress` (JSON lines) as it comes."""
    rows = []
    with tempfile.TemporaryDirectory() as folder, multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker, initargs=(quick, folder)
    ) as pool:
        for stage, jobs in zip(("dense", "dense, fine-tuning", "methods"), jobs_for(names, seeds, levels, methods, settings), strict=True):
            with tqdm(total=len(jobs), desc=stage, unit="run") as bar:
                for new in pool.imap_unordered(_run, jobs):
                    rows += new
                    bar.update(1)
                    if progress is not None:
                        with open(progress, "a") as f:
                            f.writelines(json.dumps(r) + "\n" for r in new)
    order = [*TASKS], ["dense", *METHODS]
    return sorted(rows, key=lambda r: (order[0].index(r["task"]), order[1].index(r["method"]), str(r["setting"]),
                                       str(r["level"]), r["seed"]))


# --- the rule and the tables -------------------------------------------------------------------------

def normalized(rows):
    """Rows as read back from the CSV (strings) or as run: the level a float ("" for dense)."""
    return [dict(r, level=float(r["level"]) if r["level"] != "" else "") for r in rows]


def cells(rows):
    """{(task, method, setting, level): {"val", "test", "std", "sparsity", "seeds"}}, means over seeds."""
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["method"], r["setting"], r["level"]), []).append(r)
    out = {}
    for key, rs in by.items():
        test = [float(r["test"]) for r in rs]
        out[key] = {"val": statistics.fmean(float(r["val"]) for r in rs), "test": statistics.fmean(test),
                    "std": statistics.stdev(test) if len(test) > 1 else 0.0,
                    "sparsity": [float(r["sparsity"]) for r in rs], "seeds": len(rs)}
    return out


def _better(task_name):
    """A key under which larger is better for the task's metric."""
    return (lambda v: v) if TASKS[task_name].higher else (lambda v: -v)


def default_candidate(rows, tasks=None):
    """RULE: the candidate with the best mean rank on validation over every task and level (tied
    candidates in a cell share the mean of their places; equal mean ranks go to the earlier
    candidate in CANDIDATES). Returns (candidate, {candidate: mean rank})."""
    table = cells(rows)
    tasks = tasks or sorted({r["task"] for r in rows} - set(HELD_OUT))
    levels = sorted({r["level"] for r in rows if r["method"] == "paramreg"})
    ranks = {c: [] for c in CANDIDATES}
    for task, level in itertools.product(tasks, levels):
        key = _better(task)
        values = {c: key(table[(task, "paramreg", c, level)]["val"]) for c in CANDIDATES}
        for c in CANDIDATES:  # 1 for the best; tied candidates share the mean of their places
            ranks[c].append(1 + sum(v > values[c] for v in values.values()) + (sum(v == values[c] for v in values.values()) - 1) / 2)
    mean = {c: statistics.fmean(r) for c, r in ranks.items()}
    return min(CANDIDATES, key=lambda c: (mean[c], CANDIDATES.index(c))), mean


def chosen(rows, default):
    """{(task, method, level): (setting, cell)}: paramreg's default, each baseline's better setting on validation."""
    table = cells(rows)
    out = {}
    for (task, method, setting, level), cell in table.items():
        if method == "dense":
            continue
        if method == "paramreg":
            if setting in (default, RECIPE):
                out[(task, method, level)] = (setting, cell)
            continue
        key = _better(task)
        held = out.get((task, method, level))
        if held is None or key(cell["val"]) > key(held[1]["val"]):
            out[(task, method, level)] = (setting, cell)
    return out


def verdicts(rows, default):
    """Per task and level: paramreg's default against the best baseline (on test), with the issue's test:
    not worse by more than one of the baseline's standard deviations (nor by more than 0.3 points of
    accuracy or 0.01 bits/char), ahead when better by more than one standard deviation."""
    picked = chosen(rows, default)
    out = []
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    levels = sorted({level for (_, m, level) in picked if m == "paramreg"})
    for task, level in itertools.product(tasks, levels):
        key = _better(task)
        ours = picked[(task, "paramreg", level)][1]
        rivals = {m: picked[(task, m, level)] for m in METHODS if m != "paramreg" and (task, m, level) in picked}
        best = max(rivals, key=lambda m: key(rivals[m][1]["test"]))
        theirs = rivals[best][1]
        gap = key(ours["test"]) - key(theirs["test"])  # > 0: paramreg better
        allowed = min(theirs["std"], 0.003 if TASKS[task].higher else 0.01)
        word = "ahead" if gap > theirs["std"] else "tie" if gap >= -allowed else "behind"
        out.append({"task": task, "level": level, "ours": ours, "best": best, "theirs": theirs, "gap": gap, "word": word})
    return out


def _fmt(cell):
    return f"{cell['test']:.3f} ± {cell['std']:.3f}"


def summary_markdown(rows):
    rows = normalized(rows)
    default, ranks = default_candidate(rows)
    picked = chosen(rows, default)
    table = cells(rows)
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    ruled = [t for t in tasks if t not in HELD_OUT]
    levels = sorted({r["level"] for r in rows if r["method"] == "paramreg"})
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [f"The default chosen by the rule: **{default}** (regularizer / allocation / ramp as fractions of the budget). "
             f"Mean rank on validation over {len(ruled)} tasks x {len(levels)} levels, per candidate:", "",
             "| candidate | mean rank |", "|---|---:|"]
    lines += [f"| {c} | {ranks[c]:.2f} |" for c in sorted(CANDIDATES, key=lambda c: ranks[c])]
    ruled = [t for t in tasks if t not in HELD_OUT]
    alone = {t: default_candidate(rows, [u for u in ruled if u != t])[0] for t in ruled} if len(ruled) > 1 else {}
    if alone:
        lines += ["", "The rule without each task (leave one task out): " + "; ".join(
            f"without {t}: {c}" for t, c in alone.items()) + "."]
    lines += ["", f"Test metric, mean ± standard deviation over seeds {', '.join(map(str, seeds))}; paramreg's row is the "
                  f"default above on every task, each baseline's the better of its two settings on validation per task and "
                  f"level (in brackets).", ""]
    for task in tasks:
        steps = next(r["steps"] for r in rows if r["task"] == task)
        dense = table[(task, "dense", "", "")]
        aside = "held aside from the rule, run after it with `total_steps=`; " if task in HELD_OUT else ""
        lines += [f"**{task}** ({aside}{TASKS[task].metric}, {'higher' if TASKS[task].higher else 'lower'} is better; "
                  f"{steps} steps; dense {_fmt(dense)})", "",
                  "| method | " + " | ".join(f"{level:.0%}" for level in levels) + " |", "|---|" + "---:|" * len(levels)]
        for method, title in METHODS.items():
            shown = [picked.get((task, method, level)) for level in levels]
            if any(s is None for s in shown):
                continue
            cells_ = [f"{_fmt(c)}" + ("" if method == "paramreg" else f" ({s})") for s, c in shown]
            lines.append(f"| {title} | " + " | ".join(cells_) + " |")
        lines.append("")
    reached = [abs(x - float(level)) for (t, m, s, level), c in table.items() if m == "paramreg" for x in c["sparsity"]]
    lines += [f"Every paramreg run ({len(reached)}, every candidate, task, level and seed) reached its asked sparsity within "
              f"{100 * max(reached):.2f} points, in one run.", "",
              "Against the best baseline at each level (on test): ahead = better by more than that baseline's standard "
              "deviation; tie = not worse by more than it (nor by more than 0.3 points of accuracy or 0.01 bits/char); "
              "behind otherwise.", "",
              "| task | " + " | ".join(f"{level:.0%}" for level in levels) + " |", "|---|" + "---|" * len(levels)]
    by_task = {}
    for v in verdicts(rows, default):
        by_task.setdefault(v["task"], []).append(
            f"{v['word']} ({v['gap']:+.3f} vs {v['best']})")
    lines += [f"| {t} | " + " | ".join(vs) + " |" for t, vs in by_task.items()]
    return "\n".join(lines) + "\n"


def write(rows, out):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summary = summary_markdown(read_csv(out / "results.csv"))
    (out / "summary.md").write_text(summary)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and budgets, two seeds: a smoke run")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="run these (and the dense runs they start from); "
                        "the other methods' rows in --out stay")
    parser.add_argument("--settings", nargs="+", help="run only these settings of the methods run (e.g. new paramreg "
                        "candidates); the other settings' rows in --out stay")
    parser.add_argument("--seeds", nargs="+", type=int, choices=SEEDS, help="run only these seeds (e.g. new ones); "
                        "the other seeds' rows in --out stay")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    names = sorted(set(args.tasks), key=list(TASKS).index)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    progress = args.out / "progress.jsonl"
    progress.unlink(missing_ok=True)
    seeds = tuple(args.seeds or (SEEDS[:2] if args.quick else SEEDS))
    rows = sweep(names, seeds, LEVELS, args.quick, args.workers, progress, args.methods, args.settings)
    progress.unlink()
    rows = [r for r in rows if r["task"] in args.tasks]
    if (set(args.tasks) != set(TASKS) or args.methods or args.settings or args.seeds) and (args.out / "results.csv").exists():
        rerun = {"dense", *(args.methods or METHODS)}  # the rest stays
        rows = [r for r in read_csv(args.out / "results.csv") if r["task"] not in args.tasks or r["method"] not in rerun
                or (args.settings and r["method"] != "dense" and r["setting"] not in args.settings)
                or int(r["seed"]) not in seeds] + rows
        order = [*TASKS], ["dense", *METHODS]
        rows.sort(key=lambda r: (order[0].index(r["task"]), order[1].index(r["method"]), str(r["setting"]), str(r["level"]),
                                 int(r["seed"])))
    summary = write(rows, args.out)
    if args.out == DEFAULT_OUT:
        write_between(DOCS_PAGE, *MARKS["tables"], summary)
    print(summary)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
