"""What both studies share: their CSV files and the table they keep in docs/study.md."""

import csv
import pathlib


def read_csv(path):
    """The rows of a results CSV, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_between(page: pathlib.Path, begin: str, end: str, text: str) -> None:
    """Replace what ``page`` holds between its marker comments ``begin`` and ``end`` with ``text``."""
    head, rest = page.read_text().split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{text}{end}{tail}")
