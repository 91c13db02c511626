"""Module classes: the one class paramreg gives all modules of an original class whose tensors it carries.

Note [Module classes]
    torch's parametrize gives each parametrized module a class ``Parametrized<Cls>`` of its own,
    with one property per parametrized tensor, adds a property to that class in
    ``register_parametrization``, deletes one in ``remove_parametrizations``, and lets a deep copy
    share the class with its original. A class per module costs with many small layers (Python's
    attribute caches are per class; benchmarks/forward_overhead.py measures it), and a property
    that calls the ``ParametrizationList`` costs about 5 µs per read.

    paramreg moves every module it carries a tensor of onto one class per original class
    (:func:`class_for`), shared by all such modules and never changed except by adding to it:

    - A tensor whose list is one identity carrier needs no property: paramreg keeps the
      Parameter in ``module._parameters`` (Note [The Parameter stays in its module] in
      modules/binding.py), where ``nn.Module.__getattr__`` finds it as on a plain module. That is
      by far the usual case, and the fastest (a property on 200 small layers cost 4% of an
      inference forward: it reads four more dicts per read, out of cache).
    - Any other chain under a name (a ``SoftThreshold``, a user's parametrization before or
      after ours) gets one *universal* property for that name on the class
      (:func:`tensor_property`): for a module whose list for that name is one identity carrier
      it returns the stored Parameter (Note [Fast identity reads]); for any other chain the
      chain's value, with torch's cache; for a module that parametrizes nothing under that name,
      what a plain module has. So one class serves every module of the original class, whatever
      each carries. It is installed when paramreg binds such a chain (:func:`settle`), when torch
      appends to a list that starts with paramreg's carrier (the list's class, ``_WatchedList``,
      tells every paramreg class), and when torch adds a property (below).
    - Its metaclass keeps that true under torch's own calls on such a module: the property that
      ``register_parametrization`` adds to ``module.__class__`` becomes the universal property,
      and ``remove_parametrizations`` deleting one (or one the class never had) leaves the class
      as it is (it serves the other modules).
    - Reads never change a class: ``module.parametrizations``, ``is_parametrized``, ``repr``,
      ``state_dict`` and the walks of paramreg read and return. Classes change only in
      ``attach`` and ``remove``.
    - A class another library builds on top is kept: FSDP2's ``fully_shard`` makes
      ``FSDP<Cls>(FSDPModule, Cls)`` from whatever class the module has. paramreg finds its class
      in the MRO (:func:`ours_in`), and when the module's last carrier goes it gives back the same
      class built on the original class (:func:`built_on`; FSDP2's own class for it, from FSDP2's
      cache, where FSDP2 built the class).

Note [Fast identity reads]
    parametrize's property calls the ParametrizationList module on every read (about 5 µs);
    with hundreds of small layers that is most of the forward pass. When the list holds only an
    identity carrier, the value is the stored Parameter itself, so the property returns it
    directly (under ``parametrize.cached()`` too: the cached value would be that very tensor).
    Anything else computes the chain as torch's property does, with torch's cache keyed by the
    module.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from . import export_guard
from .carrier import Carrier, changed
from .walk import carried, parametrized, plists, sync

__all__ = ["settle", "restore", "ours_in", "class_for", "tensor_property", "watch", "unwatch"]

# original class -> paramreg's class for it; weak, so that a class can go
_CLASSES: "weakref.WeakValueDictionary[type, type]" = weakref.WeakValueDictionary()
# a metaclass -> paramreg's metaclass derived from it
_METACLASSES: dict[type, type] = {}
# (a class built on paramreg's class, the class to build it on instead) -> that class
_BUILT: dict[tuple[type, type], type] = {}


def tensor_property(name: str) -> property:
    """``module.<name>`` for every module of a paramreg class (Note [Module classes])."""

    def get(self):
        found = self._modules.get("parametrizations")
        plist = None if found is None else found._modules.get(name)
        if plist is None:  # this module does not parametrize ``name``: what a plain module has
            if name in self.__dict__:
                return self.__dict__[name]
            return nn.Module.__getattr__(self, name)
        entries = plist._modules
        if len(entries) == 1:
            first = entries["0"]
            if type(first) is Carrier and first.transform is None:  # Note [Fast identity reads]
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
        found = self._modules.get("parametrizations")
        plist = None if found is None else found._modules.get(name)
        if plist is None:
            self.__dict__[name] = value
        else:
            plist.right_inverse(value)

    def delete(self):
        if name not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        del self.__dict__[name]

    get.paramreg = True
    return property(get, set, delete)


def _universal(value) -> bool:
    return isinstance(value, property) and getattr(value.fget, "paramreg", False)


def _metaclass(meta: type) -> type:
    """A metaclass derived from ``meta`` whose classes keep their universal properties."""
    found = _METACLASSES.get(meta)
    if found is not None:
        return found

    def __setattr__(cls, name, value):
        if isinstance(value, property) and getattr(value.fget, "__name__", "") == "get_parametrized":
            # torch's register_parametrization adding its property: the universal one serves this module too
            if not _universal(getattr(cls, name, None)):
                meta.__setattr__(cls, name, tensor_property(name))
            return
        meta.__setattr__(cls, name, value)

    def __delattr__(cls, name):
        if name not in cls.__dict__ or _universal(cls.__dict__[name]):
            return  # torch's remove_parametrizations on one module: what the class has serves the others
        meta.__delattr__(cls, name)

    found = _METACLASSES[meta] = type(f"Paramreg{meta.__name__.capitalize()}", (meta,), {
        "__setattr__": __setattr__, "__delattr__": __delattr__,
    })
    return found


class _WatchedList(ParametrizationList):
    """The ``ParametrizationList`` of a tensor whose first entry is paramreg's carrier: when
    something is added to it (torch's ``register_parametrization`` on top of the carrier), the
    tensor's value is no longer the stored Parameter, so every paramreg class gets the universal
    property for its name (Note [Module classes])."""

    def append(self, module):
        out = super().append(module)
        _computed(self)
        return out

    def insert(self, index, module):
        super().insert(index, module)
        _computed(self)

    def extend(self, modules):
        out = super().extend(modules)
        _computed(self)
        return out

    def __setitem__(self, index, module):
        super().__setitem__(index, module)
        _computed(self)


_WatchedList.__name__ = _WatchedList.__qualname__ = "ParametrizationList"  # prints as torch's


def _computed(plist) -> None:
    first = plist._modules.get("0")
    if isinstance(first, Carrier):
        for cls in list(_CLASSES.values()):
            _ensure(cls, first.tensor_name)


def _ensure(cls: type, name: str) -> None:
    """``cls`` has the universal property for ``name``."""
    if not _universal(getattr(cls, name, None)):
        type.__setattr__(cls, name, tensor_property(name))


def _identity_only(plist) -> bool:
    entries = plist._modules
    return len(entries) == 1 and type(entries["0"]) is Carrier and entries["0"].transform is None


def watch(plist) -> None:
    """Make a carried tensor's list tell paramreg's classes when something is added to it."""
    if type(plist) is ParametrizationList:
        plist.__class__ = _WatchedList


def unwatch(plist) -> None:
    """The list as torch made it (paramreg's carrier left it; the user's entries stay)."""
    if type(plist) is _WatchedList:
        plist.__class__ = ParametrizationList


def _carried_names(module: nn.Module) -> str:
    found = plists(module) or {}
    return ", ".join(f"'{pl[0].name}'" for pl in found.values() if isinstance(pl[0], Carrier)) or type(module).__name__


def _methods(cell: list) -> dict:
    """What paramreg's class adds to torch's namespace; ``cell[0]`` is the class once it exists."""

    def __setattr__(self, name, value):
        # As on a plain module, a new Parameter replaces a carried tensor; the forward pass uses it too
        # (Note [The Parameter stays in its module] in modules/binding.py).
        if isinstance(value, nn.Parameter):
            found = self._modules.get("parametrizations")
            plist = None if found is None else found._modules.get(name)
            if plist is not None and isinstance(plist[0], Carrier):
                plist._parameters["original"] = value
                self._parameters[name] = value
                changed()
                return
        super(cell[0], self).__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        out = super(cell[0], self)._apply(fn, recurse)
        sync(self)
        return out

    def get_parametrizations(self):
        """``module.parametrizations``; refuses a trace or an export (Note [Export guard] in modules/export_guard.py)."""
        how = export_guard.exporting()
        if how is not None and carried(self):
            export_guard.refuse(_carried_names(self), how)
        found = self._modules.get("parametrizations")
        if found is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'parametrizations'")
        return found

    def __prepare_scriptable__(self):
        """TorchScript calls this on every module before compiling it (Note [Export guard])."""
        if carried(self):
            export_guard.refuse(_carried_names(self), "torch.jit.script")
        return self

    return {
        "__setattr__": __setattr__,
        "_apply": _apply,
        "parametrizations": property(get_parametrizations),
        "__prepare_scriptable__": __prepare_scriptable__,
    }


def class_for(base: type, template: type) -> type:
    """paramreg's class for modules whose original class is ``base``; ``template`` is the class
    torch's parametrize made for one of them (its ``__getstate__``, which refuses pickling, and
    ``__deepcopy__`` are kept; its properties are not)."""
    found = _CLASSES.get(base)
    if found is not None:
        return found
    namespace = {k: v for k, v in vars(template).items() if k not in ("__dict__", "__weakref__") and not isinstance(v, property)}
    cell: list = []
    namespace.update(_methods(cell))
    namespace["_paramreg_base"] = base
    cls = _metaclass(type(base))(template.__name__, (base,), namespace)
    cell.append(cls)
    return _CLASSES.setdefault(base, cls)


def ours_in(cls: type) -> type | None:
    """paramreg's class in ``cls``'s MRO: ``cls`` itself, or one that another library built on; None if none."""
    return next((c for c in cls.__mro__ if "_paramreg_base" in c.__dict__), None)


def settle(module: nn.Module) -> None:
    """After torch registered a parametrization on ``module`` for paramreg: put it on paramreg's
    class, with a universal property for every tensor whose chain is not one identity carrier
    (Note [Module classes])."""
    cls = type(module)
    ours = ours_in(cls)
    if ours is None:  # the class torch's parametrize made (now or for the user's own parametrizations)
        ours = class_for(cls.__bases__[0], cls)
        module.__class__ = ours
    for name, plist in (plists(module) or {}).items():
        if not _identity_only(plist):
            _ensure(ours, name)


def restore(module: nn.Module) -> None:
    """After paramreg's last carrier on ``module`` went: the class it would have without paramreg
    (its original class, or torch's parametrized class while the user's parametrizations stay),
    under any class another library built on paramreg's."""
    cls = type(module)
    ours = ours_in(cls)
    if ours is None:
        return
    base = ours._paramreg_base
    if parametrized(module):  # the user's own parametrizations stay: a class as torch makes one
        module.__class__ = base
        parametrize._inject_new_class(module)
        for name in plists(module):
            parametrize._inject_property(module, name)
        target = type(module)
    else:
        target = base
    module.__class__ = target if cls is ours else built_on(cls, ours, target)


def built_on(cls: type, ours: type, target: type) -> type:
    """The class another library built on ``ours`` (``cls``), built on ``target`` instead."""
    key = (cls, target)
    found = _BUILT.get(key)
    if found is not None:
        return found
    bases = tuple(target if b is ours else built_on(b, ours, target) if ours in b.__mro__ else b for b in cls.__bases__)
    fsdp = _fsdp_classes()
    if fsdp is not None and fsdp.get(ours) is cls:  # FSDP2's class: FSDP2's own for the target
        found = fsdp.get(target)
    if found is None:
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__") and not _universal(v)}
        name = cls.__name__.replace(ours.__name__, target.__name__)
        found = types.new_class(name, bases, exec_body=lambda ns: ns.update(namespace))
        found.__module__ = cls.__module__
        if fsdp is not None and fsdp.get(ours) is cls:
            found = fsdp.setdefault(target, found)
    _BUILT[key] = found
    return found


def _fsdp_classes() -> dict | None:
    """FSDP2's cache of the classes ``fully_shard`` made (original class -> FSDP class), if FSDP2 is there."""
    try:
        from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls
    except ImportError:
        return None
    return get_cls_to_fsdp_cls()
