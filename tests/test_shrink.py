"""shrink and attach_channels: zero channels are removed with everything coupled to them, outputs
stay equal, parameter counts drop by exactly the removed slices, ONNX runs the smaller model."""

import warnings

import pytest
import torch
from torch import nn

import paramreg
from paramreg import CoupledGroupLasso, ParamregError

from conftest import assert_close_to_scale

import torch_pruning  # noqa: F401  (the `test` extra installs it: a missing one fails here, never skips)


class ResCNN(nn.Module):
    """conv-BN-ReLU, a residual block (conv-BN-ReLU-conv-BN, added), global pooling, a classifier."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c3, self.b3 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = self.b3(self.c3(torch.relu(self.b2(self.c2(x)))))
        return self.fc(torch.relu(x + y).mean((2, 3)))


class ConcatCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.c = nn.Conv2d(9, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.c(x)).flatten(1))


class TransformerMLP(nn.Module):
    """Pre-norm transformer MLP block: x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, d=8, hidden=32):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln(x))))


class AttentionBlock(nn.Module):
    """A pre-norm decoder block with the attention written out, as in nanoGPT-style models: one qkv
    Linear reshaped into heads, then ``scaled_dot_product_attention`` or ``softmax(q @ k^T) @ v``."""

    def __init__(self, d=8, heads=2, fused=True):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, -1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


def count(model):
    return sum(p.numel() for p in model.parameters())


def randomize_bn(model):
    """Non-trivial running statistics and affine entries, so that BN matters in eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def zero_rows(*tensors, idx):
    with torch.no_grad():
        for t in tensors:
            t[idx] = 0


def assert_same_outputs(big, small, x):
    """Equal up to float32 roundings of the outputs' own size: deleting channels reorders sums."""
    big.eval(), small.eval()
    with torch.no_grad():
        for inputs in (x, torch.randn_like(x), 10 * torch.randn_like(x)):
            assert_close_to_scale(small(inputs), big(inputs))


def assert_onnx_runs(small, x, tmp_path):
    import onnxruntime
    path = tmp_path / "small.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small.eval(), (x,), path, dynamo=False, input_names=["x"])
    session = onnxruntime.InferenceSession(str(path))
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert_close_to_scale(torch.from_numpy(got), small(x))


def test_residual_cnn_shrinks_with_bn_and_residual_partners(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(ResCNN())
    # channel 2 of the residual stream: c1, b1, c3 and b3 all produce it
    zero_rows(model.c1.weight, model.b1.weight, model.b1.bias, model.c3.weight, model.b3.weight, model.b3.bias, idx=2)
    # channels 1 and 4 of the block's inner layer
    zero_rows(model.c2.weight, model.c2.bias, model.b2.weight, model.b2.bias, idx=[1, 4])
    x = torch.randn(4, 3, 8, 8)
    before = count(model)
    small = paramreg.shrink(model, x)

    assert (small.c1.out_channels, small.c2.out_channels, small.c3.out_channels) == (7, 4, 7)
    assert (small.b1.num_features, small.b2.num_features, small.b3.num_features, small.fc.in_features) == (7, 4, 7, 7)
    residual = 3 * 9 + 2 + 6 * 9 + 2 + 6 * 9 + 5  # c1 row, b1, c3 row (6 inputs), b3, c2 input column (6 outputs), fc column
    inner = 8 * 9 + 1 + 2 + 8 * 9  # c2 row and bias, b2, c3 input column (8 outputs)
    # c3's row of channel 2 and c3's columns of 1 and 4 overlap in 2 x 9 entries; the c2 columns of channel 2 in rows 1, 4 too
    overlap = 2 * 9 + 2 * 9
    assert before - count(small) == residual + 2 * inner - overlap
    assert before - count(small) == before - sum(p.numel() for p in small.parameters())
    assert count(model) == before and model.c1.out_channels == 8  # the model itself is unchanged
    assert_same_outputs(model, small, x)
    assert_onnx_runs(small, x, tmp_path)


def test_a_zero_filter_before_a_live_batchnorm_is_not_removed():
    torch.manual_seed(0)
    model = randomize_bn(ResCNN())
    zero_rows(model.c2.weight, model.c2.bias, idx=3)  # BN's shift still outputs beta for channel 3
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="nothing was removed"):
        small = paramreg.shrink(model, x)
    assert small.c2.out_channels == 6
    assert_same_outputs(model, small, x)


