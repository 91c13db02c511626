"""The layout of docs/design.md holds: the folders import only along the allowed arrows, every
module names its concern, and every "Note [X] in <file>" points at a file that has that Note."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "paramreg"

# folder -> the folders its modules may import (besides their own and the root's errors.py);
# the same table is in docs/design.md, "Layout"
ALLOWED = {
    "catalogue": set(),
    "modules": {"catalogue"},
    "optim": {"catalogue", "modules"},
    "lifecycle": {"catalogue", "modules", "optim"},
    "tools": {"catalogue", "modules", "optim", "lifecycle"},
}


def modules_of(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


def imported_folders(path: Path) -> set[str]:
    """The paramreg folders (or root modules) that ``path`` imports, by reading its imports."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parts[:-1]  # ("optim",) for optim/hooks.py
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # "from . import x" at the root
                    parts = [alias.name for alias in node.names]
            elif node.module and node.module.split(".")[0] == "paramreg":
                parts = node.module.split(".")[1:]
            else:
                continue
            if not parts:
                parts = [alias.name for alias in node.names]
            found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "paramreg":
                    found.add(alias.name.split(".")[1] if "." in alias.name else "paramreg")
    return found


def test_every_module_is_in_a_folder_of_the_layout():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(ALLOWED)
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py", "errors.py"]


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folders_import_only_along_the_allowed_arrows(folder):
    for path in modules_of(folder):
        used = imported_folders(path) - {folder, "errors"}
        assert used <= ALLOWED[folder], f"{path.relative_to(PACKAGE)} imports {sorted(used - ALLOWED[folder])}"


def test_the_math_imports_nothing_of_the_mechanism():
    for path in modules_of("catalogue"):
        assert imported_folders(path) <= {"catalogue", "errors"}, path.name
        assert "torch.nn.utils.parametrize" not in path.read_text() and "torch.optim" not in path.read_text(), path.name


def test_every_module_names_its_concern_in_its_first_docstring_line():
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{path.relative_to(PACKAGE)} has no docstring naming its concern"


def note_definitions() -> dict[Path, set[str]]:
    """file -> the Notes it defines (a line that starts with ``Note [X]``, in a docstring or a comment)."""
    defined = {}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        defined[path] = set(re.findall(r"^\s*(?:#\s*)?(?:\"\"\")?Note \[([^\]]+)\]\s*$", text, flags=re.M))
    return defined


REFERENCE = re.compile(r"Note \[([^\]]+)\]\s+in\s+(?::mod:)?`*([\w./]*\w)`*(?=[\s),.;:`]|$)")


def referenced_file(name: str) -> Path:
    """``optim/state.py``, ``paramreg/optim/state.py`` or ``paramreg.optim.state``: the file."""
    if name.endswith(".py"):
        name = name.removeprefix("src/").removeprefix("paramreg/")
        return PACKAGE / name
    parts = name.split(".")
    if parts[0] == "paramreg":
        parts = parts[1:]
    return PACKAGE.joinpath(*parts).with_suffix(".py")


def test_every_note_reference_points_at_a_file_that_has_the_note():
    defined = note_definitions()
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md", *(ROOT / "tests").glob("*.py"),
               *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py")]
    checked = 0
    for source in sources:
        text = " ".join(source.read_text().split())  # references wrap across lines
        for note, where in REFERENCE.findall(text):
            target = referenced_file(where)
            assert target.exists(), f"{source.relative_to(ROOT)}: Note [{note}] in {where}: no such file"
            assert note in defined[target], f"{source.relative_to(ROOT)}: Note [{note}] is not in {where}"
            checked += 1
    assert checked > 20  # the references are found at all


def test_every_note_is_defined_once():
    seen: dict[str, Path] = {}
    for path, notes in note_definitions().items():
        for note in notes:
            assert note not in seen, f"Note [{note}] is defined in {seen[note].name} and {path.name}"
            seen[note] = path


def test_design_page_lists_every_module():
    design = (ROOT / "docs" / "design.md").read_text()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        name = str(path.relative_to(PACKAGE))
        assert f"`{name}`" in design, f"docs/design.md does not list {name}"
