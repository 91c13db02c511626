"""Physically smaller models: coupled channel groups at attach time, channel removal after training.

Which channels are coupled and which are exactly removable is decided on Torch-Pruning's dependency
graph (tools/channel_graph.py: Note [Which channels are removable]); here are the two calls on
top of it: :func:`attach_channels` (group lasso over whole channels) and :func:`shrink` (delete
the zero ones, verify the copy).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import Tensor, nn

from ..catalogue.coupled import CoupledGroupLasso
from ..errors import ParamregError
from ..lifecycle import options
from ..lifecycle.attaching import attach_regularizer
from ..lifecycle.removing import remove
from ..modules.rollback import all_or_nothing
from ..modules.selection import resolve
from ..modules.walk import slots
from ..optim.targets import SparsityTarget
from .folding import check_plain, folded
from .channel_graph import LAYERS, Graph, as_tuple, tensors_of

__all__ = ["attach_channels", "shrink"]


def attach_channels(
    model: nn.Module, targets, strength: float | None = None, example_inputs=None, *, exclude=None, step="auto",
    sparsity: float | None = None, sparsity_steps: int | None = None,
) -> list[str]:
    r"""Group lasso over whole output channels, each group spanning every tensor coupled to it.

    For each conv or linear weight that ``targets`` selects (the same selection rule as
    :func:`paramreg.attach`), the output channels' coupled producers are found from the model's
    dependency graph (Torch-Pruning): the layer's rows and bias entries, the BatchNorm scale and
    shift after it, and the rows of residual partners added to it. Channel k's group is row k of
    all of them; one :class:`paramreg.CoupledGroupLasso` per set of coupled layers applies

        prox_{tR}(m)_k = m_k·max(1 − t·a / sqrt(Σ_m ‖m_k‖²), 0),   a = ``strength``

    after each optimizer step (``mode="prox"``), so a channel becomes exactly zero in every
    producer together and :func:`paramreg.shrink` can delete it. The input columns of the next
    layers are not in the group: once the producers are zero they read zeros, and ``shrink``
    deletes them as well.

    ``step`` is the step policy of :func:`paramreg.attach`, with the same units as ``group_lasso``
    under the same optimizer: ``"auto"`` takes SGD's step lr·c_k, where c_k is the fill of the
    momentum buffer after k steps (1 on the first step, rising to (1 − dampening)/(1 − β) at
    momentum β, Note [Momentum fill]), and under Adam and the other adaptive optimizers the map in
    the optimizer's metric (:meth:`paramreg.CoupledGroupLasso.prox_diag_`); ``"lr"``: t = lr.

    ``sparsity=s, sparsity_steps=n`` asks for a fraction s of all the selected layers' channels
    (one target) to be exactly zero after n optimizer steps, along the ramp of
    :func:`paramreg.attach` (Note [Target sparsity] in :mod:`paramreg.optim.targets`); ``strength`` is
    then optional (the value reported before the first step).

    Returns the canonical names attached (the selected weights and everything coupled to them).
    All members of a group must sit in one optimizer parameter group. Raises
    :class:`paramreg.ParamregError`, changing nothing, for a selected tensor that is not a conv or
    linear weight, a layer whose channels are model outputs, or one coupled to a layer that mixes
    channels (LayerNorm, attention, ...).

    Example:
        >>> import torch, paramreg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        ...                       nn.Conv2d(4, 2, 3))
        >>> paramreg.attach_channels(model, "0.weight", 1e-2, torch.randn(1, 1, 8, 8))
        ['0.weight', '1.weight', '1.bias']
    """
    where = f"attach_channels({targets!r})"
    if not isinstance(model, nn.Module):
        raise ParamregError(f"attach_channels: model must be a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ParamregError(f"{where}: example_inputs are needed to trace the model's dependency graph")
    target = None
    if sparsity is not None or sparsity_steps is not None:
        if sparsity is None or sparsity_steps is None:
            raise ParamregError(f"{where}: give sparsity=s and sparsity_steps=n together")
        target = SparsityTarget(sparsity, sparsity_steps)
        if strength is not None:
            target.strength = CoupledGroupLasso(strength, channels=1).strength
        strength = 1.0  # the target sets the strength at every step
    elif strength is None:
        raise ParamregError(f"{where}: give a strength, or a target with sparsity=s and sparsity_steps=n")
    CoupledGroupLasso(strength, channels=1)  # validates the strength
    chosen = resolve(model, targets, exclude)
    problems = [
        f"{s.describe()} is not the weight of a Linear or Conv1d/2d/3d layer"
        for s in chosen
        if s.tensor_name != "weight" or not isinstance(s.module, LAYERS)
    ]
    if problems:
        raise ParamregError(f"{where}: attach_channels groups the output channels of conv and linear layers:\n  " + "\n  ".join(problems))
    plain = folded(model) if any(s.carrier is not None for s in slots(model)) else copy.deepcopy(model)
    graph = Graph(plain, example_inputs, where)
    plans: list[tuple[list[str], CoupledGroupLasso]] = []
    covered: set[str] = set()
    for s in chosen:
        if s.name in covered:
            continue  # a residual partner of a layer already grouped
        layer = s.name.rsplit(".", 1)[0] if "." in s.name else ""
        module = plain.get_submodule(layer)
        if module not in graph.dg.module2node:
            raise ParamregError(f"{where}: '{s.name}' is not used by the forward pass on the example inputs")
        g = graph.group(module)
        if g.output:
            problems.append(f"'{s.name}': the channels of '{layer}' are outputs of the model; removing them would change its output")
        if g.mixing:
            problems.append(
                f"'{s.name}': its channels are coupled to {', '.join(g.mixing)}, which mixes channels, so a zeroed "
                f"channel could not be removed exactly"
            )
        if not all(p.identity for p in g.producers):
            odd = [p.name for p in g.producers if not p.identity]
            problems.append(f"'{s.name}': its channels map to parts of {', '.join(odd)} (concatenation then addition); not supported")
        names = list(dict.fromkeys(p.name for p in g.producers))
        covered.update(names)
        shapes = tuple(tuple(p.tensor.shape) for p in g.producers if p.name in names)
        plans.append((names, CoupledGroupLasso(strength, channels=g.channels, members=tuple(names), shapes=shapes)))
    if problems:
        raise ParamregError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems) + "\nexclude these layers")
    done: list[str] = []
    with all_or_nothing() as undo:
        for names, reg in plans:
            attached = attach_regularizer(model, names, reg, step=options.checked_step(reg, "prox", step, where), target=target, where=where)
            done += attached
            undo(lambda attached=attached: remove(model, attached))
    return done


def _fresh(inputs: tuple, seed: int = 0) -> tuple:
    """Random inputs like ``inputs``: floating tensors redrawn with their mean and std, others kept."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if isinstance(x, Tensor) and x.is_floating_point():
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            std = x.std() if x.numel() > 1 else torch.ones((), dtype=x.dtype)
            out.append(noise * std + x.mean())
        else:
            out.append(x)
    return tuple(out)


