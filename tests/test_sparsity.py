"""What a strength means, and asking for sparsity instead: the step policy that ran, near-zero
strengths, target sparsity, keep_zeros, resuming schedules and targets, set_strength on coupled
groups (issue: "Say the sparsity you want")."""

import copy
import functools
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramreg
from paramreg import ParamregError
from paramreg.optim.targets import ramp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from quickstart import SmallCNN, load_data  # noqa: E402

DIGITS = load_data()
TARGETS = ["conv*.weight", "fc*.weight"]
TARGET_NAMES = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=3e-3),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=3e-3),
}


def train(model, opt, steps, seed=0, start=0):
    """``steps`` minibatch steps on the digits, batches drawn from ``seed`` (from step ``start`` on)."""
    x, _, y, _ = DIGITS
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(x), (32,), generator=g) for _ in range(start + steps)][start:]
    for b in batches:
        opt.zero_grad()
        F.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    return model


@torch.no_grad()
def accuracy(model):
    _, x, _, y = DIGITS
    model.eval()
    out = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return out


# ---- 1. one visible meaning -----------------------------------------------------------------


class LoggingAdam(torch.optim.Adam):
    """A subclass that only adds a method: it runs Adam's update."""

    def lr(self):
        return self.param_groups[0]["lr"]


class OverridingAdam(torch.optim.Adam):
    def step(self, closure=None):
        return super().step(closure)


def test_a_subclass_that_does_not_override_step_is_its_base_class():
    results = {}
    for cls in (torch.optim.Adam, LoggingAdam):
        torch.manual_seed(0)
        model = SmallCNN()
        paramreg.attach(model, TARGETS, l1=3e-3)
        train(model, cls(model.parameters(), lr=3e-3), 60)
        results[cls] = model
        assert paramreg.report(model)["fc1.weight"].step == "adaptive(Adam)"
    for a, b in zip(results[torch.optim.Adam].parameters(), results[LoggingAdam].parameters(), strict=True):
        assert torch.equal(a, b)
    assert paramreg.report(results[LoggingAdam]).sparsity > 0.1


def test_an_optimizer_paramreg_cannot_map_warns_once_naming_it_the_tensor_and_the_policy():
    torch.manual_seed(0)
    model = SmallCNN()
    paramreg.attach(model, "fc2.weight", l1=1e-3)
    opt = OverridingAdam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, 3)
    ours = [w for w in caught if "paramreg" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "OverridingAdam" in message and "'fc2.weight'" in message and "t = lr" in message
    assert paramreg.report(model)["fc2.weight"].step == "lr"
    with warnings.catch_warnings(record=True) as caught:  # step='lr' says it is intended: silent
        warnings.simplefilter("always")
        other = SmallCNN()
        paramreg.attach(other, "fc2.weight", l1=1e-3, step="lr")
        train(other, OverridingAdam(other.parameters(), lr=1e-3), 2)
    assert not [w for w in caught if "paramreg" in str(w.message)]


def test_adafactor_warns_and_takes_t_equal_lr():
    model = nn.Linear(4, 3)
    paramreg.attach(model, "weight", l1=1.0)
    opt = torch.optim.Adafactor(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="Adafactor is not one paramreg knows"):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert paramreg.report(model)["weight"].step == "lr"


@pytest.mark.parametrize(
    "make_opt, label",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), "sgd(SGD)"),
        (lambda p: torch.optim.Adam(p), "adaptive(Adam)"),
        (lambda p: torch.optim.AdamW(p), "adaptive(AdamW)"),
        (lambda p: torch.optim.RMSprop(p), "adaptive(RMSprop)"),
    ],
)
def test_report_and_repr_show_the_step_policy_that_ran(make_opt, label):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    paramreg.attach(model, "0.weight", l1=1e-3)
    paramreg.attach(model, "2.weight", max_norm=1.0)
    paramreg.attach(model, "0.bias", l2=1e-3, step="lr")
    assert "step=" not in repr(model[0].parametrizations.weight[0])  # nothing ran yet
    assert paramreg.report(model)["0.weight"].step is None
    opt = make_opt(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    r = paramreg.report(model)
    assert (r["0.weight"].step, r["2.weight"].step, r["0.bias"].step) == (label, "projection", "lr")
    assert f"step={label}" in repr(model[0].parametrizations.weight[0])
    assert label in str(r)


def test_attach_channels_and_group_lasso_take_the_same_units_under_adam():
    """A conv with no bias and no BatchNorm: its coupled channel group is its filter, so the two
    regularizers are the same function, and under Adam they must give the same weights."""
    models = []
    for how in ("group_lasso", "attach_channels"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        if how == "group_lasso":
            paramreg.attach(model, "0.weight", group_lasso=0.3)
        else:
            paramreg.attach_channels(model, "0.weight", 0.3, torch.randn(1, 1, 8, 8))
        train(model, torch.optim.Adam(model.parameters(), lr=3e-3), 30)
        assert paramreg.report(model)["0.weight"].step == "adaptive(Adam)"
        models.append(model)
    torch.testing.assert_close(models[0][0].weight, models[1][0].weight, rtol=1e-5, atol=1e-7)
    zero = models[0][0].weight.flatten(1).norm(dim=1) == 0
    assert 0 < int(zero.sum()) < 8, "the strength zeroes some filters, not all"


# ---- 2. a near-zero strength is nearly off ------------------------------------------------------


class Bag(nn.Module):
    """Mean of token embeddings -> class. Tokens 0-89 are frequent; 90-99 appear in one batch in 100."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        return self.head(self.embedding(tokens).mean(1))


def bag_run(make_opt, l1, steps=300, floor=1.0):
    torch.manual_seed(0)
    model = Bag()
    if l1:
        paramreg.attach(model, ["embedding.weight", "head.weight"], l1=l1, metric_floor=floor)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(0)
    for k in range(steps):
        tokens = torch.randint(0, 90, (32, 8), generator=g)
        if k % 100 == 0:
            tokens[:, 0] = torch.randint(90, 100, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(tokens), tokens[:, 1] % 4).backward()
        opt.step()
    weights = torch.cat([model.embedding.weight.detach().flatten(), model.head.weight.detach().flatten()])
    rare_wiped = int((model.embedding.weight[90:] == 0).all(1).sum())
    return float((weights == 0).float().mean()), rare_wiped


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_a_strength_a_thousand_times_below_half_sparsity_is_nearly_off(name):
    make_opt = {"SGD": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
                "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2)}[name]
    tiny = {"SGD": 3e-6, "Adam": 1e-6, "AdamW": 1e-6}[name]
    half, _ = bag_run(make_opt, 1000 * tiny)
    assert half >= 0.5, "1000x the tiny strength gives at least half zeros, so the tiny one is <= a50/1000"
    base, _ = bag_run(make_opt, None)
    small, wiped = bag_run(make_opt, tiny)
    assert small - base <= 0.01
    assert wiped == 0, "rows whose gradient is zero on most steps are not wiped by a tiny strength"


def test_the_plain_metric_wipes_rare_rows_and_the_safeguarded_default_does_not():
    """What the safeguard prevents: in Adam's plain metric a row whose gradient is zero on most
    steps has v near 0 and a step near lr/eps, so l1=1e-4 (a tenth of a50 here) wipes it."""
    _, kept = bag_run(lambda p: torch.optim.Adam(p, lr=1e-2), 1e-4)
    _, wiped = bag_run(lambda p: torch.optim.Adam(p, lr=1e-2), 1e-4, floor=0.0)  # the plain metric
    assert kept == 0 and wiped >= 5


# ---- 3. target sparsity ---------------------------------------------------------------------------


def test_ramp_is_cubic_and_holds():
    assert ramp(0.8, 100, 0) == 0.0
    assert ramp(0.8, 100, 100) == pytest.approx(0.8) and ramp(0.8, 100, 1000) == pytest.approx(0.8)
    assert ramp(0.8, 100, 50) == pytest.approx(0.8 * (1 - 0.5**3))
    values = [ramp(0.8, 100, k) for k in range(101)]
    assert values == sorted(values)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_sparsity_is_reached_on_every_seed_without_collapse(name, seed):
    torch.manual_seed(seed)
    model = SmallCNN()
    names = paramreg.attach(model, TARGETS, sparsity=0.9, sparsity_steps=120)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 120, seed=seed)
    target = paramreg.report(model).targets[0]
    assert target.names == tuple(names) and target.step == 120
    assert abs(target.reached - 0.9) <= 0.01
    train(model, opt, 40, seed=seed, start=120)  # held after the ramp
    r = paramreg.report(model)
    zeros = sum(r[n].zeros for n in names) / sum(r[n].numel for n in names)
    assert abs(zeros - 0.9) <= 0.01 and abs(r.targets[0].reached - zeros) < 1e-12
    assert accuracy(model) > 0.6, "far above chance (0.1)"


class ChannelNet(nn.Module):
    """Two conv-BN-ReLU layers (16 and 32 channels), pooling and a classifier, for the digits."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attach_channels_target_removes_the_asked_fraction_of_channels(name, seed):
    torch.manual_seed(seed)
    model = ChannelNet()
    paramreg.attach_channels(model, "conv*.weight", example_inputs=torch.randn(2, 1, 8, 8), sparsity=0.5, sparsity_steps=80)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 100, seed=seed)
    target = paramreg.report(model).targets[0]
    assert target.groups == 48 and abs(target.reached - 0.5) <= 0.01
    zero = sum(int((conv.weight.flatten(1).norm(dim=1) == 0).sum()) for conv in (model.conv1, model.conv2))
    assert zero == 24
    paramreg.remove(model)
    small = paramreg.shrink(model, torch.randn(2, 1, 8, 8))
    assert small.conv1.out_channels + small.conv2.out_channels == 24
    assert accuracy(small) > 0.8, "far above chance (0.1); dense reaches 0.97-0.98 in these 100 steps"


def test_target_options_are_checked_and_leave_the_model_unchanged():
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        ({"sparsity": 1.5, "sparsity_steps": 10}, "sparsity must be a number strictly between 0 and 1"),
        ({"sparsity": 0.5}, "needs total_steps=T .* or sparsity_steps=n"),
        ({"sparsity_steps": 10}, "sparsity_steps= needs sparsity=s"),
        ({"total_steps": 100}, "total_steps= needs sparsity=s"),
        ({"sparsity": 0.5, "total_steps": 100, "sparsity_steps": 10}, "give sparsity_steps= .* or total_steps= .*, not both"),
        ({"sparsity": 0.5, "total_steps": 3}, "total_steps must be an int >= 4"),
        ({"sparsity": 0.5, "total_steps": 100.0}, "total_steps must be an int >= 4"),
        ({"sparsity": 0.5, "sparsity_steps": 0}, "sparsity_steps must be an int >= 1"),
        ({"sparsity": 0.5, "sparsity_steps": 10, "l2": 1e-3}, "cannot take a sparsity target"),
        ({"sparsity": 0.5, "sparsity_steps": 10, "l1": 1e-3, "mode": "penalty"}, "use mode='prox'"),
        ({"sparsity": 0.5, "sparsity_steps": 10, "l1": lambda k: 1.0}, "takes no strength schedule"),
    ]
    for options, message in cases:
        with pytest.raises(ParamregError, match=message):
            paramreg.attach(model, TARGETS, **options)
    assert type(model) is SmallCNN and paramreg.spec(model)["attached"] == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_group_lasso_target_counts_groups_and_the_spec_round_trips():
    torch.manual_seed(0)
    model = SmallCNN()
    paramreg.attach(model, "fc1.weight", group_lasso=True, sparsity=0.25, sparsity_steps=30)
    train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 30)
    rows = model.fc1.weight.norm(dim=1)
    assert int((rows == 0).sum()) == 16  # 25% of 64 rows
    fresh = SmallCNN()
    paramreg.attach_spec(fresh, paramreg.spec(model))
    assert fresh.fc1.parametrizations.weight[0].target.to_dict() == {"target": 0.25, "steps": 30, "regrow": False}
    assert paramreg.spec(fresh)["attached"]["fc1.weight"] == paramreg.spec(model)["attached"]["fc1.weight"]


