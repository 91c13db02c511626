"""Sparsity against accuracy on scikit-learn's 8x8 digits: paramreg against the usual alternatives.

The methods, all on the same small CNN, data split, batch order and training budget:

  paramreg-l1-sgd       paramreg.attach(model, WEIGHTS, l1=a): exact L1 prox after each SGD step
  paramreg-l1-sgd-finetune  paramreg-l1-sgd, then its zeros kept fixed (a pruning mask) and the
                        rest fine-tuned for FINETUNE_EPOCHS more epochs, as magnitude pruning is
  paramreg-l1-adam      the same with Adam, paramreg's default step policy (no step= passed)
  penalty-threshold     the common manual recipe: loss + a·Σ|w| with SGD, then every weight below
                        a threshold set to zero; thresholds at several global magnitude quantiles,
                        and the (strength, threshold) pair is chosen on the validation split
  magnitude-pruning     dense SGD training, torch.nn.utils.prune.global_unstructured (L1 magnitude)
                        to a target sparsity, fine-tuning with the mask for FINETUNE_EPOCHS
                        (half the training epochs) more epochs, prune.remove
  paramreg-target       paramreg.attach(model, WEIGHTS, sparsity=s, sparsity_steps=..., l1=True) from the
                        start: L1 whose strength follows a cubic ramp to s over TARGET_RAMPS epochs
                        (a setting, chosen on validation like the strengths) of the training epochs,
                        then keep_zeros=True for FINETUNE_EPOCHS: the same number of steps as
                        magnitude pruning, one run per target and ramp, no strength search
  paramreg-target-l0    the same with l0=True (paramreg.L0: hard thresholding, which zeroes
                        weights without shrinking the ones it keeps)
  paramreg-group-lasso  paramreg.attach(..., group_lasso=a): whole conv filters and fc1 neurons
                        (groups="out"), fc2 input columns (groups="in"), SGD
  dense                 no regularization (the reference, and the start of magnitude pruning)

Sparsity is the fraction of exact zeros over the four weight tensors (biases excluded). The
strengths of the paramreg methods are found per method on seed 0 (a coarse search by factors of 4
for the strength where sparsity starts, then factors of 4 to 2^(1/4), finer as sparsity grows,
until at least 96% sparsity), then every strength runs with all seeds; the manual recipe uses the range of strengths of paramreg-l1-sgd (same
penalty a·Σ|w|, same optimizer), extended a decade down (see manual_strengths).
For each method and sparsity level, the configuration whose mean
sparsity over the seeds reaches the level and whose mean validation accuracy is highest is
reported with its mean test accuracy: the same rule for every method.

Writes into --out (default docs/study/): results.csv (one row per method, strength, threshold and
seed), summary.md (the table), accuracy_vs_sparsity.png, layer_sparsity.png, weight_histograms.png;
with the default --out it also rewrites the table in docs/study.md between its marker comments.

    python examples/study_digits.py            # the full study, one CPU thread, 10-20 minutes
    python examples/study_digits.py --quick --out /tmp/study   # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.utils import prune
from tqdm import tqdm

import paramreg
from quickstart import SmallCNN  # the demo's CNN (examples/ is on the path when run as a script)
from study_pages import read_csv, write_between

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "study"
DOCS_PAGE = ROOT / "docs" / "study.md"
MARK_BEGIN, MARK_END = "<!-- study-summary:begin -->", "<!-- study-summary:end -->"

WEIGHTS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
LEVELS = (0.5, 0.8, 0.9, 0.95)  # sparsity levels of the summary table
PRUNE_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97)
TARGET_RAMPS = (1 / 2, 3 / 4, 1)  # paramreg-target's ramp, as a fraction of the training epochs
THRESHOLD_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97)
BATCH_SIZE = 32
SGD_LR, MOMENTUM, ADAM_LR = 0.05, 0.9, 3e-3
LOW, HIGH = 0.3, 0.96  # the strength search spans sparsity from below LOW to at least HIGH

METHODS = {
    "paramreg-l1-sgd": "paramreg L1 prox (SGD)",
    "paramreg-l1-sgd-finetune": "paramreg L1 prox, then fine-tune with its zeros kept (SGD)",
    "paramreg-l1-adam": "paramreg L1 prox (Adam, default step)",
    "penalty-threshold": "L1 penalty in the loss + threshold (SGD)",
    "magnitude-pruning": "magnitude pruning + fine-tune (SGD)",
    "paramreg-target": "paramreg target sparsity, then zeros kept (SGD)",
    "paramreg-target-l0": "paramreg target sparsity with l0=True, then zeros kept (SGD)",
    "paramreg-group-lasso": "paramreg group lasso, filters/neurons (SGD)",
    "dense": "dense, no regularization (SGD)",
}
START = {"paramreg-l1-sgd": 2e-4, "paramreg-l1-adam": 1e-2, "paramreg-group-lasso": 2e-4}
FIELDS = ["method", "strength", "quantile", "ramp_epochs", "threshold", "sparsity", "accuracy", "val_accuracy", "seed", "optimizer", "steps",
          *(f"sparsity:{n}" for n in WEIGHTS)]


def load_data():
    """Digits scaled to [0, 1], split 60/20/20 into train/validation/test, stratified, fixed seed."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def weights_of(model):
    return [dict(model.named_parameters())[n] for n in WEIGHTS]


