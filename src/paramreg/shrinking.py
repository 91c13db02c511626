"""Physically smaller models: coupled channel groups at attach time, channel removal after training.

Note [Which channels are removable]
    Torch-Pruning's dependency graph (an optional dependency: ``pip install paramreg[shrink]``)
    gives, for every output channel of a conv or linear layer, the group of everything coupled to
    it: the *producers* (rows of the conv/linear weights that compute the channel, their bias
    entries, BatchNorm scale and shift entries, and residual partners that are added to it) and
    the *consumers* (input columns of the layers that read it, through concatenations, splits,
    flattens and element-wise ops). A channel k is removed only when deleting it cannot change any
    output:

    - every producer slice of k is exactly zero, so the channel's value is exactly 0 after
      every zero-preserving op (ReLU, GELU, pooling, padding, addition), and the consumers read
      zeros; or
    - every consumer slice of k is exactly zero, so nothing reads the channel;

    and in both cases the channel must not be an output of the model. A group that also holds a
    layer mixing channels (LayerNorm, GroupNorm, attention, an RNN, a bare Parameter, and the ops
    the tracer would pass through as element-wise but that mix channels: functional attention and
    products of two activations, ``_MIXING_OPS``) is never shrunk: its statistics would change.
    A conv followed by BatchNorm is removable only when BN's scale *and* shift are zero too (a zero
    filter still outputs BN's shift): that is why :func:`attach_channels` puts all producer slices
    into one group. After pruning, the outputs are compared with the original's on the example
    inputs and on fresh random inputs; an op that maps 0 to a non-zero value (a sigmoid, an added
    constant) makes that check fail with an error, and the model is left unchanged.

Note [What Torch-Pruning does not do here]
    It prunes whatever indices it is given; deciding that a channel is *exactly* removable (the
    rules above), guarding the model outputs, verifying the result and building coupled group
    lasso groups are paramreg's. Its tracer changes the model's train/eval flags; both functions
    work on a copy.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import carrier as _carrier
from .checkpoint import check_plain, folded
from .coupled import CoupledGroupLasso
from .errors import ParamregError
from .lifecycle import _step_policy, attach_regularizer, remove
from .sparsity import Budget
from .selection import resolve

__all__ = ["attach_channels", "shrink"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRACED = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


def _torch_pruning(where: str):
    try:
        import torch_pruning
    except ImportError:
        raise ParamregError(
            f"{where} needs Torch-Pruning for the layers' dependency graph: pip install 'paramreg[shrink]' "
            f"(torch-pruning>=1.5)"
        ) from None
    return torch_pruning


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _tensors(out) -> list[Tensor]:
    """The tensors in a nested output (tensor, tuple, list, dict)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


@dataclass
class _Slice:
    """Slices of one tensor along ``dim`` that belong to the group's channels: local index
    ``local[i]`` belongs to root channel ``root[i]``."""

    name: str
    tensor: Tensor
    dim: int
    local: list[int]
    root: list[int]

    def nonzero(self, channels: int) -> Tensor:
        """Per root channel: does any of its slices hold a non-zero entry."""
        w = self.tensor.detach().movedim(self.dim, 0)
        nz = (w.reshape(w.shape[0], -1) != 0).any(1)[self.local].long()
        return torch.zeros(channels, dtype=torch.long).index_add_(0, torch.tensor(self.root), nz) > 0

    @property
    def identity(self) -> bool:
        return self.dim == 0 and self.local == self.root and self.tensor.shape[0] == len(self.root)


@dataclass
class _Group:
    """The coupled group of one layer's output channels (Note [Which channels are removable])."""

    root: nn.Module
    root_name: str
    channels: int
    producers: list[_Slice] = field(default_factory=list)
    consumers: list[_Slice] = field(default_factory=list)
    mixing: list[str] = field(default_factory=list)  # layers that mix channels: never shrunk
    output: bool = False  # the channels are outputs of the model

    def removable(self) -> Tensor:
        """Per channel: can it be deleted without changing any output."""
        if self.mixing or self.output:
            return torch.zeros(self.channels, dtype=torch.bool)
        producers_zero = ~torch.stack([s.nonzero(self.channels) for s in self.producers]).any(0)
        if not self.consumers:
            return producers_zero
        consumers_zero = ~torch.stack([s.nonzero(self.channels) for s in self.consumers]).any(0)
        return producers_zero | consumers_zero