def test_set_strength_refuses_a_target():
    model = SmallCNN()
    paramreg.attach(model, TARGETS, sparsity=0.5, sparsity_steps=10)
    with pytest.raises(ParamregError, match="has a sparsity target"):
        paramreg.set_strength(model, "fc1.weight", 1e-3)


# ---- 4. keep the zeros while fine-tuning -----------------------------------------------------------


def test_keep_zeros_holds_every_zero_through_100_adam_steps_and_folds():
    torch.manual_seed(0)
    model = SmallCNN()
    paramreg.attach(model, TARGETS, sparsity=0.8, sparsity_steps=40)
    train(model, torch.optim.Adam(model.parameters(), lr=3e-3), 40)
    paramreg.remove(model)
    zeros = {n: p.detach() == 0 for n, p in model.named_parameters() if n.endswith("weight")}
    assert paramreg.attach(model, TARGETS, keep_zeros=True) == list(zeros)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # Adam's momentum moves zeros: the projection restores them
    train(model, opt, 100, seed=1)
    for n, p in model.named_parameters():
        if n in zeros:
            assert bool((p[zeros[n]] == 0).all()), n
            assert bool((p[~zeros[n]] != before[n][~zeros[n]]).any()), "everything else trains"
    assert paramreg.report(model)["fc1.weight"].step == "projection"
    paramreg.remove(model)
    assert type(model) is SmallCNN
    assert all(bool((dict(model.named_parameters())[n][z] == 0).all()) for n, z in zeros.items())


def test_keep_zeros_takes_the_zeros_of_a_loaded_state_dict():
    trained = nn.Linear(4, 3)
    with torch.no_grad():
        trained.weight[0] = 0.0
    model = nn.Linear(4, 3)
    paramreg.attach(model, "weight", keep_zeros=True)  # a fresh model: no zeros yet
    model.load_state_dict(trained.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    assert bool((model.weight[0] == 0).all()) and bool((model.weight[1:] != trained.weight[1:]).all())


# ---- 5. resuming schedules and targets; set_strength on coupled groups -------------------------


def _resumable(seed, name, how):
    torch.manual_seed(seed)
    model = SmallCNN()
    if how == "target":
        paramreg.attach(model, TARGETS, sparsity=0.8, sparsity_steps=30)
    else:
        paramreg.attach(model, TARGETS, l1=lambda k: 2e-3 * min(1.0, k / 20))
    return model, OPTIMIZERS[name](model.parameters())


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("how", ["target", "schedule"])
def test_a_resumed_run_is_bitwise_the_uninterrupted_one(name, how, tmp_path):
    model, opt = _resumable(0, name, how)
    train(model, opt, 40)
    # interrupted at step 15, as Lightning and the HF Trainer resume: build, attach, load both
    first, first_opt = _resumable(0, name, how)
    train(first, first_opt, 15)
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all("parametrizations" not in k for k in checkpoint["model"]), "plain keys"
    resumed, resumed_opt = _resumable(1, name, how)  # another init: everything comes from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, 25, start=15)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n
    if how == "target":
        assert paramreg.report(resumed).targets[0].step == 40


def test_set_strength_on_one_member_of_a_coupled_group_changes_the_whole_group():
    torch.manual_seed(0)
    model = ChannelNet()
    names = paramreg.attach_channels(model, "conv1.weight", 1e-3, torch.randn(2, 1, 8, 8))
    assert sorted(names) == ["bn1.bias", "bn1.weight", "conv1.bias", "conv1.weight"]
    assert sorted(paramreg.set_strength(model, "bn1.weight", 5e-2)) == sorted(names)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, 5)  # one coupled map over all four tensors: no "received tensors of shapes" error
    strengths = {paramreg.report(model)[n].regularizer for n in names}
    assert len(strengths) == 1 and "strength=0.05" in strengths.pop()


def test_a_deep_copy_shares_its_own_target():
    model = SmallCNN()
    paramreg.attach(model, TARGETS, sparsity=0.5, sparsity_steps=10)
    copied = copy.deepcopy(model)
    targets = {id(m.parametrizations.weight[0].target) for m in (copied.conv1, copied.conv2, copied.fc1, copied.fc2)}
    assert len(targets) == 1 and targets != {id(model.conv1.parametrizations.weight[0].target)}
    assert math.isclose(copied.conv1.parametrizations.weight[0].target.sparsity, 0.5)


