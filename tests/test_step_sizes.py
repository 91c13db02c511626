"""Step policies: the prox in the optimizer's own metric ("adaptive") and the group's lr ("lr")."""

import copy
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso
from torch import nn
from torch.nn import functional as F

import paramreg
from paramreg.catalogue import structured
from paramreg.optim import state as optimizer_state
from paramreg.catalogue.groups import group_norms
from paramreg.optim.step_sizes import metric

from conftest import mlp, mlp_batch


def _lasso_problem():
    g = torch.Generator().manual_seed(0)
    n, p = 200, 30
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    w = torch.zeros(p, dtype=torch.float64)
    w[:5] = torch.tensor([3.0, -2.0, 1.5, -1.0, 0.5], dtype=torch.float64)
    y = X @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


def _adam_lasso(X, y, alpha, step, steps=3000):
    torch.manual_seed(0)
    model = nn.Linear(X.shape[1], 1).double()
    paramreg.attach(model, "weight", l1=alpha, step=step)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.997)
    for _ in range(steps):
        opt.zero_grad()
        (((model(X).squeeze(1) - y) ** 2).sum() / (2 * len(y))).backward()  # scikit-learn's Lasso loss
        opt.step()
        sched.step()
    return model.weight.detach().squeeze(0).numpy(), model.bias.item()


def test_sgd_momentum_l1_reaches_the_scikit_learn_lasso_and_lr_a_weaker_one(prox_path):
    """Momentum μ settles its buffer at g/(1 − μ): the default prox step lr/(1 − μ) solves the lasso
    with strength a; t = lr solves it with strength (1 − μ)·a."""
    X, y = _lasso_problem()
    smoothness = float(torch.linalg.eigvalsh(X.T @ X / len(y)).max())
    for step, alpha in (("auto", 0.1), ("lr", 0.1 * (1 - 0.9))):
        reference = Lasso(alpha=alpha, tol=1e-12, max_iter=100_000).fit(X.numpy(), y.numpy())
        torch.manual_seed(0)
        model = nn.Linear(X.shape[1], 1).double()
        paramreg.attach(model, "weight", l1=0.1, step=step)
        opt = torch.optim.SGD(model.parameters(), lr=0.5 / smoothness, momentum=0.9)
        for _ in range(1500):
            opt.zero_grad()
            (((model(X).squeeze(1) - y) ** 2).sum() / (2 * len(y))).backward()
            opt.step()
        w = model.weight.detach().squeeze(0).numpy()
        assert np.array_equal(np.flatnonzero(w), np.flatnonzero(reference.coef_)), step
        np.testing.assert_allclose(w, reference.coef_, rtol=0, atol=1e-6)


def test_adam_adaptive_l1_reaches_the_scikit_learn_lasso_and_lr_does_not(prox_path):
    X, y = _lasso_problem()
    alpha = 0.1
    reference = Lasso(alpha=alpha, tol=1e-12, max_iter=100_000).fit(X.numpy(), y.numpy())
    w, b = _adam_lasso(X, y, alpha, step="auto")  # the default with Adam: its own metric
    assert np.array_equal(np.flatnonzero(w), np.flatnonzero(reference.coef_))
    np.testing.assert_allclose(w, reference.coef_, rtol=0, atol=1e-6)
    assert abs(b - reference.intercept_) < 1e-6
    # the decoupled step lr·a after Adam solves a reweighted problem: not the lasso's zeros
    w_lr, _ = _adam_lasso(X, y, alpha, step="lr")
    assert not np.array_equal(np.flatnonzero(w_lr), np.flatnonzero(reference.coef_))


def _soft(w, threshold):
    return torch.sign(w) * torch.clamp(w.abs() - threshold, min=0)


def _adam_denominator(opt, group, state):
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    return (v / (1 - group["betas"][1] ** float(state["step"]))).sqrt() + group["eps"]


def _radam_step(opt, group, state, _k):
    beta2, k = group["betas"][1], float(state["step"])
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * k * beta2**k / (1 - beta2**k)
    if rho <= 5:
        return group["lr"]
    rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return group["lr"] * rect * math.sqrt(1 - beta2**k) / (state["exp_avg_sq"].sqrt() + group["eps"])


