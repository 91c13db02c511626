"""The examples run as a newcomer runs them, and do what the README and docs say."""

import importlib.util
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_demo():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    reached = float(re.search(r"^reached: ([0-9.]+)% zero", out, flags=re.M).group(1))
    assert abs(reached - 90.0) <= 1.0  # the target the demo asks for
    kept = re.search(r"zeros kept: ([0-9.]+)% zero, test accuracy: ([0-9.]+)", out)
    assert float(kept.group(1)) >= reached  # fine-tuning kept every zero
    accuracy = float(kept.group(2))
    sparsity = float(re.search(r"^total \(4\).*?([0-9.]+)%", out, flags=re.M).group(1))
    assert accuracy >= 0.95
    assert sparsity >= 50.0
    assert "reloaded plain state_dict: predictions identical" in out


def test_at_scale_example_quick_run_under_torchrun(tmp_path):
    """examples/at_scale.py as docs/at-scale.md runs it, quick: 2 processes under torchrun
    (--standalone picks a free port), FSDP2, a target, a DCP save and resume, the report."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from conftest import run_job

    out = run_job("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "examples" / "at_scale.py",
                  "--quick", "--out", tmp_path / "checkpoint", timeout=600)
    assert "saved with DCP after step 6 and resumed" in out
    target = re.search(r"^target: 90\.0% of ([0-9]+) weights .* reached ([0-9.]+)%", out, flags=re.M)
    assert target and target.group(2) == "90.0"
    total = re.search(r"^total \(8\)\s+([0-9]+)\s+([0-9]+)", out, flags=re.M)
    assert int(total.group(2)) == round(0.9 * int(total.group(1)))  # exactly the target, after the resume


def _example(name):
    """examples/<name>.py as a module, loaded as `python examples/<name>.py` runs it: with examples/ on
    the path (the studies import the quickstart's CNN and study_pages) and registered in sys.modules
    (a dataclass looks its module up there)."""
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _study():
    return _example("study_digits")


def _quick_run(name, tmp_path):
    """`python examples/<name>.py --quick --out tmp_path`, checked to exit 0: the study's module and
    the rows of the CSV it wrote."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    study = _example(name)
    return study, study.read_csv(tmp_path / "results.csv")


def test_study_smoke_run(tmp_path):
    """--quick runs every method end to end and writes the CSV, the summary and the three plots."""
    study, rows = _quick_run("study_digits", tmp_path)
    assert {r["method"] for r in rows} == set(study.METHODS)
    assert all(0.0 <= float(r["sparsity"]) <= 1.0 and 0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    pruned = [r for r in rows if r["method"] == "magnitude-pruning"]
    assert [round(float(r["sparsity"]), 3) for r in pruned] == [round(t, 3) for t in study.PRUNE_TARGETS]
    for r in rows:  # the overall sparsity is the weighted mean of the per-layer columns
        layers = [float(r[f"sparsity:{n}"]) for n in study.WEIGHTS]
        sizes = [144, 4608, 32768, 640]
        assert abs(sum(s * n for s, n in zip(layers, sizes, strict=True)) / sum(sizes) - float(r["sparsity"])) < 1e-4
    for name in ("accuracy_vs_sparsity.png", "layer_sparsity.png", "weight_histograms.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.md").read_text().startswith(study.summary_markdown(rows))


def test_study_page_shows_the_committed_results():
    """docs/study.md's table is the summary of the committed docs/study/results.csv."""
    study = _study()
    rows = study.read_csv(ROOT / "docs" / "study" / "results.csv")
    page = (ROOT / "docs" / "study.md").read_text()
    shown = page.split(study.MARK_BEGIN, 1)[1].split(study.MARK_END, 1)[0]
    assert shown.strip() == study.summary_markdown(rows).strip()
    assert {r["method"] for r in rows} == set(study.METHODS)
    assert len({r["seed"] for r in rows}) == 3


def _text_study():
    return _example("study_text")


def test_text_study_smoke_run(tmp_path):
    """--quick runs every method of the transformer study end to end and writes its CSV and plots
    (nothing is asserted about the results of a run this small)."""
    study, rows = _quick_run("study_text", tmp_path)
    assert {r["method"] for r in rows} == set(study.METHODS)
    assert len({r["steps"] for r in rows}) == 1  # the same budget for every method
    for name in ("bits_vs_sparsity.png", "layer_sparsity.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_study_page_shows_the_committed_results():
    """docs/study.md's transformer table is the summary of the committed docs/study/text/results.csv."""
    study = _text_study()
    rows = study.read_csv(ROOT / "docs" / "study" / "text" / "results.csv")
    page = (ROOT / "docs" / "study.md").read_text()
    shown = page.split(study.MARK_BEGIN, 1)[1].split(study.MARK_END, 1)[0]
    assert shown.strip() == study.summary_markdown(rows, study.about_of(rows)).strip()
    assert {r["method"] for r in rows} == set(study.METHODS)
    assert len({r["seed"] for r in rows}) == 3
    assert len({r["steps"] for r in rows}) == 1


def _tasks_study():
    return _example("study_tasks")


def test_tasks_study_smoke_run(tmp_path):
    """--quick runs every task and method of the cross-task study end to end, two seeds, and writes
    its CSV and summary; every pruned run reaches its level (nothing else is asserted about results
    this small)."""
    study, rows = _quick_run("study_tasks", tmp_path)
    assert {r["task"] for r in rows} == set(study.TASKS)
    assert {r["method"] for r in rows} == {"dense", *study.METHODS}
    assert {r["setting"] for r in rows if r["method"] == "paramreg"} == {*study.CANDIDATES, study.RECIPE}
    assert {r["setting"] for r in rows if r["method"] == "paramreg" and r["task"] in study.HELD_OUT} == {study.RECIPE}
    for task in study.TASKS:
        assert len({r["steps"] for r in rows if r["task"] == task}) == 1  # the same budget for every method
    pruned = [r for r in rows if r["level"]]
    assert max(abs(float(r["sparsity"]) - float(r["level"])) for r in pruned) <= 0.01
    assert (tmp_path / "summary.md").read_text() == study.summary_markdown(rows)
    # the L1 candidates run an L1 target, whatever the library's default target is
    val = {(r["task"], r["setting"], r["level"], r["seed"]): r["val"] for r in rows if r["method"] == "paramreg"}
    assert any(v != val[(t, s.replace("l1/", "l0/", 1), level, seed)] for (t, s, level, seed), v in val.items() if s.startswith("l1/"))
    # --seeds runs those seeds again and keeps every other row: a run is a function of its seed
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "study_tasks.py"), "--quick", "--out", str(tmp_path),
                           "--tasks", "digits-cnn", "--methods", "one-shot", "--seeds", "1", "--workers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    again = study.read_csv(tmp_path / "results.csv")

    def key(r):
        return tuple(r[f] for f in study.FIELDS if f != "seconds")

    rerun = [r for r in again if r["task"] == "digits-cnn" and r["method"] in ("dense", "one-shot") and r["seed"] == "1"]
    assert len(rerun) == 1 + len(study.LEVELS) * len(study.ONE_SHOT_AT)
    assert sorted(map(key, again)) == sorted(map(key, rows))  # the rerun rows equal, every other row as it was
    assert [r for r in again if r not in rerun] == [r for r in rows if key(r) not in set(map(key, rerun))]


def test_the_rule_ranks_candidates_on_validation_in_each_task_and_level():
    """default_candidate: mean rank over task-level cells, each ranked by the mean validation metric
    over seeds, the task's direction respected (accuracy up, bits down); ties to the earlier."""
    study = _tasks_study()
    first, second = study.CANDIDATES[:2]

    def rows(task, values):
        return [{"task": task, "method": "paramreg", "setting": c, "level": 0.9, "seed": seed, "val": v, "test": v,
                 "sparsity": 0.9} for c, v in values.items() for seed in (0, 1)]

    others = {c: 0.5 for c in study.CANDIDATES[2:]}
    accuracy = rows("digits-cnn", {first: 0.97, second: 0.98, **others})  # higher is better: second first
    bits = rows("python-transformer", {first: 3.1, second: 3.0, **{c: 9.0 for c in others}})  # lower: second first
    assert study.default_candidate(accuracy + bits)[0] == second
    tied = rows("python-transformer", {first: 3.0, second: 3.0, **{c: 9.0 for c in others}})
    assert study.default_candidate(tied)[0] == first


def test_tasks_study_page_shows_the_committed_results_and_the_library_uses_its_default():
    """docs/sparsity-recipe.md's tables are the summary of the committed docs/study/tasks/results.csv,
    and the default the rule picks there is what attach(..., sparsity=s, total_steps=T) does."""
    import paramreg
    from paramreg.optim.targets import RECIPE_RAMP

    study = _tasks_study()
    rows = study.read_csv(ROOT / "docs" / "study" / "tasks" / "results.csv")
    page = (ROOT / "docs" / "sparsity-recipe.md").read_text()
    begin, end = study.MARKS["tables"]
    assert page.split(begin, 1)[1].split(end, 1)[0].strip() == study.summary_markdown(rows).strip()
    assert {r["task"] for r in rows} == set(study.TASKS) and {r["seed"] for r in rows} == {str(s) for s in study.SEEDS}
    reg, allocation, window, regrowth = study.default_candidate(study.normalized(rows))[0].split("/")
    assert tuple(float(f) for f in window.split("-")) == RECIPE_RAMP
    model = study.SmallCNN()
    paramreg.attach(model, "conv1.weight", sparsity=0.5, total_steps=800)
    carrier = model.conv1.parametrizations.weight[0]
    assert type(carrier.regularizer).__name__ == ("L1" if reg == "l1" else "L0")
    assert carrier.target.lookahead == (round(study.LOOKAHEAD * 800) if reg == "l0-ahead" else 0)  # budget/8 steps
    assert carrier.target.extrapolate == (float(reg.removeprefix("l0-extend")) if reg.startswith("l0-extend") else 0.0)
    assert carrier.target.allocation == allocation and carrier.target.keep_zeros
    assert carrier.target.regrow == (regrowth == "regrow")
