"""The catalogue's contract: the ``Regularizer`` base class, every hook the mechanism calls, and the keyword registry.

Every regularizer R knows two things about a tensor w:

- its penalty value R(w) (differentiable, for ``mode="penalty"`` and for reports), and
- its proximal map with step t >= 0::

      prox_{tR}(w) = argmin_z  ½‖z − w‖² + t·R(z)

  which is what ``mode="prox"`` applies to the stored weight right after each optimizer step,
  with t the learning rate that step used (``step="lr"``), and

- for maps that have one, its proximal map in a diagonal metric, with a step t_i per coordinate::

      prox^D_{R}(w) = argmin_z  Σ_i (z_i − w_i)² / (2·t_i) + R(z)

  which ``step="adaptive"`` takes in the optimizer's own metric (t_i = lr / (sqrt(v̂_i) + eps)
  for Adam; :mod:`paramreg.optim.step_sizes`). With every t_i = t it is prox_{tR}.

Nothing in the catalogue knows about modules, parametrizations or optimizers; the mechanism uses
these classes, never the reverse (docs/design.md, "Layout").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

from torch import Tensor

from ..errors import ParamregError

__all__ = ["Regularizer", "register", "keywords", "build", "check_strength"]


def check_strength(label: str, value) -> float:
    """Check that a strength is a finite real number >= 0 (a Python or NumPy number, or a
    one-element tensor) and return it as a float."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParamregError(f"{label} must be a real number >= 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ParamregError(f"{label} must be a finite number >= 0, got {value!r}")
    return value


# Every Regularizer subclass by class name, so that a spec (a plain dict) can rebuild it.
_BY_NAME: dict[str, type] = {}
# attach() keywords: name -> Regularizer subclass (paramreg.register)
_KEYWORDS: dict[str, type] = {}
_RESERVED = ("model", "targets", "reg", "exclude", "mode")


def register(name: str):
    """Class decorator: make a :class:`Regularizer` subclass reachable as ``attach(..., name=value)``.

    The keyword's value builds the regularizer: ``cls(value)`` for a number, ``cls(*value)`` for
    a tuple, ``cls(**value)`` for a dict, ``cls()`` for ``True``. Subclasses that are dataclasses
    also round-trip through :func:`paramreg.spec`.

    Example:
        >>> import dataclasses, torch, paramreg
        >>> @paramreg.register("clip")
        ... @dataclasses.dataclass(frozen=True)
        ... class Clip(paramreg.Regularizer):
        ...     "Projection onto the box [-bound, bound]: penalty 0 inside, +inf outside."
        ...     bound: float
        ...     kind = "constraint"
        ...     def penalty(self, w):
        ...         inside = bool(w.abs().max() <= self.bound)
        ...         return torch.tensor(0.0 if inside else float("inf"), dtype=w.dtype)
        ...     def prox(self, w, t):
        ...         return w.clamp(-self.bound, self.bound)
        >>> model = torch.nn.Linear(4, 2)
        >>> paramreg.attach(model, "weight", clip=0.1)
        ['weight']
        >>> paramreg.report(model).rows[0].regularizer
        'Clip(bound=0.1)'
    """
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
        raise ParamregError(f"register: {name!r} cannot be an attach() keyword; use a Python identifier")

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise ParamregError(f"register({name!r}) decorates a paramreg.Regularizer subclass, got {cls!r}")
        keyword, type_name = _KEYWORDS.get(name), _BY_NAME.get(cls.__name__)
        # A keyword may be taken again only by a class defined again (a re-run notebook cell);
        # a type name (what specs store) never shadows a built-in.
        if keyword is not None and keyword is not cls and (_builtin(keyword) or _where(keyword) != _where(cls)):
            raise ParamregError(f"register: the keyword {name!r} is taken by {_where(keyword)}")
        if type_name is not None and type_name is not cls and _builtin(type_name):
            raise ParamregError(f"register: the type name {cls.__name__!r} is taken by {_where(type_name)}")
        _KEYWORDS[name] = cls
        _BY_NAME[cls.__name__] = cls
        return cls

    return decorate


