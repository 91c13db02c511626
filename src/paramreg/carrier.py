"""The carrier: an identity parametrization that marks one tensor as regularized.

paramreg attaches a :class:`Carrier` to each selected tensor with
``torch.nn.utils.parametrize``. The carrier's forward returns its input, so ``module.weight``
stays the very same Parameter object and the forward pass computes nothing new; the carrier
only holds the regularizer and its mode, and makes the attachment visible in the module tree::

    ParametrizedLinear(
      in_features=4, out_features=2, bias=True
      (parametrizations): ModuleDict(
        (weight): ParametrizationList(
          (0): Carrier(L1(strength=0.001), mode='prox')
    ...

This module also owns the structural operations that torch's own ``parametrize`` gets wrong
for us (checked on torch 2.13):

- the canonical walk (:func:`slots`): every tensor is named by its plain-model name
  (``conv1.weight``, never ``conv1.parametrizations.weight.original``), and a Parameter tied
  under several names appears once;
- exact removal (:func:`detach`): only paramreg's own entry is deleted, the Parameter object is
  kept, and no property is ever deleted from a dynamic ``Parametrized<Cls>`` class that a deep
  copy may share.

Note [The Parameter stays in its module]
    ``register_parametrization`` moves ``module.weight`` to
    ``module.parametrizations.weight.original``, which renames it in ``named_parameters()`` and
    ``state_dict()`` and moves it behind ``bias``. After registering a
    carrier on a plain tensor, paramreg puts the same Parameter object back into
    ``module._parameters`` at its old position. ``module.weight`` is read from there on a shared
    class, and through paramreg's property on a class of its own (Note [Shared classes]; a data
    descriptor wins over ``_parameters``), while ``named_parameters()`` and
    ``parameters()`` de-duplicate by identity and so report the plain name in the plain order:
    an optimizer built while attached sees the parameters in the same order as one built on the
    plain model, and user code that selects parameters by name keeps working. ``state_dict()``
    would hold the tensor under both keys; a state-dict hook keeps only the plain key, and a
    load pre-hook accepts either (:func:`_save_hook`, :func:`_load_hook`).
"""

from __future__ import annotations

import copy
import copyreg
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from .errors import ParamregError
from .regularizers import Regularizer

MODES = ("prox", "penalty")

# Every carrier bound to a model. The optimizer hook looks here for the parameters it treats.
# Weak: paramreg never keeps a model alive.
_LIVE: "weakref.WeakSet[Carrier]" = weakref.WeakSet()
# Bumped whenever a carrier is bound or unbound, so that cached per-optimizer plans rebuild.
_generation = 0


def generation() -> int:
    return _generation


def changed() -> None:
    """Note that a carrier's regularizer or settings changed (cached step plans are rebuilt)."""
    global _generation
    _generation += 1


def live_carriers() -> "weakref.WeakSet[Carrier]":
    return _LIVE


