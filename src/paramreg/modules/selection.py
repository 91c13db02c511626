"""Selection: which tensors a call applies to. One rule, used by every function that takes targets.

A target is

- a shell-style pattern matched against the full canonical dotted name with
  ``fnmatch.fnmatchcase`` (``*`` also matches dots: ``"*.weight"`` is every weight,
  ``"conv*.weight"`` matches ``conv1.weight``);
- ``"re:<regex>"``: the regular expression must match the whole name (``re.fullmatch``);
- a callable ``(name, tensor) -> bool``;
- or a list/tuple of these (their union).

Names are always those of the plain model (``conv1.weight``), also while paramreg or the user
has parametrizations attached.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Callable, Sequence

from torch import nn

from .walk import Slot, slots
from ..errors import ParamregError

__all__ = ["select"]


def _predicates(targets, role: str) -> list[tuple[object, Callable[[str, Slot], bool]]]:
    """Turn a target specification into (pattern, predicate) pairs, checking its form."""
    items = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    if not items:
        raise ParamregError(f"{role} is an empty list; give at least one pattern such as '*.weight'")
    out = []
    for item in items:
        if isinstance(item, str):
            if item.startswith("re:"):
                try:
                    regex = re.compile(item[3:])
                except re.error as e:
                    raise ParamregError(f"{role} pattern {item!r} is not a valid regular expression: {e}") from None
                out.append((item, lambda name, s, r=regex: r.fullmatch(name) is not None))
            else:
                out.append((item, lambda name, s, p=item: fnmatch.fnmatchcase(name, p)))
        elif callable(item):
            out.append((item, lambda name, s, f=item: bool(f(name, s.value()))))
        else:
            raise ParamregError(
                f"{role} must be a pattern string, 're:<regex>', a callable (name, tensor) -> bool, "
                f"or a list of these; got {item!r} ({type(item).__name__})"
            )
    return out


def _first_match(pred, slot: Slot) -> Slot | None:
    """``slot`` if its name matches, else the first tied alias whose name matches (for an
    unattached tensor, so that attach goes where the user pointed), else None."""
    if pred(slot.name, slot):
        return slot
    for alias in slot.aliases:
        if pred(alias.name, slot):
            return slot if slot.carrier is not None else alias
    return None


def _closest(pattern: str, names: Sequence[str]) -> str:
    stem = pattern[3:] if pattern.startswith("re:") else pattern
    close = difflib.get_close_matches(stem, names, n=5, cutoff=0.4) or list(names[:5])
    more = ", ..." if len(names) > len(close) else ""
    return ", ".join(repr(n) for n in close) + more


def resolve(model: nn.Module, targets, exclude=None) -> list[Slot]:
    """The slots of ``model`` selected by ``targets`` minus ``exclude``, in model order.

    Raises ParamregError when a string pattern in ``targets`` matches no parameter (listing the
    closest real names) or when nothing is left; warns when an ``exclude`` pattern excluded nothing.
    """
    everything = slots(model)
    names = [s.name for s in everything]
    # Which name of each tensor matched: its own, or one of its tied aliases (attach goes there).
    matched: list[Slot | None] = [None] * len(everything)
    for pattern, pred in _predicates(targets, "targets"):
        hits = [_first_match(pred, s) for s in everything]
        if isinstance(pattern, str) and not any(hits):
            raise ParamregError(
                f"targets pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                f"closest names: {_closest(pattern, names)}. Patterns match canonical names such as "
                f"'conv1.weight'; paramreg.select(model, pattern) shows what a pattern selects"
            )
        matched = [m or h for m, h in zip(matched, hits, strict=True)]
    if exclude is not None:
        for pattern, pred in _predicates(exclude, "exclude"):
            hits = [m is not None and _first_match(pred, s) is not None for m, s in zip(matched, everything, strict=True)]
            if not any(hits):
                warnings.warn(f"exclude pattern {pattern!r} excluded nothing", stacklevel=3)
            matched = [None if h else m for m, h in zip(matched, hits, strict=True)]
    picked = [m for m in matched if m is not None]
    if not picked:
        raise ParamregError(
            f"targets {targets!r} with exclude {exclude!r} select no parameter of {type(model).__name__}; "
            f"its parameters include {_closest('', names)}"
        )
    return picked


def select(model: nn.Module, targets, exclude=None) -> list[str]:
    r"""Dry run: the canonical names that ``targets`` minus ``exclude`` select, in model order.

    Uses the same rule as :func:`paramreg.attach` and :func:`paramreg.remove` (see
    :mod:`paramreg.modules.selection`).

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> paramreg.select(model, "*.weight")
        ['0.weight', '2.weight']
        >>> paramreg.select(model, r"re:[02]\.(weight|bias)", exclude="2.bias")
        ['0.weight', '0.bias', '2.weight']
    """
    return [s.name for s in resolve(model, targets, exclude)]
