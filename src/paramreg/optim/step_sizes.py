"""Step sizes: the t of the proximal map that each step policy takes after an optimizer step.

Note [Step policies]
    ``step="lr"``: t = the learning rate of the parameter's group, the same for every coordinate
    (the decoupled form, as AdamW decouples weight decay). After an SGD step this is exact
    proximal gradient. After an Adam step it is not: the gradient step was scaled per coordinate
    by 1/(sqrt(v̂_i) + eps), and a prox of size lr·a solves a reweighted problem (entries with a
    small second moment are shrunk relatively more), not the lasso.

    ``step="adaptive"``: the proximal map is taken in the optimizer's own metric, with a step
    equal to the scaling the optimizer applied to the gradient, per coordinate for the adaptive
    ones (whose denominators are safeguarded, Note [Safeguarded metric]):

        SGD                    t = lr·c_k   (nesterov: lr·(1 + μ·c_k))
        Adam, AdamW, NAdam     t_i = lr / (sqrt(v̂_i) + eps),  v̂ = v / (1 − β₂ᵏ)  (max v with amsgrad)
        RAdam                  t_i = lr·ρ_k·sqrt(1 − β₂ᵏ) / (sqrt(v_i) + eps) when rectified, else lr
        Adamax                 t_i = lr / u_i,  u the exponentially weighted infinity norm
        RMSprop                t_i = lr·c_k / (sqrt(v_i − m_i²·[centered]) + eps)   (c_k = 1 without momentum)
        Adagrad                t_i = lr / (1 + (k − 1)·lr_decay) / (sqrt(Σ g²) + eps)

    A proximal gradient method in a fixed metric D has the fixed points of the plain one, so
    the optimizer followed by this prox targets the penalized problem itself: Adam + L1(a) the
    lasso with strength a (GROUND.md section 5; checked against scikit-learn's ``Lasso`` in the
    tests), and so does SGD with momentum. Adam's first-moment average is normalized (its bias
    correction tends to 1), so it adds no factor.

    ``step="auto"`` (the default) is ``"adaptive"`` where it applies and ``"lr"`` elsewhere: an
    optimizer listed above, and for the per-coordinate metrics a regularizer with a
    diagonal-metric map (SGD's scalar step suits every regularizer).

Note [Safeguarded metric]
    In an adaptive optimizer's metric a coordinate's step is lr/(sqrt(v̂_i) + eps). A coordinate
    that gets no gradient (an input that is always 0, an embedding row unused for a while, a dead
    unit) has v̂_i near 0 and a step up to lr/eps = 1e8·lr, so the prox in the plain metric zeroes
    it at any strength, however small: on the quickstart's CNN under Adam, a50/1000 (a50 the
    strength that gives 50% zeros) zeroed 24.5% of the weights (benchmarks/near_zero.py). The
    default therefore floors each denominator at F, what it would be for a coordinate that had
    seen a gradient of the size r at every step, r the root mean square of the gradient the
    tensor was just stepped with:

        Adam, AdamW, NAdam     max(sqrt(v̂_i), r)           (in v's raw units: r·sqrt(1 − β₂ᵏ))
        RAdam                  max(sqrt(v_i), r·sqrt(1 − β₂ᵏ))
        Adamax                 max(u_i, r)
        RMSprop                max(sqrt(v_i), r·sqrt(1 − αᵏ))
        Adagrad                max(sqrt(Σ g²), r·sqrt(k))

    so no coordinate's step exceeds lr/r (times the optimizer's scalar factors). A proximal
    method in a metric has the fixed points of the penalized problem exactly where the prox's
    metric is the gradient step's; the floor changes the prox's metric only on coordinates whose
    denominator is below F, and at a lasso optimum every gradient is at most a in magnitude, so
    r <= a and such a coordinate is held at zero as the lasso holds it. Adam + L1(a) reaches
    scikit-learn's lasso with the floor (tested); a tiny strength stays nearly off. The floor's
    multiple of r is an option of ``attach``, ``metric_floor`` (default 1; 0 gives the plain
    metric). The floor is computed over whole tensors (one reduction of each
    gradient), before the CPU's cache-sized blocks (Note [Blocks] in optim/applying.py).

Note [Correctly rounded sqrt]
    torch's eager ``sqrt`` of float32 CPU tensors is MKL's vectorized one, which is not correctly
    rounded on every CPU: on an AMD EPYC it was 1 ulp off for 17% of 65,536 values (against
    numpy's and the compiled kernels' correctly rounded one; it was exact on the Intel machines
    of earlier stops). The compiled kernels and the native pass compute sqrt correctly rounded,
    so the eager path ranked other values than the fused one there: a target's m-th critical
    strength moved by a few ulp and the count of weights tied with it (within 2^-18) by one.
    So the metric's float32 sqrt on the CPU is taken in float64 and rounded to float32
    (``_sqrt``), which is correctly rounded: a square root of a 24-bit float lies at least
    2^-50 relative from any float32 midpoint, and MKL's float64 sqrt errs by far less. Other
    dtypes and devices take torch's ``sqrt`` (CUDA's is correctly rounded by default).

The momentum fill c_k of SGD and RMSprop, and how it is tracked and resumed: Note [Momentum fill]
in optim/state.py.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from ..errors import ParamregError

__all__ = ["POLICIES", "KNOWN", "decaying", "FILLING", "DEFAULT_METRIC_FLOOR", "adam_key", "resolve", "metric", "floors", "inverse_steps", "sgd_factor", "settled", "whole", "adam_scalars", "floor_factor"]

POLICIES = ("auto", "lr", "adaptive")


def _moments(name: str, states: list[dict], key: str):
    """The state tensors ``key`` of the parameters whose optimizer ``states`` are given, and their
    step counts; half-precision state as float32."""
    missing = [i for i, s in enumerate(states) if key not in s]
    if missing:
        raise ParamregError(
            f"{name} has no {key!r} state for a parameter it just stepped; "
            f"paramreg cannot take step='adaptive' from it: attach with step='lr'"
        )
    tensors = [s[key] if s[key].dtype in (torch.float32, torch.float64) else s[key].float() for s in states]
    counts = [float(s["step"]) if "step" in s else 0.0 for s in states]
    return tensors, counts


# Each function below returns the inverse steps 1/t_i = d_i/lr as new tensors (the denominators d_i
# of Note [Step policies] with 1/lr folded into their scalar factors: no extra pass), or None
# where the step is t = lr for every coordinate.


def _raise_(tensors: list[Tensor], floors: list | None) -> list[Tensor]:
    """In place: each tensor raised to its floor (a 0-dim tensor, or a number for a DTensor)."""
    if floors is None:
        return tensors
    if isinstance(floors[0], Tensor):
        torch._foreach_maximum_(tensors, floors)
    else:  # DTensor has no sharding rule for the multi-tensor maximum with numbers
        for x, f in zip(tensors, floors, strict=True):
            x.clamp_(min=f)
    return tensors


def _sqrt(v: list[Tensor]) -> list[Tensor]:
    """sqrt of each tensor, a float32 CPU tensor's taken in float64 (Note [Correctly rounded sqrt])."""
    wide = [t.double() if t.dtype == torch.float32 and t.device.type == "cpu" else t for t in v]
    return [r if r.dtype == t.dtype else r.to(t.dtype) for r, t in zip(torch._foreach_sqrt(wide), v, strict=True)]


