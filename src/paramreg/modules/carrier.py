"""The carrier: the identity parametrization that marks one tensor as regularized, and the registry of live carriers.

paramreg attaches a :class:`Carrier` to each selected tensor with
``torch.nn.utils.parametrize``. The carrier's forward returns its input, so ``module.weight``
stays the very same Parameter object and the forward pass computes nothing new; the carrier
only holds the regularizer and its settings, and makes the attachment visible in the module tree::

    ParametrizedLinear(
      in_features=4, out_features=2, bias=True
      (parametrizations): ModuleDict(
        (weight): ParametrizationList(
          (0): Carrier(L1(strength=0.001), mode='prox')
    ...

The optimizer mechanism (:mod:`paramreg.optim`) finds the tensors it treats through
:func:`live_carriers`, and rebuilds its cached plans whenever :func:`generation` moves.
"""

from __future__ import annotations

import copy
import weakref

from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from ..catalogue.base import Regularizer
from . import export_guard

__all__ = ["Carrier", "MODES", "USER_MODES", "live_carriers", "generation", "changed"]

#: Every mode a carrier can have: ``"prox"`` (the proximal map after each optimizer step),
#: ``"penalty"`` (the penalty in the loss), and ``"forward"`` (a reparametrization acting in the
#: forward pass, ``Regularizer.kind == "reparametrization"``).
MODES = ("prox", "penalty", "forward")
#: The modes ``attach(mode=...)`` takes; ``"forward"`` follows from the regularizer's kind.
USER_MODES = ("prox", "penalty")

# Every carrier bound to a model. The optimizer hook looks here for the parameters it treats.
# Weak: paramreg never keeps a model alive.
_LIVE: "weakref.WeakSet[Carrier]" = weakref.WeakSet()
# Bumped whenever a carrier is bound, unbound or changed, so that cached per-optimizer plans rebuild.
_generation = 0


def generation() -> int:
    """A counter that moves whenever a carrier is bound, unbound or changed anywhere."""
    return _generation


def changed() -> None:
    """Note that a carrier's regularizer or settings changed (cached step plans are rebuilt)."""
    global _generation
    _generation += 1


def live_carriers() -> "weakref.WeakSet[Carrier]":
    """Every carrier bound to a model (weakly held)."""
    return _LIVE


