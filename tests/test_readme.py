"""Every ```python block of the README runs as written, and the quick start is two lines."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has an example"
    monkeypatch.chdir(tmp_path)  # the example saves a file
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
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