def test_mlp_neurons_and_consumer_side_zeros(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    zero_rows(model[0].weight, model[0].bias, idx=[0, 5, 6])  # producers of 3 hidden neurons
    with torch.no_grad():
        model[4].weight[:, [2, 7]] = 0  # nothing reads neurons 2 and 7 of the second layer
    x = torch.randn(5, 10)
    before = count(model)
    small = paramreg.shrink(model, x)
    assert [small[0].out_features, small[2].out_features] == [13, 10]
    assert before - count(small) == 3 * (10 + 1 + 12) + 2 * (16 + 1 + 3) - 3 * 2  # minus the overlap in layer 2's weight
    assert_same_outputs(model, small, x)
    assert_onnx_runs(small, x, tmp_path)


def test_transformer_mlp_block_shrinks_hidden_neurons_only(tmp_path):
    torch.manual_seed(0)
    model = TransformerMLP().eval()
    zero_rows(model.fc1.weight, model.fc1.bias, idx=list(range(0, 32, 3)))  # 11 hidden neurons
    zero_rows(model.fc2.weight, model.fc2.bias, idx=[0])  # a residual-stream dim: LayerNorm mixes it, kept
    x = torch.randn(2, 4, 8)
    before = count(model)
    small = paramreg.shrink(model, x)
    assert (small.fc1.out_features, small.fc2.in_features, small.fc2.out_features, small.ln.normalized_shape) == (21, 21, 8, (8,))
    assert before - count(small) == 11 * (8 + 1 + 8)
    assert_same_outputs(model, small, x)
    assert_onnx_runs(small, x, tmp_path)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "q@k^T"])
def test_attention_block_shrinks_mlp_neurons_and_never_the_heads(fused):
    """Torch-Pruning's tracer passes channels through attention as if it were element-wise, which
    coupled qkv's 3d outputs to proj's d inputs; shrink then deleted 2/3 of qkv and the model no
    longer ran. Attention ops now mix channels: zero q rows are kept, the MLP still shrinks."""
    torch.manual_seed(0)
    model = AttentionBlock(fused=fused).eval()
    zero_rows(model.fc1.weight, model.fc1.bias, idx=[1, 5, 6])
    zero_rows(model.qkv.weight, model.qkv.bias, idx=[0, 1])  # two query channels: not removable
    x = torch.randn(2, 5, 8)
    small = paramreg.shrink(model, x)
    assert (small.qkv.out_features, small.proj.in_features, small.fc1.out_features) == (24, 8, 29)
    assert_same_outputs(model, small, x)
    with pytest.raises(ParamregError, match=r"'qkv.weight'.*(Attention|Bmm)"):
        paramreg.attach_channels(model, "qkv.weight", 0.1, x)
    assert paramreg.attach_channels(model, "fc1.weight", 0.1, x) == ["fc1.weight", "fc1.bias"]


def test_concatenation_partners(tmp_path):
    torch.manual_seed(0)
    model = ConcatCNN().eval()
    zero_rows(model.a.weight, model.a.bias, idx=1)
    zero_rows(model.b.weight, model.b.bias, idx=[0, 4])
    zero_rows(model.c.weight, model.c.bias, idx=5)
    x = torch.randn(2, 3, 4, 4)
    before = count(model)
    small = paramreg.shrink(model, x)
    assert (small.a.out_channels, small.b.out_channels, small.c.in_channels, small.c.out_channels) == (3, 3, 6, 5)
    c_row = 9 * 9 + 1 + 3 * 16  # c's filter, bias and fc's 16 columns of that channel
    assert before - count(small) == 3 * (27 + 1) + 3 * 6 * 9 + c_row - 3 * 9
    assert_same_outputs(model, small, x)
    assert_onnx_runs(small, x, tmp_path)


def test_nothing_to_remove_warns_and_returns_an_equivalent_copy():
    torch.manual_seed(0)
    model = randomize_bn(ResCNN())
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="nothing was removed"):
        small = paramreg.shrink(model, x)
    assert small is not model and count(small) == count(model)
    assert_same_outputs(model, small, x)


def test_output_neurons_are_never_removed():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    zero_rows(model[0].weight, model[0].bias, idx=1)
    with pytest.warns(UserWarning, match="nothing was removed"):
        small = paramreg.shrink(model, torch.randn(2, 4))
    assert small[0].out_features == 3


def test_a_layer_keeps_one_channel():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    zero_rows(model[0].weight, model[0].bias, idx=[0, 1, 2])
    x = torch.randn(2, 4)
    small = paramreg.shrink(model, x)
    assert small[0].out_features == 1
    assert_same_outputs(model, small, x)


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.enc(x)).detach())