#: Ops that Torch-Pruning's tracer passes channels through as if element-wise, but that mix them:
#: attention (``F.scaled_dot_product_attention`` and its kernels) and products of two activations
#: (``q @ k.transpose(-2, -1)``: bmm, baddbmm). Matched in the autograd node's name, lower case.
_MIXING_OPS = ("attention", "bmm")


class _Graph:
    """Torch-Pruning's dependency graph of a model, with paramreg's reading of its groups."""

    def __init__(self, model: nn.Module, example_inputs, where: str):
        tp = _torch_pruning(where)
        self.tp, self.model, self.where = tp, model, where
        self.names = {m: n for n, m in model.named_modules()}
        inputs = _as_tuple(example_inputs)
        captured = []

        def keep(out):
            captured.append(out)
            return out

        flags = {m: m.training for m in model.modules()}
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=inputs, forward_fn=lambda m, x: m(*x), output_transform=keep, verbose=False
                )
        except ParamregError:
            raise
        except Exception as e:
            raise ParamregError(
                f"{where}: Torch-Pruning could not trace {type(model).__name__} with the example inputs "
                f"({type(e).__name__}: {str(e)[:200]}); check that model(*example_inputs) runs"
            ) from None
        finally:
            for m, flag in flags.items():
                m.training = flag
        out_fns = {t.grad_fn for t in _tensors(captured[0] if captured else None) if t.grad_fn is not None}
        if not out_fns:
            raise ParamregError(
                f"{where}: the outputs of {type(model).__name__} do not depend on its parameters through autograd "
                f"(a .detach(), .numpy() or torch.no_grad() in forward?), so the dependency graph cannot be traced"
            )
        self.outputs = {n for n in self.dg.module2node.values() if n.grad_fn in out_fns or not n.outputs}
        untraced = [
            f"'{name}' ({type(m).__name__})"
            for name, m in model.named_modules()
            if isinstance(m, _TRACED) and any(True for _ in m.parameters(recurse=False)) and m not in self.dg.module2node
        ]
        if untraced:
            raise ParamregError(
                f"{where}: the dependency graph cannot trace {', '.join(untraced[:6])}"
                f"{' and more' if len(untraced) > 6 else ''}: its output does not reach the model's output "
                f"through autograd (a .detach(), .numpy(), .data or torch.no_grad() in forward, or a layer forward "
                f"never calls); make the forward differentiable, or shrink a model without it"
            )

    def _param(self, module: nn.Module, tensor_name: str) -> str:
        prefix = self.names.get(module, "")
        return f"{prefix}.{tensor_name}" if prefix else tensor_name

    def group(self, module: nn.Module) -> _Group:
        """The coupled group of all output channels of ``module`` (a conv or linear layer)."""
        pruner = self.dg.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module)
        g = self.dg.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        result = _Group(module, self.names.get(module, ""), channels)
        for item in g:
            dep, local = item.dep, list(item.idxs)
            root = list(item.root_idxs)
            m, out = dep.target.module, self.dg.is_out_channel_pruning_fn(dep.handler)
            if out and dep.target in self.outputs:
                result.output = True
            named = f"'{self.names.get(m, '?')}' ({type(m).__name__})" if isinstance(m, nn.Module) else "a bare Parameter"
            if isinstance(m, nn.modules.conv._ConvNd):
                depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
                if m.transposed or (m.groups > 1 and not depthwise):
                    result.mixing.append(f"{named}, a {'transposed' if m.transposed else 'grouped'} conv")
                elif out or depthwise:
                    result.producers.append(_Slice(self._param(m, "weight"), m.weight, 0, local, root))
                    if m.bias is not None:
                        result.producers.append(_Slice(self._param(m, "bias"), m.bias, 0, local, root))
                else:
                    result.consumers.append(_Slice(self._param(m, "weight"), m.weight, 1, local, root))
            elif isinstance(m, nn.Linear):
                if out:
                    result.producers.append(_Slice(self._param(m, "weight"), m.weight, 0, local, root))
                    if m.bias is not None:
                        result.producers.append(_Slice(self._param(m, "bias"), m.bias, 0, local, root))
                else:
                    result.consumers.append(_Slice(self._param(m, "weight"), m.weight, 1, local, root))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if not m.affine:  # a zero input comes out as −mean/std, not 0
                    result.mixing.append(f"{named} without affine scale and shift")
                else:
                    result.producers.append(_Slice(self._param(m, "weight"), m.weight, 0, local, root))
                    result.producers.append(_Slice(self._param(m, "bias"), m.bias, 0, local, root))
            elif isinstance(m, nn.Module) and type(m).__module__.startswith("torch_pruning") and not list(m.parameters()):
                op = dep.target.grad_fn.name() if dep.target.grad_fn is not None else ""
                if any(word in op.lower() for word in _MIXING_OPS):
                    result.mixing.append(f"an {op.removesuffix('Backward0')} op")
                # otherwise an element-wise op, concat, split, reshape or flatten: passes channels through
            else:
                result.mixing.append(named)
        return result

    def groups(self) -> list[_Group]:
        """One group per set of coupled output channels, rooted at the first conv/linear layer in model order."""
        seen: set[int] = set()
        found = []
        for m in self.model.modules():
            if not isinstance(m, _LAYERS) or m not in self.dg.module2node or id(m) in seen:
                continue
            g = self.group(m)
            for s in g.producers:
                seen.add(id(self._owner(s)))
            found.append(g)
        return found

    def _owner(self, s: _Slice) -> nn.Module:
        name = s.name.rsplit(".", 1)[0] if "." in s.name else ""
        return self.model.get_submodule(name)


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
    (one budget) to be exactly zero after n optimizer steps, along the ramp of
    :func:`paramreg.attach` (Note [Target sparsity] in :mod:`paramreg.sparsity`); ``strength`` is
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
    budget = None
    if sparsity is not None or sparsity_steps is not None:
        if sparsity is None or sparsity_steps is None:
            raise ParamregError(f"{where}: give sparsity=s and sparsity_steps=n together")
        budget = Budget(sparsity, sparsity_steps)
        if strength is not None:
            budget.strength = CoupledGroupLasso(strength, channels=1).strength
        strength = 1.0  # the target sets the strength at every step
    elif strength is None:
        raise ParamregError(f"{where}: give a strength, or a target with sparsity=s and sparsity_steps=n")
    CoupledGroupLasso(strength, channels=1)  # validates the strength
    chosen = resolve(model, targets, exclude)
    problems = [
        f"{s.describe()} is not the weight of a Linear or Conv1d/2d/3d layer"
        for s in chosen
        if s.tensor_name != "weight" or not isinstance(s.module, _LAYERS)
    ]
    if problems:
        raise ParamregError(f"{where}: attach_channels groups the output channels of conv and linear layers:\n  " + "\n  ".join(problems))
    plain = folded(model) if any(s.carrier is not None for s in _carrier.slots(model)) else copy.deepcopy(model)
    graph = _Graph(plain, example_inputs, where)
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
    try:
        for names, reg in plans:
            done += attach_regularizer(model, names, reg, step=_step_policy(reg, "prox", step, where), budget=budget, where=where)
    except BaseException:
        if done:
            remove(model, done)
        raise
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
    ta, tb = _tensors(expected), _tensors(got)
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
    inputs = _as_tuple(example_inputs)
    flags = {m: m.training for m in small.modules()}
    small.eval()
    try:
        with torch.no_grad():
            try:
                expected = [small(*inputs), small(*_fresh(inputs))]
            except Exception as e:
                raise ParamregError(f"shrink: the model does not run on the example inputs ({type(e).__name__}: {str(e)[:200]})") from None
        graph = _Graph(small, inputs, "shrink")
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
