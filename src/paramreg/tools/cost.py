"""What a model costs at inference: parameters, FLOPs and measured CPU latency, before and after."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ParamregError

__all__ = ["Cost", "Comparison", "cost", "compare"]


class _eval:
    """Eval mode for the duration of a ``with`` block, each module's own flag restored after."""

    def __init__(self, *models: nn.Module):
        self.flags = {m: m.training for model in models for m in model.modules()}

    def __enter__(self):
        for m in self.flags:
            m.training = False

    def __exit__(self, *exc):
        for m, flag in self.flags.items():
            m.training = flag


def _times(models, inputs: tuple, repeats: int) -> list[list[float]]:
    """Milliseconds per forward pass of each model, after 3 warm-up passes, the models taking
    turns pass by pass so that changes in the machine's load hit all of them alike."""
    for m in models:
        for _ in range(3):
            m(*inputs)
    times = [[] for _ in models]
    for _ in range(repeats):
        for m, t in zip(models, times, strict=True):
            start = time.perf_counter()
            m(*inputs)
            t.append(1000 * (time.perf_counter() - start))
    return times


@dataclass(frozen=True)
class Cost:
    """Parameters, FLOPs per sample (``FlopCounterMode``; a multiply-add counts 2) and median
    latency in milliseconds per batch size (empty when not measured)."""

    parameters: int
    flops: int
    latency_ms: dict[int, float] = field(default_factory=dict)


def _batch(inputs: tuple, size: int) -> tuple:
    """The first sample of each input tensor repeated ``size`` times along dim 0."""
    return tuple(x[:1].expand(size, *x.shape[1:]).contiguous() if isinstance(x, Tensor) and x.dim() else x for x in inputs)


def cost(model: nn.Module, example_inputs, *, batch_sizes=(), repeats: int = 30) -> Cost:
    """Measure ``model`` in eval mode under ``torch.inference_mode``.

    FLOPs are counted on one sample (the first of each example input). Latency is the median of
    ``repeats`` timed forward passes (after 3 warm-up passes) for each batch size, the first
    sample repeated to that size, on the inputs' device with torch's current thread count. Timings vary from run to run: compare models
    measured in one process.

    Example:
        >>> import torch, paramreg
        >>> c = paramreg.cost(torch.nn.Linear(10, 5), torch.randn(1, 10))
        >>> c.parameters, c.flops
        (55, 100)
    """
    if not isinstance(model, nn.Module):
        raise ParamregError(f"cost: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ParamregError(f"cost: repeats must be an int >= 1, got {repeats!r}")
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    sizes = tuple(batch_sizes)
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ParamregError(f"cost: batch_sizes must be ints >= 1, got {batch_sizes!r}")
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    with _eval(model), torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(*_batch(tuple(inputs), 1))
        latency = {size: statistics.median(_times([model], _batch(tuple(inputs), size), repeats)[0]) for size in sizes}
    return Cost(parameters, int(counter.get_total_flops()), latency)


@dataclass(frozen=True)
class Comparison:
    """Two :class:`Cost` s; ``str()`` is a table with the ratio before/after."""

    before: Cost
    after: Cost

    def __str__(self) -> str:
        rows = [("parameters", self.before.parameters, self.after.parameters), ("FLOPs per sample", self.before.flops, self.after.flops)]
        for size in self.before.latency_ms:
            if size in self.after.latency_ms:
                rows.append((f"latency ms, batch {size}", self.before.latency_ms[size], self.after.latency_ms[size]))

        def fmt(v):
            return f"{v:,}" if isinstance(v, int) else f"{v:.3f}"

        table = [("", "before", "after", "before/after")] + [
            (name, fmt(b), fmt(a), f"{b / a:.2f}x" if a else "-") for name, b, a in rows
        ]
        widths = [max(len(r[i]) for r in table) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in table)

    __repr__ = __str__


def compare(before: nn.Module, after: nn.Module, example_inputs, *, batch_sizes=(1, 64), repeats: int = 30) -> Comparison:
    """:func:`cost` of two models (e.g. before and after :func:`paramreg.shrink`); the two models
    take turns forward pass by forward pass, so that their latency ratio is fair on a busy machine.

    Example:
        >>> import torch, paramreg
        >>> big, small = torch.nn.Linear(10, 8), torch.nn.Linear(10, 4)
        >>> print(paramreg.compare(big, small, torch.randn(1, 10), batch_sizes=()))
                          before  after  before/after
        parameters            88     44         2.00x
        FLOPs per sample     160     80         2.00x
    """
    sizes = tuple(batch_sizes)
    b = cost(before, example_inputs, repeats=repeats)
    a = cost(after, example_inputs, repeats=repeats)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    lb, la = {}, {}
    with _eval(before, after), torch.inference_mode():
        for size in sizes:
            tb, ta = _times([before, after], _batch(inputs, size), repeats)
            lb[size], la[size] = statistics.median(tb), statistics.median(ta)
    return Comparison(Cost(b.parameters, b.flops, lb), Cost(a.parameters, a.flops, la))