def _excess(expected, got, rtol: float, atol: float) -> tuple[float, float]:
    """The largest output difference and its allowance, each output tensor against
    ``atol + rtol * max(abs(expected))`` (Note [Relative to the outputs]); ``(inf, tol)`` if the shapes differ.

    Note [Relative to the outputs]
        Deleting channels changes the order in which a layer sums its terms, so float32 outputs
        move by a few roundings of the terms' size, whatever the scale of the outputs: on a CNN
        whose outputs are ~1e3 that is ~1e-4 absolute, 1e-7 relative. A channel that was not
        really dead (an op that maps 0 to a non-zero value before the next layer: a sigmoid, an
        added constant) moves the outputs by about the size of that layer's contribution, which
        is a sizeable part of the outputs' own scale. So each output tensor gets a tolerance
        relative to its largest magnitude, plus ``atol`` for outputs near zero.
    """
    ta, tb = tensors_of(expected), tensors_of(got)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return float("inf"), atol
    pairs = [
        (float((x.double() - y.double()).abs().max()), atol + rtol * float(x.double().abs().max()))
        for x, y in zip(ta, tb, strict=True)
        if x.numel()
    ]
    return max(pairs, key=_ratio, default=(0.0, atol))


def _ratio(pair: tuple[float, float]) -> float:
    diff, allowed = pair
    return diff / allowed if allowed > 0 else (0.0 if diff == 0 else float("inf"))


