"""The math: every regularizer against its formula, a brute-force argmin, and shared contracts."""

import math

import numpy as np
import threading

import pytest
import torch
from torch.nn import functional as F

import paramreg

REGULARIZERS = [
    paramreg.L1(0.3),
    paramreg.L2(0.7),
    paramreg.ElasticNet(l1=0.3, l2=0.7),
    paramreg.ElasticNet(l1=0.0, l2=0.5),
    paramreg.L1(0.0),
]


def formula(reg, w, t):
    """The conventions table (README "What it computes"), written independently of the implementation."""
    a = reg.strength if isinstance(reg, paramreg.L1) else getattr(reg, "l1", 0.0)
    b = reg.strength if isinstance(reg, paramreg.L2) else getattr(reg, "l2", 0.0)
    penalty = a * np.abs(w).sum() + b / 2 * (w**2).sum()
    prox = np.sign(w) * np.maximum(np.abs(w) - t * a, 0) / (1 + t * b)
    return penalty, prox


@pytest.mark.parametrize("reg", REGULARIZERS, ids=repr)
@pytest.mark.parametrize("t", [0.0, 0.1, 1.0, 3.0])
def test_penalty_and_prox_follow_the_formulas(reg, t):
    w = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    penalty, prox = formula(reg, w.numpy(), t)
    assert math.isclose(float(reg.penalty(w)), penalty, rel_tol=1e-12)
    np.testing.assert_allclose(reg.prox(w, t).numpy(), prox, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reg", REGULARIZERS, ids=repr)
def test_prox_is_the_argmin(reg):
    """prox_{tR}(w) minimizes ½(z − w)² + t·R(z) coordinatewise: check against a fine grid."""
    t = 0.8
    grid = torch.linspace(-3, 3, 600_001, dtype=torch.float64)
    for w in [-2.5, -0.2, 0.0, 0.1, 0.24, 1.7]:
        values = 0.5 * (grid - w) ** 2 + t * _penalty_elementwise(reg, grid)
        best = grid[values.argmin()]
        got = reg.prox(torch.tensor([w], dtype=torch.float64), t)
        assert abs(float(got) - float(best)) <= 1e-5


def _penalty_elementwise(reg, z):
    a = reg.strength if isinstance(reg, paramreg.L1) else getattr(reg, "l1", 0.0)
    b = reg.strength if isinstance(reg, paramreg.L2) else getattr(reg, "l2", 0.0)
    return a * z.abs() + b / 2 * z**2


@pytest.mark.parametrize("reg", REGULARIZERS, ids=repr)
def test_contracts(reg, device):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 9, generator=g).to(device)
    v = torch.randn(4, 9, generator=g).to(device)
    # prox with t = 0 is the identity
    assert torch.equal(reg.prox(u, 0.0), u)
    # penalty is non-negative
    assert float(reg.penalty(u)) >= 0
    # prox is non-expansive
    assert float((reg.prox(u, 0.5) - reg.prox(v, 0.5)).norm()) <= float((u - v).norm()) + 1e-6
    # dtype, device and shape are kept, and the in-place form agrees with the pure one
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        w = u.to(dtype)
        out = reg.prox(w, 0.5)
        assert (out.dtype, out.device, out.shape) == (w.dtype, w.device, w.shape)
        inplace = w.clone()
        reg.prox_([inplace], 0.5)
        assert torch.equal(inplace, out)


def test_l1_gives_exact_zeros_below_threshold():
    w = torch.tensor([0.05, -0.05, 0.1, -0.1000001, 0.3])
    out = paramreg.L1(1.0).prox(w, 0.1)
    assert out.tolist()[:3] == [0.0, 0.0, 0.0]
    assert out[3] < 0 and out[4] > 0


def test_l2_convention_matches_torch_weight_decay():
    """L2(b) has gradient b·w: exactly what SGD's weight_decay=b adds."""
    w = torch.randn(6, requires_grad=True)
    paramreg.L2(0.3).penalty(w).backward()
    torch.testing.assert_close(w.grad, 0.3 * w.detach())


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1", None, True])
def test_strength_is_validated(bad):
    with pytest.raises(paramreg.ParamregError, match="strength"):
        paramreg.L1(bad)
    with pytest.raises(paramreg.ParamregError, match="l2"):
        paramreg.ElasticNet(l1=0.1, l2=bad)


def test_regularizers_print_as_the_call_and_compare_by_value():
    assert repr(paramreg.L1(1e-4)) == "L1(strength=0.0001)"
    assert eval(repr(paramreg.ElasticNet(l1=0.1, l2=0.2)), vars(paramreg)) == paramreg.ElasticNet(l1=0.1, l2=0.2)
    assert len({paramreg.L1(0.1), paramreg.L1(0.1), paramreg.L2(0.1)}) == 2


