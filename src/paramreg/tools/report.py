"""Report: what is attached, how sparse it is, and what each penalty is worth right now."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..catalogue.base import Regularizer
from ..modules.walk import slots
from ..optim.step_sizes import whole

__all__ = ["Report", "Row", "TargetRow", "report", "tensor_report"]


@dataclass(frozen=True)
class Row:
    """One tensor: canonical name, shape, size, exact zeros, and its regularizer (if attached)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    regularizer: str | None  # repr of the regularizer, None if nothing is attached
    mode: str | None
    penalty: float | None  # R(w) at the current weights (whatever the mode), None if nothing is attached
    nonfinite: int = 0  # NaN and Inf entries: a diverged run, flagged in the table
    step: str | None = None  # the step policy the last optimizer step took ("adaptive(Adam)", "sgd(SGD)", "lr", ...)
    strength: float | None = None  # a sparsity target's current strength

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class TargetRow:
    """One sparsity target (``attach(..., sparsity=s, sparsity_steps=n)``) and where it stands."""

    names: tuple[str, ...]
    sparsity: float  # the fraction of zero groups asked after ``steps`` steps
    steps: int
    step: int  # optimizer steps taken so far
    asked: float  # the fraction the ramp asked at the last step
    reached: float  # the fraction of groups exactly zero now
    groups: int
    strength: float | None  # the strength of the last step
    unit: str = "groups"  # what a group is: "weights" (L1), "groups", "channels"

    def __str__(self) -> str:
        names = ", ".join(self.names[:3]) + (f" and {len(self.names) - 3} more" if len(self.names) > 3 else "")
        strength = "" if self.strength is None else f", strength {self.strength:.4g}"
        return (
            f"target: {self.sparsity:.1%} of {self.groups} {self.unit} zero by step {self.steps} ({names}): "
            f"step {self.step}, asked {self.asked:.1%}, reached {self.reached:.1%}{strength}"
        )


