"""Every ```python block of the README runs as written and prints what the README shows, and the
quick start is two lines."""

import pathlib
import re

from markdown_outputs import run_page, same_output

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_and_print_what_it_shows(tmp_path, monkeypatch):
    assert "```python" in README.read_text(), "the README has an example"
    monkeypatch.chdir(tmp_path)  # the example saves a file
    shown, namespace = run_page(README)
    assert shown, "the README shows what its example prints"
    for s in shown:
        difference = same_output(s.expected, s.actual)
        assert difference is None, f"README.md:{s.line}: {difference} (python tests/markdown_outputs.py README.md rewrites it)"
    assert (tmp_path / "model.pt").exists()
    # what the README says the example prints
    first = namespace["model"][0].weight
    assert type(namespace["model"][0]).__name__ == "Linear"
    assert 0.4 < float((first == 0).float().mean()) < 0.8
    assert (first[:, 10:] == 0).float().mean() > (first[:, :10] == 0).float().mean()


def test_quick_start_is_two_lines_demo_then_tests():
    section = README.read_text().split("## Quick start", 1)[1]
    lines = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    assert len(lines) == 2
    assert "examples/quickstart.py" in lines[0] and "pytest" in lines[1]


def test_shown_outputs_are_compared_word_for_word_and_numbers_within_two_percent():
    shown = "name  zeros  penalty\n0.weight  1221  1.207\ntotal (4)  1320  2.241\n"
    assert same_output(shown, shown.replace("  1.207", "   1.21")) is None  # rounding and alignment
    assert same_output(shown, shown.replace("1221", "1230")) is None  # 0.7%
    assert "line 2" in same_output(shown, shown.replace("1.207", "0.1242"))
    assert "line 2" in same_output(shown, shown.replace("0.weight", "1.weight"))
    assert "line 3" in same_output(shown, shown.replace("total", "sum"))
    assert "lines printed" in same_output(shown, shown + "extra\n")
