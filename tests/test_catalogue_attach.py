"""The catalogue through attach(): keywords, shape checks, training behaviour, SoftThreshold's lifecycle."""

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

import paramreg

from conftest import SmallCNN, assert_same_snapshot, cnn_batch, snapshot


def train(model, steps=1, lr=0.1):
    x, y = cnn_batch()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize(
    "targets, kwargs, message",
    [
        ("conv1.bias", {"group_lasso": {"strength": 0.1, "groups": "in"}}, r"'conv1.bias' \(shape \(4,\), torch.float32\): groups='in' needs a tensor with at least 2 dims"),
        ("fc.weight", {"group_lasso": {"strength": 0.1, "groups": "kernel"}}, r"'fc.weight' \(shape \(3, 96\), .*groups='kernel' needs a tensor with at least 3 dims"),
        ("fc.weight", {"nm": (2, 5)}, r"'fc.weight' \(shape \(3, 96\), .*NM\(2, 5\) needs .* dim 1 is a multiple of 5"),
        ("*.bias", {"nuclear_norm": 0.1}, r"'conv1.bias' \(shape \(4,\).*at least 2 dims"),
        ("conv1.bias", {"top_k": 5}, r"TopK\(5\) keeps more entries than the tensor has \(4\)"),
    ],
)
def test_shapes_that_cannot_be_grouped_are_refused_at_attach(targets, kwargs, message):
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(paramreg.ParamregError, match=message):
        paramreg.attach(model, targets, **kwargs)
    assert_same_snapshot(before, snapshot(model))


def test_nm_on_a_dim_of_six():
    with pytest.raises(paramreg.ParamregError, match=r"'weight' \(shape \(2, 6\).*NM\(2, 4\).*multiple of 4"):
        paramreg.attach(nn.Linear(6, 2), "weight", nm=(2, 4))


def test_keyword_forms_and_errors():
    model = SmallCNN()
    assert paramreg.attach(model, "conv1.weight", group_lasso=1e-3) == ["conv1.weight"]
    assert paramreg.attach(model, "conv2.weight", group_lasso={"strength": 1e-3, "groups": "in", "weighted": True}) == ["conv2.weight"]
    assert paramreg.attach(model, "fc.weight", nm=(2, 4)) == ["fc.weight"]
    assert paramreg.attach(model, "bn1.weight", non_negative=True) == ["bn1.weight"]
    assert paramreg.attach(model, "bn1.bias", box=(-1.0, 1.0)) == ["bn1.bias"]
    regs = {r.name: r.regularizer for r in paramreg.report(model).rows}
    assert regs["conv2.weight"] == "GroupLasso(strength=0.001, groups='in', weighted=True)"
    assert regs["fc.weight"] == "NM(n=2, m=4)" and regs["bn1.bias"] == "Box(lo=-1.0, hi=1.0)"
    with pytest.raises(paramreg.ParamregError, match="unknown keyword\\(s\\) lasso; regularizer keywords are .*group_lasso=.*nm=.*soft_threshold="):
        paramreg.attach(SmallCNN(), "*.weight", lasso=1e-3)
    with pytest.raises(paramreg.ParamregError, match="one regularizer per tensor, got l1=0.1, group_lasso=0.1"):
        paramreg.attach(SmallCNN(), "*.weight", l1=0.1, group_lasso=0.1)
    with pytest.raises(paramreg.ParamregError, match="NonNegative\\(\\) is a constraint.*mode='prox'"):
        paramreg.attach(SmallCNN(), "*.weight", non_negative=True, mode="penalty")
    with pytest.raises(paramreg.ParamregError, match="acts in the forward pass; it has no penalty mode"):
        paramreg.attach(SmallCNN(), "*.weight", soft_threshold=0.1, mode="penalty")
    with pytest.raises(paramreg.ParamregError, match="group_lasso=\\{'strength': 0.1, 'group': 'in'\\}.*unexpected keyword"):
        paramreg.attach(SmallCNN(), "*.weight", group_lasso={"strength": 0.1, "group": "in"})


