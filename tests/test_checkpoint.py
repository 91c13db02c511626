"""Checkpoints while attached: plain keys both ways, specs as plain data, export copies, plain check."""

import dataclasses
import io
import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import paramreg

from conftest import SmallCNN, TiedLM, assert_same_snapshot, cnn_batch, snapshot


def trained_cnn(seed=0, steps=3):
    torch.manual_seed(seed)
    model = SmallCNN()
    paramreg.attach(model, "conv*.weight", l1=0.05)
    paramreg.attach(model, "fc.*", l2=0.01, mode="penalty")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = cnn_batch()
    for _ in range(steps):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + paramreg.penalty(model)).backward()
        opt.step()
    return model


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_while_attached_is_the_plain_state_dict():
    model = trained_cnn()
    attached = model.state_dict()
    plain = paramreg.folded(model).state_dict()
    assert list(attached) == list(plain) == list(SmallCNN().state_dict())
    assert all(torch.equal(attached[k], plain[k]) for k in plain)
    assert dict(attached._metadata) == dict(plain._metadata)


def test_plain_checkpoint_loads_strictly_into_an_attached_model_and_back():
    source = trained_cnn(seed=1)
    plain_checkpoint = roundtrip(paramreg.folded(source).state_dict())
    target = trained_cnn(seed=2)
    weight = target.conv1.weight
    assert target.load_state_dict(plain_checkpoint, strict=True)
    assert target.conv1.weight is weight  # loaded in place: optimizers stay valid
    assert all(torch.equal(v, plain_checkpoint[k]) for k, v in target.state_dict().items())

    attached_checkpoint = roundtrip(source.state_dict())  # saved while attached
    fresh = SmallCNN()
    fresh.load_state_dict(attached_checkpoint, strict=True)
    x, _ = cnn_batch()
    source.eval(), fresh.eval()
    assert torch.equal(fresh(x), source(x))


def test_torch_parametrize_keys_are_accepted_too():
    """A checkpoint written with torch's parametrize key names (e.g. by hand-made parametrizations)."""
    model = trained_cnn()
    renamed = {k.replace("conv1.weight", "conv1.parametrizations.weight.original"): v for k, v in model.state_dict().items()}
    other = trained_cnn(seed=3)
    other.load_state_dict(renamed, strict=True)
    assert torch.equal(other.conv1.weight, model.conv1.weight)


def test_users_own_parametrization_keys_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    parametrizations.weight_norm(model[0])
    expected = list(model.state_dict())
    paramreg.attach(model, "*.weight", exclude="0.weight", l1=1e-3)
    paramreg.attach(model, "0.weight", l1=1e-3, mode="penalty")
    assert list(model.state_dict()) == expected
    model.load_state_dict(model.state_dict(), strict=True)


def test_tied_weights_checkpoint_is_plain():
    model = TiedLM()
    expected = list(model.state_dict())
    paramreg.attach(model, "*.weight", l1=1e-3)
    assert list(model.state_dict()) == expected
    model.load_state_dict(roundtrip(model.state_dict()), strict=True)


def test_spec_is_plain_data_and_reapplies():
    model = trained_cnn()
    s = paramreg.spec(model)
    assert json.loads(json.dumps(s)) == s
    assert list(s["attached"]) == ["conv1.weight", "conv2.weight", "fc.weight", "fc.bias"]
    checkpoint = roundtrip({"model": model.state_dict(), "paramreg": s})
    fresh = SmallCNN()
    assert paramreg.attach_spec(fresh, checkpoint["paramreg"]) == list(s["attached"])
    fresh.load_state_dict(checkpoint["model"])
    assert paramreg.spec(fresh) == s
    # the same rows, except the step policy that ran: the fresh model has not stepped yet
    assert [dataclasses.replace(r, step=None) for r in paramreg.report(fresh).rows] == [
        dataclasses.replace(r, step=None) for r in paramreg.report(model).rows
    ]
    assert "sgd(SGD)" in {r.step for r in paramreg.report(model).rows} and {r.step for r in paramreg.report(fresh).rows} == {None}


def test_attach_spec_is_all_or_nothing():
    model = trained_cnn()
    s = paramreg.spec(model)
    s["attached"]["conv9.weight"] = {"regularizer": {"type": "L2", "strength": 0.1}, "mode": "prox"}
    fresh = SmallCNN()
    before = snapshot(fresh)
    with pytest.raises(paramreg.ParamregError, match="'conv9.weight' matches no parameter"):
        paramreg.attach_spec(fresh, s)
    assert_same_snapshot(before, snapshot(fresh))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"attached": {}}, "not a paramreg spec"),
        ({"format": "paramreg.spec", "version": 99, "attached": {}}, "version 99"),
        ({"format": "paramreg.spec", "version": 1, "attached": {"fc.weight": {"regularizer": {"type": "L7"}}}}, "unknown regularizer type 'L7'"),
        ({"format": "paramreg.spec", "version": 1, "attached": {"fc.weight": {"regularizer": {"type": "L1", "a": 1}}}}, "does not fit L1"),
    ],
)
def test_bad_specs(bad, match):
    with pytest.raises(paramreg.ParamregError, match=match):
        paramreg.attach_spec(SmallCNN(), bad)


def test_folded_copy_leaves_the_training_model_attached():
    model = trained_cnn()
    before = snapshot(model)
    plain = paramreg.folded(model)
    assert_same_snapshot(before, snapshot(model))
    assert paramreg.check_plain(plain) is plain
    assert all(type(m).__module__.startswith("torch.nn") or isinstance(m, SmallCNN) for m in plain.modules())
    x, _ = cnn_batch()
    model.eval(), plain.eval()
    assert torch.equal(plain(x), model(x))
    trained_further = model.conv1.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    opt.step()  # the training model is still regularized, the copy untouched
    assert not torch.equal(model.conv1.weight, trained_further)
    assert torch.equal(plain.conv1.weight, trained_further)


def test_check_plain_names_what_is_still_attached():
    model = trained_cnn()
    with pytest.raises(paramreg.ParamregError, match="paramreg is attached to 'conv1.weight', 'conv2.weight', 'fc.weight', 'fc.bias'; call paramreg.remove"):
        paramreg.check_plain(model)
    paramreg.remove(model)
    parametrizations.orthogonal(model.fc)
    with pytest.raises(paramreg.ParamregError, match="'fc.weight' still carry parametrizations of your own"):
        paramreg.check_plain(model)


def test_pickling_the_whole_module_is_refused_by_torch():
    """Documented, not interceptable: torch refuses to pickle parametrized modules."""
    model = trained_cnn()
    with pytest.raises(RuntimeError, match="only supported through state_dict"):
        torch.save(model, io.BytesIO())
    torch.save(paramreg.folded(model), io.BytesIO())
