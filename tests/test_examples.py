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


def test_study_smoke_run(tmp_path):
    """--quick runs every method end to end and writes the CSV, the summary and the three plots."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "study_digits.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    study = _study()
    rows = study.read_csv(tmp_path / "results.csv")
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
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "study_text.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    study = _text_study()
    rows = study.read_csv(tmp_path / "results.csv")
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