def test_training_with_structured_regularizers_and_constraints():
    torch.manual_seed(0)
    model = SmallCNN()
    paramreg.attach(model, "conv2.weight", group_lasso=5.0)  # removes whole filters
    paramreg.attach(model, "fc.weight", nm=(2, 4))
    paramreg.attach(model, "conv1.weight", max_norm=0.5)
    paramreg.attach(model, "bn1.weight", non_negative=True)
    with torch.no_grad():
        model.bn1.weight.copy_(torch.linspace(-1, 1, 4))
    train(model, steps=2)
    filters = model.conv2.weight.detach().flatten(1)
    assert ((filters == 0).all(1) | (filters != 0).all(1)).all() and (filters == 0).all(1).any()
    assert int((model.fc.weight == 0).sum()) == model.fc.weight.numel() // 2
    assert float(model.conv1.weight.detach().flatten(1).norm(dim=1).max()) <= 0.5 + 1e-6
    assert bool((model.bn1.weight >= 0).all())
    report = paramreg.report(model)
    assert report["fc.weight"].sparsity == 0.5


def test_nuclear_norm_every_k_steps():
    torch.manual_seed(0)
    model = nn.Linear(6, 5, bias=False)
    plain = copy.deepcopy(model)
    paramreg.attach(model, "weight", nuclear_norm={"strength": 5.0, "every": 3})
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain)]
    x = torch.randn(8, 6)
    for step in range(1, 4):
        for m, opt in zip((model, plain), opts, strict=True):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
        if step < 3:
            assert torch.equal(model.weight, plain.weight)  # no SVD yet
    assert torch.linalg.matrix_rank(model.weight.detach()) < torch.linalg.matrix_rank(plain.weight.detach())


def test_soft_threshold_acts_in_the_forward_pass_learns_its_threshold_and_folds():
    torch.manual_seed(0)
    model = SmallCNN()
    raw = model.conv2.weight.detach().clone()
    paramreg.attach(model, "conv2.weight", soft_threshold=0.05)
    effective = model.conv2.weight.detach()
    tau = model.conv2.parametrizations.weight[0].transform.threshold
    assert torch.equal(effective, torch.sign(raw) * torch.relu(raw.abs() - 0.05))
    assert paramreg.report(model)["conv2.weight"].zeros == int((effective == 0).sum()) > 0
    names = [n for n, _ in model.named_parameters()]
    assert "conv2.parametrizations.weight.0.transform.threshold" in names
    train(model, steps=3)
    assert not torch.equal(tau.detach(), torch.tensor(0.05))  # learned
    x, _ = cnn_batch()
    model.eval()
    before = model(x)
    stored = model.conv2.weight.detach().clone()
    paramreg.remove(model)
    assert type(model.conv2) is nn.Conv2d
    assert torch.equal(model.conv2.weight, stored)  # folded: the plain weight has the exact zeros
    assert torch.equal(model(x), before)


