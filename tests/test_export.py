"""Export after folding: TorchScript (script, trace), ONNX (both exporters, run in onnxruntime), torch.export.

Each artifact must reproduce the attached model's outputs (within 1e-5 of their largest magnitude, in float32), keep
the plain weight names, and store the same exact zeros.
"""

import re
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import paramreg

from conftest import assert_close_to_scale

# torch marks TorchScript deprecated and the exporters warn about their own internals
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.conv2(x))  # a residual connection
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


class TransformerBlock(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


def trained(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        model, x = CNN(), torch.randn(16, 1, 8, 8)
        targets = ["conv*.weight", "fc.weight"]
    else:
        model, x = TransformerBlock(), torch.randn(16, 5, 32)
        targets = ["fc*.weight", "attn.in_proj_weight", "attn.out_proj.weight"]
    names = paramreg.attach(model, targets, l1=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    model.eval()
    return model, x, names


def assert_close_to(out, ref):
    assert_close_to_scale(torch.as_tensor(out).detach(), ref.detach())


def check_onnx_file(path, x, ref, plain, names):
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_close_to(out, ref)
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    state = plain.state_dict()
    for name in names:  # plain names, same values, so the same exact zeros
        assert name in initializers, f"{name} not among {sorted(initializers)}"
        np.testing.assert_array_equal(initializers[name], state[name].numpy())
    assert sum(int((initializers[n] == 0).sum()) for n in names) == sum(int((state[n] == 0).sum()) for n in names) > 0


@pytest.fixture(params=["cnn", "transformer"])
def case(request):
    model, x, names = trained(request.param)
    with pytest.raises(paramreg.ParamregError, match="paramreg is attached to"):
        paramreg.check_plain(model)
    with torch.no_grad():
        ref = model(x)
    return model, x, names, ref, paramreg.folded(model)


def test_torchscript_script(case):
    model, x, names, ref, plain = case
    scripted = torch.jit.script(plain)
    assert_close_to(scripted(x), ref)
    assert all(torch.equal(scripted.state_dict()[n], plain.state_dict()[n]) for n in names)


def test_torchscript_trace(case):
    model, x, names, ref, plain = case
    with torch.no_grad():
        traced = torch.jit.trace(plain, x)
        assert_close_to(traced(x), ref)
    assert all(torch.equal(traced.state_dict()[n], plain.state_dict()[n]) for n in names)


def test_torch_export(case):
    model, x, names, ref, plain = case
    program = torch.export.export(plain, (x,))
    assert_close_to(program.module()(x), ref)
    assert all(torch.equal(program.state_dict[n], plain.state_dict()[n]) for n in names)


def test_onnx_torchscript_exporter(case, tmp_path):
    model, x, names, ref, plain = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # no constant folding: otherwise the exporter fuses conv+BN and pre-transposes MatMul
        # weights into renamed initializers (the same for any plain model)
        torch.onnx.export(plain, (x,), tmp_path / "m.onnx", dynamo=False, do_constant_folding=False)
    check_onnx_file(tmp_path / "m.onnx", x, ref, plain, names)


def test_onnx_dynamo_exporter(case, tmp_path):
    model, x, names, ref, plain = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (x,), tmp_path / "m.onnx", dynamo=True, optimize=False, verbose=False)
    check_onnx_file(tmp_path / "m.onnx", x, ref, plain, names)


def test_remove_then_export_in_place():
    model, x, names = trained("cnn")
    with torch.no_grad():
        ref = model(x)
    paramreg.remove(model)
    assert_close_to(torch.jit.script(paramreg.check_plain(model))(x), ref)


EXPORTS = {
    "torch.jit.script": lambda model, x, path: torch.jit.script(model),
    "torch.jit.trace": lambda model, x, path: torch.jit.trace(model, x),
    "torch.export": lambda model, x, path: torch.export.export(model, (x,)),
    "torch.onnx.export": lambda model, x, path: torch.onnx.export(model, (x,), path, dynamo=False),
    "torch.onnx.export(dynamo=True)": lambda model, x, path: torch.onnx.export(model, (x,), path, dynamo=True, verbose=False),
}


@pytest.mark.parametrize("path", list(EXPORTS))
def test_exporting_an_attached_model_fails_loudly_with_the_fix(path, tmp_path):
    model, x, names = trained("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = rf"{re.escape(path.split('(')[0])} of a model with paramreg attached \('conv1.weight'.*paramreg.remove\(model\).*paramreg.folded\(model\)"
    with pytest.raises(paramreg.ParamregError, match=message):
        EXPORTS[path](model, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    # the model is as it was, still attached and training; its folded copy exports
    assert sorted(paramreg.spec(model)["attached"]) == sorted(names)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    EXPORTS[path](paramreg.folded(model), x, tmp_path / "m.onnx")


def test_strict_torch_export_is_not_seen_and_check_plain_is_the_guard():
    """torch.export.export(strict=True) traces with dynamo, which reads the parameters without
    running any of paramreg's code (Note [Export guard]): the export records the carriers."""
    model, x, names = trained("cnn")
    program = torch.export.export(model, (x,), strict=True)
    assert "conv1.parametrizations.weight.original" in program.state_dict
    with pytest.raises(paramreg.ParamregError, match="call paramreg.remove\\(model\\) first, or export paramreg.folded"):
        paramreg.check_plain(model)
    assert "conv1.parametrizations.weight.original" not in torch.export.export(paramreg.folded(model), (x,), strict=True).state_dict