def test_numpy_and_tensor_strengths_are_accepted():
    assert paramreg.L1(np.float32(0.5)) == paramreg.L1(0.5)
    assert paramreg.L2(torch.tensor(0.25)) == paramreg.L2(0.25)
    with pytest.raises(paramreg.ParamregError, match="strength"):
        paramreg.L1(torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_multi_tensor_soft_threshold_equals_softshrink(dtype):
    """The accelerator path (three foreach ops over all tensors) against the per-tensor one."""
    from paramreg.catalogue.elementwise import _soft_threshold_multi_

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=g).to(dtype) for shape in [(7, 3), (5,), (4, 2, 3, 3), (1,)]]
    tensors[0][0, :2] = torch.tensor([0.25, -0.25])  # exactly at the threshold
    expected = [F.softshrink(t, 0.25) for t in tensors]
    _soft_threshold_multi_(tensors, 0.25)
    for got, want in zip(tensors, expected, strict=True):
        assert torch.equal(got, want)  # equal values; a zero may be +0 here where softshrink gives -0


@pytest.mark.parametrize("t", [0.0, 0.1, 1.0])
def test_l0_prox_is_the_argmin_over_keep_or_zero(t):
    """R(w) = a·count(w != 0) is separable: per entry the argmin of (z - w)²/2 + t·a·[z != 0] is w
    or 0, whichever is lower (0 on a tie); the map keeps the entries it keeps exactly."""
    reg = paramreg.L0(0.3)
    w = torch.linspace(-2, 2, 41, dtype=torch.float64)
    keep = w * w / 2 > t * 0.3
    expected = torch.where(keep, w, torch.zeros_like(w))
    assert torch.equal(reg.prox(w, t), expected)
    metric = torch.full_like(w, t)
    assert torch.equal(reg.prox_diag(w, metric), expected)
    inplace = [w.clone()]
    reg.prox_diag_(inplace, [1.0 / metric if t else torch.full_like(w, math.inf)])
    assert torch.equal(inplace[0], expected if t else w * (w != 0))
    assert float(reg.penalty(w)) == pytest.approx(0.3 * int((w != 0).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_l0_prox_in_place_scores_pieces_as_the_whole_tensor_would(dtype, monkeypatch):
    """prox_ scores a contiguous tensor in flat pieces (a piece's temporary, not the tensor's):
    the same zeros, bit for bit, as the out-of-place map, over pieces, a last short piece, and a
    non-contiguous tensor scored whole."""
    from paramreg.catalogue import elementwise

    monkeypatch.setattr(elementwise, "_PIECE", 7)
    torch.manual_seed(0)
    reg = paramreg.L0(0.3)
    for w in (torch.randn(10, 5, dtype=dtype), torch.randn(5, 10, dtype=dtype).t(), torch.tensor([0.1, -2.0, 0.5], dtype=dtype)):
        inplace = [w.clone() if w.is_contiguous() else w.t().clone().t()]
        reg.prox_(inplace, 0.7)
        assert torch.equal(inplace[0], reg.prox(w, 0.7)) and inplace[0].stride() == w.stride()
        assert 0 < int((inplace[0] == 0).sum()) < w.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_l0_prox_in_place_is_a_hardshrink_at_the_bound_with_the_maps_zeros_bit_for_bit(dtype, monkeypatch):
    """prox_ (scalar steps: SGD) is hardshrink at the largest magnitude whose rounded score is at
    most the bound: the same tensor, bit for bit, as the out-of-place map (and as the scored
    pieces, where no such magnitude is found near sqrt(bound·t)), over ±0, NaN, ±inf, strengths
    that zero none, some and most entries, and scales from 1e-3 to 1e3."""
    from paramreg.catalogue import elementwise

    bits = elementwise._BITS[dtype]
    g = torch.Generator().manual_seed(0)
    found = []
    original = elementwise._magnitude_bound
    monkeypatch.setattr(elementwise, "_magnitude_bound", lambda *a: found.append(original(*a)) or found[-1])
    for scale in (1e-3, 1.0, 1e3):
        w = (torch.randn(3000, generator=g, dtype=torch.float64) * scale).to(dtype)
        w[:5] = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf], dtype=torch.float64).to(dtype)
        for t in (0.01, 0.7, 30.0):
            for quantile in (0.001, 0.5, 0.97):
                a = float(w[5:].abs().double().quantile(quantile)) ** 2 / (2 * t) * 1.0001
                expected = paramreg.L0(a).prox(w, t)
                for pieces in (False, True):
                    if pieces:
                        monkeypatch.setattr(elementwise, "_magnitude_bound", lambda *a: None)
                    inplace = [w.clone()]
                    paramreg.L0(a).prox_(inplace, t)
                    assert torch.equal(inplace[0].view(bits), expected.view(bits)), (scale, t, quantile, pieces)
                monkeypatch.setattr(elementwise, "_magnitude_bound", lambda *a: found.append(original(*a)) or found[-1])
                assert 0 < int((expected == 0).sum()) < w.numel()
    # hardshrink nearly always; float16's squares under- and overflow at the scales 1e-3 and 1e3
    assert sum(f is not None for f in found) >= (0.4 if dtype == torch.float16 else 0.9) * len(found)


