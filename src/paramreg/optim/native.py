"""The native kernels: a target's one selection pass, its held zeros and the gradient's norm, as hand-written C built at first use and called through ctypes.

Note [Native selection]
    The one pass of Note [Selection that zeroes] in optim/applying.py computes each weight's L0
    score, counts the scores below lo and below hi, and keeps the flat indices and values of the
    entries the map may zero (weights other than +0.0 that score below lo) and of the scores in
    [lo, hi). Its compiled kernel (``fused._marked``) writes a block of marks that numpy then
    searches, and inductor emits it as two loops that each compute the score (its counts, its
    stores), so the pass took twice its reads' time and numpy's search added to it (25M weights
    at 25.7% zero: 36.1 ms of a ramp step, numpy's 10.9 of it, against 15.9 for the ``l1=``
    map; the native pass 14.9: the table of ``benchmarks/ramp_parts.py`` in docs/at-scale.md).
    ``native.c`` does it
    in one loop: the score of 16 weights at once (AVX-512, where the machine has it), the kept
    entries compressed straight into an index and a value array, each thread over its own
    contiguous range with its own arrays (so the indices come out in increasing order, as
    numpy's search gives them), one call per tensor. Elsewhere, per 256 weights, a vectorized
    loop computes the scores; then, with AVX2, 8 at a time, their counts and the kept ones
    packed by a permutation looked up from the 8-bit mask of the kept lanes (AVX2 has no
    compress) and stored whole, at the count kept so far, with no branch; without it (or
    with ``-DPARAMREG_PORTABLE``), a vectorized loop takes the counts and a code per weight, and
    the kept entries are looked for 8 codes at a time (all 0: passed over; else 8 whole
    stores). Every loop is written without control flow (the zeros' masks are taken on the
    bits), so that gcc vectorizes it for AVX2 as well. On an AMD EPYC (Zen 3, no AVX-512) the
    hold and the extended scores had first been left scalar (the pass took 143.6 ms of a 25M
    ramp step against 57.8 for inductor's kernel; 25.8 since, docs/at-scale.md), and then
    each kept entry cost about as much as 40 weights that were not kept (a branch per 8
    codes that the machine mispredicted, then stores that each waited for the count): at a
    steep ramp's first steps, about 2.5% of the weights kept, the passes took 43.0 ms of a 25M
    ramp step, 31.4 with the permutation (``benchmarks/ramp_parts.py --ramp-steps 140 --ramp-at 0``;
    docs/at-scale.md).

    Each thread's arrays are allocated for the call, with room for twice the entries the most
    filled thread kept in the last pass over the same tensor (``ROOM`` at least; 1/32 of a
    thread's range before the first), at most ``cap``. A thread that keeps more than its room
    still counts them, so the pass is run again with room for exactly that many, at most
    ``cap`` (past it the counts alone). A ramp keeps a few percent of the weights, fewer from
    step to step, so the second run is rare (the ramp's first step, at most), and the pass
    allocates about 24 bytes for each entry it keeps, where room for ``cap`` on every thread
    was 12·``cap`` bytes a thread (96 MB over 25M weights on 2 threads) whatever it kept.

    It rounds every operation as the compiled kernels do (the same operations in the same order,
    IEEE single precision, built with ``-ffp-contract=off``, so no contraction into FMA), so it
    keeps the same entries with the same values, bit for bit (``tests/test_native.py`` against
    ``fused._marked``: zeros of both signs, denormals, infinities and NaN, each form of point).

Note [Native hold]
    The held zeros' pre-step pass (Note [Held zeros, fused] in optim/fused.py) reads every
    gradient, and a target's step then read it once more for the safeguard's floor F = c·‖g‖₂
    (Note [Safeguarded metric] in optim/step_sizes.py, by a dot product: 4.4 ms of a 25M-weight
    ramp step on this machine's 2 cores, the same table). ``paramreg_hold`` sets the gradient and the momentum to
    +0.0 where the weight is 0 (what ``masked_fill_`` writes) and sums the held gradient's squares
    in the same loop, and ``fused._floor`` takes that sum for as long as the gradient is not
    written again (its version counter): the floor costs no read of its own. Every float32 floor
    is then this sum (``paramreg_squares`` where no hold took it), whether or not the fused maps
    are enabled, so that the fused and the eager path still rank the same values: in chunks of
    4096 elements, each chunk in 64 float32 lanes that each add their squares in order, the
    lanes and then the chunks added in order in float64, so the same bits whatever the number of
    threads and however the compiler vectorizes it (``tests/test_native.py``: against that order
    in numpy, on 1, 2 and 3 threads). The floor differs from a dot product's in its last bits,
    so ``enabled`` can move a weight whose score lies within those bits of a target's
    threshold; either way the selection and the map take the same floor. The pass's sum is taken
    once, by the floor of the step that follows, and only while the gradient's version counter
    has not moved: a write through ``g.data`` or through numpy between the pre-step hook and the
    end of the step does not move it, and the floor would then be the held gradient's.

Note [Native build]
    The kernels are built once per process with the C compiler found (``$CC``, split as a shell
    would, else ``cc``, ``gcc`` or ``clang``) into a temporary directory, with ``-march=native``
    and OpenMP where the compiler takes them and the library then loads (a build without OpenMP
    runs on one thread), and loaded with ctypes, which releases the GIL while they run. They take
    plain contiguous float32 CPU tensors only (anything else takes the compiled kernels). Where no
    build succeeds (no compiler, no temporary directory, a library that does not load), a warning
    says why, once, and the compiled kernels run (the selection's with numpy's search, the floors
    by a dot product), as they do with ``enabled = False``. Their OpenMP runtime is the one torch
    loaded where the two share a name (``libgomp.so.1`` here); a torch whose bundled runtime is
    named otherwise loads a second.
"""