def _rmsprop_denominator(opt, group, state):
    v = state["square_avg"]
    if group["centered"]:
        v = v - state["grad_avg"] ** 2
    mu, k = group["momentum"], float(state["step"])
    fill = (1 - mu**k) / (1 - mu) if mu else 1.0  # its buffer, from zero: Σ_{j<k} μʲ times a constant g/avg
    return (v.sqrt() + group["eps"]) / fill


def _adagrad_step(opt, group, state, _k):
    lr = group["lr"] / (1 + (float(state["step"]) - 1) * group["lr_decay"])
    return lr / (state["sum"].sqrt() + group["eps"])


def _sgd_fill(k, momentum, dampening=0.0):
    """SGD's buffer after k steps of a constant gradient g is c_k·g: g on the first step, then
    μ·buf + (1 − d)·g, in closed form s + μ^(k−1)·(1 − s) with s = (1 − d)/(1 − μ)."""
    settled = (1 - dampening) / (1 - momentum)
    return settled + momentum ** (k - 1) * (1 - settled)


# optimizer -> (factory, the per-coordinate step t_i after the k-th step, written out from its state)
WRITTEN_OUT = {
    "Adam": (lambda p: torch.optim.Adam(p, lr=0.01), lambda o, g, s, k: g["lr"] / _adam_denominator(o, g, s)),
    "Adam-amsgrad": (
        lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
        lambda o, g, s, k: g["lr"] / _adam_denominator(o, g, s),
    ),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=0.01), lambda o, g, s, k: g["lr"] / _adam_denominator(o, g, s)),
    "NAdam": (lambda p: torch.optim.NAdam(p, lr=0.01), lambda o, g, s, k: g["lr"] / _adam_denominator(o, g, s)),
    "RAdam": (lambda p: torch.optim.RAdam(p, lr=0.01), _radam_step),
    "Adamax": (lambda p: torch.optim.Adamax(p, lr=0.01), lambda o, g, s, k: g["lr"] / s["exp_inf"]),
    "RMSprop": (lambda p: torch.optim.RMSprop(p, lr=0.001), lambda o, g, s, k: g["lr"] / _rmsprop_denominator(o, g, s)),
    "RMSprop-centered-momentum": (
        lambda p: torch.optim.RMSprop(p, lr=0.001, centered=True, momentum=0.9),
        lambda o, g, s, k: g["lr"] / _rmsprop_denominator(o, g, s),
    ),
    "Adagrad": (lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01), _adagrad_step),
    "SGD": (lambda p: torch.optim.SGD(p, lr=0.1), lambda o, g, s, k: g["lr"]),
    "SGD-momentum-dampening": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5),
        lambda o, g, s, k: g["lr"] * _sgd_fill(k, 0.9, 0.5),
    ),
    "SGD-nesterov": (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda o, g, s, k: g["lr"] * (1 + 0.9 * _sgd_fill(k, 0.9)),
    ),
}


@pytest.mark.parametrize("name", WRITTEN_OUT)
def test_adaptive_l1_thresholds_each_coordinate_with_the_step_the_optimizer_took(name, prox_path):
    make_opt, step_of = WRITTEN_OUT[name]
    x, y = mlp_batch()
    strength = 0.02
    model, reference = mlp(), mlp()
    paramreg.attach(model, "*.weight", l1=strength, metric_floor=0.0)  # default step policy, plain metric (safeguard tested below)
    opt, ref_opt = make_opt(model.parameters()), make_opt(reference.parameters())
    for k in range(1, 9):  # RAdam rectifies from its 6th step: cover both of its regimes
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        group = ref_opt.param_groups[0]
        with torch.no_grad():
            for w in (reference[0].weight, reference[2].weight):
                w.copy_(_soft(w, strength * step_of(ref_opt, group, ref_opt.state[w], k)))
        for got, want in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    zeros = int((model[0].weight == 0).sum())
    assert 0 < zeros < model[0].weight.numel()


def _fill_probe(l1=1.0):
    """A weight and a bias of 100s, L1 on the weight only: under a constant gradient of ones both
    move by the same optimizer update, so the weight's extra move is the prox step t·a."""
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.fill_(100.0)
        model.bias.fill_(100.0)
    paramreg.attach(model, "weight", l1=l1)
    return model


