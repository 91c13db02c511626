"""Every ```python block in docs/ (and its subfolders) runs as written (each page in order, in one namespace), what a
page shows a block prints is what it prints (markdown_outputs.py), and the command lines shown for
`python -m paramreg` work on the files the page made."""

import pathlib
import re
import subprocess
import sys

import pytest

from markdown_outputs import run_page, same_output

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown, _ = run_page(page)
    for s in shown:
        difference = same_output(s.expected, s.actual)
        assert difference is None, f"{page.name}:{s.line}: {difference} (python tests/markdown_outputs.py {page} rewrites it)"
    for line in re.findall(r"^python -m paramreg (report \S+)", page.read_text(), flags=re.M):
        assert (tmp_path / line.split()[1]).exists(), f"the page's snippets did not make {line.split()[1]}"
        done = subprocess.run([sys.executable, "-m", "paramreg", *line.split()], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "total" in done.stdout


def test_api_reference_covers_every_public_name():
    import paramreg

    documented = re.findall(r"^::: paramreg\.(\w+)$", (DOCS / "api.md").read_text(), flags=re.M)
    assert sorted(set(paramreg.__all__) - set(documented)) == []
    assert sorted(set(documented) - set(paramreg.__all__)) == []  # and nothing that is not public
    assert len(documented) == len(set(documented))