class Carrier(nn.Module):
    """The parametrization holding a regularizer and its mode.

    ``mode`` is ``"prox"`` or ``"penalty"``; the carrier is then the identity. For a
    reparametrization (``regularizer.kind == "reparametrization"``, e.g. ``SoftThreshold``) the
    mode is ``"forward"`` and the carrier applies ``regularizer.transform()``, a submodule whose
    parameters (a learnable threshold) are trained and saved with the model.
    """

    def __init__(self, regularizer: Regularizer, mode: str, step: str = "auto", schedule=None, budget=None):
        super().__init__()
        self.regularizer = regularizer
        self.mode = mode
        self.step = step  # the step policy asked for (paramreg.step_sizes)
        self.ran = None  # the step policy the last optimizer step took, e.g. "adaptive(Adam)" (stepping._label)
        self.schedule = schedule  # None, or step count -> factor on the regularizer's strengths
        self.budget = budget  # None, or the sparsity target this tensor shares with its attach call (paramreg.sparsity)
        # the schedule's current value; a target's strength (its regularizer has strength 1)
        self.factor = 1.0 if schedule is None else schedule(0)
        if budget is not None:
            self.factor = budget.strength or 0.0
        self.transform = regularizer.transform() if mode == "forward" else None
        self.calls = 0  # optimizer steps that updated the tensor (for schedules and every=k)
        self._owner = None  # weakref to the ParametrizationList this carrier sits in
        self.name = "?"  # the canonical name it was attached under, for messages

    def forward(self, x: Tensor) -> Tensor:
        return x if self.transform is None else self.transform(x)

    def right_inverse(self, x: Tensor) -> Tensor:
        # Registration keeps the stored Parameter as it is; under a user's parametrization,
        # torch's assignment path passes through here unchanged.
        return x

    def extra_repr(self) -> str:
        if torch.onnx.is_in_onnx_export():  # torch.onnx.export(dynamo=True) prints the model first (Note [Export guard])
            _refuse_carrier_export(f"'{self.name}'", "torch.onnx.export")
        step = f", step={self.ran}" if self.ran else "" if self.step == "auto" else f", step={self.step!r}"
        schedule = "" if self.schedule is None else ", scheduled"
        target = "" if self.budget is None else f", sparsity={self.budget.sparsity:g} by step {self.budget.steps}"
        return f"{self.current()!r}, mode={self.mode!r}{step}{schedule}{target}"

    def remember(self, w: Tensor) -> None:
        """Take the regularizer's memory of ``w`` (``Regularizer.remembers``), kept as a buffer
        that moves with the module and stays out of the state_dict."""
        if self.regularizer.remembers:
            self.register_buffer("memory", self.regularizer.remember(w), persistent=False)

    def current(self) -> Regularizer:
        """The regularizer at its current strength (a schedule scales it)."""
        return self.regularizer if self.factor == 1.0 else self.regularizer.scaled(self.factor)

    def leaf(self) -> nn.Parameter | None:
        """The stored Parameter this carrier regularizes, or None if it is not first in its list."""
        owner = self._owner() if self._owner is not None else None
        if owner is None or not owner.is_tensor or len(owner) == 0 or owner[0] is not self:
            return None
        return owner.original

    def _bind(self, owner: ParametrizationList) -> None:
        global _generation
        self._owner = weakref.ref(owner)
        _LIVE.add(self)
        _generation += 1

    def _unbind(self) -> None:
        global _generation
        self._owner = None
        _LIVE.discard(self)
        _generation += 1

    def __deepcopy__(self, memo):
        # A deep copy of a model is regularized like the original: bind the copy to the copied
        # ParametrizationList, which deepcopy registers in ``memo`` before copying its children.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k != "_owner"}
        new.__dict__.update(copy.deepcopy(state, memo))
        new._owner = None
        owner = self._owner() if self._owner is not None else None
        if owner is not None and id(owner) in memo:
            new._bind(memo[id(owner)])
        return new


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
        stop = len(self.plist) if self.carrier is None else _index(self.plist, self.carrier)
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
        return self.carrier(x) if self.carrier is not None and self.carrier.transform is not None else x

    def describe(self) -> str:
        """Name, shape and dtype, for messages."""
        t = self.value()
        return f"'{self.name}' (shape {tuple(t.shape)}, {t.dtype})"


def _index(plist: ParametrizationList, carrier: Carrier) -> int:
    return next(i for i, m in enumerate(plist) if m is carrier)


def _module_slots(prefix: str, module: nn.Module) -> list[Slot]:
    _sync(module)
    plists = dict(_plists(module).items()) if _parametrized(module) else {}
    found = []
    for tname, p in module._parameters.items():
        if p is None:
            continue
        plist = plists.pop(tname, None)  # a tensor carried by paramreg first (Note [The Parameter stays in its module])
        carrier = plist[0] if plist is not None and isinstance(plist[0], Carrier) else None
        found.append(Slot(prefix + tname, module, tname, p, plist, carrier))
    for tname, plist in plists.items():
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
        skip_parametrizations = _parametrized(module)
        children = [
            (f"{prefix}{name}.", child)
            for name, child in module._modules.items()
            if child is not None and not (skip_parametrizations and name == "parametrizations")
        ]
        stack.extend(reversed(children))
    return [s for _, s in sorted(chosen.values(), key=lambda item: item[0])]


def _plists(module: nn.Module) -> nn.ModuleDict | None:
    """``module.parametrizations``, read without the attribute (Note [Shared classes])."""
    plists = module._modules.get("parametrizations")
    return plists if isinstance(plists, nn.ModuleDict) else None


def _parametrized(module: nn.Module) -> bool:
    """``parametrize.is_parametrized(module)``, without reading the attribute (Note [Shared classes])."""
    plists = _plists(module)
    return plists is not None and len(plists) > 0