def shrink(model: nn.Module, example_inputs, *, rtol: float = 1e-5, atol: float = 1e-5) -> nn.Module:
    r"""A smaller copy of a plain model, without the output channels and neurons that compute nothing.

    A channel is deleted with everything coupled to it (its bias entry, BatchNorm entries, the
    matching input columns of the next layers, residual and concatenation partners) when its
    whole coupled group is exactly zero on the producing side, or on the consuming side (Note
    [Which channels are removable]); each layer keeps at least one channel. The coupling comes
    from Torch-Pruning's dependency graph, traced with ``model(*example_inputs)``. Train with
    :func:`paramreg.attach_channels` to get such zeros, then :func:`paramreg.remove`.

    The copy is checked before it is returned: on ``example_inputs`` and on fresh random inputs of
    the same shapes, in eval mode, each of its outputs must match the original's within
    ``atol + rtol * max(abs(original output))`` (Note [Relative to the outputs]: deleting channels
    reorders sums, which moves float32 outputs by a few roundings of their own size);
    otherwise :class:`paramreg.ParamregError` says by how much. ``model`` itself is never changed.
    When nothing is removable, a warning says so and an equivalent copy is returned.

    Example:
        >>> import torch, paramreg
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     model[0].weight[1] = 0; model[0].bias[1] = 0        # neuron 1 computes 0
        >>> small = paramreg.shrink(model, torch.randn(2, 4))
        >>> small[0].weight.shape, small[2].weight.shape
        (torch.Size([2, 4]), torch.Size([2, 2]))
    """
    if not isinstance(model, nn.Module):
        raise ParamregError(f"shrink: model must be a torch.nn.Module, got {type(model).__name__}")
    for label, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ParamregError(f"shrink: {label} must be a finite number >= 0, got {value!r}")
    check_plain(model)
    small = copy.deepcopy(model)
    inputs = as_tuple(example_inputs)
    flags = {m: m.training for m in small.modules()}
    small.eval()
    try:
        with torch.no_grad():
            try:
                expected = [small(*inputs), small(*_fresh(inputs))]
            except Exception as e:
                raise ParamregError(f"shrink: the model does not run on the example inputs ({type(e).__name__}: {str(e)[:200]})") from None
        graph = Graph(small, inputs, "shrink")
        plan = []
        for g in graph.groups():
            keep = g.removable()
            idxs = keep.nonzero().flatten().tolist()
            if len(idxs) == g.channels:
                idxs = idxs[1:]  # keep one channel: a layer of width 0 is not a layer
            if idxs:
                plan.append((g, idxs))
        if not plan:
            warnings.warn(
                "shrink: no output channel is removable (none has an exactly zero coupled group); nothing was removed, "
                "the returned copy is equivalent to the model",
                stacklevel=2,
            )
            return small
        for g, idxs in plan:
            pruner = graph.dg.get_pruner_of_module(g.root)
            graph.dg.get_pruning_group(g.root, pruner.prune_out_channels, idxs).prune()
        with torch.no_grad():
            try:
                got = [small(*inputs), small(*_fresh(inputs))]
            except Exception as e:
                layers = ", ".join(f"'{g.root_name}' ({len(i)})" for g, i in plan)
                raise ParamregError(
                    f"shrink: after removing the zero channels of {layers} the model no longer runs "
                    f"({type(e).__name__}: {str(e)[:200]}): the dependency graph coupled channels through an op it "
                    f"does not understand (a reshape into heads, a custom kernel). The model is unchanged"
                ) from None
        diff, allowed = max((_excess(a, b, rtol, atol) for a, b in zip(expected, got, strict=True)), key=_ratio)
        if not diff <= allowed:
            layers = ", ".join(f"'{g.root_name}' ({len(i)})" for g, i in plan)
            raise ParamregError(
                f"shrink: removing the zero channels of {layers} changed the outputs by {diff:.3g}, more than the "
                f"{allowed:.3g} that reordered sums explain (atol={atol} + rtol={rtol} x the outputs' largest magnitude); "
                f"an op between a zeroed layer and its consumers maps 0 to a non-zero value (a sigmoid, an added "
                f"constant, a normalization). The model is unchanged"
            )
    finally:
        for m, flag in flags.items():
            m.training = flag
    return small
