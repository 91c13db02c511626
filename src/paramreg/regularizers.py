"""The math: regularizers as pure tensor functions.

Every regularizer R knows two things about a tensor w:

- its penalty value R(w) (differentiable, for ``mode="penalty"`` and for reports), and
- its proximal map with step t >= 0::

      prox_{tR}(w) = argmin_z  ½‖z − w‖² + t·R(z)

  which is what ``mode="prox"`` applies to the stored weight right after each optimizer step,
  with t the learning rate that step used (``step="lr"``), and

- for maps that have one, its proximal map in a diagonal metric, with a step t_i per coordinate::

      prox^D_{R}(w) = argmin_z  Σ_i (z_i − w_i)² / (2·t_i) + R(z)

  which ``step="adaptive"`` takes in the optimizer's own metric (t_i = lr / (sqrt(v̂_i) + eps)
  for Adam; :mod:`paramreg.step_sizes`). With every t_i = t it is prox_{tR}.

Nothing here knows about modules, parametrizations or optimizers; the lifecycle code uses these
classes, never the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import dataclasses
import functools
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from .errors import ParamregError

__all__ = ["Regularizer", "L0", "L1", "L2", "ElasticNet", "register", "keywords"]


def _strength(label: str, value) -> float:
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


def _by_precision(tensors: Sequence[Tensor], steps: Sequence[Tensor]):
    """Split (tensors, steps) into the pairs that share a dtype, to be mapped in place as they
    are, and half-precision tensors, to be mapped on float32 copies and rounded once."""
    same = ([], [])
    low = []
    for w, t in zip(tensors, steps, strict=True):
        if w.dtype == t.dtype:
            same[0].append(w)
            same[1].append(t)
        else:
            low.append((w, t))
    return same, low


def _diag_(fn, tensors: Sequence[Tensor], steps: Sequence[Tensor]) -> None:
    """Apply ``fn(tensors, steps)`` (an in-place multi-tensor map) to ``tensors``; a tensor whose
    dtype differs from its steps' (bfloat16 or float16 weights, float32 steps) is mapped in float32
    and the result stored in its own dtype."""
    (ws, ts), low = _by_precision(tensors, steps)
    if ws:
        fn(ws, ts)
    for w, t in low:
        accurate = [w.to(t.dtype)]
        fn(accurate, [t])
        w.copy_(accurate[0])


def _elementwise(self, ndim: int) -> str:
    return "elements"


def _elastic_net_metric_(tensors: list[Tensor], inverse_steps: list[Tensor], l1: float = 0.0, l2: float = 0.0) -> None:
    """In place: the elastic-net prox in the metric diag(u), u = ``inverse_steps`` = 1/t (finite,
    > 0; consumed), which is L1's with l2 = 0 and L2's with l1 = 0::

        w ← sign(w)·max(abs(w) − a/u, 0)/(1 + b/u) = softshrink(u·w, a)/(u + b)

    The right-hand form takes three passes (a product, a scalar soft-threshold, a quotient) where
    w − clamp(w, −t·a, t·a) takes six; entries with u·abs(w) <= a become exact zeros.
    """
    torch._foreach_mul_(tensors, inverse_steps)
    _soft_threshold_(tensors, l1)
    if l2 != 0.0:
        torch._foreach_add_(inverse_steps, l2)
    torch._foreach_div_(tensors, inverse_steps)


def _sum_of(terms) -> Tensor:
    """The sum of a non-empty iterable of tensors, left to right (no leading 0 + first)."""
    terms = iter(terms)
    total = next(terms)
    for term in terms:
        total = total + term
    return total


def _soft_threshold_(tensors: Sequence[Tensor], threshold: float) -> None:
    """In place: w ← sign(w)·max(abs(w) − threshold, 0) over every tensor.

    On the CPU, ``softshrink`` written through ``out=`` into its own input is one pass per tensor
    with no temporary (aliasing is safe for an elementwise op), the memory-bound floor. On an
    accelerator, where a launch per tensor dominates for many small tensors, three multi-tensor
    ops do it for all tensors at once: w − clamp(w, −θ, θ), the same arithmetic (w − θ, w + θ, or
    w − w = 0), so the values are equal (a zero is +0 where softshrink may give −0).
    """
    if threshold == 0.0:
        return
    if len(tensors) > 1 and tensors[0].device.type != "cpu":
        _soft_threshold_multi_(list(tensors), threshold)
        return
    for w in tensors:
        torch._C._nn.softshrink(w, threshold, out=w)


def _soft_threshold_multi_(tensors: list[Tensor], threshold: float) -> None:
    clipped = torch._foreach_clamp_max(tensors, threshold)
    torch._foreach_clamp_min_(clipped, -threshold)
    torch._foreach_sub_(tensors, clipped)


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
    #: True when the map needs a memory per tensor taken when it is attached (:meth:`remember`).
    remembers = False

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
        :mod:`paramreg.sparsity`); regularizers without one cannot take a target."""
        raise NotImplementedError(f"{type(self).__name__} has no critical strength")

    def remember(self, w: Tensor) -> Tensor:
        """What the map needs to remember of ``w`` when attached (for ``remembers = True``)."""
        raise NotImplementedError

    def scaled(self, c: float) -> "Regularizer":
        """This regularizer with each of its :attr:`strengths` multiplied by ``c``.

        >>> import paramreg
        >>> paramreg.ElasticNet(l1=0.1, l2=0.2).scaled(0.5)
        ElasticNet(l1=0.05, l2=0.1)
        """
        if c == 1.0 or not self.strengths:
            return self
        return dataclasses.replace(self, **{f: getattr(self, f) * c for f in self.strengths})