def _carried(module: nn.Module) -> list[tuple[str, bool]]:
    """(name, alone) for each tensor of ``module`` whose first parametrization is a paramreg carrier."""
    plists = _plists(module)
    if not plists:
        return []
    return [(n, len(pl) == 1) for n, pl in plists.items() if isinstance(pl[0], Carrier)]


def _sync(module: nn.Module) -> None:
    """Make ``module._parameters[name]`` the very object the forward pass uses, for each carried tensor.

    torch's module code writes ``_parameters`` and ``parametrizations.<name>.original`` as two
    separate slots (``load_state_dict(assign=True)``, ``to_empty``, conversions that create new
    Parameters); afterwards the stored tensor of the parametrization is the one that counts.
    Also moves a module back onto its shared class where it may (Note [Shared classes]).
    """
    global _generation
    plists = _plists(module)
    if not plists:
        return
    for name, _ in _carried(module):
        original = plists[name].original
        if module._parameters.get(name) is not original:
            module._parameters[name] = original
            _generation += 1
    if type(module).__dict__.get("_paramreg_owner") is not None and _shareable(module):
        module.__class__ = _shared_class(module)


class _CarrierModuleMixin:
    """Methods added to the class of a module that has paramreg carriers (Note [The Parameter stays in its module])."""

    def __setattr__(self, name, value):
        if isinstance(value, nn.Parameter) and any(name == n for n, _ in _carried(self)):
            # As on a plain module, a new Parameter replaces the tensor; the forward pass uses it too.
            global _generation
            self._modules["parametrizations"][name]._parameters["original"] = value
            self._parameters[name] = value
            _generation += 1
            return
        type(self).__bases__[0].__setattr__(self, name, value)

    def _apply(self, fn, recurse=True):
        out = type(self).__bases__[0]._apply(self, fn, recurse)
        _sync(self)
        return out


_OVERRIDES = ("__setattr__", "_apply")
# What paramreg puts into the classes it makes, on top of torch's Parametrized<Cls> namespace.
_OURS = (*_OVERRIDES, "parametrizations", "_paramreg_owner", "__deepcopy__", "__prepare_scriptable__", "__dict__", "__weakref__")


def _guarded_parametrizations(self) -> nn.ModuleDict:
    """``module.parametrizations``: first gives the module a class of its own unless it has one.

    Note [Shared classes]
        torch's parametrize gives each parametrized module a class ``Parametrized<Cls>`` and puts
        one property per parametrized tensor into it; ``register_parametrization`` adds a
        property to that class, ``remove_parametrizations`` deletes one, and a deep copy shares
        the class with its original. A class per module keeps modules independent, but with
        hundreds of small layers it costs (Python's attribute caches are per class): on
        200 x Linear(32, 32) an inference forward ran about 1.2x the plain model's time.

        So a module whose every parametrized tensor carries one identity carrier and nothing
        else, by far the usual case, gets a class shared by all such modules of its original
        class: ``_shared_class``. That class has no property for the carried tensors at all:
        ``module.weight`` is found by ``nn.Module.__getattr__`` in ``module._parameters``,
        where the Parameter stays (Note [The Parameter stays in its module]), exactly as on a
        plain module; identity carriers make it the value parametrize would compute.

        A shared class must never be changed, and every torch function that changes a
        module's class (``register_parametrization``, ``remove_parametrizations``, and so
        everything built on them: ``orthogonal``, ``weight_norm``, ``torch.ao.pruning``) first
        reads ``module.parametrizations`` (``is_parametrized``). Every class paramreg makes
        serves that attribute through this property, which first gives the module a class of
        its own (``_own_class``: one property per carried tensor, Note [Fast identity reads])
        unless its class already is its own (``_paramreg_owner``); a deep copy of that module
        is not the owner and gets a class of its own in turn. paramreg's own code reads
        ``module._modules`` instead (``_plists``), and moves a module back onto the shared
        class when it may (``_sync``, run by every paramreg call that walks the model).

        Not covered: a ``ParametrizationList`` changed through a reference held from before,
        bypassing ``register_parametrization`` (``plist.append(p)`` while the module has the
        shared class) is not seen; ``module.weight`` would keep returning the stored Parameter.
    """
    if getattr(torch.jit._trace, "_trace_module_map", None) is not None:  # torch.jit.trace builds its module (Note [Export guard])
        _refuse_export(self, "torch.jit.trace")
    if _is_exporting():  # torch.export.export, torch.onnx.export(dynamo=True)
        _refuse_export(self, "torch.export")
    modules = self._modules
    owner = type(self).__dict__.get("_paramreg_owner")
    if owner is None or owner() is not self:
        _own_class(self)
    if "parametrizations" not in modules:
        raise AttributeError(f"'{type(self).__name__}' object has no attribute 'parametrizations'")
    return modules["parametrizations"]