from __future__ import annotations

import ctypes
import os
import shlex
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

__all__ = ["enabled", "build_flags", "select", "split", "hold", "squares", "available"]

#: False: the compiled kernels run instead (Notes [Native selection] and [Native hold]).
enabled = True
#: The flags the library was built with (None before the first build; () where every build failed).
build_flags: tuple[str, ...] | None = None

_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing")
_CHOICES = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())  # tried in order
_MODES = {"": 0, "_extended": 1, "_ahead": 2}  # the points' kind (fused.points_of) -> the C mode
_lock = threading.Lock()
_library = None


class _Counts(ctypes.Structure):
    _fields_ = [("below", ctypes.c_int64), ("under", ctypes.c_int64), ("marked", ctypes.c_int64), ("kept", ctypes.c_int64)]


def available(defines: tuple[str, ...] = ()) -> bool:
    """Whether the native kernels run here (``enabled``, and built: the first call builds them)."""
    return enabled and _load(defines) is not None


def _load(defines: tuple[str, ...] = ()):
    """The loaded library (built at the first call; ``defines``: extra ``-D`` flags, for the tests'
    portable build, each set built once), or None where no build succeeded (Note [Native build])."""
    global _library, build_flags
    if not defines and _library is not None:
        return _library or None
    with _lock:
        if defines in _others:
            return _others[defines]
        if not defines and _library is not None:
            return _library or None
        errors: list[str] = []
        try:
            library, flags, _ = _build(defines, errors)
        except Exception as e:  # no temporary directory, no source installed, a library that does not load
            library, flags = None, ()
            errors.append(f"{type(e).__name__}: {e}")
        if defines:
            _others[defines] = library
            return library
        if library is None:
            warnings.warn(f"paramreg: the native kernels could not be built ({errors[-1] if errors else 'no C compiler found'}); "
                          "the compiled kernels run instead (the selection's with numpy's search).", stacklevel=4)
        _library, build_flags = (library if library is not None else False), flags
        return library