def _prox_steps(model, opt, steps, sched=None, l1=1.0):
    """Per step: the prox step t that paramreg took on the weight (from its extra move), and the
    lr and momentum the optimizer stepped with."""
    seen = []
    for _ in range(steps):
        group = opt.param_groups[0]
        lr, momentum = group["lr"], group["momentum"]
        w, b = model.weight.detach().clone(), model.bias.detach().clone()
        model.weight.grad, model.bias.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
        t = ((w - model.weight.detach()) - (b - model.bias.detach())) / l1
        assert torch.allclose(t, t[0, 0])  # one step for every coordinate here
        seen.append((float(t[0, 0]), lr, momentum))
        if sched is not None:
            sched.step()
    return seen


@pytest.mark.parametrize("dampening, nesterov", [(0.0, False), (0.5, False), (0.0, True)])
def test_sgd_prox_step_is_lr_times_the_fill_of_the_momentum_buffer_at_each_step(dampening, nesterov):
    """Constant momentum: t = lr·c_k with c_k in closed form, which is also what the buffer holds
    for a constant gradient g = 1; it approaches the settled (1 − d)/(1 − μ) and the first step is lr."""
    model = _fill_probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, dampening=dampening, nesterov=nesterov)
    for k in range(1, 61):
        ((t, lr, mu),) = _prox_steps(model, opt, 1)
        fill = _sgd_fill(k, mu, dampening)
        assert float(opt.state[model.weight]["momentum_buffer"][0, 0]) == pytest.approx(fill, rel=1e-12)
        assert t == pytest.approx(lr * (1 + mu * fill if nesterov else fill), rel=1e-9), k
    assert t == pytest.approx(lr * paramreg.optim.step_sizes.sgd_factor(opt.param_groups[0]), rel=1e-2)  # settled by step 60


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_prox_step_follows_a_momentum_schedule_step_by_step(nesterov):
    """OneCycleLR cycles μ between 0.85 and 0.95: the fill follows c_k = μ_k·c_{k−1} + 1 with the
    μ_k of each step, as the buffer does, instead of jumping with the settled 1/(1 − μ_k)."""
    model = _fill_probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40)
    fill = 0.0
    momenta = set()
    for t, lr, mu in _prox_steps(model, opt, 40, sched):
        fill = mu * fill + 1.0 if fill else 1.0
        momenta.add(round(mu, 6))
        assert t == pytest.approx(lr * (1 + mu * fill if nesterov else fill), rel=1e-9)
    assert float(opt.state[model.weight]["momentum_buffer"][0, 0]) == pytest.approx(fill, rel=1e-12)
    assert len(momenta) > 20 and min(momenta) < 0.86 and max(momenta) > 0.94


def test_rmsprop_prox_step_follows_the_fill_of_its_momentum_buffer_under_a_schedule():
    """RMSprop's buffer starts at zero: c_k = μ_k·c_{k−1} + 1, times its metric 1/(sqrt(v) + eps)."""
    model = _fill_probe()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.001, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.005, total_steps=30)
    fill = 0.0
    for k in range(30):
        ((t, lr, mu),) = _prox_steps(model, opt, 1, sched)
        fill = mu * fill + 1.0
        metric = float(opt.state[model.weight]["square_avg"][0, 0].sqrt()) + opt.param_groups[0]["eps"]
        assert t == pytest.approx(lr * fill / metric, rel=1e-9), k


def test_the_fill_is_saved_in_the_optimizer_state_dict_and_resumed_exactly():
    model = _fill_probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, dampening=0.3)
    _prox_steps(model, opt, 5)
    state = copy.deepcopy(opt.state_dict())
    # in each parameter's state, which every checkpointer round-trips (Note [Resume] in optim/state.py)
    fills = [entry["paramreg_momentum_fill"] for entry in state["state"].values()]
    assert fills and all(f == pytest.approx(_sgd_fill(5, 0.9, 0.3), rel=1e-12) for f in fills)
    resumed = _fill_probe()
    resumed.load_state_dict(model.state_dict())
    again = torch.optim.SGD(resumed.parameters(), lr=0.01, momentum=0.9, dampening=0.3)
    again.load_state_dict(state)
    (t, lr, _), (t_resumed, _, _) = _prox_steps(model, opt, 1)[0], _prox_steps(resumed, again, 1)[0]
    assert t == t_resumed == pytest.approx(lr * _sgd_fill(6, 0.9, 0.3), rel=1e-9)
    # loaded into the optimizer that took those steps (new group dicts): the same
    opt.load_state_dict(state)
    assert _prox_steps(model, opt, 1)[0][0] == pytest.approx(t, rel=1e-12)


