"""The canonical walk: every parameter of a model under its plain-model name, tied tensors once.

Every tensor is named by its plain-model name (``conv1.weight``, never
``conv1.parametrizations.weight.original``), whether it is plain, carried by paramreg or
parametrized by the user, and a Parameter tied under several names appears once. Selection,
``attach``, ``remove``, ``report`` and the checkpoints all see the model through :func:`slots`.
The walk reads ``module._modules`` directly, never ``module.parametrizations``, and changes no
class (Note [Module classes] in modules/classes.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from .carrier import Carrier, changed

__all__ = ["Slot", "slots", "plists", "parametrized", "carried", "sync"]


@dataclass
class Slot:
    """One parameter tensor of a model, under its canonical (plain-model) name."""

    name: str
    module: nn.Module
    tensor_name: str
    # The stored Parameter, when it is the regularized tensor itself: a plain parameter, or one
    # whose first parametrization is paramreg's carrier. None under a user's parametrization.
    param: nn.Parameter | None
    plist: ParametrizationList | None  # the tensor's parametrizations, if any
    carrier: Carrier | None  # paramreg's carrier on this tensor, if attached
    aliases: list[Slot] = field(default_factory=list)  # the same Parameter under other names (tied)

    def value(self) -> Tensor:
        """The tensor the regularizer sees: the input of paramreg's carrier, else the module's tensor."""
        if self.param is not None:
            return self.param
        stop = len(self.plist) if self.carrier is None else index_in(self.plist, self.carrier)
        if self.plist.is_tensor:
            x, start = self.plist.original, 0
        else:
            originals = [getattr(self.plist, f"original{i}") for i in range(self.plist.ntensors)]
            x, start = self.plist[0](*originals), 1
        for i in range(start, stop):
            x = self.plist[i](x)
        return x

    def effective(self) -> Tensor:
        """The tensor the module computes with: ``value()`` through a reparametrizing carrier."""
        x = self.value()
        return self.carrier(x) if self.carrier is not None and self.carrier.reparametrizes else x

    def describe(self) -> str:
        """Name, shape and dtype, for messages."""
        t = self.value()
        return f"'{self.name}' (shape {tuple(t.shape)}, {t.dtype})"


def index_in(plist: ParametrizationList, carrier: Carrier) -> int:
    """The position of ``carrier`` in ``plist``."""
    return next(i for i, m in enumerate(plist) if m is carrier)


def plists(module: nn.Module) -> nn.ModuleDict | None:
    """``module.parametrizations``, read from ``module._modules`` (no export guard, no class lookup)."""
    found = module._modules.get("parametrizations")
    return found if isinstance(found, nn.ModuleDict) else None


def children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, child) of ``module._modules`` that a walk enters: every submodule but ``None`` and the
    parametrization container (``module.parametrizations``, as :func:`plists` reads it)."""
    for name, child in module._modules.items():
        if child is not None and not (name == "parametrizations" and isinstance(child, nn.ModuleDict)):
            yield name, child


def parametrized(module: nn.Module) -> bool:
    """``parametrize.is_parametrized(module)``, read from ``module._modules``."""
    found = plists(module)
    return found is not None and len(found) > 0


def carried(module: nn.Module) -> list[tuple[str, bool]]:
    """(name, alone) for each tensor of ``module`` whose first parametrization is a paramreg carrier."""
    found = plists(module)
    if not found:
        return []
    return [(n, len(pl) == 1) for n, pl in found.items() if isinstance(pl[0], Carrier)]


def sync(module: nn.Module) -> None:
    """Make ``module._parameters[name]`` the very object the forward pass uses, for each carried tensor.

    torch's module code writes ``_parameters`` and ``parametrizations.<name>.original`` as two
    separate slots (``load_state_dict(assign=True)``, ``to_empty``, conversions that create new
    Parameters); afterwards the stored tensor of the parametrization is the one that counts
    (Note [The Parameter stays in its module] in modules/binding.py).
    """
    found = plists(module)
    if not found:
        return
    for name, _ in carried(module):
        original = found[name].original
        if module._parameters.get(name) is not original:
            module._parameters[name] = original
            changed()


def _module_slots(prefix: str, module: nn.Module) -> list[Slot]:
    sync(module)
    remaining = dict(plists(module).items()) if parametrized(module) else {}
    found = []
    for tname, p in module._parameters.items():
        if p is None:
            continue
        plist = remaining.pop(tname, None)  # a tensor carried by paramreg first (Note [The Parameter stays in its module])
        carrier = plist[0] if plist is not None and isinstance(plist[0], Carrier) else None
        found.append(Slot(prefix + tname, module, tname, p, plist, carrier))
    for tname, plist in remaining.items():
        originals = [plist.original] if plist.is_tensor else [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
        if not any(isinstance(o, nn.Parameter) for o in originals):
            continue  # a parametrized buffer: not a parameter, never regularized
        carrier = next((m for m in plist if isinstance(m, Carrier)), None)
        found.append(Slot(prefix + tname, module, tname, None, plist, carrier))
    return found


def slots(model: nn.Module) -> list[Slot]:
    """Every parameter of ``model`` under its canonical name, in model order.

    A Parameter reachable under several names (tied weights) appears once, under its first name
    (as ``named_parameters()`` reports it); its other names are in ``aliases``. If paramreg's
    carrier sits under another name, the slot points at that module.
    """
    chosen: dict[object, tuple[int, Slot]] = {}
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    position = 0
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for s in _module_slots(prefix, module):
            key = id(s.param) if s.param is not None else (id(module), s.tensor_name)
            if key not in chosen:
                chosen[key] = (position, s)
            else:
                first_position, first = chosen[key]
                if s.carrier is not None and first.carrier is None:  # keep the first name, point at the carrier
                    merged = Slot(first.name, s.module, s.tensor_name, s.param, s.plist, s.carrier, [s, *first.aliases])
                    chosen[key] = (first_position, merged)
                else:
                    first.aliases.append(s)
            position += 1
        stack.extend(reversed([(f"{prefix}{name}.", child) for name, child in children(module)]))
    return [s for _, s in sorted(chosen.values(), key=lambda item: item[0])]


def module_tree(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """Every submodule of ``model`` once, in the order of a depth-first walk of ``_modules``,
    without the parametrization containers (a parametrized module's ``parametrizations``, a
    ``ModuleDict``); and whether the walk reached a module twice (shared, or a cycle)."""
    found, seen, stack, shared = [], {id(model)}, [model], False
    while stack:
        for _, child in children(stack.pop()):
            if id(child) in seen:
                shared = True
                continue
            seen.add(id(child))
            found.append(child)
            stack.append(child)
    return found, shared


def same_tree(model: nn.Module, tree: list, shared: bool) -> bool:
    """Whether :func:`module_tree` of ``model`` is, module for module, the one ``tree`` holds weak
    references to; it walks without building the list and stops at the first difference. Where
    the walk that built ``tree`` reached no module twice (``shared`` False), it keeps no set of
    the modules seen: a module now reached twice is an extra entry, a difference."""
    stack, count, n = [model], 0, len(tree)
    seen = {id(model)} if shared else None
    while stack:
        for _, child in children(stack.pop()):
            if seen is not None:
                if id(child) in seen:
                    continue
                seen.add(id(child))
            if count == n or tree[count]() is not child:
                return False
            count += 1
            stack.append(child)
    return count == n