@pytest.fixture(params=["gathered", "sampled", "counted"])
def selection(request, monkeypatch):
    """The three ways a target selects in one process on the CPU (Note [Target sparsity]): a few
    values gathered and partitioned, a bracket drawn and its values gathered (Note [Sampled
    bracket]), or counted in passes (forced here by gathering none, then by drawing none)."""
    if request.param != "gathered":
        monkeypatch.setattr(paramreg.optim.targets, "GATHERED", 0)
    if request.param == "counted":
        monkeypatch.setattr(paramreg.optim.targets, "SAMPLE", 0)
    return request.param


@pytest.mark.parametrize("form", ["l0", "l1", "l0 ahead", "l0 extended"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_a_target_step_equals_the_whole_tensor_computation(name, allocation, form, selection, monkeypatch):
    """The critical strengths computed block by block, never all at once, and selected by counting
    (Note [Critical strengths on the fly] in optim/applying.py) give the strength and weights that
    the whole tensors give: the kthvalue of the concatenated critical strengths, then the map.
    One tensor is larger than a block (split), three are smaller (gathered), one holds ties. The
    eager map (the fused one agrees with it within its ulp bound: tests/test_fused.py). "l0 ahead":
    an L0 target looking 3 steps ahead ranks the points w − 3·t·m̂ under Adam, the weights
    themselves under SGD (Note [Looking ahead] in optim/targets.py). "l0 extended": one
    extrapolating 5 times ranks w + 5·(w − w⁰) under Adam, w⁰ the weights after the first step
    (Note [Extrapolated paths]), the weights themselves under SGD."""
    from paramreg.optim import fused, step_sizes
    from paramreg.optim.applying import BOUNDARY

    monkeypatch.setattr(fused, "enabled", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(500, 400), nn.Linear(400, 30), nn.Linear(30, 30), nn.Linear(30, 20))
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(6).repeat(150).reshape(30, 30))  # ties
    reference = copy.deepcopy(model)
    # regrow=True: the proximal path alone, as the reference computes it
    horizon = {"l0": {"lookahead": 0}, "l0 ahead": {"lookahead": 3}, "l0 extended": {"extrapolate": 5.0}}.get(form, {})
    # regrow=True: the proximal path alone, as the reference computes it; an extending target takes
    # regrow=False only, so there the reference also holds the zeros (Note [Zeros that do not regrow])
    held = form == "l0 extended"
    paramreg.attach(model, "*.weight", sparsity=0.6, sparsity_steps=4, allocation=allocation, regrow=not held, **horizon,
                    **{form.split()[0]: True})
    origins = []
    kind = {"l0": paramreg.L0, "l1": paramreg.L1}[form.split()[0]]
    opt, ref_opt = OPTIMIZERS[name](model.parameters()), OPTIMIZERS[name](reference.parameters())
    x, y = torch.randn(16, 500), torch.randn(16, 20)
    for k in (1, 2):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            if held and o is ref_opt and k > 1:
                with torch.no_grad():
                    for w in (reference[i].weight for i in range(4)):
                        zero = w == 0
                        w.grad.masked_fill_(zero, 0.0)
                        for key in ("exp_avg", "momentum_buffer"):
                            if key in ref_opt.state[w]:
                                ref_opt.state[w][key].masked_fill_(zero, 0.0)
            o.step()
        weights = [reference[i].weight for i in range(4)]
        group = ref_opt.param_groups[0]
        if name == "Adam":
            states = [ref_opt.state[w] for w in weights]
            floors = fused.floors(ref_opt, group, weights, states)  # a target's: the dot product over the large tensor
            inverse = step_sizes.inverse_steps(ref_opt, group, states, group["lr"], None, floors)
        else:
            t = group["lr"] * step_sizes.sgd_factor(group, paramreg.optim.state.fill_of(ref_opt, 0, group))
            inverse = [torch.full_like(w, 1.0 / t) for w in weights]
        points = weights
        if form == "l0 ahead" and name == "Adam":
            points = [torch.where(w == 0, 0.0, w - 3 / (1 - 0.9 ** k) * (ref_opt.state[w]["exp_avg"] / u))
                      for w, u in zip(weights, inverse, strict=True)]
        if form == "l0 extended" and name == "Adam":
            origins = origins or [w.detach().clone() for w in weights]  # the weights of the ramp's first step
            points = [torch.where(w == 0, 0.0, w + 5.0 * (w - o)) for w, o in zip(weights, origins, strict=True)]
        criticals = kind(1.0).critical(points, inverse)
        asked = ramp(0.6, 4, k)
        if allocation == "global":
            flat = torch.cat([c.reshape(-1) for c in criticals])
            strengths = [float(flat.detach().kthvalue(round(asked * flat.numel())).values)] * 4
        else:
            strengths = [float(c.detach().reshape(-1).kthvalue(round(asked * c.numel())).values) for c in criticals]
        with torch.no_grad():  # the map at the strength raised by BOUNDARY (optim/applying.py)
            for w, u, a, c in zip(weights, inverse, strengths, criticals, strict=True):
                if form in ("l0 ahead", "l0 extended") and name == "Adam":
                    w.masked_fill_(c <= a * (1.0 + BOUNDARY), 0.0)
                elif name == "Adam":
                    kind(a * (1.0 + BOUNDARY)).prox_diag_([w], [u.clone()])
                else:
                    kind(a * (1.0 + BOUNDARY)).prox_([w], t)
        target = model[0].parametrizations.weight[0].target
        assert target.strength == max(strengths)
        for i in range(4):
            assert torch.equal(model[i].weight, reference[i].weight), (k, i)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_an_l0_target_zeroes_the_smallest_in_the_metric_and_leaves_the_rest_as_the_optimizer_put_them(name):
    """l0=True with a target: after one step the m entries with the smallest w²/(2·t_i) are zero
    and every other entry is bitwise what the optimizer alone computed (no shrinkage, unlike L1)."""
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    model = copy.deepcopy(plain)
    paramreg.attach(model, "weight", l0=True, sparsity=0.25, sparsity_steps=1)
    x, y = torch.randn(32, 16), torch.randn(32, 8)
    made = {"SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "Adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[name]
    for m in (plain, model):
        opt = made(m.parameters())
        F.mse_loss(m(x), y).backward()
        opt.step()
    w, reference, g = model.weight.detach(), plain.weight.detach(), plain.weight.grad
    zero = w == 0
    assert int(zero.sum()) == 32  # 25% of 128
    assert torch.equal(w[~zero], reference[~zero])
    # the metric's weights u_i = 1/t_i up to one factor: SGD's step is one number; Adam's first
    # step has sqrt(v̂_i) = abs(g_i), floored at the gradient's RMS (Note [Safeguarded metric])
    u = torch.ones_like(g) if name == "SGD" else g.abs().clamp_min(g.pow(2).mean().sqrt()) + 1e-8
    score = reference * reference * u
    assert float(score[zero].max()) <= float(score[~zero].min())
    assert paramreg.report(model).targets[0].reached == 0.25


def test_an_l0_target_extends_paths_by_default_or_looks_ahead_if_asked_and_its_spec_round_trips():
    """Notes [Extrapolated paths] and [Looking ahead]: an L0 target extends each weight's path
    EXTRAPOLATE times unless given a horizon or another extension; ``print`` shows either and the
    spec restores it; an L1 target has neither."""
    from paramreg.optim.targets import EXTRAPOLATE

    model = SmallCNN()
    paramreg.attach(model, "fc1.weight", sparsity=0.9, total_steps=1000)
    paramreg.attach(model, "fc2.weight", sparsity=0.5, sparsity_steps=(10, 30), lookahead=7)
    paramreg.attach(model, "conv*.weight", sparsity=0.5, sparsity_steps=40, l1=True)
    targets = [getattr(model, n).parametrizations.weight[0].target for n in ("fc1", "fc2", "conv1")]
    assert [(t.lookahead, t.extrapolate) for t in targets] == [(0, EXTRAPOLATE), (7, 0.0), (0, 0.0)]
    assert repr(model.fc1.parametrizations.weight[0]).endswith("then keeps its zeros, extrapolate=4)")
    assert repr(model.fc2.parametrizations.weight[0]).endswith("sparsity=0.5 from step 10 by step 30, lookahead=7)")
    fresh = SmallCNN()
    paramreg.attach_spec(fresh, paramreg.spec(model))
    assert fresh.fc2.parametrizations.weight[0].target.to_dict()["lookahead"] == 7
    assert fresh.fc1.parametrizations.weight[0].target.to_dict()["extrapolate"] == EXTRAPOLATE
    assert paramreg.spec(fresh)["attached"] == paramreg.spec(model)["attached"]
    # format 3 where a target extrapolates, 2 where one only looks ahead (an older paramreg refuses
    # either rather than drop what it cannot read)
    assert paramreg.spec(model)["version"] == 3 and paramreg.spec(nn.Linear(2, 2))["version"] == 1
    ahead = SmallCNN()
    paramreg.attach(ahead, "fc2.weight", sparsity=0.5, sparsity_steps=(10, 30), lookahead=7)
    assert paramreg.spec(ahead)["version"] == 2
    wrong = paramreg.spec(model)
    wrong["attached"]["conv1.weight"]["sparsity"]["lookahead"] = 5  # an L1 target's entry
    with pytest.raises(ParamregError, match="'conv1.weight': lookahead belongs to an L0 target"):
        paramreg.attach_spec(SmallCNN(), wrong)


def test_looking_ahead_zeroes_a_weight_that_adam_drives_toward_zero_before_one_it_drives_away():
    """Note [Looking ahead]: after one Adam step, 0.99 is being driven toward zero and -0.98 away
    from it, with the same step size. The plain L0 score zeroes the smaller, -0.98; looking 5 steps
    ahead (0.94 against -1.03) zeroes 0.99."""
    zeroed = []
    for lookahead in (0, 5):
        holder = nn.Module()
        holder.weight = nn.Parameter(torch.tensor([1.0, -0.97, 3.0, -3.0]))
        paramreg.attach(holder, "weight", sparsity=0.25, sparsity_steps=1, lookahead=lookahead)
        opt = torch.optim.Adam(holder.parameters(), lr=0.01)
        (holder.weight * torch.tensor([1.0, 1.0, 0.0, 0.0])).sum().backward()  # both move by -0.01
        opt.step()
        zeroed.append((holder.weight == 0).tolist())
    assert zeroed == [[False, True, False, False], [True, False, False, False]]


def test_an_extrapolating_target_zeroes_a_weight_that_has_been_shrinking_before_a_smaller_one_that_grows():
    """Note [Extrapolated paths]: a gradient of 1 on both, so Adam moves 1.0 toward zero and -0.9
    away from it by lr a step. At step 3, the first with a zero, the plain L0 score zeroes the
    smaller, -0.93; extended 8 times its path since step 2 (0.89 against -1.01), 0.97 goes."""
    zeroed = []
    for extrapolate in (0, 8):
        holder = nn.Module()
        holder.weight = nn.Parameter(torch.tensor([1.0, -0.9, 3.0, -3.0]))
        paramreg.attach(holder, "weight", sparsity=0.25, sparsity_steps=(1, 10), lookahead=0, extrapolate=extrapolate)
        opt = torch.optim.Adam(holder.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            (holder.weight * torch.tensor([1.0, 1.0, 0.0, 0.0])).sum().backward()
            opt.step()
        zeroed.append((holder.weight == 0).tolist())
    assert zeroed == [[False, True, False, False], [True, False, False, False]]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as meant
@pytest.mark.parametrize("flatten", [None, False, True], ids=["torch.save", "dcp", "dcp flattened"])
def test_an_extrapolating_target_keeps_its_origin_through_the_ramp_and_resumes_bitwise(flatten, tmp_path):
    """The origin is taken at the ramp's first step, kept in the optimizer's per-parameter state
    through the ramp and dropped once the zeros are kept; ``state_dict()`` always carries the key
    (a placeholder outside the ramp), so a run resumed before, in and after the ramp, by
    ``load_state_dict`` or by DCP's template-then-load path with and without flattening, is
    bitwise the uninterrupted one; ``print`` shows the extension and the spec (format 3) keeps it."""
    from paramreg.optim.state import ORIGIN_KEY

    def run(steps, model=None, opt=None, first=0):
        if model is None:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
            paramreg.attach(model, "*.weight", sparsity=0.8, total_steps=12, extrapolate=4)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for k in range(first, steps):
            g = torch.Generator().manual_seed(k)
            x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model, opt

    def origins(model, opt):
        return [ORIGIN_KEY in opt.state[m.parametrizations.weight.original] for m in (model[0], model[2])]

    full, full_opt = run(12)
    weights = [full[0].weight, full[2].weight]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
    assert origins(*run(3)) == [False, False] and origins(*run(4)) == [True, True]  # the ramp: steps 3 to 9
    assert origins(full, full_opt) == [False, False]  # dropped while the zeros are kept
    assert repr(full[0].parametrizations.weight[0]).endswith("then keeps its zeros, extrapolate=4)")
    spec = paramreg.spec(full)
    assert spec["version"] == 3 and spec["attached"]["0.weight"]["sparsity"]["extrapolate"] == 4.0
    for stop in (2, 5, 10):
        model, opt = run(stop)
        torch.manual_seed(1)
        resumed = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        paramreg.attach_spec(resumed, spec)
        resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
        if flatten is None:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
            saved = torch.load(tmp_path / "ckpt.pt")
            resumed.load_state_dict(saved["model"])
            resumed_opt.load_state_dict(saved["opt"])
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

            options = StateDictOptions(flatten_optimizer_state_dict=flatten)
            where = str(tmp_path / f"dcp{stop}")
            model_sd, optim_sd = get_state_dict(model, opt, options=options)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=where, no_dist=True)
            model_sd, optim_sd = get_state_dict(resumed, resumed_opt, options=options)  # the template: a zero-lr step
            loaded = {"model": model_sd, "optim": optim_sd}
            dcp.load(loaded, checkpoint_id=where, no_dist=True)
            set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=options)
        run(12, resumed, resumed_opt, first=stop)
        for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), (stop, name)