def _resumed_without_fill(model, make_opt):
    """Three steps, then a fresh optimizer loaded from that state with its fill record stripped."""
    opt = make_opt(model.parameters())
    _prox_steps(model, opt, 3)
    state = copy.deepcopy(opt.state_dict())
    for entry in state["state"].values():
        del entry["paramreg_momentum_fill"]
    fresh = make_opt(model.parameters())
    fresh.load_state_dict(state)
    return fresh


def test_a_group_first_seen_with_filled_buffers_starts_settled_for_sgd_and_from_its_step_count_for_rmsprop():
    # a state saved with no record of the fill (here: stripped), or an attach mid-training
    model = _fill_probe()
    fresh = _resumed_without_fill(model, lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    assert _prox_steps(model, fresh, 1)[0][0] == pytest.approx(0.01 * 10, rel=1e-9)  # settled: 1/(1 − 0.9)

    # attached mid-training, to an optimizer that stepped while no carrier was live in the process
    plain = nn.Linear(3, 1).double()
    late = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        plain.weight.grad, plain.bias.grad = torch.ones_like(plain.weight), torch.ones_like(plain.bias)
        late.step()
    optimizer_state._STATES.pop(late, None)  # untracked (here other tests' carriers may be live)
    with torch.no_grad():
        plain.weight.fill_(100.0)
        plain.bias.fill_(100.0)
    paramreg.attach(plain, "weight", l1=1.0)
    assert _prox_steps(plain, late, 1)[0][0] == pytest.approx(0.01 * 10, rel=1e-9)

    # RMSprop counts its steps: a group first seen after 3 steps starts at c_3 = 1 + μ + μ²
    model = _fill_probe()
    fresh = _resumed_without_fill(model, lambda p: torch.optim.RMSprop(p, lr=0.001, momentum=0.9))
    ((t, lr, _),) = _prox_steps(model, fresh, 1)
    metric = float(fresh.state[model.weight]["square_avg"][0, 0].sqrt()) + 1e-8
    assert t == pytest.approx(lr * (1 + 0.9 + 0.9**2 + 0.9**3) / metric, rel=1e-9)


def test_a_param_group_added_later_starts_its_own_fill():
    model, other = _fill_probe(), _fill_probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _prox_steps(model, opt, 4)
    opt.add_param_group({"params": list(other.parameters())})
    for k in (5, 6):
        w, ow = model.weight.detach().clone(), other.weight.detach().clone()
        b, ob = model.bias.detach().clone(), other.bias.detach().clone()
        for p in (*model.parameters(), *other.parameters()):
            p.grad = torch.ones_like(p)
        opt.step()
        t = float(((w - model.weight.detach()) - (b - model.bias.detach()))[0, 0])
        t_other = float(((ow - other.weight.detach()) - (ob - other.bias.detach()))[0, 0])
        assert t == pytest.approx(0.01 * _sgd_fill(k, 0.9), rel=1e-9)
        assert t_other == pytest.approx(0.01 * _sgd_fill(k - 4, 0.9), rel=1e-9)


def test_metric_of_each_optimizer():
    p = [nn.Parameter(torch.zeros(2))]
    assert {metric(torch.optim.Adam(p)), metric(torch.optim.RMSprop(p)), metric(torch.optim.Adagrad(p))} == {"diagonal"}
    assert metric(torch.optim.SGD(p, lr=0.1)) == "scalar"
    assert metric(torch.optim.Rprop(p)) is None and metric(torch.optim.Adadelta(p)) is None

    class LoggingAdam(torch.optim.Adam):  # runs Adam's update: Adam's metric
        pass

    class MyAdam(torch.optim.Adam):  # overrides step(): it may change the update, so its metric is unknown
        def step(self, closure=None):
            return super().step(closure)

    assert metric(LoggingAdam(p)) == "diagonal" and metric(MyAdam(p)) is None


def test_adaptive_with_an_optimizer_of_unknown_metric_is_an_error_naming_both():
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "0.weight", l1=1e-3, step="adaptive")
    opt = torch.optim.Rprop(model.parameters())
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(paramreg.ParamregError, match=r"'0.weight'.*step='adaptive'.*Rprop"):
        opt.step()


