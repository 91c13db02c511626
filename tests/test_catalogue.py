"""One contract over every registered regularizer, plus closed forms against slow per-group loops
and projections against brute force."""

import itertools
import math

import numpy as np
import pytest
import torch

import paramreg
import paramreg.catalogue.groups
from paramreg.catalogue.base import keywords

EXAMPLES = {
    "l0": paramreg.L0(0.3),
    "l1": paramreg.L1(0.3),
    "l2": paramreg.L2(0.7),
    "elastic_net": paramreg.ElasticNet(l1=0.3, l2=0.7),
    "group_lasso": paramreg.GroupLasso(0.8, groups="in", weighted=True),
    "sparse_group_lasso": paramreg.SparseGroupLasso(l1=0.2, group=0.6),
    "nuclear_norm": paramreg.NuclearNorm(0.9),
    "non_negative": paramreg.NonNegative(),
    "box": paramreg.Box(-0.5, 0.7),
    "max_norm": paramreg.MaxNorm(1.1),
    "unit_norm": paramreg.UnitNorm(),
    "top_k": paramreg.TopK(0.25),
    "nm": paramreg.NM(2, 4),
    "keep_zeros": paramreg.KeepZeros(),
    "soft_threshold": paramreg.SoftThreshold(0.1),
}
CASES = list(EXAMPLES.values())


def test_every_builtin_keyword_has_an_example():
    builtin = {k for k, cls in keywords().items() if cls.__module__.startswith("paramreg.")}
    assert set(EXAMPLES) == builtin
    assert all(isinstance(EXAMPLES[k], cls) for k, cls in keywords().items() if k in EXAMPLES)


def objective(reg, z, w, t):
    return 0.5 * float((z - w).pow(2).sum()) + t * float(reg.penalty(z))


@pytest.mark.parametrize("reg", CASES, ids=repr)
def test_contract(reg, device):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 8, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(4, 8, generator=g, dtype=torch.float64).to(device)
    t = 0.5
    p = reg.prox(u, t)
    assert float(reg.penalty(u)) >= 0 and float(reg.penalty(p)) >= 0
    if reg.kind == "constraint":
        assert float(reg.penalty(p)) == 0.0, "the projection is feasible"
        assert torch.equal(reg.prox(p, t), p), "projecting a feasible point leaves it"
    else:
        assert torch.equal(reg.prox(u, 0.0), u), "prox with t = 0 is the identity"
    if reg.convex:
        assert float((reg.prox(u, t) - reg.prox(v, t)).norm()) <= float((u - v).norm()) + 1e-12
    # optimality: no nearby point and no other feasible point has a lower objective
    best = objective(reg, p, u, t)
    for scale in (1e-4, 1e-2, 1e-1, 1.0):
        for _ in range(50):
            q = p + scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(device)
            assert best <= objective(reg, q, u, t) + 1e-9
    if reg.kind == "constraint":
        for _ in range(50):
            q = reg.prox(torch.randn(p.shape, generator=g, dtype=torch.float64).to(device), t)
            assert best <= objective(reg, q, u, t) + 1e-9
    # dtype, device and shape kept; the in-place form agrees with the pure one
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        w = u.to(dtype)
        out = reg.prox(w, t)
        assert (out.dtype, out.device, out.shape) == (w.dtype, w.device, w.shape)
        inplace = w.clone()
        reg.prox_([inplace], t)
        assert torch.equal(inplace, out)
    # specs print as the call and round-trip through plain dicts
    assert paramreg.Regularizer.from_dict(reg.to_dict()) == reg
    assert eval(repr(reg), vars(paramreg)) == reg


# --- closed forms against slow per-group loops -------------------------------------------------


def slow_group_prox(w, t, a, groups, weighted, l1=0.0):
    """The textbook formula, one group at a time, in NumPy."""
    w = np.sign(w) * np.maximum(np.abs(w) - t * l1, 0)
    out = np.empty_like(w)
    keep = {"out": (0,), "in": (1,), "kernel": (0, 1)}.get(groups, (groups,))
    for index in itertools.product(*(range(w.shape[d]) for d in keep)):
        selector = [slice(None)] * w.ndim
        for d, i in zip(keep, index, strict=True):
            selector[d] = i
        group = w[tuple(selector)]
        c = math.sqrt(group.size) if weighted else 1.0
        norm = np.linalg.norm(group)
        out[tuple(selector)] = group * (max(1 - t * a * c / norm, 0) if norm > 0 else 0)
    return out


@pytest.mark.parametrize("groups", ["out", "in", "kernel", 2, -1])
@pytest.mark.parametrize("weighted", [False, True])
def test_group_lasso_against_a_per_group_loop(groups, weighted):
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    norms = paramreg.catalogue.groups.group_norms(w, groups)
    c = math.sqrt(w.numel() / norms.numel()) if weighted else 1.0
    a = float(norms.median()) / (0.7 * c)  # about half of the groups fall below the threshold
    reg = paramreg.GroupLasso(a, groups=groups, weighted=weighted)
    expected = slow_group_prox(w.numpy(), 0.7, a, groups, weighted)
    np.testing.assert_allclose(reg.prox(w, 0.7).numpy(), expected, rtol=1e-12, atol=1e-15)
    assert (expected == 0).any(), "some group should be zeroed"