def test_soft_threshold_checkpoints_round_trip():
    torch.manual_seed(0)
    model = SmallCNN()
    paramreg.attach(model, "conv*.weight", soft_threshold=0.05)
    train(model, steps=2)
    model.eval()
    x, _ = cnn_batch()
    expected = model(x)
    state = model.state_dict()
    extra = {"conv1.parametrizations.weight.0.transform.threshold", "conv2.parametrizations.weight.0.transform.threshold"}
    assert set(state) == set(SmallCNN().state_dict()) | extra
    buffer = io.BytesIO()
    torch.save({"model": state, "paramreg": paramreg.spec(model)}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = SmallCNN()
    paramreg.attach_spec(fresh, checkpoint["paramreg"])
    fresh.load_state_dict(checkpoint["model"], strict=True)
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    plain = SmallCNN().eval()
    plain.load_state_dict(paramreg.folded(model).state_dict(), strict=True)  # the plain form
    assert torch.equal(plain(x), expected)
    other = SmallCNN()
    paramreg.attach(other, "conv*.weight", soft_threshold=0.05)
    other.load_state_dict(plain.state_dict(), strict=True)  # a plain checkpoint loads too
    assert torch.equal(other.conv1.parametrizations.weight.original, plain.conv1.weight)


def test_user_registered_regularizer():
    @paramreg.register("shrink_to_mean")
    @dataclasses.dataclass(frozen=True)
    class ShrinkToMean(paramreg.Regularizer):
        """R(w) = (b/2)·‖w − mean(w)‖²; prox: mean + (w − mean)/(1 + t·b) (mean is unchanged)."""

        strength: float

        def penalty(self, w):
            return 0.5 * self.strength * (w - w.mean()).pow(2).sum()

        def prox(self, w, t):
            return w.mean() + (w - w.mean()) / (1 + t * self.strength)

    model = SmallCNN()
    assert paramreg.attach(model, "fc.weight", shrink_to_mean=1.0) == ["fc.weight"]
    mean = model.fc.weight.detach().mean().item()
    paramreg.prox_step(model, lr=1e9)
    assert torch.allclose(model.fc.weight, torch.full_like(model.fc.weight, mean), atol=1e-6)
    spec = paramreg.spec(model)
    assert spec["attached"]["fc.weight"]["regularizer"] == {"type": "ShrinkToMean", "strength": 1.0}
    fresh = SmallCNN()
    paramreg.attach_spec(fresh, spec)
    with pytest.raises(paramreg.ParamregError, match="keyword 'l1' is taken by paramreg.catalogue.elementwise.L1"):
        paramreg.register("l1")(ShrinkToMean)
    with pytest.raises(paramreg.ParamregError, match="cannot be an attach\\(\\) keyword"):
        paramreg.register("mode")
    with pytest.raises(paramreg.ParamregError, match="decorates a paramreg.Regularizer subclass"):
        paramreg.register("thing")(dict)


def test_zero_step_leaves_zero_groups_finite():
    """A warm-up that starts at lr = 0 must not turn zero groups into 0/0 = NaN."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0] = 0
    paramreg.attach(model, "weight", group_lasso=0.1)
    paramreg.attach(model, "bias", sparse_group_lasso=(0.1, 0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert torch.isfinite(model.weight).all() and (model.weight[0] == 0).all()


def test_every_k_does_not_change_the_step_of_other_regularizers():
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.bias.fill_(5.0)
    paramreg.attach(model, "weight", nuclear_norm={"strength": 1e-9, "every": 10})
    paramreg.attach(model, "bias", l1=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model.weight.grad = torch.zeros_like(model.weight)
        model.bias.grad = torch.zeros_like(model.bias)
        opt.step()
    torch.testing.assert_close(model.bias.detach(), torch.full((4,), 4.7))


def test_half_precision_penalties_and_feasibility():
    w = torch.randn(6, 5).to(torch.bfloat16)
    assert torch.isfinite(paramreg.NuclearNorm(1.0).penalty(w))
    for reg in (paramreg.MaxNorm(0.5), paramreg.UnitNorm()):
        assert float(reg.penalty(reg.prox(w, 1.0))) == 0.0


def test_soft_threshold_must_start_above_zero_and_never_dies():
    with pytest.raises(paramreg.ParamregError, match="would never learn"):
        paramreg.attach(nn.Linear(3, 2), "weight", soft_threshold=0.0)
    paramreg.SoftThreshold(0.0, learnable=False)  # a fixed zero threshold is allowed
    layer = nn.Linear(3, 2)
    paramreg.attach(layer, "weight", soft_threshold=0.1)
    theta = layer.parametrizations.weight[0].transform.threshold
    with torch.no_grad():
        theta.fill_(-0.2)  # τ = abs(θ): a negative θ still has a gradient
    layer(torch.randn(5, 3)).pow(2).sum().backward()
    assert float(theta.grad) != 0.0


def test_register_refuses_to_shadow_builtins():
    @dataclasses.dataclass(frozen=True)
    class GroupLasso(paramreg.Regularizer):
        strength: float

        def penalty(self, w):
            return w.sum() * 0

        def prox(self, w, t):
            return w

    with pytest.raises(paramreg.ParamregError, match="type name 'GroupLasso' is taken by paramreg.catalogue.structured.GroupLasso"):
        paramreg.register("my_group_lasso")(GroupLasso)
    assert paramreg.Regularizer.from_dict({"type": "GroupLasso", "strength": 1.0, "groups": "in"}) == paramreg.GroupLasso(1.0, "in")


def test_top_k_fractions_round_half_up_and_keep_at_least_one():
    assert paramreg.TopK(0.25).kept(10) == 3 and paramreg.TopK(0.1).kept(4) == 1 and paramreg.TopK(1.0).kept(7) == 7


def test_soft_threshold_refuses_tied_weights():
    """Found by the state machine: a forward-pass transform on one side of a tie changes one use only."""
    from conftest import TiedLM

    model = TiedLM()
    before = snapshot(model)
    for pattern in ("emb.weight", "out.weight"):
        with pytest.raises(paramreg.ParamregError, match="one Parameter shared as 'emb.weight', 'out.weight'.*untie"):
            paramreg.attach(model, pattern, soft_threshold=0.1)
    assert_same_snapshot(before, snapshot(model))
    assert paramreg.attach(model, "*.weight", exclude="emb.weight", soft_threshold=0.1) == ["hidden.weight"]