def l1_of_weights(model):
    return sum(w.abs().sum() for w in weights_of(model))


@torch.no_grad()
def accuracy(model, split):
    x, y = split
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def train(model, data, *, seed, epochs, optimizer="sgd", loss_penalty=None):
    """A plain training loop; the batch order depends on the seed only."""
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=SGD_LR, momentum=MOMENTUM)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
    x, y = data["train"]
    order = torch.Generator().manual_seed(1000 + seed)
    steps = 0
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=order).split(BATCH_SIZE):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            if loss_penalty is not None:
                loss = loss + loss_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()  # paramreg's prox, when attached, runs right after this
            steps += 1
    return steps


def fresh_model(seed):
    torch.manual_seed(seed)
    return SmallCNN()


def layer_sparsity(model):
    return {n: (w == 0).float().mean().item() for n, w in zip(WEIGHTS, weights_of(model), strict=True)}


def global_sparsity(model):
    ws = weights_of(model)
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def row(method, strength, model, data, *, seed, steps, optimizer="sgd", quantile="", threshold="", ramp_epochs=""):
    per_layer = layer_sparsity(model)
    return {
        "method": method, "strength": strength, "quantile": quantile, "ramp_epochs": ramp_epochs, "threshold": threshold, "sparsity": round(global_sparsity(model), 6),
        "accuracy": round(accuracy(model, data["test"]), 6), "val_accuracy": round(accuracy(model, data["val"]), 6),
        "seed": seed, "optimizer": optimizer, "steps": steps, **{f"sparsity:{n}": round(v, 6) for n, v in per_layer.items()},
    }


def flat_weights(model):
    return torch.cat([w.detach().flatten() for w in weights_of(model)])


# --- the methods: each returns (csv rows, the trained model or None) ---------------------------------

def run_paramreg(method, strength, data, seed, epochs):
    model = fresh_model(seed)
    if method == "paramreg-group-lasso":
        paramreg.attach(model, ["conv*.weight", "fc1.weight"], group_lasso=strength)  # groups="out"
        paramreg.attach(model, "fc2.weight", group_lasso={"strength": strength, "groups": "in"})
    else:
        paramreg.attach(model, WEIGHTS, l1=strength)  # the default step policy: no step= here
    optimizer = "adam" if method == "paramreg-l1-adam" else "sgd"
    steps = train(model, data, seed=seed, epochs=epochs, optimizer=optimizer)
    paramreg.remove(model)
    return [row(method, strength, model, data, seed=seed, steps=steps, optimizer=optimizer)], model