def test_untraceable_layer_is_named():
    with pytest.raises(ParamregError, match=r"cannot trace 'enc' \(Linear\)"):
        paramreg.shrink(Detached(), torch.randn(2, 4))


class Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x)))


def test_an_op_that_maps_zero_elsewhere_fails_the_check_and_changes_nothing():
    model = Sigmoid()
    zero_rows(model.a.weight, model.a.bias, idx=2)  # sigmoid(0) = 0.5 still reaches b
    with pytest.raises(ParamregError, match="changed the outputs"):
        paramreg.shrink(model, torch.randn(3, 4))
    assert model.a.out_features == 6


def large_output_mlp(hidden=512, scale=2e4):
    """An MLP whose outputs are ~1e4 (a regression head, unnormalized logits), half its hidden neurons zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    with torch.no_grad():
        model[2].weight.mul_(scale)
    zero_rows(model[0].weight, model[0].bias, idx=list(range(0, hidden, 2)))
    return model.eval()


def test_large_outputs_shrink_within_roundings_of_their_size():
    model, x = large_output_mlp(), torch.randn(64, 32)
    with torch.no_grad():
        assert 3e3 < float(model(x).abs().max()) < 1e5
    # the removal really moves the outputs by more than an absolute 1e-5 (reordered float32 sums) ...
    with pytest.raises(ParamregError, match="changed the outputs"):
        paramreg.shrink(model, x, rtol=0)
    # ... which the default, relative to the outputs' magnitude, accepts
    small = paramreg.shrink(model, x)
    assert small[0].out_features == 256
    assert_same_outputs(model, small, x)


def test_a_zero_neuron_behind_a_sigmoid_is_refused_at_any_output_scale():
    for scale in (1.0, 1e4):
        model = Sigmoid()
        with torch.no_grad():
            model.b.weight.mul_(scale)
        zero_rows(model.a.weight, model.a.bias, idx=2)  # sigmoid(0) = 0.5 still reaches b
        with pytest.raises(ParamregError, match="changed the outputs"):
            paramreg.shrink(model, torch.randn(3, 4))


@pytest.mark.parametrize("option", [{"rtol": -1.0}, {"atol": float("nan")}, {"rtol": "1e-5"}])
def test_shrink_tolerances_must_be_finite_numbers(option):
    with pytest.raises(ParamregError, match="shrink: (rtol|atol) must be"):
        paramreg.shrink(large_output_mlp(hidden=8), torch.randn(2, 32), **option)


def test_shrink_refuses_an_attached_model():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    paramreg.attach(model, "*.weight", l1=1e-3)
    with pytest.raises(ParamregError, match="paramreg.remove"):
        paramreg.shrink(model, torch.randn(2, 4))


# ---- attach_channels and CoupledGroupLasso ----


def test_coupled_prox_is_the_group_lasso_prox_of_the_concatenated_channels():
    torch.manual_seed(0)
    tensors = [torch.randn(5, 3, 2, 2), torch.randn(5), torch.randn(5, 7)]
    tensors[0][1] *= 0.01
    tensors[1][1] *= 0.01
    tensors[2][1] *= 0.01
    reg = CoupledGroupLasso(0.5, channels=5, members=("a", "b", "c"), shapes=tuple(tuple(t.shape) for t in tensors))
    concatenated = torch.cat([t.reshape(5, -1) for t in tensors], 1)
    expected = paramreg.GroupLasso(0.5).prox(concatenated, t=0.7)
    got = [t.clone() for t in tensors]
    reg.prox_(got, t=0.7)
    torch.testing.assert_close(torch.cat([t.reshape(5, -1) for t in got], 1), expected)
    assert all(bool((t[1] == 0).all()) for t in got)  # channel 1 zero in every member together
    torch.testing.assert_close(reg.joint_penalty(tensors), paramreg.GroupLasso(0.5).penalty(concatenated))
    assert float(reg.joint_penalty(tensors)) <= sum(float(reg.penalty(t)) for t in tensors)


def test_coupled_prox_refuses_a_partial_set_of_members():
    reg = CoupledGroupLasso(0.1, channels=2, members=("w", "b"), shapes=((2, 3), (2,)))
    with pytest.raises(ParamregError, match="one optimizer parameter group"):
        reg.prox_([torch.ones(2, 3)], t=0.1)


def test_coupled_spec_round_trips():
    reg = CoupledGroupLasso(0.1, channels=2, members=("w", "b"), shapes=((2, 3), (2,)))
    import json

    assert paramreg.Regularizer.from_dict(json.loads(json.dumps(reg.to_dict()))) == reg
    assert CoupledGroupLasso.adaptive is True  # a map in an optimizer's metric, as GroupLasso


def test_attach_channels_groups_bn_and_residual_partners():
    model = ResCNN()
    names = paramreg.attach_channels(model, "c*.weight", 0.01, torch.randn(2, 3, 8, 8))
    assert sorted(names) == sorted(
        ["c1.weight", "b1.weight", "b1.bias", "c3.weight", "b3.weight", "b3.bias", "c2.weight", "c2.bias", "b2.weight", "b2.bias"]
    )
    regs = {s: paramreg.spec(model)["attached"][s]["regularizer"] for s in names}
    assert regs["c1.weight"] == regs["b3.bias"] == regs["c3.weight"]  # one group: the residual stream
    assert regs["c2.weight"] != regs["c1.weight"]
    assert model.training  # the tracer's eval() did not leak


def test_training_with_attach_channels_then_shrink(tmp_path):
    torch.manual_seed(0)
    model = ResCNN()
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    # strength 0.07: the prox step grows with the momentum buffer's fill (3 of 14 channels vanish)
    paramreg.attach_channels(model, "c*.weight", 0.07, x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for members in (
        [model.c1.weight, model.b1.weight, model.b1.bias, model.c3.weight, model.b3.weight, model.b3.bias],
        [model.c2.weight, model.c2.bias, model.b2.weight, model.b2.bias],
    ):
        zero = [(m.detach().reshape(m.shape[0], -1) == 0).all(1) for m in members]
        assert all(bool((z == zero[0]).all()) for z in zero)  # a channel is zero in all members, or in none
    zeros = int(((model.c1.weight.detach().reshape(8, -1) == 0).all(1)).sum()) + int(
        ((model.c2.weight.detach().reshape(6, -1) == 0).all(1)).sum()
    )
    assert zeros >= 2
    spec = paramreg.spec(model)
    fresh = ResCNN()
    assert sorted(paramreg.attach_spec(fresh, spec)) == sorted(spec["attached"])
    paramreg.remove(model)
    model.eval()
    small = paramreg.shrink(model, x[:4])
    assert small.c1.out_channels + small.c2.out_channels == 8 + 6 - zeros
    assert_same_outputs(model, small, x[:4])
    assert_onnx_runs(small, x[:4], tmp_path)


def test_attach_channels_refuses_members_in_different_param_groups():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    x = torch.randn(2, 1, 8, 8)
    paramreg.attach_channels(model, "0.weight", 0.1, x)
    opt = torch.optim.SGD([{"params": [model[0].weight, model[3].weight, model[3].bias]}, {"params": model[1].parameters(), "lr": 0.01}], lr=0.1)
    model(x).sum().backward()
    with pytest.raises(ParamregError, match="one optimizer parameter group"):
        opt.step()


def test_attach_channels_errors_name_the_layer_and_change_nothing():
    x = torch.randn(2, 3, 8)
    stacked = nn.Sequential(TransformerMLP(), TransformerMLP())
    with pytest.raises(ParamregError, match=r"(?s)'0.fc2.weight'.*'1.ln' \(LayerNorm\)"):
        paramreg.attach_channels(stacked, "*.fc*.weight", 0.1, x)  # 0.fc2 feeds the residual stream
    assert paramreg.spec(stacked)["attached"] == {}
    model = TransformerMLP()
    with pytest.raises(ParamregError, match="'ln.weight'.*not the weight of a Linear"):
        paramreg.attach_channels(model, "ln.weight", 0.1, x)
    out = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ParamregError, match="outputs of the model"):
        paramreg.attach_channels(out, "*.weight", 0.1, torch.randn(2, 4))
    assert paramreg.attach_channels(model, "fc1.weight", 0.1, x) == ["fc1.weight", "fc1.bias"]
    with pytest.raises(ParamregError, match="strength"):
        paramreg.attach_channels(model, "fc1.weight", -1.0, x)


@pytest.mark.parametrize("reg", [CoupledGroupLasso(0.6, channels=4), CoupledGroupLasso(0.6, channels=4, members=("w",), shapes=((4, 8),))], ids=repr)
def test_coupled_group_lasso_passes_the_catalogue_contract(reg):
    from test_catalogue import test_contract as contract

    contract(reg, torch.device("cpu"))