def test_auto_with_an_optimizer_of_unknown_metric_takes_the_lr():
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "0.weight", l1=0.5)
    opt = torch.optim.Rprop(model.parameters(), lr=0.01)
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="Rprop is not one paramreg knows.*'0.weight' take the step t = lr"):
        opt.step()
    reference = mlp()
    ref_opt = torch.optim.Rprop(reference.parameters(), lr=0.01)
    F.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    assert torch.equal(model[0].weight.detach(), F.softshrink(reference[0].weight.detach(), 0.01 * 0.5))


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"nuclear_norm": 0.1, "step": "adaptive"}, r"NuclearNorm.*no map in a diagonal metric"),
        ({"max_norm": 1.0, "step": "adaptive"}, r"MaxNorm.*no map in a diagonal metric"),
        ({"l1": 0.1, "step": "adaptive", "mode": "penalty"}, r"step='adaptive'.*mode='prox' only"),
        ({"l1": 0.1, "step": "fast"}, r"step must be one of 'auto', 'lr', 'adaptive', got 'fast'"),
    ],
)
def test_bad_step_policies_are_refused_at_attach(keywords, message):
    model = mlp()
    with pytest.raises(paramreg.ParamregError, match=message):
        paramreg.attach(model, "0.weight", **keywords)
    assert not paramreg.report(model).rows[0].regularizer


ADAPTIVE = [
    paramreg.L1(0.3),
    paramreg.L2(0.7),
    paramreg.ElasticNet(l1=0.2, l2=0.5),
    paramreg.GroupLasso(0.4),
    paramreg.GroupLasso(0.2, groups="in", weighted=True),
    paramreg.GroupLasso(0.3, groups="kernel"),
    paramreg.SparseGroupLasso(l1=0.1, group=0.3),
    paramreg.NonNegative(),
    paramreg.Box(-0.2, 0.3),
]


def _metric_objective(reg, z, w, t):
    return float(((z - w) ** 2 / (2 * t)).sum() + reg.penalty(z))


@pytest.mark.parametrize("reg", ADAPTIVE, ids=repr)
def test_prox_diag_minimizes_the_metric_objective(reg):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    w[0] *= 0.01  # a group small enough to vanish
    t = torch.rand(w.shape, generator=g, dtype=torch.float64) * 2 + 0.05
    z = reg.prox_diag(w, t)
    best = _metric_objective(reg, z, w, t)
    for scale in (1e-2, 1e-4, 1e-6):
        for _ in range(60):
            other = z + scale * torch.randn(z.shape, generator=g, dtype=torch.float64)
            if reg.kind == "constraint":
                other = reg.prox(other, 0.0)
            assert best <= _metric_objective(reg, other, w, t) + 1e-12
    # with one step size for every coordinate it is the ordinary proximal map
    torch.testing.assert_close(reg.prox_diag(w, torch.full_like(w, 0.3)), reg.prox(w, 0.3), rtol=1e-10, atol=1e-12)
    # the in-place multi-tensor form (given the inverse steps 1/t) equals the pure one
    inplace = [w.clone(), w[1].clone()]
    reg.prox_diag_(inplace, [1 / t, 1 / t[1]])
    torch.testing.assert_close(inplace[0], z, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(inplace[1], reg.prox_diag(w[1], t[1]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "reg",
    [
        paramreg.GroupLasso(0.4),
        paramreg.GroupLasso(0.3, weighted=True),
        paramreg.GroupLasso(0.2, groups="in"),
        paramreg.SparseGroupLasso(l1=0.1, group=0.3),
    ],
    ids=repr,
)
def test_group_maps_of_many_tensors_equal_one_tensor_at_a_time(reg):
    # tensors whose rows have one shape are concatenated and solved together (one Newton run)
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 4), (3, 4), (2, 3), (6, 4)]
    ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    across = 0 if reg.groups == "in" else 1  # the dim a group spans: columns for "in", else rows
    for w in ws:
        w.select(1 - across, 0).mul_(0.01)  # a group small enough to vanish
    ts = [torch.rand(s, generator=g, dtype=torch.float64) + 0.05 for s in shapes]
    got = [w.clone() for w in ws]
    reg.prox_diag_(got, [1 / t for t in ts])
    for w, t, z in zip(ws, ts, got, strict=True):
        torch.testing.assert_close(z, reg.prox_diag(w, t), rtol=1e-10, atol=1e-12)
    assert any(bool((z == 0).all(dim=across).any()) for z in got)  # some groups vanish
    assert all(bool((z != 0).any()) for z in got)