def run_penalty_threshold(strength, data, seed, epochs):
    model = fresh_model(seed)
    steps = train(model, data, seed=seed, epochs=epochs, loss_penalty=lambda m: strength * l1_of_weights(m))
    rows = []
    magnitudes = flat_weights(model).abs().sort().values
    for q in THRESHOLD_QUANTILES:
        threshold = magnitudes[min(len(magnitudes) - 1, math.ceil(q * len(magnitudes)) - 1)].item()
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            for w in weights_of(pruned):
                w.masked_fill_(w.abs() <= threshold, 0.0)
        rows.append(row("penalty-threshold", strength, pruned, data, seed=seed, steps=steps, quantile=q, threshold=f"{threshold:.6g}"))
    return rows, model


def run_dense(data, seed, epochs):
    model = fresh_model(seed)
    steps = train(model, data, seed=seed, epochs=epochs)
    return [row("dense", 0.0, model, data, seed=seed, steps=steps)], model


def finetune_zeros_kept(trained, strength, data, seed, finetune_epochs, steps_before):
    """A trained paramreg L1 model (removed, plain) fine-tuned with its exact zeros held at zero."""
    model = copy.deepcopy(trained)
    modules = dict(model.named_modules())
    for n in WEIGHTS:
        module = modules[n.rsplit(".", 1)[0]]
        prune.custom_from_mask(module, "weight", mask=module.weight.detach() != 0)
    steps = train(model, data, seed=seed + 500, epochs=finetune_epochs)
    for n in WEIGHTS:
        prune.remove(modules[n.rsplit(".", 1)[0]], "weight")
    return [row("paramreg-l1-sgd-finetune", strength, model, data, seed=seed, steps=steps_before + steps)], model


def run_pruning(dense, target, data, seed, finetune_epochs, dense_steps):
    model = copy.deepcopy(dense)
    modules = dict(model.named_modules())
    prune.global_unstructured(
        [(modules[n.rsplit(".", 1)[0]], "weight") for n in WEIGHTS], pruning_method=prune.L1Unstructured, amount=target
    )
    steps = train(model, data, seed=seed + 500, epochs=finetune_epochs)
    for n in WEIGHTS:
        prune.remove(modules[n.rsplit(".", 1)[0]], "weight")
    return [row("magnitude-pruning", target, model, data, seed=seed, steps=dense_steps + steps)], model


def run_target(target, ramp_epochs, data, seed, epochs, finetune_epochs, l0=False):
    """paramreg's L1 (or L0) with a target from the first step (the ramp over ramp_epochs, then
    held), then finetune_epochs with its zeros kept: as many steps as magnitude pruning."""
    model = fresh_model(seed)
    ramp_steps = ramp_epochs * math.ceil(len(data["train"][0]) / BATCH_SIZE)
    paramreg.attach(model, WEIGHTS, sparsity=target, sparsity_steps=ramp_steps, **({"l0": True} if l0 else {"l1": True}))
    steps = train(model, data, seed=seed, epochs=epochs)
    paramreg.remove(model)
    paramreg.attach(model, WEIGHTS, keep_zeros=True)
    steps += train(model, data, seed=seed + 500, epochs=finetune_epochs)
    paramreg.remove(model)
    method = "paramreg-target-l0" if l0 else "paramreg-target"
    return [row(method, target, model, data, seed=seed, steps=steps, ramp_epochs=ramp_epochs)], model


# --- the sweep -----------------------------------------------------------------------------------

def _grid_factor(sparsity, gain):
    """The next strength's factor: large steps while sparsity moves slowly at the low end (Adam's
    metric spreads it over decades of strength), fine steps at the high end, where a factor of 2
    can take a network from 91% to 100% sparse."""
    if sparsity < 0.6 and gain < 0.05:
        return 4.0
    return math.sqrt(2) if sparsity < 0.85 else 2 ** 0.25


