"""Run the ```python blocks of a Markdown page and compare what they print with what the page shows.

A page shows a printed output as a plain fenced block (```` ``` ```` or ```` ```text ````) right after
a ```python block, with the word "prints" in the prose between them. :func:`run_page` runs the
page's python blocks in order, in one namespace, each with its stdout captured, and returns one
:class:`Shown` per such output block, with what the block before it really printed.

    python tests/markdown_outputs.py README.md docs/index.md   # rewrite the shown outputs from a run

Numbers are compared with a relative tolerance of 2% (:func:`same_output`): the shown outputs come
from float32 training runs, and another CPU (another BLAS, other vector units) rounds sums in
another order, which can move a printed count or penalty by a few units in its last digits; every
word, name and the number of lines must match exactly.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import sys
import warnings
from dataclasses import dataclass

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
RTOL = 0.02


@dataclass
class Shown:
    page: pathlib.Path
    line: int  # where the shown output's fence opens
    expected: str  # what the page shows
    actual: str  # what the python block before it printed
    span: tuple[int, int]  # the shown text's offsets in the page


def run_page(page: pathlib.Path) -> tuple[list[Shown], dict]:
    """Execute the page's python blocks (in the current working directory) and pair each shown
    output with its block's stdout; also return the namespace the blocks ran in."""
    text = page.read_text()
    namespace: dict = {}
    shown: list[Shown] = []
    last_python: str | None = None  # stdout of the python block just before, if the previous block was python
    previous_end = 0
    for m in FENCE.finditer(text):
        lang, body = m.group(1), m.group(2)
        prose = text[previous_end : m.start()]
        if lang == "python":
            out = io.StringIO()
            with warnings.catch_warnings(), contextlib.redirect_stdout(out):
                warnings.simplefilter("ignore")
                exec(compile(body, str(page), "exec"), namespace)
            last_python = out.getvalue()
        elif lang in ("", "text") and last_python is not None and re.search(r"\bprints\b", prose):
            shown.append(Shown(page, text.count("\n", 0, m.start()) + 1, body, last_python, (m.start(2), m.end(2))))
            last_python = None
        else:
            last_python = None
        previous_end = m.end()
    return shown, namespace


def _numbers_and_words(line: str) -> tuple[list[float], str]:
    numbers = [float(x) for x in NUMBER.findall(line)]
    words = " ".join(NUMBER.sub("#", line).split())
    return numbers, words


def same_output(expected: str, actual: str, rtol: float = RTOL) -> str | None:
    """None if ``actual`` prints what ``expected`` shows (numbers within ``rtol``), else the first difference."""
    want, got = expected.rstrip("\n").splitlines(), actual.rstrip("\n").splitlines()
    if len(want) != len(got):
        return f"{len(got)} lines printed, {len(want)} shown"
    for i, (w, g) in enumerate(zip(want, got, strict=True), 1):
        (wn, ww), (gn, gw) = _numbers_and_words(w), _numbers_and_words(g)
        if ww != gw or len(wn) != len(gn) or any(abs(a - b) > rtol * max(abs(a), abs(b)) for a, b in zip(wn, gn, strict=True)):
            return f"line {i}: shown {w!r}, printed {g!r}"
    return None


def update(page: pathlib.Path) -> int:
    """Rewrite each shown output of ``page`` with what its block prints now; return how many changed."""
    shown, _ = run_page(page)
    text = page.read_text()
    changed = 0
    for s in reversed(shown):
        if s.expected != s.actual:
            text = text[: s.span[0]] + s.actual + text[s.span[1] :]
            changed += 1
    page.write_text(text)
    return changed


if __name__ == "__main__":
    import os
    import tempfile

    pages = [pathlib.Path(p).resolve() for p in sys.argv[1:]]
    for p in pages:
        with tempfile.TemporaryDirectory() as d:  # the pages' snippets write files
            here = os.getcwd()
            os.chdir(d)
            try:
                n = update(p)
            finally:
                os.chdir(here)
        print(f"{p}: {n} shown output(s) rewritten")