def test_l0_prox_in_place_under_autograd_is_recorded():
    """Where autograd records the in-place map (a non-leaf tensor in grad mode), it is scored
    whole: its gradient is the map's (1 where kept, 0 where zeroed)."""
    w = torch.tensor([0.05, -2.0, 0.5, -0.01], requires_grad=True)
    x = w * 1.0
    paramreg.L0(0.02).prox_([x], 1.0)
    x.sum().backward()
    assert torch.equal(x.detach(), torch.tensor([0.0, -2.0, 0.5, 0.0])) and torch.equal(w.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_l0_has_no_penalty_mode():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(paramreg.ParamregError, match="no gradient.*mode='prox'"):
        paramreg.attach(model, "weight", l0=0.1, mode="penalty")
    assert paramreg.spec(model)["attached"] == {}


def test_an_l1_penalty_over_many_small_tensors_takes_one_foreach_call_with_the_loops_value_and_gradient(monkeypatch):
    """Note [Sums of many small tensors]: 6 small tensors in one torch._foreach_norm call, the large
    one and a float16 one by abs().sum(); the value equals the loop's up to summation order, the
    gradient exactly (sign(w), 0 at 0)."""
    torch.manual_seed(0)
    small = [torch.randn(8, 8) for _ in range(6)]
    small[0][0, :3] = 0.0
    tensors = [w.requires_grad_() for w in [*small, torch.randn(300, 300), torch.randn(4, 4).half()]]
    calls = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, p: calls.append(len(ts)) or real(ts, p))
    value = paramreg.L1(0.5).penalty_sum(tensors)
    assert calls == [6]
    grads = torch.autograd.grad(value, tensors)
    loop = 0.5 * sum(w.abs().sum().float() for w in tensors)
    assert torch.allclose(value.float(), loop, rtol=1e-6, atol=0)
    for w, g in zip(tensors, grads, strict=True):
        assert torch.equal(g, 0.5 * torch.sign(w.detach()).to(g.dtype))


def test_an_l1_penalty_over_large_cpu_tensors_passes_through_one_held_buffer(monkeypatch):
    """Note [Sums of many small tensors]: large CPU tensors (here, with the sizes scaled down, over
    1,000 elements and 5,000 together) pass abs(w) through one buffer per dtype, kept between
    calls, in chunks (a non-contiguous one too); the value equals the loop's up to summation
    order, the gradient exactly (sign(w), 0 at 0); float16 and few small tensors take the loop."""
    from paramreg.catalogue import elementwise

    monkeypatch.setattr(elementwise, "FOREACH_BELOW", 1000)
    monkeypatch.setattr(elementwise, "CHUNK", 1000)
    monkeypatch.setattr(elementwise, "CHUNKED_FROM", 5000)
    monkeypatch.setattr(elementwise, "_buffers", threading.local())
    torch.manual_seed(0)
    large = [torch.randn(3000), torch.randn(60, 70).t(), torch.randn(2500, dtype=torch.float64), torch.randn(2600, dtype=torch.float64)]
    large[0][:7] = 0.0
    tensors = [w.requires_grad_() for w in [*large, torch.randn(4, 4).half()]]
    applied = []
    real = elementwise._ChunkedAbsSum.apply
    monkeypatch.setattr(elementwise._ChunkedAbsSum, "apply", lambda scale, *ws: applied.append((scale, len(ws))) or real(scale, *ws))
    value = paramreg.L1(0.5).penalty_sum(tensors)
    assert applied == [(1.0, 2), (1.0, 2)]  # float32 and float64, each in one node, scaled after their sum
    buffers = dict(elementwise._buffers.by_key)
    assert {k: b.numel() for k, b in buffers.items()} == {(torch.float32, torch.device("cpu")): 1000, (torch.float64, torch.device("cpu")): 1000}
    grads = torch.autograd.grad(value, tensors)
    loop = 0.5 * sum(w.abs().sum().double() for w in tensors)
    assert torch.allclose(value.double(), loop, rtol=1e-6, atol=0)
    for w, g in zip(tensors, grads, strict=True):
        assert torch.equal(g, 0.5 * torch.sign(w.detach()).to(g.dtype))
    paramreg.L1(0.5).penalty_sum(tensors)
    assert all(elementwise._buffers.by_key[k] is b for k, b in buffers.items())  # held, not made again
    views = elementwise._buffers.views  # per buffer, the chunks' outputs: views of it, one per length
    assert {k: sorted(v) for k, v in views.items()} == {(torch.float32, torch.device("cpu")): [200, 1000], (torch.float64, torch.device("cpu")): [500, 600, 1000]}
    assert all(v.data_ptr() == buffers[k].data_ptr() for k, held in views.items() for v in held.values())
    monkeypatch.setattr(elementwise, "VIEWS_HELD", 2)
    views.clear()
    held = paramreg.L1(0.5).penalty_sum(tensors)  # three lengths of chunk in float64, at most two views kept
    assert all(len(v) <= 2 for v in views.values()) and torch.allclose(held.double(), value.double(), rtol=1e-6, atol=0)
    applied.clear()
    paramreg.L1(0.5).penalty_sum(large[:2])  # 7,200 float32 elements in two tensors
    assert applied == [(0.5, 2)]  # one node: the strength inside it
    applied.clear()
    paramreg.L1(0.5).penalty_sum([large[0]])  # under 5,000 elements: the loop
    assert applied == []