@register("l1")
@dataclass(frozen=True)
class L1(Regularizer):
    r"""Lasso: R(w) = a·Σ abs(w), with a = ``strength``.

    Proximal map (soft-thresholding)::

        prox_{tR}(w) = sign(w)·max(abs(w) − t·a, 0)

    Entries whose magnitude is at most t·a become exact zeros.

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([2.0, 0.3, -1.0])
        >>> paramreg.L1(0.5).penalty(w)
        tensor(1.6500)
        >>> paramreg.L1(0.5).prox(w, t=1.0)
        tensor([ 1.5000,  0.0000, -0.5000])

    Reference: Tibshirani (1996), "Regression shrinkage and selection via the lasso";
    Parikh & Boyd (2014), "Proximal Algorithms", section 6.5.2.
    """

    strength: float
    unit = "weights"  # what one group of the map is (a sparsity target counts them)
    strengths = ("strength",)
    adaptive = True
    split = _elementwise

    def __post_init__(self):
        object.__setattr__(self, "strength", _strength("L1 strength", self.strength))

    def penalty(self, w: Tensor) -> Tensor:
        return self.strength * w.abs().sum()

    def penalty_sum(self, tensors: Sequence[Tensor]) -> Tensor:
        return self.strength * _sum_of(w.abs().sum() for w in tensors)

    def prox(self, w: Tensor, t: float) -> Tensor:
        return F.softshrink(w, float(t) * self.strength) if float(t) * self.strength else w.clone()

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        _soft_threshold_(tensors, float(t) * self.strength)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        x = w.to(torch.promote_types(w.dtype, t.dtype))
        threshold = t * self.strength
        return (x - torch.clamp(x, -threshold, threshold)).to(w.dtype)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        if self.strength != 0.0:
            _diag_(functools.partial(_elastic_net_metric_, l1=self.strength), tensors, inverse_steps)

    def critical(self, tensors: Sequence[Tensor], inverse_steps: Sequence) -> list[Tensor]:
        """abs(w_i)/t_i per element: the prox zeroes w_i exactly when the strength is at least that."""
        return [(w * u).abs_() for w, u in zip(tensors, inverse_steps, strict=True)]


