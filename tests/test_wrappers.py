"""Optimizers that wrap a torch optimizer and call its step() inside their own: one prox per outer
step, with the inner optimizer's step size (Note [Nested steps] in optim/hooks.py).
ZeroRedundancyOptimizer is covered by test_training_setups.py's two-process test."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import paramreg

from conftest import mlp, mlp_batch


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization as its reference implementation has it: step(closure) moves to
    w + e(w), takes the gradient there, moves back and calls the base optimizer's step()."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def step(self, closure):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm() for g in grads]))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["e"] = e = p.grad * group["rho"] / (norm + 1e-12)
                    p.add_(e)
        with torch.enable_grad():
            closure()
        for group in self.param_groups:
            for p in group["params"]:
                if "e" in self.state[p]:
                    p.sub_(self.state[p]["e"])
        self.base_optimizer.step()


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019): k fast steps of the inner optimizer, then the slow weights move
    alpha of the way towards the fast ones. ``after_inner`` runs after each inner step (the
    hand-written prox of the reference run)."""

    def __init__(self, inner, k=2, alpha=0.5, after_inner=None):
        super().__init__(inner.param_groups, {})
        self.inner, self.k, self.alpha, self.after_inner, self.count = inner, k, alpha, after_inner, 0
        self.param_groups = inner.param_groups
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        self.inner.step()
        if self.after_inner is not None:
            self.after_inner()
        self.count += 1
        if self.count % self.k == 0:
            for slow, p in zip(self.slow, (p for g in self.param_groups for p in g["params"]), strict=True):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)


def soft_weights(model, t):
    """The hand-written prox of L1 on the weights of an MLP: soft-thresholding by t."""
    with torch.no_grad():
        for w in (model[0].weight, model[2].weight):
            w.copy_(F.softshrink(w, t))


def test_a_single_weight_in_a_sam_wrapper_gets_one_prox_per_step():
    """The issue's case: l1=1.0, lr=0.1 took 0.9 to 0.8 (the prox twice)."""
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    paramreg.attach(layer, "weight", l1=1.0)
    opt = SAM(layer.parameters(), torch.optim.SGD, lr=0.1)
    x = torch.zeros(1, 1)  # the loss does not depend on the weight: its gradient is 0, the step is the prox alone

    def closure():
        opt.zero_grad()
        loss = layer(x).sum()
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    assert layer.weight.item() == pytest.approx(0.9, abs=1e-7)


def test_sam_wrapper_matches_a_hand_written_prox_after_the_base_step():
    x, y = mlp_batch()
    runs = []
    for with_paramreg in (True, False):
        model = mlp()
        if with_paramreg:
            paramreg.attach(model, "*.weight", l1=0.05)
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(6):
            closure()
            opt.step(closure)
            if not with_paramreg:
                soft_weights(model, 0.1 * 0.05)
        runs.append(model)
    ours, reference = runs
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), reference.parameters(), strict=True))
    assert (ours[0].weight == 0).any()


def test_lookahead_wrapper_matches_a_hand_written_prox_after_each_inner_step():
    x, y = mlp_batch()
    runs = []
    for with_paramreg in (True, False):
        model = mlp()
        if with_paramreg:
            paramreg.attach(model, "*.weight", l1=0.3)
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        after = None if with_paramreg else (lambda model=model: soft_weights(model, 0.1 * 0.3))
        opt = Lookahead(inner, after_inner=after)
        for _ in range(5):  # the last is a fast step alone: Lookahead's averaging keeps no exact zeros
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        runs.append(model)
    ours, reference = runs
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), reference.parameters(), strict=True))
    assert (ours[0].weight == 0).any()


def test_a_step_that_raised_does_not_make_later_steps_look_nested():
    """An interrupted step() never reaches its post-step hook; neither it nor another optimizer
    stepping after it is taken for a wrapper."""
    model = mlp()
    paramreg.attach(model, "*.weight", l1=0.05)
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2].parameters(), lr=0.1)
    x, y = mlp_batch()
    F.cross_entropy(model(x), y).backward()

    def interrupted():  # SGD calls the closure inside step(), after the pre-step hook ran
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.step(interrupted)
    for _ in range(2):
        for opt, layer in ((second, model[2]), (first, model[0])):
            w = layer.weight.detach().clone()
            opt.step()
            expected = F.softshrink(torch.add(w, layer.weight.grad, alpha=-0.1), 0.1 * 0.05)
            assert torch.equal(layer.weight.detach(), expected)


def test_accelerate_prepared_optimizer_with_accumulation_gets_one_prox_per_real_step():
    from accelerate import Accelerator  # the `test` extra installs it: a missing one fails here, never skips
    from accelerate.state import AcceleratorState, GradientState

    batches = [mlp_batch(n=8, seed=s) for s in range(8)]
    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = mlp()
        paramreg.attach(model, "*.weight", l1=0.05)
        model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for x, y in batches:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                opt.step()
                opt.zero_grad()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    # by hand: the mean of two micro-batches' gradients, one step and one prox every two batches
    reference = mlp()
    paramreg.attach(reference, "*.weight", l1=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for i, (x, y) in enumerate(batches):
        (F.cross_entropy(reference(x), y) / 2).backward()
        if i % 2 == 1:
            ref_opt.step()
            ref_opt.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    for a, b in zip(unwrapped.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert (unwrapped[0].weight == 0).any()