def test_the_held_buffers_sum_beside_sparse_tensors_inference_mode_and_torch_func():
    """Note [Sums of many small tensors]: a sparse tensor beside large ones takes abs().sum(); a
    penalty taken first under inference_mode leaves a buffer that training can write; under
    torch.func's transforms every tensor takes abs().sum() (the node is an old-style Function).
    Found by a review in stop 34."""
    from paramreg.catalogue import elementwise

    torch.manual_seed(0)
    big, sparse = torch.randn(1100, 1000), torch.randn(10, 10).to_sparse()
    value = paramreg.L1(0.5).penalty_sum([big, sparse])
    assert torch.allclose(value, 0.5 * (big.abs().sum() + sparse.to_dense().abs().sum()), rtol=1e-6, atol=0)
    elementwise._buffers.__dict__.clear()  # this thread's buffer made afresh, first under inference_mode
    w = big.clone().requires_grad_()
    with torch.inference_mode():
        evaluated = paramreg.L1(0.5).penalty_sum([w])
    trained = paramreg.L1(0.5).penalty_sum([w])
    trained.backward()
    assert float(evaluated) == float(trained) and torch.equal(w.grad, 0.5 * torch.sign(big))
    grad = torch.func.grad(lambda x: paramreg.L1(0.5).penalty_sum([x, x.t()]))(big)
    assert torch.equal(grad, torch.sign(big))


def test_a_few_small_tensors_join_the_held_buffers_node_with_the_strength(monkeypatch):
    """Note [Sums of many small tensors]: beside large CPU tensors of their dtype, fewer than
    FOREACH_FROM small ones pass through the same node, and with one node the strength is taken
    inside it (no multiplication node of its own); value as the loop's up to summation order,
    gradient exactly strength·sign(w). Four small ones take the foreach call instead."""
    from paramreg.catalogue import elementwise

    monkeypatch.setattr(elementwise, "FOREACH_BELOW", 1000)
    monkeypatch.setattr(elementwise, "CHUNK", 1000)
    monkeypatch.setattr(elementwise, "CHUNKED_FROM", 5000)
    monkeypatch.setattr(elementwise, "_buffers", threading.local())
    torch.manual_seed(0)
    tensors = [w.requires_grad_() for w in [torch.randn(3000), torch.randn(2600), torch.randn(7, 9), torch.randn(30)]]
    tensors[2].data[0, :2] = 0.0
    applied = []
    real = elementwise._ChunkedAbsSum.apply
    monkeypatch.setattr(elementwise._ChunkedAbsSum, "apply", lambda scale, *ws: applied.append((scale, len(ws))) or real(scale, *ws))
    value = paramreg.L1(0.25).penalty_sum(tensors)
    assert applied == [(0.25, 4)] and type(value.grad_fn).__name__ == "_ChunkedAbsSumBackward"
    shaped = {shape for shape in elementwise._buffers.views[(torch.float32, torch.device("cpu"))] if isinstance(shape, torch.Size)}
    assert shaped == {torch.Size([7, 9]), torch.Size([30])}  # those that fit: written into a view shaped as them
    loop = 0.25 * sum(w.detach().double().abs().sum() for w in tensors)
    assert torch.allclose(value.double(), loop, rtol=1e-6, atol=0)
    for w, g in zip(tensors, torch.autograd.grad(value, tensors), strict=True):
        assert torch.equal(g, 0.25 * torch.sign(w.detach()))
    applied.clear()
    four = [*tensors, *(torch.randn(5, requires_grad=True) for _ in range(2))]  # four small: one foreach call
    paramreg.L1(0.25).penalty_sum(four)
    assert applied == [(1.0, 2)]
