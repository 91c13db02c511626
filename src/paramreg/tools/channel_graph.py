"""The channel dependency graph: which channels of a model are coupled, and which are exactly removable.

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

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ParamregError

__all__ = ["Graph", "LAYERS", "as_tuple", "tensors_of", "torch_pruning"]

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRACED = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)


def torch_pruning(where: str):
    try:
        import torch_pruning
    except ImportError:
        raise ParamregError(
            f"{where} needs Torch-Pruning for the layers' dependency graph: pip install 'paramreg[shrink]' "
            f"(torch-pruning>=1.5)"
        ) from None
    return torch_pruning


def as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def tensors_of(out) -> list[Tensor]:
    """The tensors in a nested output (tensor, tuple, list, dict)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors_of(o)]
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


class Graph:
    """Torch-Pruning's dependency graph of a model, with paramreg's reading of its groups."""

    def __init__(self, model: nn.Module, example_inputs, where: str):
        tp = torch_pruning(where)
        self.tp, self.model, self.where = tp, model, where
        self.names = {m: n for n, m in model.named_modules()}
        inputs = as_tuple(example_inputs)
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
        out_fns = {t.grad_fn for t in tensors_of(captured[0] if captured else None) if t.grad_fn is not None}
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
            if not isinstance(m, LAYERS) or m not in self.dg.module2node or id(m) in seen:
                continue
            g = self.group(m)
            for s in g.producers:
                seen.add(id(self._owner(s)))
            found.append(g)
        return found

    def _owner(self, s: _Slice) -> nn.Module:
        name = s.name.rsplit(".", 1)[0] if "." in s.name else ""
        return self.model.get_submodule(name)