def test_an_origin_is_taken_at_each_tensors_first_ramp_step_whatever_a_state_dict_call_left_and_remove_drops_it():
    """Note [Extrapolated paths]: ``state_dict()`` writes a placeholder origin (a copy of the weight)
    into the live state, outside the ramp. A tensor without a gradient at the ramp's first step
    takes its origin at its own first ramp step, as it would with no state_dict() call: the run is
    bitwise the same (with a placeholder read as the origin it was not). Placeholders are not held
    before the ramp; ``remove`` takes every origin out of the optimizer's state."""
    from paramreg.optim.state import ORIGIN_KEY

    def run(save_at=None, steps=9):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        paramreg.attach(model, "*.weight", sparsity=0.8, sparsity_steps=(3, 8))  # extrapolate=4 by default
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        second = model[2].parametrizations.weight.original
        held = []
        for k in range(1, steps + 1):
            g = torch.Generator().manual_seed(k)
            x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if k == 4:
                second.grad = None  # unused at the ramp's first step
            opt.step()
            if k == save_at:
                assert ORIGIN_KEY in opt.state_dict()["state"][2]  # the placeholder, in the live state too
            held.append(ORIGIN_KEY in opt.state[second])
        return model, opt, held

    plain, _, held = run()
    saved, opt, _ = run(save_at=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), saved.state_dict().values(), strict=True))
    assert held == [False] * 4 + [True] * 5  # from its own first ramp step (5) on
    _, _, held = run(save_at=1)
    assert held[:4] == [True, False, False, False]  # a placeholder is dropped at the next step before the ramp
    paramreg.remove(saved)
    assert not any(ORIGIN_KEY in state for state in opt.state.values())