_others: dict = {}  # defines -> the library built with them (the tests' portable build)


def _build(defines: tuple[str, ...], errors: list[str]):
    """(the library, its flags, the compiler's command) from the first of ``_CHOICES`` that builds
    and loads; the library None where none does (``errors`` says why)."""
    source = resources.files(__package__).joinpath("native.c").read_text()
    named = os.environ.get("CC")
    compiler = shlex.split(named) if named else next(([c] for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not compiler:
        return None, (), None
    with tempfile.TemporaryDirectory(prefix="paramreg-") as folder:
        path = os.path.join(folder, "native.c")
        with open(path, "w") as f:
            f.write(source)
        for k, choice in enumerate(_CHOICES):
            out = os.path.join(folder, f"native{k}.so")
            command = [*compiler, *_FLAGS, *choice, *(f"-D{d}" for d in defines), path, "-o", out]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:  # the compiler named is not there, or hangs
                errors.append(f"{type(e).__name__}: {e}")
                break
            if done.returncode != 0:
                errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
                continue
            try:
                library = ctypes.CDLL(out)  # loaded: the file may go
            except OSError as e:  # e.g. its OpenMP runtime not found: the next choice
                errors.append(f"{type(e).__name__}: {e}")
                continue
            library.paramreg_select.restype = None
            library.paramreg_select.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_float] * 6
                                                + [ctypes.c_int] * 2 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                                        ctypes.POINTER(_Counts), ctypes.c_int])
            for name in ("paramreg_hold", "paramreg_squares"):
                getattr(library, name).restype = ctypes.c_double
            library.paramreg_hold.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            library.paramreg_squares.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            library.paramreg_split.restype = ctypes.c_int64
            library.paramreg_split.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3
            library.threaded = "-fopenmp" in choice
            return library, choice, compiler
    return None, (), compiler


def _takes(*tensors: Tensor | None) -> bool:
    """Whether the kernels take these tensors: plain contiguous float32 CPU tensors of one size."""
    first = tensors[0]
    return all(t is None or (type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32
                             and t.is_contiguous() and t.numel() == first.numel()) for t in tensors)


#: The least room a thread's arrays get (entries; Note [Native selection]).
ROOM = 1 << 14
# tensor -> the most entries one thread kept in the last pass over it that kept its new zeros (weak)
_kept = WeakIdKeyDictionary()