_PARAMETRIZATIONS = property(_guarded_parametrizations)


# torch.compiler.is_exporting is newer than the oldest torch paramreg supports
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _refuse_export(module: nn.Module, how: str):
    """Raise: ``module`` is being exported while paramreg is attached to it.

    Note [Export guard]
        An export of an attached model records paramreg's carriers: ``torch.export`` and the ONNX
        exporters store each carried tensor twice (also as ``...parametrizations.weight.original``),
        ``torch.jit.trace`` keeps the ``parametrizations`` submodules, ``torch.jit.script`` stops
        at them. paramreg sees each of these while it happens and raises with the fix instead:
        TorchScript asks every module for ``__prepare_scriptable__`` before compiling it;
        ``torch.jit.trace`` and ``torch.export`` (which ``torch.onnx.export(dynamo=True)`` uses)
        read ``module.parametrizations``, this class's property, while ``torch.jit._trace``'s
        module map is set or ``torch.compiler.is_exporting()`` holds; the TorchScript ONNX exporter
        reads ``state_dict()``, whose hook sees ``torch.onnx.is_in_onnx_export()``; the dynamo ONNX
        exporter prints the model before each capture (it would fall back from a refused
        non-strict capture to a strict one), which calls ``Carrier.extra_repr``. ``torch.compile``
        reads none of them, so it keeps working while attached. Not seen: ``torch.export.export(...,
        strict=True)`` (dynamo reads the parameters without paramreg's code); ``check_plain`` is the
        guard there.
    """
    names = ", ".join(f"'{pl[0].name}'" for pl in (_plists(module) or {}).values() if isinstance(pl[0], Carrier))
    _refuse_carrier_export(names or type(module).__name__, how)


def _refuse_carrier_export(names: str, how: str):
    raise ParamregError(
        f"{how} of a model with paramreg attached ({names}): the export would record "
        f"paramreg's carriers. Call paramreg.remove(model) before exporting, or export paramreg.folded(model) "
        f"(a plain copy; the model stays attached)"
    )


def _prepare_scriptable(self):
    """``torch.jit.script`` calls this on every module before compiling it (Note [Export guard])."""
    _refuse_export(self, "torch.jit.script")


def _shareable(module: nn.Module) -> bool:
    """Whether ``module`` may use its shared class: each parametrized tensor holds one identity carrier alone."""
    plists = _plists(module)
    return bool(plists) and all(
        len(pl) == 1 and type(pl[0]) is Carrier and pl[0].transform is None for pl in plists.values()
    )


# One shared class per original class (Note [Shared classes]); weak, so that a class can go.
_SHARED: "weakref.WeakValueDictionary[type, type]" = weakref.WeakValueDictionary()


def _shared_class(module: nn.Module) -> type:
    """The class all shareable modules of ``module``'s original class share: no tensor properties."""
    cls = type(module)
    base = cls.__bases__[0]
    shared = _SHARED.get(base)
    if shared is None:
        # torch's namespace (``__getstate__`` refusing pickling, ``__deepcopy__``) without its properties
        namespace = {k: v for k, v in vars(cls).items() if k not in _OURS and not isinstance(v, property)}
        namespace.update({k: vars(_CarrierModuleMixin)[k] for k in _OVERRIDES})
        namespace.update(_class_extras(None))
        shared = _SHARED.setdefault(base, type(cls.__name__, (base,), namespace))
    return shared


