"""Proximal gradient through paramreg reaches scikit-learn's Lasso and ElasticNet optima.

The loss is sklearn's (1/(2n))·‖y − Xw − b‖²; the bias (intercept) is not penalized. Full-batch
SGD with step 1/L (L the Lipschitz constant of the loss gradient) plus paramreg's prox after
every step is ISTA, which converges linearly on these well-posed problems (n > p, random X).
"""

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet as SkElasticNet
from sklearn.linear_model import Lasso as SkLasso
from torch import nn

import paramreg


def make_problem(n, p, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    w_true = np.zeros(p)
    support = rng.choice(p, size=max(1, p // 4), replace=False)
    w_true[support] = rng.uniform(1, 3, size=support.size) * rng.choice([-1, 1], size=support.size)
    y = X @ w_true + 0.5 + 0.3 * rng.standard_normal(n)
    return X, y


def fit_prox_gradient(X, y, max_steps=20_000, **attach_kwargs):
    """ISTA through paramreg; stops once an iterate no longer changes (float64 fixed point)."""
    n, p = X.shape
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    model = nn.Linear(p, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    paramreg.attach(model, "weight", **attach_kwargs)
    augmented = np.hstack([X, np.ones((n, 1))])
    lipschitz = np.linalg.eigvalsh(augmented.T @ augmented / n).max()
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / lipschitz)
    previous = None
    for step in range(max_steps):
        opt.zero_grad()
        loss = (model(Xt).squeeze(1) - yt).pow(2).sum() / (2 * n)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            current = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
            if previous is not None and (current - previous).abs().max() < 1e-15:
                break
            previous = current.clone()
    else:
        raise AssertionError("proximal gradient did not reach a fixed point")
    paramreg.remove(model)
    return model.weight.detach().squeeze(0).numpy(), model.bias.detach().item()


PROBLEMS = [(200, 20, 0), (100, 40, 1), (80, 10, 2)]
# every parity test through the fused and the eager map (SGD takes neither: Note [Fused map] in optim/fused.py)
pytestmark = pytest.mark.usefixtures("prox_path")


@pytest.mark.parametrize("n,p,seed", PROBLEMS)
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_lasso_matches_sklearn(n, p, seed, fraction):
    X, y = make_problem(n, p, seed)
    alpha_max = np.abs((X - X.mean(0)).T @ (y - y.mean())).max() / n
    alpha = fraction * alpha_max
    ref = SkLasso(alpha=alpha, tol=1e-14, max_iter=1_000_000).fit(X, y)
    w, b = fit_prox_gradient(X, y, l1=alpha)
    assert 0 < (ref.coef_ == 0).sum() < p, "the problem should have a non-trivial support"
    np.testing.assert_array_equal(w == 0, ref.coef_ == 0)
    np.testing.assert_allclose(w, ref.coef_, rtol=0, atol=1e-6)
    assert abs(b - ref.intercept_) < 1e-6


@pytest.mark.parametrize("n,p,seed", PROBLEMS)
@pytest.mark.parametrize("alpha,l1_ratio", [(0.1, 0.5), (0.3, 0.8), (0.05, 0.2)])
def test_elastic_net_matches_sklearn(n, p, seed, alpha, l1_ratio):
    X, y = make_problem(n, p, seed)
    ref = SkElasticNet(alpha=alpha, l1_ratio=l1_ratio, tol=1e-14, max_iter=1_000_000).fit(X, y)
    w, b = fit_prox_gradient(X, y, reg=paramreg.ElasticNet(l1=alpha * l1_ratio, l2=alpha * (1 - l1_ratio)))
    np.testing.assert_array_equal(w == 0, ref.coef_ == 0)
    np.testing.assert_allclose(w, ref.coef_, rtol=0, atol=1e-6)
    assert abs(b - ref.intercept_) < 1e-6


def test_l2_matches_ridge_closed_form():
    """L2(b) is (b/2)‖w‖²: with the loss (1/(2n))‖y − Xw‖² the optimum solves (XᵀX/n + b·I) w = Xᵀy/n."""
    X, y = make_problem(120, 8, 3)
    X = X - X.mean(0)
    y = y - y.mean()
    b = 0.7
    expected = np.linalg.solve(X.T @ X / len(y) + b * np.eye(X.shape[1]), X.T @ y / len(y))
    w, _ = fit_prox_gradient(X, y, l2=b)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-8)
