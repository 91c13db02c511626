"""When the prox runs: after each real optimizer step, with that step's learning rate, once."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import paramreg
from paramreg.optim import applying, penalty as optim_penalty

from conftest import TiedLM, mlp, mlp_batch

OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1),
    "SGD-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}
STRENGTH = 0.05


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def reference_run(model, make_opt, steps, x, y, make_sched=None, strength=STRENGTH, adaptive=False, factor=lambda k: 1.0):
    """A plain model, the same optimizer, and the soft-threshold written out after each step:
    threshold factor(k)·lr·a at the k-th step, or with ``adaptive`` (Adam's metric, safeguarded)
    lr·a / (max(sqrt(v / (1 − β₂ᵏ)), rms(g)) + eps)."""
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched else None
    weights = [model[0].weight, model[2].weight]
    for k in range(1, steps + 1):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        group = opt.param_groups[0]
        lr = group["lr"]
        with torch.no_grad():
            for w in weights:
                threshold = factor(k) * lr * strength
                if adaptive:
                    state = opt.state[w]
                    bias_correction = 1 - group["betas"][1] ** float(state["step"])
                    floor = float(w.grad.pow(2).mean().sqrt())
                    threshold = threshold / ((state["exp_avg_sq"] / bias_correction).sqrt().clamp(min=floor) + group["eps"])
                w.copy_(torch.sign(w) * torch.clamp(w.abs() - threshold, min=0))
        if sched is not None:
            sched.step()
    return model


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("built", ["before attach", "after attach"])
@pytest.mark.parametrize("step", ["auto", "lr"])
def test_prox_after_every_step_matches_the_written_out_reference(name, built, step, device):
    x, y = (t.to(device) for t in mlp_batch())
    make_opt = OPTIMIZERS[name]
    strength = 0.005 / make_opt([torch.zeros(1, requires_grad=True)]).param_groups[0]["lr"]  # threshold 0.005 a step
    adaptive = name.startswith("Adam") and step == "auto"  # the default for Adam: its own metric
    strength = strength / 20 if adaptive else strength  # Adam's 1/sqrt(v) makes the thresholds larger
    # the default for SGD with nesterov momentum 0.9: t = lr·(1 + 0.9·c_k), c_k = (1 − 0.9ᵏ)/(1 − 0.9)
    # the fill of its buffer after k steps, rising to the settled 1 + 0.9/(1 − 0.9) = 10
    sgd_momentum = name == "SGD-momentum" and step == "auto"
    factor = (lambda k: 1 + 0.9 * (1 - 0.9**k) / (1 - 0.9)) if sgd_momentum else (lambda k: 1.0)
    strength = strength / 10 if sgd_momentum else strength
    expected = reference_run(mlp().to(device), make_opt, 12, x, y, strength=strength, adaptive=adaptive, factor=factor)

    model = mlp().to(device)
    opt = make_opt(model.parameters()) if built == "before attach" else None
    paramreg.attach(model, "*.weight", l1=strength, step=step)
    opt = opt or make_opt(model.parameters())
    for _ in range(12):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    paramreg.remove(model)
    # Adam's metric: paramreg computes softshrink(u·w, a)/u with u = 1/t, the reference
    # w − clamp(w, −t·a, t·a): equal up to a few float32 roundings per step (relative 1e-6 over 12
    # steps; without v's bias correction the reference is off by 0.4)
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if adaptive else {"rtol": 0, "atol": 1e-7}
    for got, want in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, **tolerance)
    assert (model[0].weight == 0).any(), "L1 should produce exact zeros"
    assert (model[0].weight != 0).any()


def _adaptive_run(block, monkeypatch, make_opt, regularize):
    """Ten steps of a small MLP, ``regularize(model)`` attaching, with blocks of ``block`` elements."""
    monkeypatch.setattr(applying, "BLOCK", block)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 3))
    regularize(model)
    opt = make_opt(model.parameters())
    x, y = torch.randn(16, 20), torch.randint(0, 3, (16,))
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    paramreg.remove(model)
    return model


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=0.05),
    lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True, momentum=0.5),
], ids=["Adam", "RMSprop"])
def test_adaptive_prox_in_blocks_equals_one_pass(monkeypatch, make_opt):
    # Note [Blocks]: weights cut into slices together with their optimizer state, small biases
    # gathered into one block; elementwise maps give bitwise the same result as one pass
    def regularize(model):
        paramreg.attach(model, "*.weight", l1=0.02)
        paramreg.attach(model, "0.bias", elastic_net=(0.02, 0.5))
        paramreg.attach(model, "2.bias", l2=0.5)

    whole = _adaptive_run(1 << 30, monkeypatch, make_opt, regularize)
    assert (whole[0].weight == 0).any() and (whole[0].weight != 0).any()
    for block in (7, 40):
        blocked = _adaptive_run(block, monkeypatch, make_opt, regularize)
        for got, want in zip(blocked.parameters(), whole.parameters(), strict=True):
            assert torch.equal(got, want)


def test_adaptive_group_lasso_in_row_blocks_equals_one_pass(monkeypatch):
    # Newton's iterations stop per block, not when the whole tensor has converged: equal within
    # its tolerance (NEWTON_RTOL 1e-6 in float32), the same rows zero
    def regularize(model):
        paramreg.attach(model, "0.weight", group_lasso=0.05)
        paramreg.attach(model, "2.weight", sparse_group_lasso=(0.01, 0.05))

    def run(block):
        return _adaptive_run(block, monkeypatch, lambda p: torch.optim.Adam(p, lr=0.05), regularize)

    whole, blocked = run(1 << 30), run(45)  # 2 rows of the first weight, 1 of the second per block
    zero_rows = (whole[0].weight == 0).all(dim=1)
    assert 0 < int(zero_rows.sum()) < 30
    assert torch.equal((blocked[0].weight == 0).all(dim=1), zero_rows)
    for got, want in zip(blocked.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_blocks_cover_every_element_once(monkeypatch):
    monkeypatch.setattr(applying, "BLOCK", 8)
    big, small, other = torch.zeros(5, 4), torch.zeros(3), torch.zeros(2, 2)
    strided = torch.zeros(4, 6).t()  # not contiguous: one block, not sliced
    states = [{"v": torch.zeros(5, 4), "step": torch.tensor(3.0)}, {"v": torch.zeros(3)}, {"v": torch.zeros(2, 2)}, {"v": torch.zeros(4, 6).t()}]
    blocks = list(applying._blocks([big, small, other, strided], states, paramreg.L1(1.0)))
    for indices, tensors, block_states in blocks:
        assert all(t.data_ptr() >= [big, small, other, strided][i].data_ptr() for i, t in zip(indices, tensors, strict=True))
        for t, state in zip(tensors, block_states, strict=True):
            t += 1
            state["v"] += 1
            assert "step" not in state or state["step"].shape == ()
    for t, state in zip([big, small, other, strided], states, strict=True):
        assert torch.equal(t, torch.ones_like(t)) and torch.equal(state["v"], torch.ones_like(t))
    assert [len(tensors) for _, tensors, _ in blocks] == [1, 1, 1, 3]
    assert [list(indices) for indices, _, _ in blocks] == [[0], [0], [0], [1, 2, 3]]  # 20 → 8 + 8 + 4; then 3, 4 and the strided 24 gathered
    # a group map whose groups lie in rows: slices of whole rows (2 rows = 8 elements)
    rows = [t[0].shape for _, t, _ in applying._blocks([big], states[:1], paramreg.GroupLasso(1.0))]
    assert rows == [(2, 4), (2, 4), (1, 4)]
    # maps that cannot be cut (groups over columns, the nuclear norm) take whole tensors
    for regularizer in (paramreg.GroupLasso(1.0, groups="in"), paramreg.NuclearNorm(1.0)):
        whole = [t for _, ts, _ in applying._blocks([big, small], states[:2], regularizer) for t in ts]
        assert len(whole) == 2 and whole[0] is big and whole[1] is small


def test_step_size_follows_the_lr_scheduler():
    x, y = mlp_batch()

    def make_opt(params):
        return torch.optim.SGD(params, lr=0.3)

    def make_sched(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    expected = reference_run(mlp(), make_opt, 8, x, y, make_sched=make_sched)
    model = mlp()
    paramreg.attach(model, "*.weight", l1=STRENGTH)
    opt = make_opt(model.parameters())
    sched = make_sched(opt)
    for _ in range(8):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        sched.step()
    paramreg.remove(model)
    for got, want in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_each_group_uses_its_own_learning_rate():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1.0)
    opt = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.0}, {"params": [model[2].weight], "lr": 0.01}])
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    model[0].weight.grad = torch.zeros_like(w0)
    model[2].weight.grad = torch.zeros_like(w2)
    opt.step()
    assert torch.equal(model[0].weight, w0)  # t = 0: identity
    assert torch.equal(model[2].weight, F.softshrink(w2, 0.01))


def test_grad_scaler_skipped_step_applies_no_prox(device):
    x, y = (t.to(device) for t in mlp_batch())
    model = mlp().to(device)
    paramreg.attach(model, "*.weight", l1=STRENGTH)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device.type)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    scaler.scale(loss_of(model, x, y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # inf gradient: the optimizer step is skipped, and so is the prox
    scaler.update()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    opt.zero_grad()
    scaler.scale(loss_of(model, x, y)).backward()
    scaler.step(opt)
    scaler.update()
    start = before["0.weight"]
    expected = F.softshrink(torch.add(start, model[0].weight.grad, alpha=-0.1), 0.1 * STRENGTH)
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=0, atol=1e-6)


def test_gradient_accumulation_applies_the_prox_once_per_step():
    x, y = mlp_batch(n=32)
    model = mlp()
    paramreg.attach(model, "*.weight", l1=STRENGTH)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = model[0].weight.detach().clone()
    opt.zero_grad()
    for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
        (loss_of(model, xb, yb) / 4).backward()
    grad = model[0].weight.grad.clone()
    opt.step()
    expected = F.softshrink(torch.add(start, grad, alpha=-0.1), 0.1 * STRENGTH)
    assert torch.equal(model[0].weight.detach(), expected)


@pytest.mark.parametrize(
    "make_opt, strength", [(lambda p: torch.optim.SGD(p, lr=0.1), 0.5), (lambda p: torch.optim.Adam(p, lr=0.01), 0.05)]
)
def test_parameters_frozen_mid_training_get_no_prox(make_opt, strength):
    model = mlp()
    paramreg.attach(model, "*.weight", l1=strength)
    opt = make_opt(model.parameters())
    x, y = mlp_batch()
    for step in range(4):
        if step == 2:  # frozen mid-training: its .grad is None from now on
            model[0].weight.requires_grad_(False)
            frozen = model[0].weight.detach().clone()
            moving = model[2].weight.detach().clone()
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, moving)
    assert (model[2].weight == 0).any()


def test_tied_weight_gets_the_prox_once():
    model = TiedLM()
    paramreg.attach(model, "*.weight", l1=STRENGTH)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.arange(11)
    start = model.emb.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(tokens), tokens).backward()
    expected = F.softshrink(torch.add(start, model.emb.weight.grad, alpha=-0.1), 0.1 * STRENGTH)
    opt.step()
    assert torch.equal(model.emb.weight.detach(), expected)
    assert model.out.weight is model.emb.weight


def test_penalty_mode_adds_to_the_loss_and_never_acts_at_step_time():
    x, y = mlp_batch()
    plain = mlp()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    model = mlp()
    paramreg.attach(model, "*.weight", l1=STRENGTH, mode="penalty")
    paramreg.attach(model, "*.bias", l2=0.2)  # prox mode: not part of penalty()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        expected_penalty = STRENGTH * (model[0].weight.abs().sum() + model[2].weight.abs().sum())
        torch.testing.assert_close(paramreg.penalty(model), expected_penalty)
        opt.zero_grad()
        (loss_of(model, x, y) + paramreg.penalty(model)).backward()
        opt.step()
        opt_plain.zero_grad()
        manual = STRENGTH * sum(p.abs().sum() for n, p in plain.named_parameters() if n.endswith("weight"))
        (loss_of(plain, x, y) + manual).backward()
        opt_plain.step()
        with torch.no_grad():
            for b in (plain[0].bias, plain[2].bias):
                b.div_(1 + 0.1 * 0.2)
    paramreg.remove(model)
    for got, want in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not (model[0].weight == 0).any(), "a penalty in the loss gives no exact zeros"


def test_penalty_is_zero_without_penalty_mode_regularizers():
    model = mlp()
    assert float(paramreg.penalty(model)) == 0.0
    paramreg.attach(model, "*.weight", l1=1.0)
    assert float(paramreg.penalty(model)) == 0.0


def _l1_of(*tensors, a=STRENGTH):
    return a * sum(float(t.detach().abs().sum()) for t in tensors)


def _penalty(model) -> float:
    return float(paramreg.penalty(model).detach())


def _walks(monkeypatch):
    """Count the plans paramreg.penalty builds (each one walks the model with carrier.slots)."""
    calls = []

    class Counted(optim_penalty._PenaltyPlan):
        __slots__ = ()

        def __init__(self, *args):
            calls.append(1)
            super().__init__(*args)

    monkeypatch.setattr(optim_penalty, "_PenaltyPlan", Counted)
    return calls


def test_penalty_caches_its_plan_and_rebuilds_it_when_carriers_change(monkeypatch):
    # Note [Penalty plans]: one walk per model while nothing changes; attach, remove and
    # set_strength (the carrier generation) each make the next call walk again
    walks = _walks(monkeypatch)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2))
    paramreg.attach(model, "0.weight", l1=STRENGTH, mode="penalty")
    for _ in range(3):
        assert _penalty(model) == pytest.approx(_l1_of(model[0].weight))
    assert len(walks) == 1
    paramreg.attach(model, "2.weight", l1=STRENGTH, mode="penalty")
    assert _penalty(model) == pytest.approx(_l1_of(model[0].weight, model[2].weight))
    paramreg.set_strength(model, "2.weight", 2 * STRENGTH)
    expected = _l1_of(model[0].weight) + _l1_of(model[2].weight, a=2 * STRENGTH)
    assert _penalty(model) == pytest.approx(expected)
    paramreg.remove(model, "0.weight")
    assert _penalty(model) == pytest.approx(_l1_of(model[2].weight, a=2 * STRENGTH))
    assert len(walks) == 4
    paramreg.penalty(model)
    assert len(walks) == 4


def test_penalty_sees_a_submodule_swapped_added_or_deleted_after_attach(monkeypatch):
    walks = _walks(monkeypatch)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    paramreg.attach(model, "*.weight", l1=STRENGTH, mode="penalty")
    assert _penalty(model) == pytest.approx(_l1_of(model[0].weight, model[2].weight))
    # replaced by a plain layer: its penalty goes (the old layer's carrier is still alive and bound)
    old = model[2]
    model[2] = nn.Linear(8, 3)
    assert _penalty(model) == pytest.approx(_l1_of(model[0].weight))
    # a layer that carries a regularizer already, appended (no carrier is bound or unbound here)
    model.append(old)
    assert _penalty(model) == pytest.approx(_l1_of(model[0].weight, old.weight))
    # a deeper swap: inside a submodule
    inner = nn.Sequential(nn.Linear(3, 3))
    paramreg.attach(inner, "0.weight", l1=STRENGTH, mode="penalty")
    model.append(inner)
    assert _penalty(model) == pytest.approx(_l1_of(model[0].weight, old.weight, inner[0].weight))
    inner[0] = nn.Linear(3, 3)
    assert _penalty(model) == pytest.approx(_l1_of(model[0].weight, old.weight))
    del model[0]
    assert _penalty(model) == pytest.approx(_l1_of(old.weight))
    assert len(walks) == 6  # one per change, none for an unchanged model
    paramreg.penalty(model)
    assert len(walks) == 6


def test_penalty_plan_of_shared_submodules_and_of_a_module_cycle(monkeypatch):
    """Note [Penalty plans]: a tree that reaches a module twice (weight-tied layers, a cycle) keeps
    its plan cached and is checked with a set of the modules seen; a swap is still seen, and a
    module newly shared in a tree that had none is a change."""
    walks = _walks(monkeypatch)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    paramreg.attach(model, "*.weight", l1=STRENGTH, mode="penalty")
    for _ in range(2):
        assert _penalty(model) == pytest.approx(_l1_of(shared.weight, model[3].weight))
    assert len(walks) == 1 and model in optim_penalty._penalty_plans
    model[2] = nn.Linear(4, 4)
    assert _penalty(model) == pytest.approx(_l1_of(shared.weight, model[3].weight))
    assert len(walks) == 2
    model[1] = model[3]  # a tree that shared nothing now reaches a module twice
    assert _penalty(model) == pytest.approx(_l1_of(shared.weight, model[3].weight))
    assert len(walks) == 3
    block = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.LayerNorm(4), nn.GELU()))
    tied = nn.Sequential(nn.ModuleList([block] * 24), nn.Linear(4, 2))  # one block, 24 places
    paramreg.attach(tied, "*.weight", l1=STRENGTH, mode="penalty")
    for _ in range(3):
        assert _penalty(tied) == pytest.approx(_l1_of(block[0].weight, block[1][0].weight, tied[1].weight))  # each once
    assert len(walks) == 4 and tied in optim_penalty._penalty_plans
    cyclic = nn.Sequential(nn.Linear(4, 4))
    cyclic.add_module("again", cyclic)
    paramreg.attach(cyclic, "0.weight", l1=STRENGTH, mode="penalty")
    for _ in range(2):
        assert _penalty(cyclic) == pytest.approx(_l1_of(cyclic[0].weight))
    assert len(walks) == 5 and cyclic in optim_penalty._penalty_plans


def test_penalty_follows_a_replaced_parameter_and_a_schedule_without_a_stale_plan():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    paramreg.attach(model, "0.weight", l1=STRENGTH, mode="penalty", schedule=lambda k: 0.5 * k)
    paramreg.attach(model, "2.weight", l2=0.3, mode="penalty")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = mlp_batch()
    for k in range(3):
        expected = 0.5 * k * _l1_of(model[0].weight) + 0.15 * float(model[2].weight.detach().pow(2).sum())
        penalty = paramreg.penalty(model)
        assert float(penalty) == pytest.approx(expected)
        opt.zero_grad()
        (loss_of(model, x, y) + penalty).backward()
        opt.step()
    model[2].weight = nn.Parameter(torch.ones(3, 8))  # the carrier now regularizes the new Parameter
    assert _penalty(model) == pytest.approx(0.5 * 3 * _l1_of(model[0].weight) + 0.15 * 24)


def test_penalty_under_a_users_own_parametrization_is_computed_through_it():
    # the user's parametrization comes first: the penalty sees its output (2·stored), on every call
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Double())
    paramreg.attach(model, "*.weight", l1=STRENGTH, mode="penalty")
    stored = model[0].parametrizations.weight.original
    for _ in range(2):
        assert _penalty(model) == pytest.approx(_l1_of(2 * stored, model[2].weight))
    with torch.no_grad():
        stored.mul_(3)
    assert _penalty(model) == pytest.approx(_l1_of(2 * stored, model[2].weight))
    assert model not in optim_penalty._penalty_plans  # a slot holds modules: not cached (Note [Penalty plans])


def test_prox_step_without_an_optimizer():
    model = mlp()
    paramreg.attach(model, "0.weight", l1=2.0)
    paramreg.attach(model, "2.weight", l2=1.0)
    w0, w2, b0 = (t.detach().clone() for t in (model[0].weight, model[2].weight, model[0].bias))
    paramreg.prox_step(model, lr=0.1)
    assert torch.equal(model[0].weight.detach(), F.softshrink(w0, 0.2))
    assert torch.equal(model[2].weight.detach(), w2 / 1.1)
    assert torch.equal(model[0].bias.detach(), b0)
    with pytest.raises(paramreg.ParamregError, match="lr"):
        paramreg.prox_step(model, lr=-1.0)


def test_removed_and_dropped_models_are_no_longer_treated():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=10.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    paramreg.remove(model)
    x, y = mlp_batch()
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()
    assert not (model[0].weight == 0).any()


def test_optimizer_param_groups_added_later_are_seen():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=10.0)
    opt = torch.optim.SGD([model[0].weight], lr=0.1)
    x, y = mlp_batch()
    loss_of(model, x, y).backward()
    opt.step()
    assert not (model[2].weight == 0).all()
    opt.add_param_group({"params": [model[2].weight], "lr": 0.1})
    opt.step()
    assert (model[2].weight == 0).all()


def test_deepcopy_before_training_trains_independently():
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "*.weight", l1=STRENGTH)
    clone = copy.deepcopy(model)
    for m in (model, clone):
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        for _ in range(5):
            opt.zero_grad()
            loss_of(m, x, y).backward()
            opt.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_size_follows_optimizer_load_state_dict():
    model = nn.Linear(4, 4, bias=False)
    paramreg.attach(model, "weight", l1=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.weight.grad = torch.zeros_like(model.weight)
    opt.step()
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.0
    opt.load_state_dict(state)  # new group dicts around the same params list
    before = model.weight.detach().clone()
    opt.step()
    assert torch.equal(model.weight, before)


def test_user_dataclass_regularizer_need_not_be_hashable():
    from dataclasses import dataclass

    @dataclass
    class Clip(paramreg.Regularizer):
        bound: float

        def penalty(self, w):
            return torch.zeros((), dtype=w.dtype)

        def prox(self, w, t):
            return w.clamp(-self.bound, self.bound)

    model = mlp()
    paramreg.attach(model, "*.weight", reg=Clip(0.01))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = mlp_batch()
    loss_of(model, x, y).backward()
    opt.step()
    assert float(model[0].weight.detach().abs().max()) <= 0.01
    paramreg.prox_step(model, lr=0.1)
    assert paramreg.spec(model)["attached"]["0.weight"]["regularizer"] == {"type": "Clip", "bound": 0.01}


def test_optimizer_without_lr_gets_a_clear_error():
    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"step_size": 0.1})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(group["step_size"] * p.grad.sign())

    model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    opt = SignSGD(model.parameters())
    x, y = mlp_batch()
    loss_of(model, x, y).backward()
    with pytest.raises(paramreg.ParamregError, match="SignSGD has no 'lr'.*paramreg.prox_step"):
        opt.step()


def test_a_fused_optimizers_skipped_step_under_grad_scaler_applies_no_prox_and_counts_nothing():
    """Note [Skipped fused steps]: GradScaler calls a fused optimizer's step() on an inf gradient,
    with optimizer.found_inf set; the kernel moves nothing, and neither does paramreg (its map
    read the inf gradient's norm and made the weights NaN)."""
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "*.weight", sparsity=0.5, sparsity_steps=(1, 4), l1=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for k in range(6):
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        if k == 2:
            model[0].weight.grad[0, 0] = float("inf")
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        scaler.step(opt)
        scaler.update()
        if k == 2:
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    carrier = model[0].parametrizations.weight[0]
    assert carrier.calls == 5 == int(opt.state[model[0].parametrizations.weight.original]["step"])
    weights = [model[0].weight, model[2].weight]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * sum(w.numel() for w in weights))


@pytest.mark.parametrize("passed", ["positional", "keyword"])
def test_regrow_false_masks_the_gradient_a_closure_computes(passed):
    """Note [Zeros that do not regrow] with step(closure): the pre-step hook runs before the
    closure computes the gradient, so the closure is wrapped to set the kept zeros' gradient to
    zero after it; the optimizer's moments never see them."""
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "*.weight", sparsity=0.6, sparsity_steps=(1, 5), l1=True, regrow=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    weight, original = model[0].weight, model[0].parametrizations.weight.original
    zeros = weight == 0
    masked = 0
    for _ in range(8):
        second = opt.state[original]["exp_avg_sq"].clone() if opt.state[original] else None
        opt.step(closure) if passed == "positional" else opt.step(closure=closure)
        assert not (zeros & (weight != 0)).any()  # no zero came back
        if zeros.any():  # a zero's second moment only decays: its gradient was 0
            assert torch.equal(opt.state[original]["exp_avg_sq"][zeros], second[zeros] * 0.999)
            masked += 1
        zeros = weight == 0
    assert masked >= 6


def test_the_hooks_work_shows_in_the_profiler_under_paramregs_names():
    """``torch.profiler`` shows the post-step hook's work as ``paramreg.after_step`` and the
    held zeros' pass before a target's step as ``paramreg.before_step`` (Note [Why a global
    optimizer post-step hook] in optim/hooks.py), and neither for an optimizer over no attached
    weight, while another model is attached."""
    torch.manual_seed(0)
    model, plain = mlp(), mlp()
    paramreg.attach(model, "0.weight", sparsity=0.5, sparsity_steps=(0, 4))
    paramreg.attach(model, "2.weight", l1=1e-3)
    opt, other = torch.optim.Adam(model.parameters(), lr=0.01), torch.optim.Adam(plain.parameters(), lr=0.01)
    x, y = mlp_batch()
    names = []
    for optimizer, net in ((opt, model), (other, plain)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            optimizer.zero_grad()
            loss_of(net, x, y).backward()
            optimizer.step()
        names.append({e.name for e in prof.events() if e.name.startswith("paramreg.")})
    assert names == [{"paramreg.before_step", "paramreg.after_step"}, set()]
