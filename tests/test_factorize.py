"""factorize: low-rank Linear and Conv2d layers become two thin layers with the same outputs;
cost/compare count parameters and FLOPs (latency is measured, never asserted)."""

import warnings

import pytest
import torch
from torch import nn

import paramreg
from paramreg import ParamregError

from conftest import assert_close_to_scale


def low_rank_(weight, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    out, rest = weight.shape[0], weight[0].numel()
    with torch.no_grad():
        weight.copy_((torch.randn(out, r, generator=g) @ torch.randn(r, rest, generator=g)).reshape(weight.shape) / rest**0.5)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_linear_of_rank_r_becomes_two_layers_with_the_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    low_rank_(model[0].weight, 3)
    small = paramreg.factorize(model, "0.weight")
    first, second = small[0]
    assert (first.in_features, first.out_features, first.bias, second.in_features, second.out_features) == (40, 3, None, 3, 30)
    assert count(model) - count(small) == 40 * 30 - 3 * (40 + 30)
    x = torch.randn(8, 40)
    assert_close_to_scale(small(x), model(x))
    assert isinstance(model[0], nn.Linear)  # the model itself is unchanged


def test_conv_via_its_2d_reshape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1), nn.ReLU())
    low_rank_(model[0].weight, 2)
    small = paramreg.factorize(model, "0.weight")
    first, second = small[0]
    assert (first.in_channels, first.out_channels, first.kernel_size, first.stride, first.padding) == (8, 2, (3, 3), (2, 2), (1, 1))
    assert (second.in_channels, second.out_channels, second.kernel_size) == (2, 16, (1, 1))
    x = torch.randn(2, 8, 9, 9)
    assert_close_to_scale(small(x), model(x))


def test_rank_and_tol_truncate_with_the_stated_error():
    torch.manual_seed(0)
    layer = nn.Linear(50, 50, bias=False)
    u, _ = torch.linalg.qr(torch.randn(50, 50))
    v, _ = torch.linalg.qr(torch.randn(50, 50))
    s = torch.tensor([10.0, 5.0, 1.0] + [0.01] * 47)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(s) @ v.T)
    model = nn.Sequential(layer)
    assert paramreg.factorize(model, "0.weight", tol=0.05)[0][0].out_features == 3  # tail 0.01·sqrt(47)/‖s‖ < 0.05
    assert paramreg.factorize(model, "0.weight", tol=0.12)[0][0].out_features == 2  # drops σ = 1: 1.03/11.2
    small = paramreg.factorize(model, "0.weight", rank=2)
    x = torch.eye(50)
    error = torch.linalg.matrix_norm((small(x) - model(x)).detach())  # ‖W − W_2‖_F = sqrt(1 + 47·0.0001)
    assert abs(float(error) - (1 + 47e-4) ** 0.5) < 1e-4


def test_after_nuclear_norm_training_the_numerical_rank_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(256, 20)
    y = x[:, :2].sum(1, keepdim=True)
    paramreg.attach(model, "2.weight", nuclear_norm=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    paramreg.remove(model)
    rank = int(torch.linalg.matrix_rank(model[2].weight.detach()))
    assert rank < 16
    small = paramreg.factorize(model, "2.weight")
    assert small[2][0].out_features == rank
    assert_close_to_scale(small(x), model(x))


def test_full_rank_layers_stay_and_a_warning_says_so():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=r"'0' \(rank 6 of 6\) left as they are"):
        small = paramreg.factorize(model, "0.weight")
    assert isinstance(small[0], nn.Linear)


def test_bad_input_names_the_layer_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ParamregError, match=r"'0.weight'.*grouped conv"):
        paramreg.factorize(model, "0.weight")
    with pytest.raises(ParamregError, match=r"'2.weight'.*not the weight of a Linear or Conv2d"):
        paramreg.factorize(model, "2.weight")
    with pytest.raises(ParamregError, match="rank=5 exceeds"):
        paramreg.factorize(model, "1.weight", rank=5)
    with pytest.raises(ParamregError, match="not both"):
        paramreg.factorize(model, "1.weight", rank=1, tol=0.1)
    with pytest.raises(ParamregError, match="tol must be"):
        paramreg.factorize(model, "1.weight", tol=1.5)
    paramreg.attach(model, "1.weight", l1=1e-3)
    with pytest.raises(ParamregError, match="paramreg.remove"):
        paramreg.factorize(model, "1.weight")
    assert isinstance(model[1], nn.Linear)


def test_factorized_model_exports_to_onnx(tmp_path):
    import onnxruntime
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 16, 10)).eval()
    low_rank_(model[0].weight, 2)
    low_rank_(model[3].weight, 2, seed=1)
    small = paramreg.factorize(model, ["0.weight", "3.weight"]).eval()
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small, (x,), tmp_path / "f.onnx", dynamo=False, input_names=["x"])
    (got,) = onnxruntime.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert_close_to_scale(torch.from_numpy(got), model(x))


def test_cost_and_compare_count_parameters_and_flops():
    big = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 4))
    x = torch.randn(5, 3, 4, 4)
    big.train()
    c = paramreg.cost(big, x, batch_sizes=(1, 2), repeats=2)
    assert c.parameters == 8 * 27 + 8 + 4 * 128 + 4
    assert c.flops == 2 * (8 * 27 * 16 + 4 * 128)  # one sample, a multiply-add is 2 FLOPs (biases are not counted)
    assert set(c.latency_ms) == {1, 2} and all(v > 0 for v in c.latency_ms.values())
    assert big.training  # eval mode only while measuring
    table = paramreg.compare(big, small, x, batch_sizes=(3,), repeats=2)
    assert table.before.flops == 2 * table.after.flops
    assert "latency ms, batch 3" in str(table) and "2.00x" in str(table)
    with pytest.raises(ParamregError, match="batch_sizes"):
        paramreg.cost(big, x, batch_sizes=(0,))
