"""Strength schedules: a callable of the step count, changed during training, shown in the report."""

import pytest
import torch
from torch.nn import functional as F

import paramreg

from conftest import mlp, mlp_batch


def _train(model, opt, steps):
    x, y = mlp_batch()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_warm_up_schedule_sets_the_strength_of_each_step():
    x, y = mlp_batch()
    ramp = lambda k: 0.2 * min(1.0, k / 4)  # noqa: E731  0, 0.05, 0.1, 0.15, 0.2, 0.2, ...
    model, reference = mlp(), mlp()
    paramreg.attach(model, "0.weight", l1=ramp, step="lr")
    assert paramreg.report(model)["0.weight"].regularizer == "L1(strength=0.0) scheduled"
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference))
    for k in range(7):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        with torch.no_grad():
            reference[0].weight.copy_(F.softshrink(reference[0].weight, 0.1 * ramp(k)))
        assert torch.equal(model[0].weight, reference[0].weight)
        # the report shows the strength the next step will use
        assert paramreg.report(model)["0.weight"].regularizer == f"L1(strength={ramp(k + 1)!r}) scheduled"


def test_schedule_argument_scales_every_strength_of_any_regularizer():
    model = mlp()
    paramreg.attach(model, "0.weight", reg=paramreg.ElasticNet(l1=0.1, l2=0.4), schedule=lambda k: 0.5)
    assert paramreg.report(model)["0.weight"].regularizer == "ElasticNet(l1=0.05, l2=0.2) scheduled"
    assert paramreg.spec(model)["attached"]["0.weight"]["regularizer"] == {"type": "ElasticNet", "l1": 0.05, "l2": 0.2}


def test_a_schedule_in_penalty_mode_counts_optimizer_steps():
    model = mlp()
    paramreg.attach(model, "0.weight", l2=lambda k: 0.1 * k, mode="penalty")
    assert float(paramreg.penalty(model).detach()) == 0.0
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    w = model[0].weight.detach()
    torch.testing.assert_close(paramreg.penalty(model).detach(), 0.5 * 0.3 * w.pow(2).sum())


def test_set_strength_changes_the_strength_in_place():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, opt, 1)
    assert paramreg.set_strength(model, "*.weight", 0.5) == ["0.weight", "2.weight"]
    before = model[0].weight.detach().clone()
    _train(model, opt, 1)
    grad = model[0].weight.grad
    assert torch.equal(model[0].weight.detach(), F.softshrink(torch.add(before, grad, alpha=-0.1), 0.05))
    paramreg.set_strength(model, "0.weight", lambda k: 0.0)  # a schedule too
    assert paramreg.report(model)["0.weight"].regularizer == "L1(strength=0.0) scheduled"
    assert paramreg.report(model)["2.weight"].regularizer == "L1(strength=0.5)"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: paramreg.attach(m, "0.weight", l1=lambda k: -1.0), r"finite number >= 0, got -1.0 at step 0"),
        (lambda m: paramreg.attach(m, "0.weight", l1=lambda k: 1 / 0), r"failed at step 0: ZeroDivisionError"),
        (lambda m: paramreg.attach(m, "0.weight", non_negative=True, schedule=lambda k: 1.0), r"NonNegative\(\) has no strength"),
        (lambda m: paramreg.attach(m, "0.weight", l1=lambda k: 1.0, l2=0.1), r"reg=paramreg.ElasticNet"),
        (lambda m: paramreg.attach(m, "0.weight", l1=0.1, schedule=3), r"schedule must be a callable"),
        (lambda m: paramreg.set_strength(m, "0.bias", 0.1), r"no selected tensor has a paramreg regularizer"),
    ],
)
def test_bad_schedules_are_refused_and_change_nothing(call, message):
    model = mlp()
    with pytest.raises(paramreg.ParamregError, match=message):
        call(model)
    assert all(row.regularizer is None for row in paramreg.report(model).rows)


def test_a_schedule_that_goes_bad_during_training_names_the_tensor_and_the_step():
    model = mlp()
    paramreg.attach(model, "0.weight", l1=lambda k: 0.1 if k < 2 else float("nan"))
    with pytest.raises(paramreg.ParamregError, match=r"schedule of '0.weight' returned nan at step 2"):
        _train(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)


def test_set_strength_refuses_a_regularizer_with_two_strengths():
    model = mlp()
    paramreg.attach(model, "0.weight", l1=0.1, l2=0.1)
    with pytest.raises(paramreg.ParamregError, match=r"'0.weight'.*ElasticNet.*strengths \('l1', 'l2'\)"):
        paramreg.set_strength(model, "0.weight", 0.2)
    assert paramreg.report(model)["0.weight"].regularizer == "ElasticNet(l1=0.1, l2=0.1)"