def test_group_lasso_in_a_diagonal_metric_zeroes_exactly_the_groups_its_condition_says():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 7, generator=g, dtype=torch.float64) * torch.linspace(0.01, 2, 40, dtype=torch.float64)[:, None]
    t = torch.rand(w.shape, generator=g, dtype=torch.float64) + 0.1
    a = 1.0
    z = paramreg.GroupLasso(a).prox_diag(w, t)
    vanish = (w / t).norm(dim=1) <= a  # 0 is optimal iff ‖w_g / t_g‖ <= a
    assert 0 < int(vanish.sum()) < 40
    assert torch.equal(z[vanish], torch.zeros_like(z[vanish]))
    assert (z[~vanish].norm(dim=1) > 0).all()
    # optimality of a kept group: (z − w)/t + a·z/‖z‖ = 0
    kept = ~vanish
    residual = (z[kept] - w[kept]) / t[kept] + a * z[kept] / z[kept].norm(dim=1, keepdim=True)
    assert float(residual.abs().max()) < 1e-10


GROUPINGS = [((6, 4, 3, 3), "out"), ((6, 4, 3, 3), "in"), ((6, 4, 3, 3), "kernel"), ((6, 4, 3, 3), 2),
             ((6, 4, 3, 3), -1), ((40, 7), "out"), ((40, 7), "in"), ((30,), "out")]


def _group_case(shape, groups, spread, seed, dtype=torch.float64):
    """Weights with an all-zero slice; steps t in [0.05, 0.05 + spread] (spread 0: one step for
    every coordinate) with every 97th coordinate at 1e3, like Adam's lr/eps where a coordinate
    never had a gradient; and a strength a at which about a third of the groups vanish (a group
    vanishes iff ‖w_g / t_g‖ <= a; a is 0.1% above one group's ‖w_g / t_g‖, so that no group sits on
    the boundary, where float32 and float64 could decide differently)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w[-1] = 0.0
    t = torch.rand(shape, generator=g, dtype=torch.float64) * spread + 0.05
    t.view(-1)[::97] = 1e3
    a = float(group_norms(w / t, groups).flatten().quantile(0.35, interpolation="lower")) * 1.001
    return w.to(dtype), t.to(dtype), a


def _conditioned_error(z, exact, w, groups) -> float:
    """max over the kept entries of abs(z − exact) / (abs(exact)·eps·κ_g), κ_g = ‖w_g‖/‖z_g‖ =
    ‖w_g‖/r_g: a group barely above its threshold has r_g = ‖w_g‖ − (about c_g), computed with an
    absolute error of a few eps·‖w_g‖, so its entries carry a relative error of a few eps·κ_g in
    any solve in z's precision (the problem's conditioning, not the method's)."""
    exact = exact.double()
    kappa = group_norms(w.double(), groups) / group_norms(exact, groups).clamp(min=1e-300)
    error = (z.double() - exact).abs() / (exact.abs() * kappa * torch.finfo(z.dtype).eps)
    return float(error[exact != 0].max())


@pytest.mark.parametrize("shape, groups", GROUPINGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fast_group_solve_equals_the_reference_solve(shape, groups, dtype):
    # Note [Group lasso in a diagonal metric, fast]: the in-place solve (bracketed Newton from the
    # mean-step start) against the reference (safeguarded Newton, bisection) that prox_diag keeps,
    # given the same steps (the reference 1/u, as Regularizer.prox_diag_ passes them). Both zero
    # the same groups; in float64 they agree within 8·eps·κ_g relative (seen: 2.6), and in float32
    # each is within 4·eps·κ_g of the float64 solution of the same float32 inputs (seen: 1.8 and
    # 1.5), where κ_g = ‖w_g‖/r_g is the group's conditioning (_conditioned_error)
    for spread in (0.0, 0.1, 2.0, 50.0):
        for seed in range(6):
            w, t, a = _group_case(shape, groups, spread, seed)
            w, inverse = w.to(dtype), (1 / t).to(dtype)
            reference = structured._group_shrink_diag(w, inverse.reciprocal(), groups, a)
            fast = w.clone()
            structured.group_shrink_diag_(fast, inverse.clone(), groups, a)
            assert torch.equal(fast == 0, reference == 0)
            assert int((reference == 0).sum()) > int((w == 0).sum()) and bool((reference != 0).any())  # some groups vanish
            if dtype == torch.float64:
                assert _conditioned_error(fast, reference, w, groups) <= 8
            else:
                exact = structured._group_shrink_diag(w.double(), inverse.double().reciprocal(), groups, a)
                assert torch.equal(fast == 0, exact == 0)
                assert _conditioned_error(fast, exact, w, groups) <= 4
                assert _conditioned_error(reference, exact, w, groups) <= 4


def test_fast_group_solve_takes_one_evaluation_where_the_start_is_the_root(monkeypatch):
    # one step size per group: the mean-step start is the closed form, and one evaluation proves it
    monkeypatch.setattr(structured, "NEWTON_MAX_ITERATIONS", 1)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(50, 9, generator=g, dtype=torch.float64)
    t = (torch.rand(50, 1, generator=g, dtype=torch.float64) + 0.1).expand(50, 9).contiguous()
    got = w.clone()
    structured.group_shrink_diag_(got, 1 / t, "out", 4.0)
    want = w * (1 - 4.0 * t / w.norm(dim=1, keepdim=True)).clamp(min=0)
    assert 0 < int((got == 0).all(dim=1).sum()) < 50
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0.0)