def _floored_sqrt(v: list[Tensor], floors: list | None) -> list[Tensor]:
    """sqrt(v), each tensor raised to its floor (Note [Safeguarded metric]), correctly rounded
    (Note [Correctly rounded sqrt])."""
    return _raise_(_sqrt(v), floors)


def adam_scalars(group: dict, k: float, lr: float) -> tuple[float, float]:
    """Adam's (and AdamW's, NAdam's) inverse step after its k-th step as scale·max(sqrt(v), F) +
    shift: (scale, shift) = (1/(lr·sqrt(1 − β₂ᵏ)), eps/lr), v in its raw units."""
    return 1.0 / (lr * math.sqrt(1.0 - group["betas"][1] ** k)), group["eps"] / lr


def _adam(name, group, states, lr, floors):
    v, counts = _moments(name, states, adam_key(group))
    inverse = _floored_sqrt(v, floors)
    scalars = [adam_scalars(group, k, lr) for k in counts]
    torch._foreach_mul_(inverse, [scale for scale, _ in scalars])
    torch._foreach_add_(inverse, scalars[0][1])  # eps/lr, the same for every tensor
    return inverse


def _radam(name, group, states, lr, floors):
    beta2, eps = group["betas"][1], group["eps"]
    v, counts = _moments(name, states, "exp_avg_sq")
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    scales = []
    for k in counts:
        rho = rho_inf - 2.0 * k * beta2**k / (1.0 - beta2**k)
        if rho <= 5.0:
            return None  # an unrectified step is plain momentum SGD: t = lr
        rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        scales.append(lr * rect * math.sqrt(1.0 - beta2**k))
    inverse = _floored_sqrt(v, floors)
    torch._foreach_add_(inverse, eps)
    torch._foreach_div_(inverse, scales)
    return inverse


def _adamax(name, group, states, lr, floors):
    u, _ = _moments(name, states, "exp_inf")
    return _raise_(list(torch._foreach_div(u, lr)), None if floors is None else [f / lr for f in floors])


