"""Every ```python block in docs/ (and its subfolders) runs as written (each page in order, in one namespace), and the
command lines shown for `python -m paramreg` work on the files the page made."""

import pathlib
import re
import subprocess
import sys
import warnings

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            exec(compile(block, str(page), "exec"), namespace)
    for line in re.findall(r"^python -m paramreg (report \S+)", page.read_text(), flags=re.M):
        assert (tmp_path / line.split()[1]).exists(), f"the page's snippets did not make {line.split()[1]}"
        done = subprocess.run([sys.executable, "-m", "paramreg", *line.split()], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "total" in done.stdout