def test_fast_group_solve_of_half_precision_and_non_contiguous_tensors():
    w, t, a = _group_case((12, 10), "out", 2.0, 0, torch.float32)
    # bfloat16 weights with float32 steps: solved in float32 and rounded once
    half = w.to(torch.bfloat16)
    got = half.clone()
    structured.group_shrink_diag_(got, 1 / t, "out", a)
    in_float32 = half.float()
    structured.group_shrink_diag_(in_float32, 1 / t, "out", a)
    assert got.dtype == torch.bfloat16 and torch.equal(got, in_float32.to(torch.bfloat16))
    # a tensor with no (A, G, B) view takes the reference solve: bitwise the reference
    strided = w.t().contiguous().t()
    inverse = (1 / t).t().contiguous().t()
    got = strided.clone().t().contiguous().t()
    structured.group_shrink_diag_(got, inverse.clone(), "out", a)
    assert not got.is_contiguous()
    assert torch.equal(got, structured._group_shrink_diag(strided, inverse.reciprocal(), "out", a))


def test_adaptive_prox_of_bfloat16_weights_is_computed_in_float32_and_rounded_once(prox_path):
    torch.manual_seed(0)
    model = nn.Linear(64, 32).to(torch.bfloat16)
    paramreg.attach(model, "weight", l1=0.05, metric_floor=0.0)  # the plain metric, written out below
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    model(x).float().pow(2).mean().backward()
    # the same Adam step without the prox, then the prox written out in float32
    reference = nn.Linear(64, 32).to(torch.bfloat16)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    reference(x).float().pow(2).mean().backward()
    opt.step()
    ref_opt.step()
    state = ref_opt.state[reference.weight]
    t = 0.01 / ((state["exp_avg_sq"].float() / (1 - 0.999)).sqrt() + 1e-8)
    expected = _soft(reference.weight.detach().float(), 0.05 * t).to(torch.bfloat16)
    assert model.weight.dtype == torch.bfloat16
    assert torch.equal(model.weight.detach(), expected)
    assert (model.weight == 0).any()


# optimizer -> (factory, the safeguarded denominator of the k-th step from its state and the RMS r of
# the gradient it stepped with, the step's scalar factor; Note [Safeguarded metric])
SAFEGUARDED = {
    "Adam": (
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda g, s, r, k: (s["exp_avg_sq"] / (1 - g["betas"][1] ** k)).sqrt().clamp(min=r) + g["eps"],
        lambda g, k: g["lr"],
    ),
    "RMSprop": (
        lambda p: torch.optim.RMSprop(p, lr=0.001),
        lambda g, s, r, k: s["square_avg"].sqrt().clamp(min=r * math.sqrt(1 - g["alpha"] ** k)) + g["eps"],
        lambda g, k: g["lr"],
    ),
    "Adagrad": (
        lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01),
        lambda g, s, r, k: s["sum"].sqrt().clamp(min=r * math.sqrt(k)) + g["eps"],
        lambda g, k: g["lr"] / (1 + (k - 1) * g["lr_decay"]),
    ),
    "Adamax": (lambda p: torch.optim.Adamax(p, lr=0.01), lambda g, s, r, k: s["exp_inf"].clamp(min=r), lambda g, k: g["lr"]),
}


