"""attach / remove: what the model looks like while attached and after removal."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import paramreg
from paramreg.modules.carrier import Carrier
from paramreg.modules.walk import slots

from conftest import SmallCNN, TiedLM, assert_same_snapshot, cnn_batch, mlp, mlp_batch, snapshot


def train(model, steps=3, lr=0.1, opt=None, device="cpu"):
    x, y = (t.to(device) for t in cnn_batch())
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def test_attach_returns_canonical_names_in_model_order():
    model = SmallCNN()
    assert paramreg.attach(model, ["fc.*", "conv*.weight"], l1=1e-3) == ["conv1.weight", "conv2.weight", "fc.weight", "fc.bias"]
    # names stay canonical while attached, for selection and for the report
    assert paramreg.select(model, "*.weight") == ["conv1.weight", "bn1.weight", "conv2.weight", "fc.weight"]
    assert [r.name for r in paramreg.report(model).rows] == ["conv1.weight", "conv2.weight", "fc.weight", "fc.bias"]
    assert isinstance(model.conv1.parametrizations.weight[0], Carrier)
    assert "Carrier(L1(strength=0.001), mode='prox')" in repr(model)


def test_identity_carrier_keeps_the_parameter_object():
    model = SmallCNN()
    weight = model.conv1.weight
    paramreg.attach(model, "conv1.weight", l1=1e-3)
    assert model.conv1.weight is weight
    assert model.conv1.parametrizations.weight.original is weight
    # the module behaves like the plain one: a plain tensor cannot be assigned to a parameter,
    # and nn.init writes into the same stored Parameter
    with pytest.raises(TypeError, match="cannot assign"):
        model.conv1.weight = torch.ones_like(weight)
    nn.init.constant_(model.conv1.weight, 2.0)
    assert model.conv1.weight is weight and bool((weight == 2).all())


def test_remove_gives_back_the_plain_model(device):
    model = SmallCNN().to(device)
    x, _ = cnn_batch()
    x = x.to(device)
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    params = [(n, id(p)) for n, p in model.named_parameters()]
    paramreg.attach(model, "*.weight", l1=1e-2)
    paramreg.attach(model, "*.bias", l2=1e-2, mode="penalty")
    train(model, device=device)
    model.eval()
    before = model(x)
    assert paramreg.remove(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert type(model.conv1) is nn.Conv2d
    assert list(model.state_dict()) == keys
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert torch.equal(model(x), before)
    assert not any(isinstance(m, Carrier) for m in model.modules())
    # a second remove is a no-op
    paramreg.remove(model)
    assert list(model.state_dict()) == keys and torch.equal(model(x), before)


def test_partial_remove_in_any_order_restores_order():
    model = mlp()
    params = [(n, id(p)) for n, p in model.named_parameters()]
    paramreg.attach(model, "*", l1=1e-3)
    paramreg.remove(model, "*.weight")
    assert paramreg.report(model).rows[0].name == "0.bias"
    assert [(n, id(p)) for n, p in model.named_parameters()] == params  # also while attached
    paramreg.remove(model, ["0.bias", "2.bias"])
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())


def test_reattach_after_remove():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    paramreg.remove(model)
    assert paramreg.attach(model, "*.weight", l2=1e-3) == ["0.weight", "2.weight"]
    assert paramreg.report(model).rows[0].regularizer == "L2(strength=0.001)"


def test_users_own_parametrization_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    parametrizations.orthogonal(model[0])  # registered before attach
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected_q = model[0].weight.clone()
    paramreg.attach(model, "*.weight", exclude="0.weight", l1=1e-3)
    paramreg.attach(model, "0.weight", l2=1e-3, mode="penalty")  # on top of the user's
    # torch's orthogonal moved 0.weight behind 0.bias before paramreg saw the module
    assert paramreg.select(model, "0.*") == ["0.bias", "0.weight"]

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model[2], "weight", Double())  # registered after attach
    before = model(x)
    paramreg.remove(model)
    assert torch.equal(model(x), before)
    assert [type(m).__name__ for m in model[0].parametrizations.weight] == ["_Orthogonal"]
    assert [type(m).__name__ for m in model[2].parametrizations.weight] == ["Double"]
    assert torch.allclose(model[0].weight, expected_q)
    assert not parametrize.is_parametrized(model[4])


def test_tied_weights_are_attached_once_and_stay_tied():
    model = TiedLM()
    shared = model.emb.weight
    names = paramreg.attach(model, "*.weight", l1=1e-3)
    assert names == ["emb.weight", "hidden.weight"]
    assert model.out.weight is shared and model.emb.weight is shared
    assert [r.name for r in paramreg.report(model).rows] == names
    with pytest.raises(paramreg.ParamregError, match="already has"):
        paramreg.attach(model, "out.weight", l2=1e-3)  # the same tensor under its other name
    paramreg.remove(model)
    assert model.out.weight is shared and model.emb.weight is shared
    assert list(model.state_dict()) == list(TiedLM().state_dict())


def test_tied_weight_attached_under_its_second_name():
    model = TiedLM()
    # the carrier sits where the user pointed; the tensor keeps its canonical (first) name
    assert paramreg.attach(model, "out.weight", l1=1e-3) == ["emb.weight"]
    assert parametrize.is_parametrized(model.out, "weight") and not parametrize.is_parametrized(model.emb)
    assert [r.name for r in paramreg.report(model).rows] == ["emb.weight"]
    assert paramreg.select(model, "*") == paramreg.select(TiedLM(), "*")
    assert paramreg.remove(model, "out.weight").out.weight is model.emb.weight
    assert not parametrize.is_parametrized(model.out)


def test_deepcopy_is_regularized_and_removing_from_it_leaves_the_original_intact():
    model = SmallCNN()
    x, _ = cnn_batch()
    paramreg.attach(model, "*.weight", l1=0.05)
    clone = copy.deepcopy(model)
    assert paramreg.report(clone).rows[0].regularizer == "L1(strength=0.05)"
    train(clone, steps=5)
    assert paramreg.report(clone).zeros > 0  # the copy's optimizer steps applied its prox
    paramreg.remove(clone)
    assert type(clone.conv1) is nn.Conv2d
    model(x)  # the original still works: its dynamic classes were not modified
    assert isinstance(model.conv1.parametrizations.weight[0], Carrier)
    paramreg.remove(model, "conv1.weight")
    paramreg.remove(clone)
    model(x)
    assert parametrize.is_parametrized(model.conv2) and not parametrize.is_parametrized(model.conv1)


def test_partial_remove_on_a_copy_keeps_the_original_working():
    model = mlp()
    x, _ = mlp_batch()
    paramreg.attach(model, "*", l1=1e-3)
    clone = copy.deepcopy(model)
    paramreg.remove(clone, "0.weight")  # the module keeps another parametrization: class rebuilt
    assert torch.equal(model(x), clone(x))
    assert parametrize.is_parametrized(model[0], "weight")
    assert not parametrize.is_parametrized(clone[0], "weight")


def test_attach_is_atomic_when_registration_fails(monkeypatch):
    from conftest import assert_same_snapshot, snapshot

    model = SmallCNN()
    before = snapshot(model)
    real = paramreg.modules.binding.bind
    calls = []

    def failing(slot, *args):
        calls.append(slot.name)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return real(slot, *args)

    monkeypatch.setattr(paramreg.modules.binding, "bind", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        paramreg.attach(model, "*.weight", l1=1e-3)
    assert_same_snapshot(before, snapshot(model))


def test_attaching_to_a_copy_leaves_the_original_working():
    model = nn.Linear(4, 3)
    paramreg.attach(model, "weight", l1=1e-3)
    clone = copy.deepcopy(model)
    paramreg.attach(clone, "bias", l2=1e-3)  # torch would add a property to the class both share
    x = torch.randn(2, 4)
    assert torch.equal(model(x), clone(x))
    assert [r.name for r in paramreg.report(model).rows] == ["weight"]


def test_transformer_encoder_clones_its_layer_with_carriers():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    paramreg.attach(layer, "linear1.weight", l1=1e-3)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)  # deep-copies the layer
    paramreg.attach(encoder, "layers.0.linear1.bias", l2=1e-3)
    assert paramreg.select(encoder, "*linear1.weight") == ["layers.0.linear1.weight", "layers.1.linear1.weight"]
    x = torch.randn(2, 5, 16)
    before = encoder(x)
    paramreg.remove(encoder)
    assert torch.equal(encoder(x), before)


def test_assigning_a_new_parameter_while_attached_replaces_it_everywhere():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1.0)
    new = nn.Parameter(torch.full((8, 6), 0.05))
    model[0].weight = new
    assert model[0].weight is new and dict(model.named_parameters())["0.weight"] is new
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = mlp_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert (new == 0).all()  # the new Parameter is the one regularized
    paramreg.remove(model)
    assert model[0].weight is new


def test_load_state_dict_assign_and_conversions_keep_one_parameter():
    source = mlp(seed=1)
    model = mlp()
    paramreg.attach(model, "*.weight", l1=0.05)
    model.load_state_dict(source.state_dict(), assign=True)
    model.double()
    assert len(list(model.parameters())) == 4
    assert model[0].weight is dict(model.named_parameters())["0.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = mlp_batch()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.double()), y).backward()
        opt.step()
    before = model(x.double())
    saved = model.state_dict()
    assert torch.equal(saved["0.weight"], model[0].weight.detach()) and (saved["0.weight"] == 0).any()
    paramreg.remove(model)
    assert torch.equal(model(x.double()), before)


def test_to_empty_from_meta_keeps_one_parameter():
    with torch.device("meta"):
        model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    model.to_empty(device="cpu")
    params = dict(model.named_parameters())
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert model[0].weight is params["0.weight"] and model[0].weight.device.type == "cpu"


def test_torch_remove_parametrizations_on_a_carried_tensor_leaves_a_working_module():
    model = nn.Linear(4, 4)
    paramreg.attach(model, "weight", l1=1e-2)
    parametrize.remove_parametrizations(model, "weight")
    assert list(model.state_dict()) == ["weight", "bias"]
    assert type(model) is nn.Linear and paramreg.report(model).rows[0].regularizer is None


def test_fast_reads_return_the_stored_parameter_and_yield_to_other_paths():
    model = mlp()
    weight = model[0].weight
    paramreg.attach(model, "*.weight", l1=1e-3)
    assert model[0].weight is weight
    with parametrize.cached():  # torch's cache path still works
        assert torch.equal(model[0].weight, weight)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model[0], "weight", Double())  # appended after ours
    assert torch.equal(model[0].weight, 2 * weight)


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_identity_carried_modules_share_one_class_and_read_the_parameter_directly():
    class Dense(nn.Linear):  # classes of this test's own: paramreg's class for nn.Linear may have
        pass  # properties that other tests' chains needed (Note [Module classes])

    class Conv(nn.Conv2d):
        pass

    model = nn.Sequential(Dense(4, 4), Dense(4, 4), Conv(1, 1, 1))
    weights = [m.weight for m in model]
    paramreg.attach(model, "*.weight", l1=1e-3)
    paramreg.attach(model, "1.bias", l2=1e-3)  # which tensors are carried does not matter
    assert type(model[0]) is type(model[1]) and type(model[2]) is not type(model[0])
    assert "weight" not in vars(type(model[0]))  # no property: nn.Module.__getattr__ finds _parameters
    assert all(m.weight is w for m, w in zip(model, weights, strict=True))
    assert isinstance(model[0], nn.Linear) and parametrize.type_before_parametrizations(model[0]) is Dense


def test_torch_parametrizing_another_tensor_leaves_modules_sharing_the_class_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    paramreg.attach(model, "*.weight", l1=1e-3)
    shared = type(model[1])
    bias = model[0].bias
    parametrize.register_parametrization(model[0], "bias", Double())  # torch adds a property to model[0]'s class
    assert type(model[0]) is shared and type(model[1]) is shared  # the shared class's own property serves both
    assert torch.equal(model[0].bias, 2 * bias) and isinstance(model[1].bias, nn.Parameter)
    parametrize.remove_parametrizations(model[1], "weight")  # torch deletes a property from model[1]'s class
    assert type(model[1]) is nn.Linear and model[0].weight is dict(model.named_parameters())["0.weight"]
    x = torch.randn(2, 4)
    model(x)
    paramreg.remove(model)
    assert type(model[0]) is not nn.Linear and parametrize.is_parametrized(model[0], "bias")  # the user's stays
    assert torch.equal(model[0].bias, 2 * bias)


def test_reading_an_attached_module_never_changes_its_class():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    paramreg.attach(model, "*.weight", l1=1e-3)
    m = model[0]
    before = type(m)
    assert hasattr(m, "parametrizations") and parametrize.is_parametrized(m) and parametrize.is_parametrized(m, "weight")
    assert "Carrier" in repr(m) and list(m.state_dict()) == ["weight", "bias"]
    paramreg.report(model)
    paramreg.select(model, "*.weight")
    assert type(m) is before and type(model[2]) is before


def test_deep_copies_share_the_class_and_stay_independent():
    model = nn.Linear(4, 4)
    paramreg.attach(model, "weight", l1=1e-3)
    parametrize.register_parametrization(model, "bias", Double())
    clone = copy.deepcopy(model)
    assert type(clone) is type(model)  # one class serves both (Note [Module classes])
    parametrize.register_parametrization(model, "weight", Double())  # appended after the carrier, on the original
    x = torch.randn(2, 4)
    assert torch.equal(model(x), nn.functional.linear(x, 2 * model.parametrizations.weight.original, model.bias))
    assert torch.equal(clone(x), nn.functional.linear(x, clone.parametrizations.weight.original, clone.bias))


def test_attaching_the_same_again_is_a_no_op_for_that_tensor():
    """Lightning runs configure_optimizers (where attach may sit) once per fit and for lr_find."""
    model = mlp()
    first = paramreg.attach(model, "*.weight", l1=1e-3)
    carriers = [s.carrier for s in slots(model) if s.carrier is not None]  # read without the property, which moves classes
    before = snapshot(model)
    assert paramreg.attach(model, "*.weight", l1=1e-3) == first
    assert paramreg.attach(model, "*.weight", reg=paramreg.L1(1e-3)) == first  # an equal regularizer
    assert_same_snapshot(before, snapshot(model))
    assert [s.carrier for s in slots(model) if s.carrier is not None] == carriers
    # a tensor not yet attached is attached; the attached one is left as it is
    assert paramreg.attach(model, "*", l1=1e-3, exclude="2.bias") == ["0.weight", "0.bias", "2.weight"]
    assert [s.carrier for s in slots(model) if s.carrier is not None][::2] == carriers
    assert [r.regularizer for r in paramreg.report(model).rows] == ["L1(strength=0.001)"] * 3
    # anything else on an attached tensor is still refused: another strength, mode, step or schedule
    for change in ({"l1": 2e-3}, {"l1": 1e-3, "mode": "penalty"}, {"l1": 1e-3, "step": "lr"}, {"l1": lambda k: 1e-3}):
        with pytest.raises(paramreg.ParamregError, match="already has L1.*attaching the same again is a no-op"):
            paramreg.attach(model, "0.weight", **change)
    paramreg.remove(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