def _hard_threshold_metric_(tensors: list[Tensor], inverse_steps: list[Tensor], l0: float) -> None:
    """In place: w_i ← w_i where w_i²·u_i > 2a, else 0 (u = ``inverse_steps`` = 1/t, consumed).

    The score w_i²·u_i is rounded exactly as :meth:`L0.critical` rounds it (times 2), so that a
    strength equal to an entry's critical strength zeroes it."""
    for w, u in zip(tensors, inverse_steps, strict=True):
        u.mul_(w * w)
        w.masked_fill_(u <= 2.0 * l0, 0.0)


@register("l0")
@dataclass(frozen=True)
class L0(Regularizer):
    r"""Best subset: R(w) = a·(number of non-zero entries of w), with a = ``strength``.

    Proximal map (hard thresholding; R is not convex, the map is still exact)::

        prox_{tR}(w)_i = w_i  if w_i²/(2t) > a,  else 0

    Unlike L1 it does not shrink the entries it keeps: it decides which entries are zero and
    leaves the others to the optimizer. With a target (``l0=True, sparsity=s``) the strength
    is calibrated on every step so that the fraction s of entries with the smallest
    w_i²/(2·t_i) is zero: in Adam's metric t_i = lr/(sqrt(v̂_i) + eps) this is gradual pruning
    by abs(w)·(sqrt(v̂) + eps)^½ in which zeros come back when their gradient moves them. R has no
    gradient, so there is no ``mode="penalty"``.

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([2.0, 0.3, -1.5])
        >>> paramreg.L0(0.5).penalty(w)
        tensor(1.5000)
        >>> paramreg.L0(0.5).prox(w, t=1.0)
        tensor([ 2.0000,  0.0000, -1.5000])

    Reference: Blumensath & Davies (2008), "Iterative thresholding for sparse approximations";
    Bolte, Sabach & Teboulle (2014), "Proximal alternating linearized minimization for
    nonconvex and nonsmooth problems".
    """

    strength: float
    unit = "weights"
    strengths = ("strength",)
    adaptive = True
    convex = False
    differentiable = False
    split = _elementwise

    def __post_init__(self):
        object.__setattr__(self, "strength", _strength("L0 strength", self.strength))

    def penalty(self, w: Tensor) -> Tensor:
        return self.strength * torch.count_nonzero(w).to(torch.promote_types(w.dtype, torch.float32))

    # Every form compares the score w²·(1/t) with 2a, rounded as critical() rounds w²·(1/t)/2.

    def prox(self, w: Tensor, t: float) -> Tensor:
        return w.masked_fill(w * w * (1.0 / float(t)) <= 2.0 * self.strength, 0.0) if float(t) * self.strength else w.clone()

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        if float(t) * self.strength:
            for w in tensors:
                w.masked_fill_(w * w * (1.0 / float(t)) <= 2.0 * self.strength, 0.0)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        x = w.to(torch.promote_types(w.dtype, t.dtype))
        return x.masked_fill(x * x * t.reciprocal() <= 2.0 * self.strength, 0.0).to(w.dtype)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        if self.strength != 0.0:
            _diag_(functools.partial(_hard_threshold_metric_, l0=self.strength), tensors, inverse_steps)

    def critical(self, tensors: Sequence[Tensor], inverse_steps: Sequence) -> list[Tensor]:
        """w_i²/(2·t_i) per element: the prox zeroes w_i exactly when the strength is at least that."""
        return [w * w * u / 2 for w, u in zip(tensors, inverse_steps, strict=True)]