def select(kind: str, w: Tensor, v: Tensor, x: Tensor | None, floor: float, scale: float, shift: float, factor: float,
           lo: float, hi: float, cap: int, keep_fresh: bool = True, library=None):
    """The pass of Note [Native selection] over the float32 contiguous CPU tensor ``w`` with the
    second moment ``v`` and, for the points' ``kind`` ("_extended", "_ahead"), the tensor ``x``
    (the origin, the first moment) and ``factor``: ((scores below lo, below hi, entries counted
    as kept), their flat indices (int64), their values (float32: −1 for a weight the map zeroes
    at any strength from lo, else its score in [lo, hi))), with at most ``cap`` entries kept per
    thread's range: past them, the counts alone and None for the indices and values. With
    ``keep_fresh`` False only the scores in [lo, hi) are kept and counted. None where the
    library is not built or the tensors are not float32 contiguous CPU tensors of one size. Each
    thread's room is guessed, and the pass run again where a thread kept more (Note [Native
    selection])."""
    library = library or (_load() if enabled else None)
    if library is None or (kind and x is None) or not _takes(w, v, x):
        return None
    threads = _threads(library)
    n = w.numel()
    cap = max(0, min(cap, -(-n // threads) + 16))
    last = _kept.get(w) if keep_fresh else None
    room = min(cap, max(ROOM, -(-n // threads) // 32 if last is None else 2 * last))
    while True:
        idx = torch.empty(threads * (room + 16), dtype=torch.int64)  # per thread: the last 16 taken by whole vector stores
        val = torch.empty(threads * (room + 16), dtype=torch.float32)
        counts = (_Counts * threads)()
        library.paramreg_select(w.data_ptr(), v.data_ptr(), 0 if x is None else x.data_ptr(), n, floor, scale, shift, factor,
                                lo, hi, _MODES[kind], int(keep_fresh), idx.data_ptr(), val.data_ptr(), room, counts, threads)
        most = max(c.kept for c in counts)
        if keep_fresh:
            _kept[w] = most
        if most <= room or most > cap:
            break
        room = most  # a range past its guessed room: again, with room for what it kept
    total = [sum(c.below for c in counts), sum(c.under for c in counts), sum(c.marked for c in counts)]
    if most > room:  # a range past its room: what it wrote is not a prefix of what it kept
        return total, None, None
    room += 16
    parts = [(t * room, c.kept) for t, c in enumerate(counts)]
    indices = numpy.concatenate([idx.numpy()[s:s + k] for s, k in parts])
    values = numpy.concatenate([val.numpy()[s:s + k] for s, k in parts])
    return total, indices, values


def split(indices: numpy.ndarray, values: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray] | None:
    """The entries a pass kept (int64 ``indices``, float32 ``values``, in order) parted in one
    loop: (the indices whose value is not >= 0, the new zeros; the others' indices; their
    values), as ``indices[~(values >= 0)]``, ``indices[values >= 0]`` and ``values[values >= 0]``
    part them (numpy's masks took 8.5 ms over 550,000 entries here, ad hoc); None where the
    library is not built."""
    library = _load() if enabled else None
    if library is None:
        return None
    indices = numpy.ascontiguousarray(indices, dtype=numpy.int64)
    values = numpy.ascontiguousarray(values, dtype=numpy.float32)
    n = len(values)
    k = int(numpy.count_nonzero(values >= 0))  # each side's size, and one entry more (the loop writes both sides)
    fresh, at, inside = numpy.empty(n - k + 1, numpy.int64), numpy.empty(k + 1, numpy.int64), numpy.empty(k + 1, numpy.float32)
    f = library.paramreg_split(indices.ctypes.data, values.ctypes.data, n, fresh.ctypes.data, at.ctypes.data, inside.ctypes.data)
    assert f == n - k
    return fresh[:f], at[:k], inside[:k]


_CHUNK = 4096  # SQUARES_CHUNK in native.c
# gradient -> (its version when the held zeros' pass summed it, the sum of its squares), by identity
# (weak: nothing kept alive); taken once, by the floor of the step that follows (squares)
_squares = WeakIdKeyDictionary()


def _threads(library) -> int:
    return max(1, torch.get_num_threads()) if library.threaded else 1


def hold(w: Tensor, g: Tensor, m: Tensor | None) -> bool:
    """Before a step: ``g`` and ``m`` (None: none) set to +0.0 where ``w`` is 0 (Note [Native
    hold]), their version counters advanced, the held gradient's sum of squares kept for
    :func:`squares`; False (nothing written) where the library is not built or the tensors are
    not float32 contiguous CPU tensors of one size."""
    library = _load() if enabled else None
    if library is None or not _takes(w, g, m):
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
    """The sum of squares of the float32 contiguous CPU tensor ``g`` as Note [Native hold] sums it:
    the held zeros' pass's, once, where it took it and ``g``'s version counter has not moved
    since (a write through ``g.data`` or numpy does not move it: Note [Native hold]), else summed
    now; None where the library is not built or ``g`` is not such a tensor."""
    library = _load() if enabled else None
    if library is None or not _takes(g):
        return None
    kept = _squares.pop(g, None)
    if kept is not None and kept[0] == g._version:
        return kept[1]
    n = g.numel()
    partials = torch.empty(max(1, -(-n // _CHUNK)), dtype=torch.float64)
    return library.paramreg_squares(g.data_ptr(), n, partials.data_ptr(), _threads(library))