def _fast_property(name: str) -> property:
    """``module.<name>`` for a carried tensor on a module with a class of its own.

    Note [Fast identity reads]
        parametrize's property calls the ParametrizationList module on every read (about 10 µs);
        with hundreds of small layers that is most of the forward pass. When the list holds
        only an identity carrier, the value is the stored Parameter itself, so the property
        returns it directly (under ``parametrize.cached()`` too: the cached value would be that
        very tensor). Anything else (a user's parametrization appended later, a
        ``SoftThreshold``) computes the chain as torch's property does, with torch's cache
        keyed by this module (torch's own property keys it by the module it was made for,
        which a deep copy's shared class gets wrong). Modules on a shared class have no
        property at all (Note [Shared classes]).
    """

    def get(self):
        plist = self._modules["parametrizations"]._modules[name]
        if len(plist._modules) == 1:
            first = plist._modules["0"]
            if type(first) is Carrier and first.transform is None:
                return plist._parameters["original"]
        if not parametrize._cache_enabled:
            return plist()
        if torch._C._get_tracing_state() is not None:
            raise RuntimeError("Cannot trace a model while caching parametrizations.")
        key = (id(self), name)
        tensor = parametrize._cache.get(key)
        if tensor is None:
            tensor = parametrize._cache[key] = plist()
        return tensor

    def set(self, value):
        self._modules["parametrizations"]._modules[name].right_inverse(value)

    get.paramreg = True
    return property(get, set)


def _own_class(module: nn.Module, without: tuple[str, ...] = ()) -> None:
    """Give ``module`` a parametrized class of its own, minus the properties in ``without``.

    torch's parametrize adds and deletes properties on the module's class, and a deep copy shares
    that class with the original; a class of its own keeps modules independent (Note [Shared
    classes]). While the module has carriers, the class also gets :class:`_CarrierModuleMixin`'s
    methods and fast reads of the carried tensors (Note [Fast identity reads]).
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in _OURS and k not in without}
    carried = [n for n, _ in _carried(module)]
    for name in _plists(module) or {}:
        # ours for every carried tensor, and for one the shared class served from _parameters
        # or whose carrier went while the user's parametrizations stayed; torch's for the rest
        value = namespace.get(name)
        if name in carried or value is None or _is_ours(value):
            namespace[name] = _fast_property(name)
    if carried:
        namespace.update({k: vars(_CarrierModuleMixin)[k] for k in _OVERRIDES})
    namespace.update(_class_extras(module))
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _is_ours(value) -> bool:
    return isinstance(value, property) and getattr(value.fget, "paramreg", False)


def _class_extras(owner: nn.Module | None) -> dict:
    """What every class paramreg makes has: the guarded ``parametrizations``, its owner, deep copies."""
    return {
        "parametrizations": _PARAMETRIZATIONS,
        "_paramreg_owner": None if owner is None else weakref.ref(owner),
        "__deepcopy__": _deepcopy,
        "__prepare_scriptable__": _prepare_scriptable,
    }


def _deepcopy(self, memo):
    """A deep copy, on a class of its own if the original has one (so that owners are exact)."""
    base_copy = getattr(type(self).__bases__[0], "__deepcopy__", None)
    if base_copy is not None:
        replica = base_copy(self, memo)
    else:  # what torch's Parametrized<Cls> does for a class without __deepcopy__
        replica = memo.get(id(self))
        if replica is not None:
            return replica
        replica = self.__new__(type(self))
        memo[id(self)] = replica
        replica.__dict__ = copy.deepcopy(self.__dict__, memo)
        for slot in copyreg._slotnames(type(self)):
            if hasattr(self, slot):
                setattr(replica, slot, copy.deepcopy(getattr(self, slot), memo))
    if type(replica).__dict__.get("_paramreg_owner") is not None:
        _settle(replica)
    return replica


def _settle(module: nn.Module, without: tuple[str, ...] = ()) -> None:
    """Put ``module`` on its shared class if it may use it, else on a class of its own (Note [Shared classes])."""
    if _shareable(module):
        module.__class__ = _shared_class(module)
    else:
        _own_class(module, without)


def _save_hook(module, state_dict, prefix, local_metadata) -> None:
    """Keep, for each carried tensor, exactly the key the model would have without paramreg."""
    carried = _carried(module)
    if carried and torch.onnx.is_in_onnx_export():  # the TorchScript ONNX exporter (Note [Export guard])
        _refuse_export(module, "torch.onnx.export")
    metadata = getattr(state_dict, "_metadata", {})
    for name, alone in carried:
        inner = f"{prefix}parametrizations.{name}.original"
        if alone:
            if inner in state_dict:  # the stored tensor, under the plain key, in place
                state_dict[prefix + name] = state_dict.pop(inner)
            base = f"{prefix}parametrizations.{name}"
            if _plists(module)[name][0].transform is None:
                for key in [k for k in metadata if k == base or k.startswith(base + ".")]:
                    del metadata[key]
        else:  # the user's parametrizations stay: their key is the real one
            state_dict.pop(prefix + name, None)
    if not any(k.startswith(f"{prefix}parametrizations.") for k in state_dict):
        metadata.pop(f"{prefix}parametrizations", None)


def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Accept a carried tensor under its plain key or its parametrize key (checkpoints with or without paramreg)."""
    for name, _ in _carried(module):
        plain, inner = prefix + name, f"{prefix}parametrizations.{name}.original"
        if plain in state_dict and inner not in state_dict:
            state_dict[inner] = state_dict[plain]
        elif inner in state_dict and plain not in state_dict:
            state_dict[plain] = state_dict[inner]
        transform = _plists(module)[name][0].transform
        if transform is not None:  # a plain checkpoint has no threshold: keep the current one
            for key, value in transform.state_dict().items():
                state_dict.setdefault(f"{prefix}parametrizations.{name}.0.transform.{key}", value)