def search_strengths(method, data, epochs, max_runs, bar, keep):
    """Seed-0 runs that bracket where sparsity starts (factors of 4), then the factors of _grid_factor
    up to HIGH."""
    done = {}

    def run(a):
        if a not in done:
            rows, model = run_paramreg(method, a, data, 0, epochs)
            done[a] = rows[0]
            keep[(method, a)] = model
            bar.update(1)
            bar.set_postfix(strength=f"{a:.3g}", sparsity=f"{rows[0]['sparsity']:.3f}", acc=f"{rows[0]['accuracy']:.3f}")
        return done[a]

    a = START[method]
    for _ in range(max_runs):  # coarse: find a with sparsity < LOW and 4a with sparsity >= LOW
        if run(a)["sparsity"] >= LOW:
            a /= 4
        elif run(4 * a)["sparsity"] < LOW:
            a *= 4
        else:
            break
    grid = [a]
    while len(grid) < max_runs and run(grid[-1])["sparsity"] < HIGH and run(grid[-1])["val_accuracy"] > 0.3:
        gain = run(grid[-1])["sparsity"] - run(grid[-2])["sparsity"] if len(grid) > 1 else 1.0
        grid.append(grid[-1] * _grid_factor(run(grid[-1])["sparsity"], gain))
    run(grid[-1])
    return grid, [done[g] for g in grid]


def manual_strengths(l1_grid):
    """Strengths for the manual recipe: factors of 2 from a decade below the L1 grid to its top.

    The penalty a·Σ|w| in the loss and paramreg's L1(a) have the same fixed points (under
    momentum β paramreg takes the prox with SGD's step lr·c_k, c_k the fill of the momentum
    buffer, which settles at 1/(1 − β)); the manual recipe also gets the decade below, so that
    its best setting is not cut off by the grid.
    """
    lo, hi = 0.1 * min(l1_grid), max(l1_grid)
    out = [lo]
    while out[-1] * 2 <= hi * 1.001:
        out.append(out[-1] * 2)
    return out


def sweep(data, *, seeds, epochs, finetune_epochs, max_strengths):
    rows, seed0_models = [], {}
    with tqdm(desc="dense", unit="run", total=len(seeds)) as bar:
        dense = {}
        for seed in seeds:
            new, dense[seed] = run_dense(data, seed, epochs)
            rows += new
            bar.update(1)
    grids = {}
    for method in ("paramreg-l1-sgd", "paramreg-l1-adam", "paramreg-group-lasso"):
        with tqdm(desc=f"{method}: strengths (seed {seeds[0]})", unit="run") as bar:
            grids[method], first = search_strengths(method, data, epochs, max_strengths, bar, seed0_models)
        rows += first
        trained = {(seeds[0], a): seed0_models[(method, a)] for a in grids[method]}
        with tqdm(desc=f"{method}: other seeds", unit="run", total=len(grids[method]) * (len(seeds) - 1)) as bar:
            for seed in seeds[1:]:
                for a in grids[method]:
                    new, trained[(seed, a)] = run_paramreg(method, a, data, seed, epochs)
                    rows += new
                    bar.update(1)
        if method == "paramreg-l1-sgd":
            with tqdm(desc="paramreg-l1-sgd-finetune", unit="run", total=len(trained)) as bar:
                for (seed, a), model in trained.items():
                    steps = next(r["steps"] for r in rows if r["method"] == method and r["seed"] == seed and r["strength"] == a)
                    new, tuned = finetune_zeros_kept(model, a, data, seed, finetune_epochs, steps)
                    rows += new
                    if seed == seeds[0]:
                        seed0_models[("paramreg-l1-sgd-finetune", a)] = tuned
                    bar.update(1)
    manual = manual_strengths(grids["paramreg-l1-sgd"])
    with tqdm(desc="penalty-threshold", unit="run", total=len(manual) * len(seeds)) as bar:
        for seed in seeds:
            for a in manual:
                new, model = run_penalty_threshold(a, data, seed, epochs)
                rows += new
                if seed == seeds[0]:
                    seed0_models[("penalty-threshold", a)] = model  # before thresholding
                bar.update(1)
    with tqdm(desc="magnitude-pruning", unit="run", total=len(PRUNE_TARGETS) * len(seeds)) as bar:
        for seed in seeds:
            dense_steps = next(r["steps"] for r in rows if r["method"] == "dense" and r["seed"] == seed)
            for target in PRUNE_TARGETS:
                new, model = run_pruning(dense[seed], target, data, seed, finetune_epochs, dense_steps)
                rows += new
                if seed == seeds[0]:
                    seed0_models[("magnitude-pruning", target)] = model
                bar.update(1)
    rows += sweep_targets(data, seeds=seeds, epochs=epochs, finetune_epochs=finetune_epochs)
    seed0_models[("dense", 0.0)] = dense[seeds[0]]
    return rows, seed0_models