def _rmsprop(name, group, states, lr, floors):
    v, _ = _moments(name, states, "square_avg")
    if group.get("centered"):
        m, _ = _moments(name, states, "grad_avg")
        v = [a.addcmul(b, b, value=-1) for a, b in zip(v, m, strict=True)]
    inverse = _floored_sqrt(v, floors)
    torch._foreach_add_(inverse, group["eps"])
    torch._foreach_div_(inverse, lr)  # lr includes the momentum's fill (inverse_steps)
    return inverse


def _adagrad(name, group, states, lr, floors):
    sums, counts = _moments(name, states, "sum")
    inverse = _floored_sqrt(sums, floors)
    torch._foreach_add_(inverse, group["eps"])
    decay = group.get("lr_decay", 0.0)
    torch._foreach_mul_(inverse, [(1.0 + (k - 1.0) * decay) / lr for k in counts])
    return inverse


def settled(momentum: float, dampening: float = 0.0) -> float:
    """The fill a momentum buffer approaches at constant momentum: (1 − dampening)/(1 − μ) for
    SGD, 1/(1 − μ) for RMSprop (Note [Momentum fill])."""
    return (1.0 - dampening) / (1.0 - momentum)


def sgd_factor(group: dict, fill: float | None = None) -> float:
    """t / lr for SGD: the scaling of the gradient by its momentum buffer with fill ``fill``
    (None: the settled fill, (1 − dampening)/(1 − μ))."""
    momentum, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
    if not momentum:
        return 1.0
    c = settled(momentum, dampening) if fill is None else fill
    return 1.0 + momentum * c if group.get("nesterov") else c


def adam_key(group: dict) -> str:
    return "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"


# Optimizer class -> the function giving its inverse steps 1/t_i (None: t = lr).
_DIAGONAL = {
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
    torch.optim.NAdam: _adam,
    torch.optim.RAdam: _radam,
    torch.optim.Adamax: _adamax,
    torch.optim.RMSprop: _rmsprop,
    torch.optim.Adagrad: _adagrad,
}
# Diagonal optimizer -> what a coordinate's denominator before eps (in the units of its state, before
# any bias correction) would be after k steps of a constant gradient of magnitude 1 (Note [Safeguarded metric]).
_UNIT_DENOMINATOR = {
    torch.optim.Adam: lambda group, k: math.sqrt(1.0 - group["betas"][1] ** k),
    torch.optim.AdamW: lambda group, k: math.sqrt(1.0 - group["betas"][1] ** k),
    torch.optim.NAdam: lambda group, k: math.sqrt(1.0 - group["betas"][1] ** k),
    torch.optim.RAdam: lambda group, k: math.sqrt(1.0 - group["betas"][1] ** k),
    torch.optim.Adamax: lambda group, k: 1.0,
    torch.optim.RMSprop: lambda group, k: math.sqrt(1.0 - group["alpha"] ** k),
    torch.optim.Adagrad: lambda group, k: math.sqrt(k),
}
_SCALAR = (torch.optim.SGD,)
KNOWN = (*_DIAGONAL, *_SCALAR)
# Known optimizer -> its state that a zero gradient makes decay by a factor a step: (key, factor,
# signed) for the group given (Note [Decaying state of held zeros] in optim/hooks.py).
_DECAYING = {
    **dict.fromkeys((torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam),
                    lambda group: (("exp_avg_sq", group["betas"][1], False),)),
    torch.optim.RMSprop: lambda group: (("square_avg", group["alpha"], False), ("grad_avg", group["alpha"], True)),
}
FILLING = (torch.optim.SGD, torch.optim.RMSprop)  # a momentum buffer whose fill scales the step
#: The default safeguard of the adaptive metric, ``attach(..., metric_floor=...)`` (Note [Safeguarded
#: metric]): each coordinate's denominator is at least what a coordinate would have after seeing
#: this multiple of the root mean square of its tensor's gradient at every step (0: the plain metric).
DEFAULT_METRIC_FLOOR = 1.0


def resolve(optimizer) -> type | None:
    """The torch optimizer class whose update ``optimizer`` runs: its own class if paramreg knows
    it, else the nearest known base class whose ``step`` it does not override; None otherwise.

    >>> import torch
    >>> class LoggingAdam(torch.optim.Adam):
    ...     pass
    >>> class Mine(torch.optim.Adam):
    ...     def step(self, closure=None):
    ...         return super().step(closure)
    >>> p = [torch.nn.Parameter(torch.zeros(1))]
    >>> resolve(LoggingAdam(p)).__name__, resolve(Mine(p)), resolve(torch.optim.Rprop(p))
    ('Adam', None, None)
    """
    cls = type(optimizer)
    for base in cls.__mro__:
        if base in _DIAGONAL or base in _SCALAR:
            # torch wraps ``step`` with its hooks in the class of the first instance built: a subclass
            # built before any instance of its base holds a wrapper of its own around the same step
            return base if inspect.unwrap(cls.step) is inspect.unwrap(base.step) else None
    return None