class Carrier(nn.Module):
    """The parametrization holding a regularizer and its settings.

    ``mode`` is ``"prox"`` or ``"penalty"``; the carrier is then the identity. For a
    reparametrization (``regularizer.kind == "reparametrization"``, e.g. ``SoftThreshold``) the
    mode is ``"forward"`` and the carrier applies ``regularizer.transform()``, a submodule whose
    parameters (a learnable threshold) are trained and saved with the model.

    Its strength: ``regularizer`` at unit multiple, times ``scale`` (a strength schedule's value at
    the current step, 1.0 without one); under a sparsity target (``target``), the target's
    strength of the last step instead (:meth:`multiplier`).
    """

    def __init__(self, regularizer: Regularizer, mode: str, step: str = "auto", schedule=None, target=None,
                 metric_floor: float = 1.0):
        super().__init__()
        self.regularizer = regularizer
        self.mode = mode
        self.step = step  # the step policy asked for (paramreg.optim.step_sizes)
        self.metric_floor = metric_floor  # the adaptive step's safeguard (Note [Safeguarded metric])
        self.ran = None  # the step policy the last optimizer step took, e.g. "adaptive(Adam)" (paramreg.optim.plans)
        self.points = None  # whether that step's target scores points (Adam's metric), None before a step
        self.schedule = schedule  # None, or step count -> multiplier of the regularizer's strengths
        self.scale = 1.0 if schedule is None else schedule(0)  # the schedule's current value
        self.target = target  # None, or the SparsityTarget this tensor shares with its attach call
        self.transform = regularizer.transform() if mode == "forward" else None
        self.calls = 0  # optimizer steps that updated the tensor (for schedules, targets and every=k)
        self._owner = None  # weakref to the ParametrizationList this carrier sits in
        self.name = "?"  # the canonical name it was attached under, for messages
        self.tensor_name = "?"  # the name of the tensor in its module (``weight``)

    @property
    def reparametrizes(self) -> bool:
        """True when the carrier changes the tensor in the forward pass (not the identity)."""
        return self.transform is not None

    def forward(self, x: Tensor) -> Tensor:
        return x if self.transform is None else self.transform(x)

    def right_inverse(self, x: Tensor) -> Tensor:
        # Registration keeps the stored Parameter as it is; under a user's parametrization,
        # torch's assignment path passes through here unchanged.
        return x

    def extra_repr(self) -> str:
        export_guard.refuse_in_onnx_export(f"'{self.name}'")  # torch.onnx.export(dynamo=True) prints the model
        step = f", step={self.ran}" if self.ran else "" if self.step == "auto" else f", step={self.step!r}"
        floor = "" if self.metric_floor == 1.0 else f", metric_floor={self.metric_floor:g}"
        schedule = "" if self.schedule is None else ", scheduled"
        target = ""
        if self.target is not None:
            start = f" from step {self.target.start}" if self.target.start else ""
            kept = ", then keeps its zeros" if self.target.keep_zeros else ""
            regrow = ", regrow=True" if self.target.regrow else ""  # attach's default is False (its Note in optim/targets.py)
            ahead = f", lookahead={self.target.lookahead}" if self.target.lookahead else ""  # Note [Looking ahead]
            if self.target.extrapolate:  # Note [Extrapolated paths]
                ahead = f", extrapolate={self.target.extrapolate:g}"
            if ahead and self.points is False:  # e.g. under SGD: the weights themselves are ranked
                ahead += " (Adam and AdamW only)"
            target = f", sparsity={self.target.sparsity:g}{start} by step {self.target.steps}{kept}{ahead}{regrow}"
        return f"{self.current()!r}, mode={self.mode!r}{step}{floor}{schedule}{target}"

    def remember(self, w: Tensor) -> None:
        """Take the regularizer's memory of ``w`` (``Regularizer.remembers``), or for a target that
        keeps its zeros after the ramp and lets them regrow in it the mask of ``w``'s zeros (Note
        [Ramp, then keep the zeros] in optim/targets.py), kept as a buffer that moves with the
        module and stays out of the state_dict."""
        if self.regularizer.remembers:
            self.register_buffer("memory", self.regularizer.remember(w), persistent=False)
        elif self.target is not None and self.target.keep_zeros and self.target.regrow:
            self.register_buffer("memory", w.detach() == 0, persistent=False)

    def multiplier(self) -> float:
        """The multiple of ``regularizer`` in force: a target's last strength (0 before its first
        step unless a starting strength was given), else the schedule's value (1 without one)."""
        if self.target is not None:
            return self.target.strength or 0.0
        return self.scale

    def current(self) -> Regularizer:
        """The regularizer at its current strength (a schedule or a target sets it)."""
        m = self.multiplier()
        return self.regularizer if m == 1.0 else self.regularizer.scaled(m)

    def leaf(self) -> nn.Parameter | None:
        """The stored Parameter this carrier regularizes, or None if it is not first in its list."""
        owner = self._owner() if self._owner is not None else None
        if owner is None or not owner.is_tensor or len(owner) == 0 or owner[0] is not self:
            return None
        return owner.original

    def bind(self, owner: ParametrizationList) -> None:
        """Make the carrier live, sitting in ``owner``."""
        self._owner = weakref.ref(owner)
        _LIVE.add(self)
        changed()

    def unbind(self) -> None:
        """The carrier is no longer attached to anything."""
        self._owner = None
        _LIVE.discard(self)
        changed()

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
            new.bind(memo[id(owner)])
        return new