def test_sparse_group_lasso_against_a_per_group_loop():
    w = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    reg = paramreg.SparseGroupLasso(l1=0.3, group=0.9, groups="out")
    expected = slow_group_prox(w.numpy(), 1.0, 0.9, "out", False, l1=0.3)
    np.testing.assert_allclose(reg.prox(w, 1.0).numpy(), expected, rtol=1e-12, atol=1e-15)


def test_nuclear_norm_against_numpy_svd_and_rank_drops():
    w = torch.randn(6, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    matrix = w.reshape(6, -1).numpy()
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    threshold = float(np.sort(s)[2]) + 1e-3  # three singular values fall below it
    expected = (u * np.maximum(s - threshold, 0)) @ vh
    got = paramreg.NuclearNorm(threshold).prox(w, 1.0)
    np.testing.assert_allclose(got.reshape(6, -1).numpy(), expected, rtol=0, atol=1e-12)
    assert np.linalg.matrix_rank(matrix) == 6
    assert torch.linalg.matrix_rank(got.reshape(6, -1)) == 3
    assert math.isclose(float(paramreg.NuclearNorm(2.0).penalty(w)), 2.0 * s.sum(), rel_tol=1e-12)


def test_max_norm_and_unit_norm_against_per_row_loops():
    w = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.6
    rows = [row / max(1.0, np.linalg.norm(row) / 1.8) for row in w.numpy()]
    np.testing.assert_allclose(paramreg.MaxNorm(1.8).prox(w, 1.0).numpy(), np.stack(rows), rtol=1e-12)
    assert (np.linalg.norm(w.numpy(), axis=1) > 1.8).any() and (np.linalg.norm(w.numpy(), axis=1) < 1.8).any()
    rows = [row / np.linalg.norm(row) for row in w.numpy()]
    np.testing.assert_allclose(paramreg.UnitNorm().prox(w, 1.0).numpy(), np.stack(rows), rtol=1e-12)


# --- projections against brute force ----------------------------------------------------------


def test_top_k_is_the_nearest_k_sparse_point_and_has_exactly_the_promised_zeros():
    w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for k in range(10):
        got = paramreg.TopK(k).prox(w, 1.0)
        assert int((got == 0).sum()) == 9 - k
        best = min(
            float((w - w * torch.isin(torch.arange(9), torch.tensor(support, dtype=torch.long)).reshape(3, 3)).norm())
            for support in itertools.combinations(range(9), k)
        )
        assert math.isclose(float((w - got).norm()), best, rel_tol=1e-12, abs_tol=1e-12)
    assert int((paramreg.TopK(0.25).prox(torch.randn(40, 10), 1.0) == 0).sum()) == 300


def test_nm_is_the_nearest_n_of_m_point_and_has_exactly_the_promised_zeros():
    w = torch.randn(3, 8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    got = paramreg.NM(2, 4).prox(w, 1.0)
    assert int((got == 0).sum()) == w.numel() // 2
    for o, k in itertools.product(range(3), range(2)):
        for block in range(2):
            x = w[o, 4 * block : 4 * block + 4, k]
            best = min(float((x - x * torch.isin(torch.arange(4), torch.tensor(s))).norm()) for s in itertools.combinations(range(4), 2))
            assert math.isclose(float((x - got[o, 4 * block : 4 * block + 4, k]).norm()), best, rel_tol=1e-12)


def test_box_and_non_negative_against_a_grid():
    grid = torch.linspace(-2, 2, 4001, dtype=torch.float64)
    for reg, lo, hi in ((paramreg.Box(-0.5, 0.7), -0.5, 0.7), (paramreg.NonNegative(), 0.0, math.inf)):
        feasible = grid[(grid >= lo) & (grid <= hi)]
        for x in (-1.3, -0.2, 0.3, 1.5):
            nearest = feasible[(feasible - x).abs().argmin()]
            assert abs(float(reg.prox(torch.tensor([x], dtype=torch.float64), 1.0)) - float(nearest)) <= 1e-3


# --- multi-task lasso reference ----------------------------------------------------------------


def test_group_lasso_over_input_columns_matches_multitask_lasso():
    from sklearn.linear_model import MultiTaskLasso

    rng = np.random.default_rng(7)
    n, p, tasks = 120, 15, 3
    X = rng.standard_normal((n, p))
    W = np.zeros((tasks, p))
    W[:, :4] = rng.standard_normal((tasks, 4)) * 2
    Y = X @ W.T + 0.1 * rng.standard_normal((n, tasks))
    alpha = 0.2
    ref = MultiTaskLasso(alpha=alpha, tol=1e-14, max_iter=1_000_000).fit(X, Y)

    model = torch.nn.Linear(p, tasks).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    paramreg.attach(model, "weight", group_lasso={"strength": alpha, "groups": "in"})
    augmented = np.hstack([X, np.ones((n, 1))])
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / np.linalg.eigvalsh(augmented.T @ augmented / n).max())
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    previous = None
    for step in range(50_000):
        opt.zero_grad()
        ((model(Xt) - Yt).pow(2).sum() / (2 * n)).backward()
        opt.step()
        if step % 50 == 0:
            current = model.weight.detach().clone()
            if previous is not None and (current - previous).abs().max() < 1e-15:
                break
            previous = current
    w = model.weight.detach().numpy()
    zero_columns = (ref.coef_ == 0).all(axis=0)
    assert 0 < zero_columns.sum() < p
    np.testing.assert_array_equal((w == 0).all(axis=0), zero_columns)
    np.testing.assert_allclose(w, ref.coef_, rtol=0, atol=1e-6)
