"""The native kernels: a target's one selection pass, its held zeros and the gradient's norm, as hand-written C built at first use and called through ctypes.

Note [Native selection]
    The one pass of Note [Selection that zeroes] in optim/applying.py computes each weight's L0
    score, counts the scores below lo and below hi, and keeps the flat indices and values of the
    entries the map may zero (weights other than +0.0 that score below lo) and of the scores in
    [lo, hi). Its compiled kernel (``fused._marked``) writes a block of marks that numpy then
    searches, and inductor emits it as two loops that each compute the score (its counts, its
    stores), so the pass took twice its reads' time and numpy's search added a third of it (25M
    weights at 25.7% zero: 50.2 ms a ramp step, of which numpy 13.5, against 17.1 for the
    ``l1=`` map's pass; benchmarks/ramp_parts.py, docs/at-scale.md). ``native.c`` does it
    in one loop: the score of 16 weights at once (AVX-512, where the machine has it; elsewhere a
    loop the compiler vectorizes over 256 weights, then a branch-free one that counts and writes
    the kept entries), the kept entries compressed straight into an index and a value array, each
    thread over its own contiguous range with its own arrays (so the indices come out in
    increasing order, as numpy's search gives them), one call per tensor.

    It rounds every operation as the compiled kernels do (the same operations in the same order,
    IEEE single precision, built with ``-ffp-contract=off``, so no contraction into FMA), so it
    keeps the same entries with the same values, bit for bit (``tests/test_native.py`` against
    ``fused._marked``: zeros of both signs, denormals, infinities and NaN, each form of point).

Note [Native hold]
    The held zeros' pre-step pass (Note [Held zeros, fused] in optim/fused.py) reads every
    gradient, and a target's step then read it once more for the safeguard's floor F = c·‖g‖₂
    (Note [Safeguarded metric] in optim/step_sizes.py, by a dot product: 4.9 ms of a 25M-weight
    ramp step on this machine's 2 cores). ``paramreg_hold`` sets the gradient and the momentum to
    +0.0 where the weight is 0 (what ``masked_fill_`` writes) and sums the held gradient's squares
    in the same loop, and ``fused._floor`` takes that sum for as long as the gradient is not
    written again (its version counter): the floor costs no read of its own. Every float32 floor
    is then this sum (``paramreg_squares`` where no hold took it), whether or not the fused maps
    are enabled, so that the fused and the eager path still rank the same values: the sum of
    squares in float64, in chunks of 4096 elements, each chunk in 16 lanes that each add in
    order, the lanes and then the chunks added in order, so the same bits whatever the number of
    threads and however the compiler vectorizes it (``tests/test_native.py``: against that order
    in numpy, on 1 and 2 threads).

Note [Native build]
    The kernels are built once per process with the C compiler found (``$CC``, else ``cc``, ``gcc`` or
    ``clang``) into a temporary directory, with ``-march=native`` and OpenMP where the compiler
    takes them (a build without OpenMP runs on one thread), and loaded with ctypes, which releases
    the GIL while it runs. Where no build succeeds (no compiler), a warning says why, once, and
    the compiled kernel with numpy's search runs, as it does with ``enabled = False``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources

import numpy
import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["enabled", "build_flags", "select", "hold", "squares", "available"]

#: False: the compiled kernels run instead (Notes [Native selection] and [Native hold]).
enabled = True
#: The flags the library was built with (None before the first build; () where every build failed).
build_flags: tuple[str, ...] | None = None

_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno")
_CHOICES = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())  # tried in order
_MODES = {"": 0, "_extended": 1, "_ahead": 2}  # the points' kind (fused.points_of) -> the C mode
_lock = threading.Lock()
_library = None


class _Counts(ctypes.Structure):
    _fields_ = [("below", ctypes.c_int64), ("under", ctypes.c_int64), ("marked", ctypes.c_int64), ("kept", ctypes.c_int64)]


def available(defines: tuple[str, ...] = ()) -> bool:
    """Whether the native pass runs here (``enabled``, and built: the first call builds it)."""
    return enabled and _load(defines) is not None


def _load(defines: tuple[str, ...] = ()):
    """The loaded library (built at the first call; ``defines``: extra ``-D`` flags, for the tests'
    portable build), or None where no build succeeded."""
    global _library, build_flags
    if _library is not None and not defines:
        return _library or None
    with _lock:
        if _library is not None and not defines:
            return _library or None
        library, flags, errors = None, (), []
        source = resources.files(__package__).joinpath("native.c").read_text()
        compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
        with tempfile.TemporaryDirectory(prefix="paramreg-") as folder:
            path = os.path.join(folder, "native.c")
            with open(path, "w") as f:
                f.write(source)
            for choice in _CHOICES if compiler else ():
                out = os.path.join(folder, f"select{len(errors)}.so")
                command = [compiler, *_FLAGS, *choice, *(f"-D{d}" for d in defines), path, "-o", out]
                try:
                    done = subprocess.run(command, capture_output=True, text=True)
                except OSError as e:  # the compiler named is not there
                    errors.append(f"{type(e).__name__}: {e}")
                    break
                if done.returncode == 0:
                    library, flags = ctypes.CDLL(out), choice  # loaded: the file may go
                    break
                errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        if library is not None:
            library.paramreg_select.restype = None
            library.paramreg_select.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_float] * 6
                                                + [ctypes.c_int] * 2 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                                        ctypes.POINTER(_Counts), ctypes.c_int])
            for name in ("paramreg_hold", "paramreg_squares"):
                getattr(library, name).restype = ctypes.c_double
            library.paramreg_hold.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            library.paramreg_squares.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            library.threaded = "-fopenmp" in flags
        elif not defines:
            warnings.warn(f"paramreg: the native selection could not be built ({'no C compiler found' if not compiler else errors[-1]}); "
                          "the compiled kernel with numpy's search runs instead.", stacklevel=4)
        if defines:
            return library
        _library, build_flags = (library if library is not None else False), flags
        return library


def select(kind: str, w: Tensor, v: Tensor, x: Tensor | None, floor: float, scale: float, shift: float, factor: float,
           lo: float, hi: float, cap: int, keep_fresh: bool = True, library=None):
    """The pass of Note [Native selection] over the float32 contiguous CPU tensor ``w`` with the
    second moment ``v`` and, for the points' ``kind`` ("_extended", "_ahead"), the tensor ``x``
    (the origin, the first moment) and ``factor``: ((scores below lo, below hi, entries counted
    as kept), their flat indices (int64), their values (float32: −1 for a weight the map zeroes
    at any strength from lo, else its score in [lo, hi)), complete), with at most ``cap``
    entries written per thread (complete: none was left out). With ``keep_fresh`` False only the
    scores in [lo, hi) are kept and counted. None where the library is not built."""
    library = library or (_load() if enabled else None)
    if library is None:
        return None
    threads = _threads(library)
    n = w.numel()
    cap = max(0, min(cap, -(-n // threads) + 16))
    room = cap + 16  # per thread: the last 16 taken by whole vector stores
    idx = torch.empty(threads * room, dtype=torch.int64)
    val = torch.empty(threads * room, dtype=torch.float32)
    counts = (_Counts * threads)()
    library.paramreg_select(w.data_ptr(), v.data_ptr(), 0 if x is None else x.data_ptr(), n, floor, scale, shift, factor, lo, hi,
                            _MODES[kind], int(keep_fresh), idx.data_ptr(), val.data_ptr(), cap, counts, threads)
    parts = [(t * room, min(c.kept, cap)) for t, c in enumerate(counts)]
    indices = numpy.concatenate([idx.numpy()[s:s + k] for s, k in parts])
    values = numpy.concatenate([val.numpy()[s:s + k] for s, k in parts])
    total = [sum(c.below for c in counts), sum(c.under for c in counts), sum(c.marked for c in counts)]
    return total, indices, values, all(c.kept <= cap for c in counts)


_CHUNK = 4096  # SQUARES_CHUNK in native.c
# gradient -> (its version when summed, the sum of its squares), by identity (weak: nothing kept alive)
_squares = WeakIdKeyDictionary()


def _threads(library) -> int:
    return max(1, torch.get_num_threads()) if library.threaded else 1


def hold(w: Tensor, g: Tensor, m: Tensor | None) -> bool:
    """Before a step: ``g`` and ``m`` (None: none) set to +0.0 where ``w`` is 0 (Note [Native
    hold]), their version counters advanced, the held gradient's sum of squares kept for
    :func:`squares`; False (nothing written) where the library is not built. The caller checks
    that the tensors are plain, contiguous, float32, alike and on the CPU."""
    library = _load() if enabled else None
    if library is None:
        return False
    n = w.numel()
    partials = torch.empty(max(1, -(-n // _CHUNK)), dtype=torch.float64)
    total = library.paramreg_hold(w.data_ptr(), g.data_ptr(), 0 if m is None else m.data_ptr(), n, partials.data_ptr(),
                                  _threads(library))
    for t in (g,) if m is None else (g, m):
        torch.autograd.graph.increment_version(t)  # written through its data pointer
    _squares[g] = (g._version, total)
    return True


def squares(g: Tensor) -> float | None:
    """The sum of squares of the float32 contiguous CPU tensor ``g`` as Note [Native hold] sums it
    (the held zeros' pass's, where it took it and ``g`` was not written since); None where the
    library is not built."""
    kept = _squares.get(g)
    if kept is not None and kept[0] == g._version:
        return kept[1]
    library = _load() if enabled else None
    if library is None:
        return None
    n = g.numel()
    partials = torch.empty(max(1, -(-n // _CHUNK)), dtype=torch.float64)
    return library.paramreg_squares(g.data_ptr(), n, partials.data_ptr(), _threads(library))