def _load_post_hook(module, incompatible_keys) -> None:
    _sync(module)  # load_state_dict(assign=True) assigns both slots separately
    plists = _plists(module)
    for name, _ in _carried(module):
        plists[name][0].remember(plists[name].original)  # a memory of the loaded tensor (KeepZeros: its zeros)


def _hooks_installed(module: nn.Module) -> bool:
    return any(h is _save_hook for h in module._state_dict_hooks.values())


def _install_hooks(module: nn.Module) -> None:
    if not _hooks_installed(module):
        module.register_state_dict_post_hook(_save_hook)
        module.register_load_state_dict_pre_hook(_load_hook)
        module.register_load_state_dict_post_hook(_load_post_hook)


def _uninstall_hooks(module: nn.Module) -> None:
    for hooks, ours in (
        (module._state_dict_hooks, _save_hook),
        (module._load_state_dict_pre_hooks, _load_hook),
        (module._load_state_dict_post_hooks, _load_post_hook),
    ):
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is ours]:
            del hooks[key]


def attach(slot: Slot, regularizer: Regularizer, mode: str, step: str = "auto", schedule=None, budget=None) -> Carrier:
    """Register and bind a carrier on ``slot``, which the caller has validated."""
    module, tname = slot.module, slot.tensor_name
    carrier = Carrier(regularizer, mode, step, schedule, budget)
    carrier.name = slot.name  # for messages
    carrier.remember(slot.value())
    if _parametrized(module):
        _own_class(module)  # torch is about to change the class: a fresh one (Note [Shared classes])
    order = list(module._parameters)
    parametrize.register_parametrization(module, tname, carrier)
    if slot.plist is None:  # a plain tensor: Note [The Parameter stays in its module]
        module._parameters[tname] = slot.param
        _reorder(module._parameters, order)
        _install_hooks(module)
    _settle(module)
    carrier._bind(_plists(module)[tname])
    return carrier


def _reorder(params: dict, order: list[str]) -> None:
    rank = {n: i for i, n in enumerate(order)}
    ordered = sorted(params.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    params.clear()
    params.update(ordered)


def detach(slot: Slot) -> None:
    """Remove paramreg's carrier from ``slot`` and nothing else.

    An identity carrier leaves every value as it is; a reparametrizing one (``SoftThreshold``) is
    folded first: the stored tensor becomes the tensor the module computed with.
    """
    module, tname, plist, carrier = slot.module, slot.tensor_name, slot.plist, slot.carrier
    _sync(module)
    if carrier.transform is not None:  # fold: the stored tensor becomes what the module computed with
        with torch.no_grad():
            plist.original.copy_(carrier(plist.original))
    if len(plist) > 1:
        # The user's own parametrizations stay; ours is the identity, so the chain's value is unchanged.
        first = plist[0] is carrier
        del plist[_index(plist, carrier)]
        if first:
            del module._parameters[tname]  # as torch has it for a parametrized tensor
        _settle(module)
    else:
        plists = _plists(module)
        del plists[tname]
        if len(plists) == 0:
            del module._modules["parametrizations"]
            module.__class__ = type(module).__bases__[0]
        else:
            _settle(module, without=(tname,))  # never delete a property from a class another module may share
    if not _carried(module):
        _uninstall_hooks(module)
    carrier._unbind()