@register("l2")
@dataclass(frozen=True)
class L2(Regularizer):
    r"""Ridge: R(w) = (b/2)·Σ w², with b = ``strength``.

    This is the convention of torch's ``weight_decay=b`` (its gradient is b·w); Keras ``L2(c)``
    penalizes c·Σ w², which is ``L2(2c)`` here.

    Proximal map (shrinkage)::

        prox_{tR}(w) = w / (1 + t·b)

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([2.0, -1.0])
        >>> paramreg.L2(0.5).penalty(w)
        tensor(1.2500)
        >>> paramreg.L2(1.0).prox(w, t=1.0)
        tensor([ 1.0000, -0.5000])
    """

    strength: float
    strengths = ("strength",)
    adaptive = True
    split = _elementwise

    def __post_init__(self):
        object.__setattr__(self, "strength", _strength("L2 strength", self.strength))

    def penalty(self, w: Tensor) -> Tensor:
        return 0.5 * self.strength * w.pow(2).sum()

    def penalty_sum(self, tensors: Sequence[Tensor]) -> Tensor:
        return 0.5 * self.strength * _sum_of(w.pow(2).sum() for w in tensors)

    def prox(self, w: Tensor, t: float) -> Tensor:
        return w / (1.0 + float(t) * self.strength)

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        if self.strength != 0.0:
            torch._foreach_div_(list(tensors), 1.0 + float(t) * self.strength)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        return (w.to(torch.promote_types(w.dtype, t.dtype)) / (1.0 + t * self.strength)).to(w.dtype)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        if self.strength != 0.0:
            _diag_(functools.partial(_elastic_net_metric_, l2=self.strength), tensors, inverse_steps)


@register("elastic_net")
@dataclass(frozen=True)
class ElasticNet(Regularizer):
    r"""Elastic net: R(w) = a·Σ abs(w) + (b/2)·Σ w², with a = ``l1`` and b = ``l2``.

    Its proximal map is exact in closed form (soft-threshold, then shrink)::

        prox_{tR}(w) = sign(w)·max(abs(w) − t·a, 0) / (1 + t·b)

    scikit-learn's ``ElasticNet(alpha, l1_ratio=r)`` is ``ElasticNet(l1=alpha·r, l2=alpha·(1 − r))``
    on the loss (1/(2n))‖y − Xw‖².

    Example:
        >>> import torch, paramreg
        >>> w = torch.tensor([2.0, 0.3])
        >>> paramreg.ElasticNet(l1=0.5, l2=1.0).prox(w, t=1.0)
        tensor([0.7500, 0.0000])
    """

    l1: float
    l2: float
    strengths = ("l1", "l2")
    adaptive = True
    split = _elementwise

    def __post_init__(self):
        object.__setattr__(self, "l1", _strength("ElasticNet l1", self.l1))
        object.__setattr__(self, "l2", _strength("ElasticNet l2", self.l2))

    def penalty(self, w: Tensor) -> Tensor:
        return self.l1 * w.abs().sum() + 0.5 * self.l2 * w.pow(2).sum()

    def penalty_sum(self, tensors: Sequence[Tensor]) -> Tensor:
        return self.l1 * _sum_of(w.abs().sum() for w in tensors) + 0.5 * self.l2 * _sum_of(w.pow(2).sum() for w in tensors)

    def prox(self, w: Tensor, t: float) -> Tensor:
        shrunk = F.softshrink(w, float(t) * self.l1) if float(t) * self.l1 else w
        return shrunk / (1.0 + float(t) * self.l2)

    def prox_(self, tensors: Sequence[Tensor], t: float) -> None:
        _soft_threshold_(tensors, float(t) * self.l1)
        if self.l2 != 0.0:
            torch._foreach_div_(list(tensors), 1.0 + float(t) * self.l2)

    def prox_diag(self, w: Tensor, t: Tensor) -> Tensor:
        return L2(self.l2).prox_diag(L1(self.l1).prox_diag(w, t), t)

    def prox_diag_(self, tensors: Sequence[Tensor], inverse_steps: list[Tensor]) -> None:
        _diag_(functools.partial(_elastic_net_metric_, l1=self.l1, l2=self.l2), tensors, inverse_steps)
