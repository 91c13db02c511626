"""All or nothing: a change made of many steps is undone as a whole when one of them fails.

``attach``, ``attach_spec`` and ``attach_channels`` bind carriers one tensor at a time, after
validating every tensor; if a step still fails (an exception from torch, a keyboard interrupt),
what was already bound is unbound again in reverse order, so a failed call leaves no trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["all_or_nothing"]


@contextmanager
def all_or_nothing() -> Iterator[Callable[[Callable[[], None]], None]]:
    """A context whose ``undo(fn)`` records how to take back one step; on any exception (also
    ``KeyboardInterrupt``) the recorded steps are taken back, last first, and the exception goes on.

    >>> done = []
    >>> try:
    ...     with all_or_nothing() as undo:
    ...         for x in (1, 2, 3):
    ...             if x == 3:
    ...                 raise ValueError("third step failed")
    ...             done.append(x)
    ...             undo(lambda x=x: done.remove(x))
    ... except ValueError:
    ...     pass
    >>> done
    []
    """
    undos: list[Callable[[], None]] = []
    try:
        yield undos.append
    except BaseException:
        for fn in reversed(undos):
            fn()
        raise