def sweep_targets(data, *, seeds, epochs, finetune_epochs, methods=("paramreg-target", "paramreg-target-l0")):
    """The target methods: one run per target, ramp length and seed (they need no dense model)."""
    rows = []
    ramps = sorted({max(1, round(f * epochs)) for f in TARGET_RAMPS})
    for method in methods:
        with tqdm(desc=method, unit="run", total=len(PRUNE_TARGETS) * len(ramps) * len(seeds)) as bar:
            for seed in seeds:
                for target in PRUNE_TARGETS:
                    for ramp in ramps:
                        rows += run_target(target, ramp, data, seed, epochs, finetune_epochs, l0=method.endswith("-l0"))[0]
                        bar.update(1)
    return rows


# --- summary -------------------------------------------------------------------------------------

def configurations(rows):
    """{(method, strength, quantile, ramp_epochs): {"sparsity", "accuracy", "val_accuracy" (means), "std", "seeds"}}."""
    by = {}
    for r in rows:
        by.setdefault((r["method"], float(r["strength"]), str(r["quantile"]), str(r.get("ramp_epochs", ""))), []).append(r)
    out = {}
    for key, rs in by.items():
        acc = [float(r["accuracy"]) for r in rs]
        out[key] = {
            "sparsity": statistics.fmean(float(r["sparsity"]) for r in rs),
            "accuracy": statistics.fmean(acc),
            "val_accuracy": statistics.fmean(float(r["val_accuracy"]) for r in rs),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "seeds": len(rs),
        }
    return out


def best_at(rows, levels=LEVELS):
    """{method: {level: (config key, stats) or None}}: the configuration with mean sparsity >= level
    and the highest mean validation accuracy (ties: the sparser one)."""
    configs = configurations(rows)
    best = {}
    for method in METHODS:
        if method == "dense":
            continue
        best[method] = {}
        for level in levels:
            ok = [(k, s) for k, s in configs.items() if k[0] == method and s["sparsity"] >= level - 1e-9]
            best[method][level] = max(ok, key=lambda ks: (ks[1]["val_accuracy"], ks[1]["sparsity"])) if ok else None
    return best


def summary_markdown(rows):
    """The summary table and the comparison, in markdown; a function of the CSV rows only."""
    best = best_at(rows)
    configs = configurations(rows)
    seeds = sorted({int(r["seed"]) for r in rows})
    dense = [s for k, s in configs.items() if k[0] == "dense"]
    lines = [
        f"Mean test accuracy over seeds {', '.join(map(str, seeds))} (± standard deviation over seeds) of the "
        f"configuration with the best mean validation accuracy among those whose mean sparsity reaches the level; "
        f"in brackets its mean sparsity and its strength (pruning: the target; paramreg target: the target / the ramp's "
        f"length; manual recipe: strength / the "
        f"fraction of weights cut by the threshold).",
        "",
        "| method | " + " | ".join(f">= {level:.0%} sparse" for level in LEVELS) + " |",
        "|---|" + "---:|" * len(LEVELS),
    ]
    for method, levels in best.items():
        cells = []
        for level in LEVELS:
            found = levels[level]
            if found is None:
                cells.append("not reached")
                continue
            (_, strength, quantile, ramp), s = found
            setting = f"{strength:.3g}" + (f" / {float(quantile):.0%}" if quantile else "") + (f" / ramp {ramp} epochs" if ramp else "")
            cells.append(f"{s['accuracy']:.3f} ± {s['std']:.3f} ({s['sparsity']:.1%}, {setting})")
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    if dense:
        lines += ["", f"Dense reference (no regularization): test accuracy {dense[0]['accuracy']:.3f} ± {dense[0]['std']:.3f}."]
    for ours in ("paramreg-target", "paramreg-target-l0", "paramreg-l1-sgd", "paramreg-l1-sgd-finetune"):
        lines += ["", f"Does {METHODS[ours]} at least match each alternative (mean test accuracy)?", ""]
        lines += compare(best, ours)
    return "\n".join(lines) + "\n"