def _lopsided(scale=1e-6):
    """Two layers, the first with weights a millionth of the second's: a global ranking takes the
    first one's weights before any of the second's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model[0].weight.mul_(scale)
    return model


def _one_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    return [int((m.weight == 0).sum()) for m in model]


def test_the_per_tensor_maximum_holds_exactly_where_a_global_target_would_empty_a_tensor(selection):
    # Note [Allocation]: 100 of 200 weights asked; the first layer's 100 rank lowest
    emptied = _lopsided()
    paramreg.attach(emptied, "*.weight", sparsity=0.5, sparsity_steps=1, max_sparsity=1.0)
    assert _one_step(emptied) == [100, 0]
    capped = _lopsided()
    paramreg.attach(capped, "*.weight", sparsity=0.5, sparsity_steps=1)  # the default maximum, 0.99
    assert _one_step(capped) == [99, 1]
    tighter = _lopsided()
    paramreg.attach(tighter, "*.weight", sparsity=0.5, sparsity_steps=1, max_sparsity=0.7)
    assert _one_step(tighter) == [70, 30]


@pytest.mark.parametrize("by", ["native", "compiled"])
@pytest.mark.parametrize("max_sparsity, zeros", [(1.0, [100, 0]), (None, [99, 1]), (0.7, [70, 30])])
def test_the_per_tensor_maximum_holds_exactly_through_the_one_pass_selection(max_sparsity, zeros, by, monkeypatch):
    """Note [Selection that zeroes] in optim/applying.py: an L0 target under AdamW whose one pass
    both selects and finds what its map zeroes (a drawn bracket, the compiled kernel on every
    weight) keeps each tensor's maximum as the passes do: a strength within that pass's bracket
    zeroes what the pass found, one below it (the capped tensor's at 0.7) runs the map's pass."""
    from paramreg.optim import fused, native, targets

    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(targets, "GATHERED", 0)
    monkeypatch.setattr(native, "enabled", by == "native")  # the one pass by the native kernel or the compiled one
    names = []
    original, native_select = fused._call, native.select
    monkeypatch.setattr(fused, "_call", lambda name, *args: names.append(name) or original(name, *args))
    monkeypatch.setattr(native, "select", lambda kind, *args, **kw: names.append(f"native{kind}") or native_select(kind, *args, **kw))
    model = _lopsided()
    paramreg.attach(model, "*.weight", sparsity=0.5, sparsity_steps=1, **({} if max_sparsity is None else {"max_sparsity": max_sparsity}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    assert [int((m.weight == 0).sum()) for m in model] == zeros
    assert ("native_extended" in names) == (by == "native") and ("l0_extended_select" in names) == (by == "compiled")
    if max_sparsity is not None:  # at 0.99 the capped strengths lie within the bracket, at 0.7 far below it
        assert ("l0_extended" in names) == (max_sparsity < 1.0)  # the map's pass only there


def test_a_uniform_allocation_gives_each_tensor_the_fraction(selection):
    model = _lopsided()
    paramreg.attach(model, "*.weight", sparsity=0.3, sparsity_steps=1, allocation="uniform")
    assert _one_step(model) == [30, 30]
    spec = paramreg.spec(model)["attached"]["0.weight"]["sparsity"]
    assert spec["allocation"] == "uniform" and "max_sparsity" not in spec
    fresh = _lopsided()
    paramreg.attach_spec(fresh, paramreg.spec(model))
    assert fresh[0].parametrizations.weight[0].target.allocation == "uniform"


@pytest.mark.parametrize("keywords, match", [
    ({"sparsity": 0.5, "sparsity_steps": 1, "allocation": "per-layer"}, "allocation must be one of 'global', 'uniform'"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "max_sparsity": 0.4}, "max_sparsity must be a number from the target sparsity"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "max_sparsity": 1.5}, "max_sparsity must be a number from the target sparsity"),
    ({"l1": 1e-3, "max_sparsity": 0.9}, "allocation=, max_sparsity=, regrow=, lookahead= and extrapolate= belong to a sparsity target"),
    ({"l1": 1e-3, "regrow": False}, "allocation=, max_sparsity=, regrow=, lookahead= and extrapolate= belong to a sparsity target"),
    ({"l0": 1e-3, "lookahead": 5}, "allocation=, max_sparsity=, regrow=, lookahead= and extrapolate= belong to a sparsity target"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "regrow": "no"}, "regrow must be True or False"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "l1": True, "lookahead": 5}, "lookahead= belongs to an L0 target"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "lookahead": -1}, "lookahead must be an int >= 0"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "lookahead": True}, "lookahead must be an int >= 0"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "lookahead": 2.5}, "lookahead must be an int >= 0"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "lookahead": 10**400}, "lookahead must be an int >= 0 and below 2..31"),
    ({"l0": 1e-3, "extrapolate": 4}, "allocation=, max_sparsity=, regrow=, lookahead= and extrapolate= belong to a sparsity target"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "l1": True, "extrapolate": 4}, "extrapolate= belongs to an L0 target"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "extrapolate": -1}, "extrapolate must be a number from 0 to 1e"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "extrapolate": True}, "extrapolate must be a number from 0 to 1e"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "extrapolate": float("nan")}, "extrapolate must be a number from 0 to 1e"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "extrapolate": 1e7}, "extrapolate must be a number from 0 to 1e"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "extrapolate": "4"}, "extrapolate must be a number from 0 to 1e"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "extrapolate": 4, "lookahead": 3}, "give lookahead= .* or extrapolate= .*, not both"),
    ({"sparsity": 0.5, "sparsity_steps": 1, "extrapolate": 4, "regrow": True}, "extrapolate=4 needs regrow=False"),
])
def test_bad_allocation_options_are_refused(keywords, match):
    model = _lopsided()
    with pytest.raises(ParamregError, match=match):
        paramreg.attach(model, "*.weight", **keywords)
    assert paramreg.spec(model)["attached"] == {}


def _recipe_run(make_opt, steps, model=None, opt=None, first=0, **recipe):
    """The recipe with its defaults, total_steps=8: the ramp from step 2 to 6, then the zeros kept."""
    torch.manual_seed(0)
    if model is None:
        model = SmallCNN()
        paramreg.attach(model, TARGETS, sparsity=0.8, **(recipe or {"total_steps": 8}))
        opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(0)
    for k in range(first + steps):
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        if k < first:
            continue
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _resumed_recipe(make_opt, model, opt, stop, steps, tmp_path):
    """``model`` and ``opt`` after ``stop`` steps of :func:`_recipe_run`, saved (state_dicts and
    spec), rebuilt in a fresh SmallCNN and run on to ``steps``."""
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "spec": paramreg.spec(model)}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed = SmallCNN()
    paramreg.attach_spec(resumed, saved["spec"])
    resumed_opt = make_opt(resumed.parameters())
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    return _recipe_run(make_opt, steps - stop, resumed, resumed_opt, first=stop)[0]


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_one_call_ramps_then_keeps_its_zeros_and_resumes_bitwise(name, tmp_path):
    """Note [Ramp, then keep the zeros]: nothing before step 2, the ramp to 80% by step 6, then the
    zero set of step 6 kept while the other weights train on unshrunk; saved at step 8 (after the
    ramp) and at step 4 (in it), resumed runs equal the uninterrupted one."""
    make_opt = {"SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2)}[name]
    full, _ = _recipe_run(make_opt, 12)
    weights = [dict(full.named_parameters())[n] for n in TARGET_NAMES]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
    at_6, _ = _recipe_run(make_opt, 6)
    zeros_6 = [dict(at_6.named_parameters())[n] == 0 for n in TARGET_NAMES]
    assert all(torch.equal(w == 0, z) for w, z in zip(weights, zeros_6, strict=True))  # the same zeros since step 6
    early, _ = _recipe_run(make_opt, 2)
    assert all(int((dict(early.named_parameters())[n] == 0).sum()) == 0 for n in TARGET_NAMES)  # the ramp starts at 2
    for stop in (4, 8):
        model, opt = _recipe_run(make_opt, stop)
        resumed = _resumed_recipe(make_opt, model, opt, stop, 12, tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True)), stop
    assert "from step 2 by step 6, then keeps its zeros" in repr(full.conv1.parametrizations.weight[0])
    assert "L0 target 80%" in paramreg.report(full).rows[0].regularizer
    assert "then zeros kept" in paramreg.report(full).rows[0].regularizer


def _zero_sets(regrow, make_opt, steps=30):
    """The zero sets of an L1 target (ramp from step 3 to 20) after each step."""
    path, _, _ = _small_target_run(make_opt, steps, l1=True, regrow=regrow)
    return [torch.cat([w.flatten() for w in weights]) == 0 for weights in path]


def _small_target_run(make_opt, steps, **target):
    """A target (``target``: attach's options beside its ramp from step 3 to 20, to 70%) on a small
    MLP run for ``steps`` steps; the weights after every step, the optimizer and the two weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    paramreg.attach(model, "*.weight", sparsity=0.7, sparsity_steps=(3, 20), **target)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(0)
    path = []
    for _ in range(steps):
        x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        path.append([w.detach().clone() for w in (model[0].weight, model[2].weight)])
    return path, opt, [model[0].weight, model[2].weight]


@pytest.mark.parametrize("name", ["SGD", "SGD momentum", "Adam"])
def test_regrow_false_keeps_every_zero_of_the_ramp_where_the_proximal_path_lets_some_return(name):
    """Note [Zeros that do not regrow]: the zero set only grows, and the ramp's fraction is met
    exactly at its end, under every optimizer (momentum would move a zero whose gradient alone
    was set to zero); with regrow=True (the default) the same run under plain SGD has zeros that
    come back."""
    make_opt = {"SGD": lambda p: torch.optim.SGD(p, lr=0.2), "SGD momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                "Adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[name]
    sets = _zero_sets(False, make_opt)
    assert all(not (a & ~b).any() for a, b in zip(sets, sets[1:], strict=False))
    assert int(sets[19].sum()) == round(0.7 * sets[0].numel())
    if name == "SGD":
        sets = _zero_sets(True, make_opt)
        assert any((a & ~b).any() for a, b in zip(sets, sets[1:], strict=False))


def test_regrow_false_masks_nothing_before_the_ramp_so_a_zero_initialized_weight_trains():
    """A tensor that starts at zero (LoRA's B) is not frozen: the mask starts after the ramp's
    first step, when the zeros are the target's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))  # no unit without gradient
    nn.init.zeros_(model[2].weight)
    # from step 2: Adam's first step moves every weight by lr, whose critical strengths then tie
    paramreg.attach(model, "2.weight", sparsity=0.5, sparsity_steps=(2, 6), l0=True, regrow=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 3, (32,))).backward()
        opt.step()
    assert int((model[2].weight == 0).sum()) == 24  # half of 48 trained weights, not all 48


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_regrow_false_changes_the_run_and_resumes_bitwise_from_any_step(name, tmp_path):
    """The optimizer's moments differ from the regrowing run's (an L0 map that zeroes the same
    weights leaves the weights alike over these 12 steps). Saved before the ramp (step 2: nothing masked yet), at its first masked step (3) and in it
    (5), resumed runs equal the uninterrupted one: the step counts that decide the mask are
    restored before the resumed run's first step."""
    make_opt = {"SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2)}[name]
    full, full_opt = _recipe_run(make_opt, 12, total_steps=8, regrow=False)
    regrowing, regrowing_opt = _recipe_run(make_opt, 12, total_steps=8, regrow=True)
    moments = [[t for s in o.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()] for o in (full_opt, regrowing_opt)]
    assert not all(torch.equal(a, b) for a, b in zip(*moments, strict=True))  # the zeros' moments no longer see their gradients
    for stop in (2, 3, 5):
        model, opt = _recipe_run(make_opt, stop, total_steps=8, regrow=False)
        resumed = _resumed_recipe(make_opt, model, opt, stop, 12, tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True)), stop
    unused = " (Adam and AdamW only)" if name == "SGD" else ""  # print says where the extension does nothing
    assert repr(full.conv1.parametrizations.weight[0]).endswith(f"then keeps its zeros, extrapolate=4{unused})")
    assert repr(regrowing.conv1.parametrizations.weight[0]).endswith("then keeps its zeros, regrow=True)")  # no extension


@pytest.mark.parametrize("regrow", [False, True])
def test_after_the_ramp_the_zeros_kept_take_a_mask_only_where_they_could_regrow(regrow):
    """Note [Ramp, then keep the zeros]: with regrow=False the pre-step hold keeps every zero
    after the ramp, with no mask taken; with regrow=True each carrier takes its mask at the
    ramp's last step. Either way the zero set after the ramp (step 6 of 12) is frozen, under
    AdamW, whose decoupled weight decay and momentum would move a zero no hold or mask kept."""
    make_opt = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)  # noqa: E731
    model, opt = _recipe_run(make_opt, 6, total_steps=8, regrow=regrow)
    frozen = [model.get_submodule(n.rsplit(".", 1)[0]).weight == 0 for n in TARGET_NAMES]
    model, opt = _recipe_run(make_opt, 6, model=model, opt=opt, first=6)
    carriers = [model.get_submodule(n.rsplit(".", 1)[0]).parametrizations.weight[0] for n in TARGET_NAMES]
    assert all(hasattr(c, "memory") == regrow for c in carriers)
    now = [model.get_submodule(n.rsplit(".", 1)[0]).weight == 0 for n in TARGET_NAMES]
    assert all(torch.equal(a, b) for a, b in zip(frozen, now, strict=True))
    assert sum(int(z.sum()) for z in now) >= round(0.8 * sum(z.numel() for z in now))


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_total_steps_is_the_recipe_spelled_out(name):
    """Note [The recipe's defaults]: total_steps=T is the ramp over 0.25-0.75 of T with L0 in the
    optimizer's metric, global allocation and the zeros kept, the same weights bit for bit."""
    make_opt = {"SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2)}[name]
    short, _ = _recipe_run(make_opt, 12)
    spelled, _ = _recipe_run(make_opt, 12, sparsity_steps=(2, 6), keep_zeros=True, l0=True, allocation="global")
    assert all(torch.equal(a, b) for a, b in zip(short.state_dict().values(), spelled.state_dict().values(), strict=True))
    assert paramreg.spec(short) == paramreg.spec(spelled)
    l1, _ = _recipe_run(make_opt, 12, total_steps=8, l1=True)
    assert "L1 target 80%" in paramreg.report(l1).rows[0].regularizer


@pytest.mark.parametrize("grouping", ["elements", "out", "in"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_target_zeroes_exactly_its_budget_at_every_step_however_its_map_rounds(name, grouping):
    """The m-th group sits on the map's threshold by construction; the map tests it in its own
    arithmetic (softshrink's t·a against abs(w) under SGD's scalar step, the column norms of the
    group lasso in Adam's metric), a few float32 roundings away from the critical strength, and
    left it nonzero about half the time (one group short) before the map's strength was raised by
    BOUNDARY (optim/applying.py)."""
    keywords = {"l1": True} if grouping == "elements" else {"group_lasso": {"strength": 1.0, "groups": grouping}}
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
        paramreg.attach(model, "*.weight", sparsity=0.6, sparsity_steps=4, **keywords)
        made = {"SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "Adam": lambda p: torch.optim.Adam(p, lr=1e-2)}
        opt = made[name](model.parameters())
        weights = [model[i].weight for i in (0, 2, 4)]
        if grouping == "elements":
            groups = sum(w.numel() for w in weights)
        else:
            groups = sum(w.shape[0 if grouping == "out" else 1] for w in weights)
        for step in range(1, 7):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if grouping == "elements":
                zeros = sum(int((w == 0).sum()) for w in weights)
            else:
                zeros = sum(int((w.norm(dim=1 if grouping == "out" else 0) == 0).sum()) for w in weights)
            assert zeros == round(ramp(0.6, 4, step) * groups), (seed, step)


class _HeavyBall(torch.optim.Optimizer):
    """An optimizer paramreg does not know: momentum that moves a weight whose gradient is 0."""

    def __init__(self, params, lr=0.05, momentum=0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("velocity", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])


def test_regrow_false_under_an_optimizer_paramreg_does_not_know_sets_the_zeros_back_after_its_step():
    """Note [Zeros that do not regrow]: where paramreg does not know which state moves a weight,
    it keeps each zero mask from before the step and sets those weights to zero after it."""
    with pytest.warns(UserWarning):  # paramreg does not know its update (Note [Which optimizers paramreg knows])
        sets = _zero_sets(False, lambda p: _HeavyBall(p))
    assert all(not (a & ~b).any() for a, b in zip(sets, sets[1:], strict=False))
    assert int(sets[19].sum()) == round(0.7 * sets[0].numel())


@pytest.mark.parametrize("name", ["Adam", "SGD momentum", "RMSprop momentum", "NAdam"])
def test_regrow_false_leaves_every_kept_zero_at_zero_through_the_optimizers_own_step(name):
    """Note [Zeros that do not regrow]: with the gradient and the momentum of the kept zeros set to
    zero, the optimizer's own step leaves them at zero, before paramreg's map runs (a hook of the
    optimizer itself runs between its step and paramreg's global post-step hook): a map that
    zeroed them again would hide a momentum left in place."""
    make_opt = {"Adam": lambda p: torch.optim.Adam(p, lr=1e-2), "SGD momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                "RMSprop momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),
                "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2)}[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    paramreg.attach(model, "*.weight", sparsity=0.8, sparsity_steps=(2, 15))
    opt = make_opt(model.parameters())
    weights = [model[0].weight, model[2].weight]
    before, moved = [], []
    opt.register_step_pre_hook(lambda *_: before.__setitem__(slice(None), [w.detach() == 0 for w in weights]))
    opt.register_step_post_hook(lambda *_: moved.append(sum(int((z & (w != 0)).sum()) for z, w in zip(before, weights, strict=True))))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
    assert moved[3:] == [0] * 17 and sum(moved) == 0


@pytest.mark.parametrize("name", ["Adam", "RMSprop centered"])
def test_regrow_false_keeps_the_held_zeros_decaying_state_normal_and_changes_no_weight(name, monkeypatch):
    """Note [Decaying state of held zeros]: with beta2 (alpha) = 0.5 a held zero's second moment
    halves a step and, left alone, is denormal or 0 within 200 steps; the pass every
    floor_period(0.5) = 6 steps keeps it at or above tiny·2^6 (RMSprop's centred average at 0),
    and every weight at every step is the same bit for bit as without the pass."""
    from paramreg.optim import hooks

    key = {"Adam": "exp_avg_sq", "RMSprop centered": "square_avg"}[name]
    make_opt = {"Adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.5)),
                "RMSprop centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.5, centered=True)}[name]
    tiny = torch.finfo(torch.float32).tiny
    assert hooks.floor_period(0.5) == 6 and hooks.floor_period(1.0) == 0
    for factor in (0.5, 0.9, 0.95, 0.99, 0.999, 0.9999):  # the floor, decayed over a period, is still normal
        assert tiny * 2.0 ** hooks.FLOOR_BITS * factor ** hooks.floor_period(factor) >= tiny * 2.0 ** (hooks.FLOOR_BITS / 2)
    kept, opt, weights = _small_target_run(make_opt, 200, regrow=False)
    held = [opt.state[w][key][w == 0] for w in weights]
    assert sum(h.numel() for h in held) == round(0.7 * sum(w.numel() for w in weights))
    assert min(float(h.min()) for h in held) >= tiny * 2.0 ** (hooks.FLOOR_BITS / 2)
    if name == "RMSprop centered":
        assert all(not opt.state[w]["grad_avg"][w == 0].any() for w in weights)
    monkeypatch.setattr(hooks, "_keep_normal", lambda *args: None)
    decayed, opt, weights = _small_target_run(make_opt, 200, regrow=False)
    held = torch.cat([opt.state[w][key][w == 0] for w in weights])
    assert bool((held < tiny).all())  # denormal or 0 without the pass
    assert all(torch.equal(a, b) for step_a, step_b in zip(kept, decayed, strict=True) for a, b in zip(step_a, step_b, strict=True))


def test_regrow_false_with_a_sparse_gradient_sets_the_zeros_back_after_the_step():
    """A sparse gradient (``Embedding(sparse=True)``) takes no masked write: its zeros are kept by
    setting them back after the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16, sparse=True), nn.Flatten(), nn.Linear(64, 3))
    paramreg.attach(model, "0.weight", sparsity=0.7, sparsity_steps=(2, 10), l1=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    zeros = model[0].weight == 0
    for _ in range(14):
        opt.zero_grad()
        F.cross_entropy(model(torch.randint(0, 50, (32, 4))), torch.randint(0, 3, (32,))).backward()
        opt.step()
        assert not (zeros & (model[0].weight != 0)).any()
        zeros = model[0].weight == 0
    assert int(zeros.sum()) == round(0.7 * zeros.numel())


def _recording(select, passes, *args, **kwargs):
    found = select(*args, **kwargs)
    passes.append(found.passes)
    return found


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("form", ["l0", "l1"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW fused"])
def test_a_sampled_bracket_changes_no_weight_and_mostly_takes_one_pass(name, form, allocation, monkeypatch):
    """Note [Sampled bracket]: the recipe's weights at every step are the same, bit for bit,
    whether its selections draw a bracket from 2048 values, from 64 (narrow: it misses more
    often, and the passes after it resolve the miss) or none (the histogram passes); with 2048
    most selections take one pass. A cap that binds (``max_sparsity``) ranks
    again with limits."""
    from paramreg.optim import fused, targets

    monkeypatch.setattr(targets, "GATHERED", 0)
    monkeypatch.setattr(fused, "min_numel", 2 if name == "AdamW fused" else 1 << 16)
    original, bracket, held = targets.kth_smallest, targets._bracket, []
    monkeypatch.setattr(targets, "_bracket", lambda *a, **k: held.append(a[3] is not None) or bracket(*a, **k))
    runs, drawn = {}, 2048  # a twelfth of the 25,856 weights, as 2^16 of 800K (the default draws far fewer of larger models)
    for sample in (drawn, 64, 0):
        monkeypatch.setattr(targets, "SAMPLE", sample)
        passes = []
        monkeypatch.setattr(targets, "kth_smallest", functools.partial(_recording, original, passes))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        paramreg.attach(model, ["0.weight", "2.weight", "4.weight"], sparsity=0.9, total_steps=16, allocation=allocation,
                        max_sparsity=0.93, **{form: True})
        opt = {"SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
               "AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-2)}[name](model.parameters())
        g = torch.Generator().manual_seed(0)
        steps = []
        for _ in range(16):
            x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps.append([model[i].weight.detach().clone() for i in (0, 2, 4)])
        runs[sample] = steps, passes
    reference = runs[0][0]
    for sample, (steps, _) in runs.items():
        assert all(torch.equal(a, b) for s, r in zip(steps, reference, strict=True) for a, b in zip(s, r, strict=True)), sample
    default = runs[drawn][1]
    assert default and sum(p == 1 for p in default) >= 0.8 * len(default), default
    assert all(p == 2 for p in runs[0][1])  # the histogram passes alone
    assert any(held) == (allocation == "global")  # a global target's draws past its held zeros
    zeros = sum(int((w == 0).sum()) for w in reference[-1])
    if allocation == "global":
        assert zeros == round(0.9 * sum(w.numel() for w in reference[-1]))
    else:  # each tensor its own rounded count (Note [Allocation])
        assert zeros == sum(round(0.9 * w.numel()) for w in reference[-1])


def test_a_bracket_drawn_past_held_zeros_is_narrower_and_still_holds_the_answer():
    """Note [Sampled bracket]: with the zeros held since the last step known (``held``), the
    bracket is drawn among the draws above them, around the (m − held)-th of the rest: it holds
    the m-th smallest, and far fewer values than the bracket drawn over all; a draw whose count
    of zeros disagrees with ``held`` (a resumed run's, zeros that came back) gets the bracket
    drawn over all."""
    from paramreg.optim.targets import _bracket

    g = torch.Generator().manual_seed(0)
    total, zeros, m = 1_000_000, 600_000, 601_300  # mid-ramp: 60% held, 0.13% more asked
    values = torch.cat([torch.zeros(zeros), torch.rand(total - zeros, generator=g) + 0.5])
    answer = values.kthvalue(m).values.item()
    drawn = values[torch.randint(0, total, (1 << 16,), generator=g)]
    plain, past = _bracket(drawn, m, total), _bracket(drawn, m, total, held=zeros)
    assert past[0] <= answer < past[1] and plain[0] <= answer < plain[1]
    inside = [int(((values >= lo) & (values < hi)).sum()) for lo, hi in (plain, past)]
    assert inside[1] * 5 < inside[0], inside
    assert _bracket(drawn, m, total, held=zeros - 50_000) == plain  # the draw disagrees: drawn over all
    few = torch.zeros(1 << 16)  # every draw a held zero, none above them: drawn over all, not refused
    assert _bracket(few, 1_000_000 - 5, 1_000_000, held=1_000_000 - 10) == _bracket(few, 1_000_000 - 5, 1_000_000)


def _counted(calls: list, original, record=lambda *a: True):
    """``original``, appending ``record`` of its arguments to ``calls`` at each call."""

    def counted(*args, **kwargs):
        calls.append(record(*args))
        return original(*args, **kwargs)

    return counted


def test_after_a_ramp_whose_zeros_stay_a_selection_counts_the_zero_weights_without_a_pass_over_the_scores(monkeypatch):
    """A target given ``sparsity_steps=`` selects at every step after its ramp too, and with
    zeros that do not regrow its answer is a held zero: one read of each weight counts the zeros
    and answers 0, with no draw and no pass over the scores, and the weights are those of the
    histogram passes, bit for bit; during the ramp the draws pass the zeros held. Weights set
    from outside the step (five held zeros made 1.0 before step 9) leave fewer zeros than asked:
    that step takes the passes, which zero as many again."""
    from paramreg.optim import applying, fused, targets

    monkeypatch.setattr(targets, "GATHERED", 0)
    monkeypatch.setattr(fused, "min_numel", 2)
    runs = {}
    originals = {"sample": applying._Criticals.sample, "marked": applying._Criticals.marked,
                 "zero_weights": applying._Criticals.zero_weights}
    original_kth, original_bracket = targets.kth_smallest, targets._bracket
    default = targets.SAMPLE
    for sample in (default, 0):
        monkeypatch.setattr(targets, "SAMPLE", sample)
        calls = {"sample": [], "marked": [], "zero_weights": [], "kth_smallest": [], "held": []}
        for name, original in originals.items():
            monkeypatch.setattr(applying._Criticals, name, _counted(calls[name], original))
        monkeypatch.setattr(targets, "kth_smallest", _counted(calls["kth_smallest"], original_kth))
        monkeypatch.setattr(targets, "_bracket", _counted(calls["held"], original_bracket, lambda *a: a[3] is not None))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        paramreg.attach(model, ["0.weight", "2.weight"], sparsity=0.8, sparsity_steps=6)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        weights, seen = [], {}
        for k in range(10):
            if k in (6, 8):
                seen[k] = {key: len(v) for key, v in calls.items()}
            if k == 8:
                with torch.no_grad():
                    model[0].weight.view(-1)[torch.nonzero(model[0].weight.view(-1) == 0)[:5]] = 1.0
            x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            weights.append([model[i].weight.detach().clone() for i in (0, 2)])
        runs[sample] = weights, calls, seen
    (drawn, calls, seen), (reference, _, _) = runs[default], runs[0]
    assert all(torch.equal(a, b) for s, r in zip(drawn, reference, strict=True) for a, b in zip(s, r, strict=True))
    assert any(calls["held"][: seen[6]["held"]])  # in the ramp, a draw past the held zeros
    for key in ("sample", "marked", "kth_smallest"):  # steps 7 and 8: the zeros counted, nothing else
        assert seen[8][key] == seen[6][key], key
    assert seen[8]["zero_weights"] == seen[6]["zero_weights"] + 2
    assert len(calls["marked"]) > seen[8]["marked"] and len(calls["kth_smallest"]) > seen[8]["kth_smallest"]  # step 9
    total = sum(w.numel() for w in drawn[-1])
    assert sum(int((w == 0).sum()) for w in drawn[-1]) == round(0.8 * total)


def _sampled_run(monkeypatch, sample, extra=None, steps=12):
    """The recipe (L0, ramp 3-9 of 12) over two Linear weights (and ``extra``) under AdamW, every
    selection through the histogram passes (``sample`` 0) or a drawn bracket; the weights."""
    from paramreg.optim import targets

    monkeypatch.setattr(targets, "GATHERED", 0)
    monkeypatch.setattr(targets, "SAMPLE", sample)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    names = ["0.weight", "2.weight"]
    if extra is not None:
        model.add_module("extra", extra)
        names.append("extra.weight")
    paramreg.attach(model, names, sparsity=0.9, total_steps=12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model[:3](x), y).backward()
        opt.step()
    return [p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")]


def test_a_sampled_bracket_with_denormals_flushed_gives_the_same_weights(monkeypatch):
    """With ``torch.set_flush_denormal(True)`` the smallest positive float rounds to 0: the
    bracket's floor is the smallest normal float, so the kept zeros are counted below it."""
    reference = _sampled_run(monkeypatch, 0)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        flushed = _sampled_run(monkeypatch, 512)
    finally:
        torch.set_flush_denormal(False)
    assert all(torch.equal(a, b) for a, b in zip(reference, flushed, strict=True))


def test_a_sampled_bracket_skips_a_tensor_with_no_elements(monkeypatch):
    reference = _sampled_run(monkeypatch, 0, nn.Linear(0, 3))
    drawn = _sampled_run(monkeypatch, 512, nn.Linear(0, 3))
    assert all(torch.equal(a, b) for a, b in zip(reference, drawn, strict=True))


def test_a_draw_reads_only_the_state_its_formula_asks_for_and_each_once():
    """``_Drawn``: a tensor of the parameter's shape is gathered at the draws when first asked
    for (also through ``get``), once, even where the draws cover every element; other state as
    it is; the keys are the state's, and the state is not written."""
    from paramreg.optim.applying import _Drawn

    p = torch.arange(6.0).reshape(2, 3)
    draws = torch.tensor([5, 0, 1, 2, 3, 4])  # every element
    state = {"step": torch.tensor(3.0), "exp_avg_sq": p * 10, "exp_avg": p * 100, "flat": torch.ones(6)}
    drawn = _Drawn(state, p, draws)
    assert set(drawn) == set(state)
    first = drawn["exp_avg_sq"]
    assert torch.equal(first, torch.tensor([50.0, 0, 10, 20, 30, 40]))
    assert drawn["exp_avg_sq"] is first and drawn.get("exp_avg_sq") is first  # not drawn again
    assert torch.equal(drawn.get("exp_avg"), torch.tensor([500.0, 0, 100, 200, 300, 400]))
    assert drawn["step"] is state["step"] and drawn["flat"] is state["flat"] and drawn.get("missing", 7) == 7
    assert torch.equal(state["exp_avg_sq"], p * 10) and torch.equal(state["exp_avg"], p * 100)
    # a 1-D parameter drawn at every element: the gathered tensor has its shape again, and a second read must not gather it again
    flat = _Drawn({"exp_avg_sq": torch.arange(6.0) * 10}, torch.arange(6.0), draws)
    assert torch.equal(flat["exp_avg_sq"], first) and torch.equal(flat["exp_avg_sq"], first)
    assert dict(flat.items()) == {"exp_avg_sq": flat["exp_avg_sq"]} and list(drawn.values())[1] is first  # items, values: gathered


def test_a_count_below_a_float32_value_compares_in_float32():
    """The caps' upper bounds (Note [Allocation]): a bfloat16 comparison would round the bound down."""
    from paramreg.optim.targets import _below

    above_one = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
    assert _below(torch.ones(3, dtype=torch.bfloat16), above_one) == 3
    assert _below(torch.ones(3, dtype=torch.float16), 1.0) == 0
    assert _below(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), above_one) == 2


def test_zero_s_shard_of_units_draws_nothing():
    """Under ZeroRedundancyOptimizer a rank selects its own units alone, from another optimizer's
    shard of the state: no draw, the histogram passes."""
    from paramreg.optim import targets

    class Units:
        sizes, device, reduce = [10], torch.device("cpu"), None

        def chunks(self, units=None, limits=None):
            yield 0, torch.arange(10.0)

    assert targets._Alone(Units()).sample() is None
    assert targets._kth(targets._Alone(Units()), 4) == 3.0


@pytest.mark.parametrize("regularizer", [paramreg.L1(0.5), paramreg.L0(0.5), paramreg.GroupLasso(0.5), paramreg.GroupLasso(0.5, groups="in")],
                         ids=repr)
def test_critical_sizes_are_those_of_the_critical_strengths_for_every_shape(regularizer):
    """A target's unit sizes are taken once per regularizer and shapes (on meta tensors) and
    kept: each shape gets its own, equal to the number of critical strengths of real tensors."""
    from paramreg.optim.applying import _critical_sizes

    g = torch.Generator().manual_seed(0)
    for shapes in ([(6, 4)], [(6, 4), (3, 5, 2)], [(6, 4)], [(2, 4)]):
        tensors = [torch.randn(shape, generator=g) for shape in shapes]
        expected = [c.numel() for c in regularizer.critical(tensors, [torch.ones_like(t) for t in tensors])]
        assert _critical_sizes(regularizer, tensors) == expected