def _builtin(cls: type) -> bool:
    return cls.__module__.startswith("paramreg.")


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def keywords() -> dict[str, type]:
    """The attach() keywords and the regularizer class each builds."""
    return dict(_KEYWORDS)


def build(name: str, value) -> "Regularizer":
    """The regularizer that ``attach(..., name=value)`` asks for."""
    cls = _KEYWORDS[name]
    if value is True:
        return cls()
    if isinstance(value, tuple):
        return cls(*value)
    if isinstance(value, dict):
        return cls(**value)
    return cls(value)


class Regularizer:
    """Base class: a penalty R(w) and its proximal map.

    Subclasses implement :meth:`penalty` and :meth:`prox` as pure functions of a tensor, and may
    override :meth:`prox_` with a faster in-place version over many tensors at once. Built-in
    regularizers are frozen dataclasses: immutable, equal when their settings are equal, printed
    as the call that made them, and convertible to and from plain dicts (:meth:`to_dict`,
    :meth:`from_dict`).

    This class declares everything the mechanism asks of a regularizer, each with its default:
    the attributes ``kind``, ``convex``, ``differentiable``, ``strengths``, ``adaptive``, ``joint``,
    ``remembers``, ``every`` and ``unit``, and the methods below. A regularizer overrides only
    what differs; tests/test_catalogue.py runs every registered one through the same contract.
    """

    #: "penalty": penalty and prox (either mode); "constraint": a projection, penalty 0 on the set
    #: and +inf outside (mode="prox" only); "reparametrization": acts in the forward pass.
    kind = "penalty"
    #: True when the map is the proximal map of a convex function (so it is non-expansive).
    convex = True
    #: False when R has no useful gradient (a count), so that ``mode="penalty"`` is refused.
    differentiable = True
    #: The fields that are strengths; R is linear in them, so a schedule's factor c scales them
    #: all (:meth:`scaled`), and prox_{t·R_{c·a}} = prox_{(c·t)·R_a}.
    strengths = ()
    #: True when the map has a diagonal-metric form (:meth:`prox_diag`), which ``step="adaptive"``
    #: takes in the optimizer's own metric.
    adaptive = False
    #: True when the map couples several tensors (one group spans all of them), so that
    #: :meth:`prox_` and :meth:`prox_diag_` must receive them all in one call.
    joint = False
    #: True when the map needs a memory per tensor taken when it is attached (:meth:`remember`);
    #: it is then applied by :meth:`project_` with those memories.
    remembers = False
    #: Apply the map on every k-th optimizer step that updates a tensor, with step k·t (an
    #: expensive map such as ``NuclearNorm``'s SVD).
    every = 1
    #: What one group of the map is, in words: a sparsity target counts them ("weights" for L1,
    #: "channels" for coupled channels).
    unit = "groups"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _BY_NAME.setdefault(cls.__name__, cls)

    def check(self, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of this shape cannot take this regularizer, or None."""
        return None

    def split(self, ndim: int) -> str | None:
        """How the adaptive prox may cut a tensor with ``ndim`` dims into blocks mapped one by one
        (on the CPU, to keep its passes in cache): ``"elements"`` (the map acts on each coordinate
        alone: any flat slices), ``"rows"`` (slices along dim 0 hold whole groups), or None."""
        return None

    def to_dict(self) -> dict:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal regularizer.

        >>> import paramreg
        >>> paramreg.ElasticNet(l1=0.1, l2=0.2).to_dict()
        {'type': 'ElasticNet', 'l1': 0.1, 'l2': 0.2}
        """
        if not dataclasses.is_dataclass(self):
            raise ParamregError(
                f"{type(self).__name__} cannot be written as a spec: make it a frozen dataclass of its settings"
            )
        return {"type": type(self).__name__, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> "Regularizer":
        """Rebuild a regularizer from :meth:`to_dict`'s output.

        >>> import paramreg
        >>> paramreg.Regularizer.from_dict({"type": "L1", "strength": 1e-4})
        L1(strength=0.0001)
        """
        if not isinstance(d, dict) or not isinstance(d.get("type"), str):
            raise ParamregError(f"a regularizer spec is a dict with a 'type' key, got {d!r}")
        cls = _BY_NAME.get(d["type"])
        if cls is None:
            raise ParamregError(f"unknown regularizer type {d['type']!r}; known types: {', '.join(sorted(_BY_NAME))}")
        settings = {k: v for k, v in d.items() if k != "type"}
        try:
            return cls(**settings)
        except TypeError as e:
            raise ParamregError(f"regularizer spec {d!r} does not fit {cls.__name__}: {e}") from None

    def penalty(self, w: Tensor) -> Tensor:
        """R(w), a differentiable scalar tensor."""
        raise NotImplementedError

    def penalty_sum(self, tensors: Sequence[Tensor]) -> Tensor:
        """Σ_k R(w_k) over several tensors, differentiable (``paramreg.penalty`` calls it once per
        regularizer); subclasses may override it with a faster form.

        >>> import torch, paramreg
        >>> paramreg.L1(0.5).penalty_sum([torch.tensor([1.0, -2.0]), torch.tensor([4.0])])
        tensor(3.5000)
        """
        total = self.penalty(tensors[0])
        for w in tensors[1:]:
            total = total + self.penalty(w)
        return total

    def prox(self, w: Tensor, t: float) -> Tensor:
        """argmin_z ½‖z − w‖² + t·R(z), as a new tensor of w's shape and dtype."""
        raise NotImplementedError

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        """Apply :meth:`prox` with step ``t`` in place to every tensor (no autograd)."""
        for w in tensors:
            w.copy_(self.prox(w, t))

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        """argmin_z Σ_i (z_i − w_i)²/(2·t_i) + R(z) with ``t`` a tensor of steps t_i > 0 of w's
        shape, as a new tensor of w's shape and dtype (for regularizers with ``adaptive = True``)."""
        raise NotImplementedError(f"{type(self).__name__} has no diagonal-metric proximal map")

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        """Apply :meth:`prox_diag` in place to every tensor, with steps t = 1/``inverse_steps``
        (finite and > 0; scratch tensors the call may overwrite; float32 for half-precision
        weights)."""
        for w, u in zip(tensors, inverse_steps, strict=True):
            w.copy_(self.prox_diag(w, u.reciprocal_()))

    def critical(self, tensors: Sequence[Tensor], inverse_steps: Sequence) -> list[Tensor]:
        """Per tensor, the critical strength of each of its groups: the smallest strength at which
        the proximal map with steps t = 1/``inverse_steps`` (a tensor of w's shape, or a number)
        maps the group to zero, for this regularizer's form (its own strength is ignored). Target
        sparsity calibrates the strength from these (Note [Target sparsity] in
        :mod:`paramreg.optim.targets`); regularizers without one cannot take a target."""
        raise NotImplementedError(f"{type(self).__name__} has no critical strength")

    def remember(self, w: Tensor) -> Tensor:
        """What the map needs to remember of ``w`` when attached (for ``remembers = True``)."""
        raise NotImplementedError(f"{type(self).__name__} remembers nothing")

    def project_(self, tensors: Sequence[Tensor], memories: Sequence[Tensor]) -> None:
        """For ``remembers = True``: the map in place, with each tensor's memory from :meth:`remember`
        (it takes no step size)."""
        raise NotImplementedError(f"{type(self).__name__} remembers nothing")

    def transform(self):
        """For ``kind = "reparametrization"``: a new ``nn.Module`` that computes the tensor the
        module uses from the stored one, in the forward pass (its parameters train with the model)."""
        raise NotImplementedError(f"{type(self).__name__} does not act in the forward pass")

    def scaled(self, c: float) -> "Regularizer":
        """This regularizer with each of its :attr:`strengths` multiplied by ``c``.

        >>> import paramreg
        >>> paramreg.ElasticNet(l1=0.1, l2=0.2).scaled(0.5)
        ElasticNet(l1=0.05, l2=0.1)
        """
        if c == 1.0 or not self.strengths:
            return self
        return dataclasses.replace(self, **{f: getattr(self, f) * c for f in self.strengths})