@dataclass(frozen=True)
class Report:
    """Rows and a total. ``str(report)`` is a table; iterating yields the rows; index by canonical
    name for one row; :meth:`to_dict` gives flat numbers for a logger."""

    rows: tuple[Row, ...]
    targets: tuple[TargetRow, ...] = ()

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.rows)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def penalty(self) -> float:
        return sum(r.penalty for r in self.rows if r.penalty is not None)

    @property
    def nonfinite(self) -> int:
        return sum(r.nonfinite for r in self.rows)

    def __getitem__(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"{name!r} is not in this report; it has {[r.name for r in self.rows][:8]}")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat numbers for a logger: ``"<name>/sparsity"``, ``"<name>/zeros"`` and, where a
        regularizer is attached, ``"<name>/penalty"`` per row, the same under ``"total/"``, and
        ``"target<i>/asked"``, ``"/reached"`` and ``"/strength"`` per sparsity target.

        Each value is a plain ``float`` or ``int``, which ``wandb.log``, TensorBoard's
        ``add_scalars`` and Lightning's ``self.log_dict`` take as they are.

        Example:
            >>> import torch, paramreg
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> with torch.no_grad():
            ...     _ = model.weight.copy_(torch.tensor([[0.0, -2.0]]))
            >>> _ = paramreg.attach(model, "weight", l1=0.5)
            >>> paramreg.report(model).to_dict(prefix="reg/")
            {'reg/weight/sparsity': 0.5, 'reg/weight/zeros': 1, 'reg/weight/penalty': 1.0, 'reg/total/sparsity': 0.5, 'reg/total/zeros': 1, 'reg/total/penalty': 1.0}
        """
        out: dict[str, float] = {}
        for r in self.rows:
            out[f"{prefix}{r.name}/sparsity"] = r.sparsity
            out[f"{prefix}{r.name}/zeros"] = r.zeros
            if r.penalty is not None:
                out[f"{prefix}{r.name}/penalty"] = r.penalty
        out[f"{prefix}total/sparsity"] = self.sparsity
        out[f"{prefix}total/zeros"] = self.zeros
        for i, t in enumerate(self.targets):  # each sparsity target: what was asked, reached, and its strength
            out[f"{prefix}target{i}/asked"] = t.asked
            out[f"{prefix}target{i}/reached"] = t.reached
            if t.strength is not None:
                out[f"{prefix}target{i}/strength"] = t.strength
        if any(r.penalty is not None for r in self.rows):
            out[f"{prefix}total/penalty"] = self.penalty
        return out

    def __str__(self) -> str:
        def fmt_penalty(p):
            return "-" if p is None else f"{p:.4g}"

        header = ("name", "shape", "numel", "zeros", "sparsity", "regularizer", "step", "penalty")
        body = [
            (
                r.name,
                "x".join(map(str, r.shape)) or "scalar",
                str(r.numel),
                str(r.zeros),
                f"{r.sparsity:.1%}",
                "-" if r.regularizer is None else f"{r.regularizer} [{r.mode}]",
                r.step or "-",
                fmt_penalty(r.penalty),
            )
            for r in self.rows
        ]
        has_penalty = any(r.penalty is not None for r in self.rows)
        total = (
            f"total ({len(self.rows)})",
            "",
            str(self.numel),
            str(self.zeros),
            f"{self.sparsity:.1%}",
            "",
            "",
            fmt_penalty(self.penalty if has_penalty else None),
        )
        table = [header, *body, total]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        right = {2, 3, 4, 7}

        def line(row):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [line(header), rule, *map(line, body), rule, line(total)]
        if self.nonfinite:  # flag the rows, and say it once below the table
            lines[2 : 2 + len(body)] = [
                f"{text}  !! {r.nonfinite} NaN/Inf" if r.nonfinite else text for text, r in zip(lines[2 : 2 + len(body)], self.rows, strict=True)
            ]
            lines.append(f"!! {self.nonfinite} NaN/Inf entries in {sum(1 for r in self.rows if r.nonfinite)} tensor(s)")
        lines += [str(t) for t in self.targets]
        return "\n".join(lines)

    __repr__ = __str__


def report(model: nn.Module) -> Report:
    """One row per attached tensor (or, when nothing is attached, per floating-point parameter).

    Counts exact zeros of the tensor the module computes with (for ``SoftThreshold``, the
    thresholded weight), and evaluates each penalty R(w) at the current weights. It works on any model, so it also shows the sparsity left after
    :func:`paramreg.remove`. On a sharded model (FSDP2's ``DTensor`` parameters) every row counts
    the whole tensor, which gathers it: call it on every rank.

    Example:
        >>> import torch, paramreg
        >>> model = torch.nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, -2.0], [0.5, 0.0, 0.0, 0.0]]))
        >>> _ = paramreg.attach(model, "weight", l1=0.1)
        >>> r = paramreg.report(model)
        >>> r["weight"].zeros, r["weight"].sparsity, round(r["weight"].penalty, 6)
        (5, 0.625, 0.35)
    """
    everything = slots(model)
    attached = [s for s in everything if s.carrier is not None]
    chosen = attached or [
        s for s in everything if not isinstance(s.param, nn.parameter.UninitializedParameter) and s.value().is_floating_point()
    ]
    rows = []
    shared: dict[int, tuple] = {}  # id(target) -> (target, [slots])
    with torch.no_grad():
        for s in chosen:
            w, effective = whole(s.value()), whole(s.effective())
            c = s.carrier
            reg = c.current() if c is not None else None
            target = c.target if c is not None else None
            if target is not None:
                shared.setdefault(id(target), (target, []))[1].append(s)
            rows.append(
                Row(
                    name=s.name,
                    shape=tuple(w.shape),
                    numel=w.numel(),
                    zeros=int((effective == 0).sum()),
                    nonfinite=int((~torch.isfinite(effective)).sum()),
                    regularizer=None if reg is None else _describe(c),
                    mode=None if reg is None else c.mode,
                    penalty=None if reg is None else float(reg.penalty(w)),
                    step=None if c is None else c.ran,
                    strength=None if target is None else target.strength,
                )
            )
        targets = tuple(_target_row(target, members) for target, members in shared.values())
    return Report(tuple(rows), targets)


def _describe(carrier) -> str:
    """The regularizer column: the call that made it, at its current strength."""
    if carrier.target is not None:
        strength = carrier.target.strength
        now = "not stepped yet" if strength is None else f"strength {strength:.4g}"
        kept = ", then zeros kept" if carrier.target.keep_zeros else ""
        return f"{type(carrier.regularizer).__name__} target {carrier.target.sparsity:.0%} ({now}{kept})"
    return repr(carrier.current()) + (" scheduled" if carrier.schedule else "")


def _target_row(target, members: list) -> TargetRow:
    """Where one sparsity target stands: its groups counted over every tensor that shares it."""
    regularizer = members[0].carrier.regularizer
    tensors = [whole(s.value()) for s in members]
    zero_groups = total = 0
    by_regularizer: dict[int, list] = {}
    for s, w in zip(members, tensors, strict=True):
        by_regularizer.setdefault(id(s.carrier.regularizer), [s.carrier.regularizer, []])[1].append(w)
    for regularizer, ws in by_regularizer.values():
        for c in regularizer.critical(ws, [1.0] * len(ws)):  # a group is zero exactly when its critical strength is
            zero_groups += int((c == 0).sum())
            total += c.numel()
    return TargetRow(
        names=tuple(s.name for s in members),
        sparsity=target.sparsity,
        steps=target.steps,
        step=max(s.carrier.calls for s in members),
        asked=target.asked,
        reached=zero_groups / total if total else 0.0,
        groups=total,
        strength=target.strength,
        unit=regularizer.unit,
    )


def tensor_report(tensors: Mapping[str, Tensor], spec: dict | None = None) -> Report:
    """A :class:`Report` of a state_dict-like mapping (floating-point tensors only).

    ``spec`` (from :func:`paramreg.spec`) fills the regularizer, mode and penalty columns.
    """
    attached = (spec or {}).get("attached", {})
    rows = []
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            continue
        entry = attached.get(name)
        reg = Regularizer.from_dict(entry["regularizer"]) if entry else None
        rows.append(
            Row(
                name=name,
                shape=tuple(t.shape),
                numel=t.numel(),
                zeros=int((t == 0).sum()),
                regularizer=None if reg is None else repr(reg),
                mode=None if reg is None else entry.get("mode", "prox"),
                penalty=None if reg is None else float(reg.penalty(t.detach())),
                nonfinite=int((~torch.isfinite(t)).sum()),
            )
        )
    return Report(tuple(rows))