def compare(best, ours):
    lines = []
    for other in ("penalty-threshold", "magnitude-pruning"):
        for level in LEVELS:
            mine, theirs = best[ours][level], best[other][level]
            if mine is None or theirs is None:
                verdict = "paramreg did not reach this level" if mine is None else "the alternative did not reach it"
            else:
                diff = mine[1]["accuracy"] - theirs[1]["accuracy"]
                diff = 0.0 if abs(diff) < 1e-5 else diff  # the CSV's 6-digit rounding: a tie
                noise = max(mine[1]["std"], theirs[1]["std"])
                word = "yes" if diff >= 0 else ("no, within one seed std" if -diff <= noise else "no")
                verdict = f"{word} ({mine[1]['accuracy']:.3f} vs {theirs[1]['accuracy']:.3f}, {100 * diff:+.1f} points)"
            lines.append(f"- vs {METHODS[other]} at {level:.0%}: {verdict}")
    return lines


def update_docs_page(summary, page=DOCS_PAGE):
    write_between(page, MARK_BEGIN, MARK_END, summary)


# --- plots ---------------------------------------------------------------------------------------

COLORS = {"paramreg-target": "C5", "paramreg-target-l0": "C6", "paramreg-l1-sgd": "C0", "paramreg-l1-sgd-finetune": "C3", "paramreg-l1-adam": "C9", "penalty-threshold": "C1", "magnitude-pruning": "C2",
          "paramreg-group-lasso": "C4", "dense": "k"}


def frontier(rows, method):
    """Per configuration (pruning: target; paramreg: strength; manual recipe: per threshold quantile the
    strength with the best validation accuracy; target: per target the ramp with the best validation
    accuracy) the mean sparsity, mean test accuracy and its std."""
    configs = {k: s for k, s in configurations(rows).items() if k[0] == method}
    if method in ("penalty-threshold", "paramreg-target"):
        by_level = {}
        for key, s in configs.items():
            level = key[2] if method == "penalty-threshold" else key[1]  # the fraction cut / the target
            if level not in by_level or s["val_accuracy"] > by_level[level]["val_accuracy"]:  # best setting per level
                by_level[level] = s
        points = list(by_level.values())
    else:
        points = list(configs.values())
    points.sort(key=lambda s: s["sparsity"])
    return [p["sparsity"] for p in points], [p["accuracy"] for p in points], [p["std"] for p in points]