@pytest.mark.parametrize("name", SAFEGUARDED)
def test_the_default_metric_is_floored_at_the_rms_of_the_gradient(name, prox_path):
    """Coordinates that get no gradient (inputs that are always 0) have v = 0: the plain metric's
    step lr/eps would zero them at any strength; the default floors each denominator at the RMS of
    the tensor's gradient, written out here from the optimizer's state."""
    make_opt, denominator, scale = SAFEGUARDED[name]
    x, y = mlp_batch()
    x[:, :4] = 0.0  # dead inputs: the first layer's columns 0-3 never get a gradient
    strength = 1e-4
    model, reference = mlp(), mlp()
    paramreg.attach(model, "*.weight", l1=strength)
    opt, ref_opt = make_opt(model.parameters()), make_opt(reference.parameters())
    for k in range(1, 9):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        group = ref_opt.param_groups[0]
        with torch.no_grad():
            for w in (reference[0].weight, reference[2].weight):
                rms = float(w.grad.pow(2).mean().sqrt())
                t = scale(group, k) / denominator(group, ref_opt.state[w], rms, k)
                w.copy_(_soft(w, strength * t))
        # float32: the floor is computed as ‖g‖/sqrt(n) in the state's raw units here and as the
        # root of the mean square in bias-corrected units above; those roundings differ by a few
        # ulps and propagate through 8 steps of training, hence 10x the plain metric's tolerance
        for got, want in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert int((model[0].weight[:, :4] == 0).sum()) == 0, "a tiny strength leaves the dead coordinates alone"


def test_the_plain_metric_wipes_coordinates_without_gradient_and_the_default_does_not(prox_path):
    x, y = mlp_batch()
    x[:, :4] = 0.0
    dead = {}
    for floor in (0.0, None):  # the plain metric, the default
        torch.manual_seed(0)
        model = mlp()
        paramreg.attach(model, "0.weight", l1=1e-6, **({} if floor is None else {"metric_floor": floor}))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        dead[floor] = int((model[0].weight[:, :4] == 0).sum())
    assert dead[0.0] == model[0].weight[:, :4].numel()  # t = lr/eps = 1e6: gone in one step
    assert dead[None] == 0


def test_metric_floor_is_an_option_of_attach_that_specs_carry():
    model = mlp()
    paramreg.attach(model, "0.weight", l1=1e-3, metric_floor=0.0)
    paramreg.attach(model, "2.weight", l1=1e-3)
    assert paramreg.spec(model)["attached"]["0.weight"]["metric_floor"] == 0.0
    assert "metric_floor" not in paramreg.spec(model)["attached"]["2.weight"]  # the default is not written
    assert "metric_floor=0" in repr(model[0].parametrizations.weight[0])
    fresh = mlp()
    paramreg.attach_spec(fresh, paramreg.spec(model))
    assert fresh[0].parametrizations.weight[0].metric_floor == 0.0 and fresh[2].parametrizations.weight[0].metric_floor == 1.0


@pytest.mark.parametrize("bad, match", [
    ({"metric_floor": -1.0}, "metric_floor must be a finite number >= 0"),
    ({"metric_floor": float("nan")}, "metric_floor must be a finite number >= 0"),
    ({"metric_floor": True}, "metric_floor must be a finite number >= 0"),
    ({"metric_floor": 0.0, "step": "lr"}, "metric_floor=0.0 sets the safeguard of the adaptive proximal step"),
    ({"metric_floor": 0.0, "mode": "penalty"}, "metric_floor=0.0 sets the safeguard of the adaptive proximal step"),
])
def test_a_bad_metric_floor_is_refused_and_changes_nothing(bad, match):
    model = mlp()
    with pytest.raises(paramreg.ParamregError, match=match):
        paramreg.attach(model, "*.weight", l1=1e-3, **bad)
    assert paramreg.spec(model)["attached"] == {}


def test_a_subclass_built_before_its_base_resolves_to_the_base():
    """torch wraps ``step`` with its hooks in the class of the first instance built; a subclass
    built before any instance of its base held a wrapper of its own around the same step, and
    paramreg took it for an override (a fresh process: the classes' first instances)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from paramreg.optim.step_sizes import resolve\n"
        "class MyAdam(torch.optim.Adam): pass\n"
        "p = [torch.nn.Parameter(torch.zeros(1))]\n"
        "print(resolve(MyAdam(p)).__name__, resolve(torch.optim.Adam(p)).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["Adam", "Adam"]