def metric(optimizer) -> str | None:
    """``"diagonal"`` (a step per coordinate), ``"scalar"`` (SGD: one step, lr times a momentum
    factor), or None when paramreg does not know the optimizer's metric (:func:`resolve`).

    >>> import torch
    >>> p = [torch.nn.Parameter(torch.zeros(1))]
    >>> metric(torch.optim.Adam(p)), metric(torch.optim.SGD(p, lr=0.1)), metric(torch.optim.Rprop(p))
    ('diagonal', 'scalar', None)
    """
    cls = resolve(optimizer)
    if cls in _DIAGONAL:
        return "diagonal"
    if cls in _SCALAR:
        return "scalar"
    return None


def whole(t: Tensor) -> Tensor:
    """A DTensor's full value (its partial norms reduced); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def floors(optimizer, group: dict, params: list[Tensor], states: list[dict], ratio: float = DEFAULT_METRIC_FLOOR) -> list[Tensor] | None:
    """Per parameter in ``params`` (with its optimizer state in ``states``): the floor of its
    metric's denominators, ``ratio`` (``attach(..., metric_floor=...)``) times the root mean square of the gradient it was
    just stepped with, in the units of the optimizer's state (Note [Safeguarded metric]); a 0-dim
    tensor each (a number each for sharded DTensor gradients), or None when the ratio is 0. One
    reduction over each gradient.
    """
    if not ratio:
        return None
    cls = resolve(optimizer)
    grads = [p.grad for p in params]
    factors = [floor_factor(cls, group, p.numel(), state, ratio) for p, state in zip(params, states, strict=True)]
    if any(type(g) is not Tensor for g in grads):  # a sharded gradient (DTensor): its whole norm, as numbers
        return [float(whole(torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)))) * f for g, f in zip(grads, factors, strict=True)]
    if all(g.dtype in (torch.float32, torch.float64) for g in grads):
        out = list(torch._foreach_norm(grads, 2))
    else:  # half precision: the norm in float32
        out = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads]
    torch._foreach_mul_(out, factors)
    return out


def floor_factor(cls: type, group: dict, numel: int, state: dict, ratio: float) -> float:
    """The floor of a tensor's denominators per unit of its gradient's norm: ``ratio`` times the
    unit denominator of optimizer class ``cls`` after the tensor's steps, over sqrt(numel) (the
    floor is this times ‖g‖₂, Note [Safeguarded metric])."""
    k = float(state["step"]) if "step" in state else 1.0
    return ratio * _UNIT_DENOMINATOR[cls](group, k) / math.sqrt(max(numel, 1))


def inverse_steps(
    optimizer, group: dict, states: list[dict], lr: float, fill: float | None = None, floors: list[Tensor] | None = None
) -> list[Tensor] | None:
    """The adaptive step of a diagonal-metric optimizer as inverse steps 1/t_i, one new tensor per
    entry of ``states`` (the optimizer's state of parameters it just stepped in ``group``, or the
    same slices of them), with ``lr`` standing for the group's learning rate; None where the step
    is t = lr for every coordinate (RAdam before rectification). ``fill``: the fill of the group's
    momentum buffers after this step, for RMSprop (None: the settled fill; Note [Momentum fill]).
    ``floors``: per entry, the floor of the denominators (:func:`floors`, computed over the whole
    tensors; None: the plain metric).

    1/t_i is the metric's weight: the prox minimizes Σ_i (1/t_i)(z_i − w_i)²/2 + R(z). It is
    finite, and positive when the optimizer's eps is (a zero, possible with eps=0, is raised to
    the smallest normal number: a step so large that the prox returns its minimizer, 0 for L1).
    """
    cls = resolve(optimizer)
    if cls is torch.optim.RMSprop and group.get("momentum", 0.0):
        lr *= settled(group["momentum"]) if fill is None else fill
    inverse = _DIAGONAL[cls](cls.__name__, group, states, lr, floors)
    if inverse is not None and not group.get("eps", 1.0) > 0:
        torch._foreach_clamp_min_(inverse, torch.finfo(inverse[0].dtype).tiny)
    return inverse


def decaying(optimizer, group: dict) -> tuple[tuple[str, float, bool], ...]:
    """The state of ``optimizer``'s parameters in ``group`` that decays geometrically where the
    gradient is zero, as (key, factor a step, whether signed): Adam's second moment by beta2,
    RMSprop's averages by alpha; () for the other optimizers (Adamax's infinity norm stays at or
    above eps, Adagrad's sum does not decay, SGD's momentum at a held zero is zero)."""
    of = _DECAYING.get(resolve(optimizer))
    return of(group) if of is not None else ()