def plot_all(rows, seed0_models, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method in METHODS:
        if method == "dense":
            continue
        xs, ys, es = frontier(rows, method)
        ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o", ms=4, capsize=2, color=COLORS[method], label=METHODS[method])
    dense = [float(r["accuracy"]) for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(statistics.fmean(dense), color="k", ls=":", lw=1, label=METHODS["dense"])
    ax.set(xlabel="sparsity of the weights (% exact zeros)", ylabel="test accuracy (mean over seeds)",
           title="8x8 digits, small CNN: accuracy against sparsity", xlim=(25, 100), ylim=(0.5, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_sparsity.png", dpi=110)
    plt.close(fig)

    # per-layer sparsity of one model per method (seed 0, the configuration chosen at 90%)
    best = best_at(rows, levels=(0.9,))
    chosen = {}
    for method, levels in best.items():
        found = levels[0.9]
        if found is not None:
            (_, strength, quantile, ramp), _ = found
            chosen[method] = next(
                r for r in rows if r["method"] == method and float(r["strength"]) == strength
                and str(r["quantile"]) == quantile and str(r.get("ramp_epochs", "")) == ramp
                and int(r["seed"]) == min(int(q["seed"]) for q in rows)
            )
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(1, len(chosen))
    for i, (method, r) in enumerate(chosen.items()):
        xs = [j + (i - (len(chosen) - 1) / 2) * width for j in range(len(WEIGHTS))]
        ax.bar(xs, [100 * float(r[f"sparsity:{n}"]) for n in WEIGHTS], width, color=COLORS[method],
               label=f"{METHODS[method]} ({100 * float(r['sparsity']):.0f}% overall)")
    numel = [w.numel() for w in weights_of(SmallCNN())]
    ax.set_xticks(range(len(WEIGHTS)), [f"{n}\n({k} weights)" for n, k in zip(WEIGHTS, numel, strict=True)])
    ax.set(ylabel="exact zeros (%)", ylim=(0, 105), title="Per-layer sparsity, one model per method (seed 0, chosen at >= 90%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "layer_sparsity.png", dpi=110)
    plt.close(fig)

    if seed0_models is None:  # --targets-only: the trained models of the other methods are not at hand
        return
    # weight histograms: dense, the manual penalty before thresholding, paramreg L1 (the 90% choices)
    panels = [("dense (before)", seed0_models.get(("dense", 0.0)))]
    for method, label in (("penalty-threshold", "L1 penalty in the loss, before thresholding"),
                          ("paramreg-l1-sgd", "paramreg L1 prox (after, no thresholding)")):
        found = best[method][0.9]
        key = (method, found[0][1]) if found is not None else None
        if key in seed0_models:
            panels.append((f"{label}, a={key[1]:.3g}", seed0_models[key]))
    panels = [(label, m) for label, m in panels if m is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, (label, model) in zip(axes[0], panels, strict=True):
        w = flat_weights(model)
        zeros = int((w == 0).sum())
        ax.hist(w[w != 0].numpy(), bins=120, range=(-0.4, 0.4), color="C0")
        ax.set_yscale("log")
        ax.set_title(f"{label}\n{zeros / w.numel():.1%} exact zeros (not drawn)", fontsize=8)
        ax.set_xlabel("weight value")
    axes[0][0].set_ylabel("count (log)")
    fig.tight_layout()
    fig.savefig(out / "weight_histograms.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run: 1 seed, 1 epoch, few strengths")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder (default docs/study/)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--targets-only", action="store_true",
                        help="rerun only the target methods; the other rows are kept from --out's results.csv "
                             "and weight_histograms.png is left as it is")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    if args.quick:
        seeds, epochs, finetune, max_strengths = [0], 1, 2, 3
    else:
        seeds, epochs, finetune, max_strengths = list(range(args.seeds)), args.epochs, args.epochs // 2, 22
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.targets_only:  # rerun the target methods, keep every other row of --out's results.csv
        kept = [{k: v for k, v in r.items() if k in FIELDS} for r in read_csv(args.out / "results.csv")
                if not r["method"].startswith("paramreg-target")]
        rows, seed0_models = kept + sweep_targets(load_data(), seeds=seeds, epochs=epochs, finetune_epochs=finetune), None
    else:
        rows, seed0_models = sweep(load_data(), seeds=seeds, epochs=epochs, finetune_epochs=finetune, max_strengths=max_strengths)
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    rows = read_csv(args.out / "results.csv")  # the summary is a function of the CSV alone
    summary = summary_markdown(rows)
    plot_all(rows, seed0_models, args.out)
    elapsed = time.perf_counter() - started
    command = "python examples/study_digits.py" + (" --quick" if args.quick else "") + (" --targets-only" if args.targets_only else "")
    (args.out / "summary.md").write_text(
        f"{summary}\n`{command}`: {len(rows)} result rows in {elapsed:.0f} s "
        f"(torch {torch.__version__}, {torch.get_num_threads()} thread).\n"
    )
    if args.out.resolve() == DEFAULT_OUT.resolve() and not args.quick:
        update_docs_page(summary)
    print(summary)
    print(f"wrote {args.out}/results.csv, summary.md and 3 PNGs in {elapsed:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
