"""What a model costs at inference: parameters, FLOPs and measured CPU latency, before and after."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import ParamregError

__all__ = ["Cost", "Comparison", "cost", "compare"]


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
    ``repeats`` timed forward passes (after 3 warm-up passes) for each batch size, on the inputs'
    device with torch's current thread count. Timings vary from run to run: compare models
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
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            counter = FlopCounterMode(display=False)
            with counter:
                model(*_batch(tuple(inputs), 1))
            latency = {}
            for size in sizes:
                x = _batch(tuple(inputs), size)
                for _ in range(3):
                    model(*x)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(*x)
                    times.append(time.perf_counter() - start)
                latency[size] = 1000 * statistics.median(times)
    finally:
        for m, flag in flags.items():
            m.training = flag
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
    """:func:`cost` of two models (e.g. before and after :func:`paramreg.shrink`), latencies
    measured alternately in one process so that their ratio is fair.

    Example:
        >>> import torch, paramreg
        >>> big, small = torch.nn.Linear(10, 8), torch.nn.Linear(10, 4)
        >>> print(paramreg.compare(big, small, torch.randn(1, 10), batch_sizes=()))
                          before  after  before/after
        parameters            88     44         2.00x
        FLOPs per sample     160     80         2.00x
    """
    sizes = tuple(batch_sizes)
    b, a = cost(before, example_inputs, repeats=repeats), cost(after, example_inputs, repeats=repeats)
    lb, la = {}, {}
    for size in sizes:  # alternate the two models so that drift in the machine's load hits both
        lb[size] = cost(before, example_inputs, batch_sizes=(size,), repeats=repeats).latency_ms[size]
        la[size] = cost(after, example_inputs, batch_sizes=(size,), repeats=repeats).latency_ms[size]
    return Comparison(Cost(b.parameters, b.flops, lb), Cost(a.parameters, a.flops, la))
