"""The fused map (Note [Fused map] in optim/fused.py): where it runs, that it agrees with the eager
map within its stated bound, and that it compiles once per dtype, not per step."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import paramreg
from paramreg.optim import applying, fused, native, step_sizes
from paramreg.catalogue import structured
from paramreg.catalogue.structured import NEWTON_MAX_ITERATIONS
from paramreg.optim.plans import Bucket


def _adam_state(dtype, steps=3, seed=0, **adam):
    """A two-layer model after ``steps`` Adam steps (no regularizer), its gradients kept: dead
    inputs give the first layer coordinates with v = 0, where the floor binds."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 7)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 300, generator=g, dtype=dtype), torch.randint(0, 7, (32,), generator=g)
    x[:, :20] = 0.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **adam)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _map(path, monkeypatch, regularizer, weights, opt, floor):
    """The bucket's map over copies of ``weights`` through ``path``; the copies, mapped."""
    monkeypatch.setattr(fused, "enabled", path == "fused")
    monkeypatch.setattr(fused, "min_numel", 2)
    originals = [w.detach().clone() for w in weights]
    bucket = Bucket(regularizer, "adaptive", metric_floor=floor)
    with torch.no_grad():
        applying._apply(bucket, weights, 1e-3, opt, opt.param_groups[0], None)
        mapped = [w.detach().clone() for w in weights]
        for w, o in zip(weights, originals, strict=True):
            w.copy_(o)
    return mapped


def _exact_floor_error(opt, weights, floor):
    """Per weight: how far the eager floor (float32 ``_foreach_norm``) is from the floor in
    float64, relative (0 without a floor)."""
    if not floor:
        return [0.0] * len(weights)
    group = opt.param_groups[0]
    states = [opt.state[w] for w in weights]
    eager = step_sizes.floors(opt, group, weights, states, floor)
    cls = step_sizes.resolve(opt)
    exact = [math.sqrt(math.fsum(x * x for x in w.grad.double().flatten().tolist())) * step_sizes.floor_factor(cls, group, w.numel(), s, floor)
             for w, s in zip(weights, states, strict=True)]
    return [abs(float(e) - x) / x for e, x in zip(eager, exact, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("regularizer", [paramreg.L1(3e-3), paramreg.ElasticNet(l1=3e-3, l2=0.5)], ids=repr)
@pytest.mark.parametrize("floor", [1.0, 0.0])
def test_fused_and_eager_maps_agree(dtype, regularizer, floor, monkeypatch):
    """Within 4 ulp of abs(w) with the plain metric (measured: 1.8); with the floor, within 8 ulp
    plus twice abs(w) times the eager floor's relative error, measured here against a correctly
    rounded sum (Note [Fused map]); zeros differ only within that band around the threshold."""
    model, opt = _adam_state(dtype)
    weights = [model[0].weight, model[2].weight]
    before = [w.detach().clone() for w in weights]
    got = _map("fused", monkeypatch, regularizer, weights, opt, floor)
    want = _map("eager", monkeypatch, regularizer, weights, opt, floor)
    eps = torch.finfo(dtype).eps
    for w, g, e, rho in zip(before, got, want, _exact_floor_error(opt, weights, floor), strict=True):
        bound = w.abs() * (8 * eps + 2 * rho if floor else 4 * eps)
        assert bool(((g - e).abs() <= bound).all()), float(((g - e).abs() / w.abs()).max())
        assert 0 < int((e == 0).sum()) < e.numel()
        differ = (g == 0) != (e == 0)
        assert bool((e[differ].abs() <= bound[differ]).all() and (g[differ].abs() <= bound[differ]).all())
    assert fused.compile_seconds.get(("l1", dtype, "cpu")) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("regularizer", [paramreg.GroupLasso(1.9), paramreg.GroupLasso(0.11, weighted=True)], ids=repr)
@pytest.mark.parametrize("floor", [1.0, 0.0])
def test_fused_and_eager_group_lasso_agree_to_the_solver_tolerance(dtype, regularizer, floor, monkeypatch):
    """Both solve each group's norm to NEWTON_RTOL (relative 1e-6 in float32, 1e-12 in float64)
    and map with it: they agree within 4x that relative to abs(w), and zero the same rows."""
    model, opt = _adam_state(dtype)
    weights = [model[0].weight, model[2].weight]
    before = [w.detach().clone() for w in weights]
    got = _map("fused", monkeypatch, regularizer, weights, opt, floor)
    want = _map("eager", monkeypatch, regularizer, weights, opt, floor)
    rtol = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    zeroed = 0
    for w, g, e in zip(before, got, want, strict=True):
        assert bool(((g - e).abs() <= 4 * rtol * w.abs()).all()), float(((g - e).abs() / w.abs()).max())
        assert torch.equal(g.abs().sum(1) == 0, e.abs().sum(1) == 0)
        zeroed += int((e.abs().sum(1) == 0).sum())
    assert 0 < zeroed < sum(w.shape[0] for w in weights)
    assert fused.compile_seconds.get(("group_first", dtype, "cpu")) is not None


def test_further_group_lasso_evaluations_run_on_the_rows_left_unproven_only(monkeypatch):
    """After the first evaluation, which maps the rows it proves, each further one takes only the
    rows still unproven; a row that never proves (NaN) is mapped with the last iterate, as the
    eager solve maps it: NaN in both paths, every other row within the solver's tolerance."""
    model, opt = _adam_state(torch.float32)
    weights = [model[0].weight]
    with torch.no_grad():
        model[0].weight[5, 3] = float("nan")
    before = weights[0].detach().clone()
    rows = []
    original = fused._call

    def counting(name, w, *rest):
        if name == "group_next":
            rows.append(w.shape[0])
        return original(name, w, *rest)

    monkeypatch.setattr(fused, "_call", counting)
    got = _map("fused", monkeypatch, paramreg.GroupLasso(1.9), weights, opt, 1.0)[0]
    want = _map("eager", monkeypatch, paramreg.GroupLasso(1.9), weights, opt, 1.0)[0]
    assert len(rows) == NEWTON_MAX_ITERATIONS - 1 and rows[0] < before.shape[0] and rows[-1] == 2  # at last the NaN row, twice
    assert rows == sorted(rows, reverse=True)  # each evaluation on rows of the last
    assert bool(got[5].isnan().all()) and bool(want[5].isnan().all())
    rest = torch.ones(before.shape[0], dtype=torch.bool)
    rest[5] = False
    assert bool(((got[rest] - want[rest]).abs() <= 4e-6 * before[rest].abs()).all())
    assert torch.equal(got[rest].abs().sum(1) == 0, want[rest].abs().sum(1) == 0)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-20), (torch.float64, 1e-160)], ids=str)
def test_groups_whose_squared_norm_underflows_are_solved_to_the_tolerance(dtype, scale):
    """‖w_g‖² below the dtype's tiny: the start lies right of the root (Note [Group lasso in a
    diagonal metric, fast]), and a Newton point that does not rise from there is no stop; both
    solves agree within 4·rtol of abs(w) with the reference solve of the same problem scaled to
    norms near 1, in float64 (the prox is equivariant: scale·prox of w/scale with threshold 1).
    Before the stop asked for a left point, both were 3.5e-4 off."""
    w = torch.tensor([[1.0, 3.0, 0.5], [2.0, -1.0, 0.25], [0.1, 0.1, 0.1]], dtype=dtype) * scale
    u = 1 / torch.tensor([[0.02, 1.0, 0.2], [0.5, 0.05, 1.0], [1.0, 1.0, 1.0]], dtype=dtype)
    rtol = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    want = structured._group_shrink_diag(w.double() / scale, 1 / u.double(), "out", 1.0) * scale
    eager = w.clone()
    structured.group_shrink_diag_(eager, u.clone(), "out", scale)
    fast = w.clone()
    c = torch.tensor([1.0, 0.0, scale, rtol, torch.finfo(dtype).tiny], dtype=dtype)
    assert fused._group_lasso_(fast, u * u, torch.zeros((), dtype=dtype), c)
    for got in (eager, fast):
        assert bool(((got.double() - want).abs() <= 4 * rtol * w.double().abs()).all()), got
        assert torch.equal(got.abs().sum(1) == 0, want.abs().sum(1) == 0)
    assert bool((want[2] == 0).all()) and bool((want[:2] != 0).all())


def _eager_scores(opt, weights, floor):
    """Per weight, u·w² in the eager arithmetic (u: the inverse steps of Note [Safeguarded metric])."""
    group = opt.param_groups[0]
    states = [opt.state[w] for w in weights]
    floors = step_sizes.floors(opt, group, weights, states, floor)
    inverse = step_sizes.inverse_steps(opt, group, states, 1e-3, None, floors)
    return [u * (w.detach() * w.detach()) for w, u in zip(weights, inverse, strict=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("floor", [1.0, 0.0])
def test_fused_and_eager_l0_maps_agree(dtype, floor, monkeypatch):
    """L0 keeps or zeroes each weight: the two maps differ only where the score u·w² lies within
    8 ulp plus four times the eager floor's relative error of the threshold 2a (the compiled sqrt
    is correctly rounded, the eager one within 1 ulp: Note [Fused map]); every other weight is
    the same, bitwise."""
    model, opt = _adam_state(dtype)
    weights = [model[0].weight, model[2].weight]
    scores = _eager_scores(opt, weights, floor)
    a = float(torch.cat([s.reshape(-1) for s in scores]).median()) / 2  # half the weights zero
    got = _map("fused", monkeypatch, paramreg.L0(a), weights, opt, floor)
    want = _map("eager", monkeypatch, paramreg.L0(a), weights, opt, floor)
    eps = torch.finfo(dtype).eps
    for w, g, e, s, rho in zip(weights, got, want, scores, _exact_floor_error(opt, weights, floor), strict=True):
        differ = (g != e)
        assert torch.equal(g[~differ], e[~differ]) and torch.equal(e[e != 0], w.detach()[e != 0])
        assert bool(((s[differ] - 2 * a).abs() <= (8 * eps + 4 * rho) * 2 * a).all())
        assert 0 < int((e == 0).sum()) < e.numel()
    assert fused.compile_seconds.get(("l0", dtype, "cpu")) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("regularizer", [paramreg.L1(1.0), paramreg.L0(1.0)], ids=repr)
@pytest.mark.parametrize("floor", [1.0, 0.0])
def test_fused_critical_strengths_are_the_eager_ones_to_a_few_ulp(dtype, regularizer, floor, monkeypatch):
    """A target's critical strengths through the compiled kernel, in blocks (here of 7,000 over
    120,000 and 2,800 weights: equal blocks, the last shorter), against ``critical`` on the eager
    inverse steps with the same floors: within 4 ulp (the sqrt's 1 ulp, carried through two
    products), every block in order."""
    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(fused, "CRITICAL_BLOCK", 7000)
    model, opt = _adam_state(dtype)
    weights = [model[0].weight, model[2].weight]
    group = opt.param_groups[0]
    states = [opt.state[w] for w in weights]
    floors = step_sizes.floors(opt, group, weights, states, floor)
    inverse = step_sizes.inverse_steps(opt, group, states, 1e-3, None, floors)
    want = regularizer.critical([w.detach() for w in weights], inverse)
    for i, (w, state) in enumerate(zip(weights, states, strict=True)):
        blocks = fused.critical_blocks(opt, group, regularizer, w, state, 1e-3, None if floors is None else floors[i])
        sizes, got = [], []
        for block in blocks:
            sizes.append(block.numel())
            got.append(block.clone())
        assert len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0] and sum(sizes) == w.numel()
        got = torch.cat(got).view_as(w)
        assert bool(((got - want[i]).abs() <= 4 * torch.finfo(dtype).eps * want[i]).all())
    assert fused.critical_blocks(torch.optim.SGD(model.parameters(), lr=0.1), group, regularizer, weights[0], states[0], 1e-3, None) is None
    assert fused.critical_blocks(opt, group, paramreg.GroupLasso(1.0), weights[0], states[0], 1e-3, None) is None


def _count_calls(monkeypatch, every=False):
    """The sizes of the tensors the L1 and group-lasso kernels map (``every``: of every kernel's call)."""
    calls = []
    original = fused._call

    def counting(name, w, *rest):
        if every or name in ("l1", "group_first"):
            calls.append(w.numel())
        return original(name, w, *rest)

    monkeypatch.setattr(fused, "_call", counting)
    return calls


def _train(model, opt, steps, sched=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, model[0].in_features, generator=g)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_the_rule_large_tensors_of_adam_family_optimizers_take_the_fused_map(monkeypatch):
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(fused, "min_numel", 1000)
    model = nn.Sequential(nn.Linear(40, 50), nn.Linear(50, 10))  # 2,000 and 500 weights
    paramreg.attach(model, "*.weight", l1=1e-3)
    for make in (lambda p: torch.optim.Adam(p, lr=1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3), lambda p: torch.optim.NAdam(p),
                 lambda p: torch.optim.Adam(p, amsgrad=True)):
        calls.clear()
        _train(model, make(model.parameters()), 2)
        assert calls == [2000, 2000]  # the small tensor took the eager map
    for make in (lambda p: torch.optim.RMSprop(p), lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.Adam(p, eps=0.0)):
        calls.clear()
        _train(model, make(model.parameters()), 2)
        assert calls == []
    monkeypatch.setattr(fused, "enabled", False)
    _train(model, torch.optim.Adam(model.parameters()), 2)
    assert calls == []
    paramreg.remove(model)
    monkeypatch.setattr(fused, "enabled", True)
    paramreg.attach(model, "*.weight", group_lasso=1e-3)  # rows: fused, and fewer than FEW_SMALL small tensors too
    _train(model, torch.optim.Adam(model.parameters()), 2)
    assert calls == [2000, 500, 2000, 500]
    calls.clear()
    small = nn.Sequential(nn.Linear(40, 10), *(nn.Linear(10, 10) for _ in range(fused.FEW_SMALL - 1)))  # as many small: eager
    paramreg.attach(small, "*.weight", group_lasso=1e-3)
    _train(small, torch.optim.Adam(small.parameters()), 1)
    assert calls == []
    for keywords in ({"reg": paramreg.GroupLasso(1e-3, groups="in")}, {"l2": 1e-3}, {"reg": paramreg.SparseGroupLasso(l1=1e-3, group=1e-3)}):
        paramreg.remove(model)
        paramreg.attach(model, "*.weight", **keywords)  # maps the kernels do not compute
        _train(model, torch.optim.Adam(model.parameters()), 2)
        assert calls == [], keywords


def test_no_step_recompiles(monkeypatch):
    """One graph per dtype and device: new sizes, learning rates (a schedule), step counts and
    strengths reuse it."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fused, "min_numel", 2)
    model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10), nn.Linear(10, 3))
    paramreg.attach(model, "*.weight", l1=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    _train(model, opt, 1, sched)  # compiles, unless an earlier test in this process did
    graphs = counters["stats"]["unique_graphs"]
    _train(model, opt, 5, sched)
    paramreg.set_strength(model, "*.weight", 2e-3)
    _train(model, opt, 3, sched)
    wider = nn.Sequential(nn.Linear(31, 17))
    paramreg.attach(wider, "*.weight", l1=1e-3)
    _train(wider, torch.optim.AdamW(wider.parameters()), 3)
    assert counters["stats"]["unique_graphs"] == graphs
    assert isinstance(fused.compile_seconds[("l1", torch.float32, "cpu")], float)


class _Mixed(nn.Module):
    """Weights of 4, 2 and 1 dims, square and not, the first larger than the second and smaller
    than the third (so the critical strengths' buffer grows in the first step)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)  # 432 weights
        self.square = nn.Linear(16, 16)  # 256
        self.wide = nn.Linear(16, 40)  # 640
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 40))  # 40, one dim

    def forward(self, x):
        return self.wide(self.square(self.conv(x).mean((2, 3))).relu()) * self.scale


def _train_mixed(model, opt, steps):
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("keywords", [{"sparsity": 0.5, "sparsity_steps": 8}, {"sparsity": 0.5, "sparsity_steps": 8, "lookahead": 0},
                                      {"sparsity": 0.5, "sparsity_steps": 8, "lookahead": 2},
                                      {"sparsity": 0.5, "sparsity_steps": 8, "l1": True},
                                      {"l1": 1e-3}, {"l0": 1e-6}, {"group_lasso": 1e-3}], ids=repr)
def test_no_step_recompiles_over_weights_of_every_shape(keywords, monkeypatch):
    """Weights of 1, 2 and 4 dims, square and not, through every kernel: the first two steps
    compile what they need, no later step compiles anything (the kernels take flat aliases, not views whose
    bases Dynamo would guard on)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(fused, "CRITICAL_BLOCK", 300)  # blocks of 216, 256 and 320: a block per size
    model = _Mixed()
    selected = "*.weight" if "group_lasso" in keywords else ["conv.weight", "square.weight", "wide.weight", "scale"]
    paramreg.attach(model, selected, **keywords)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    calls = _count_calls(monkeypatch, every=True)
    _train_mixed(model, opt, 2)  # a target holds its zeros from its second step on (Note [Held zeros, fused])
    graphs = counters["stats"]["unique_graphs"]
    _train_mixed(model, opt, 5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(calls) >= 7 * (3 if "group_lasso" in keywords else 4)  # every tensor took a fused kernel in every step


def test_a_kernel_that_cannot_compile_warns_once_and_the_eager_map_runs(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(fused, "compile_seconds", {})
    monkeypatch.setattr(fused, "_compiled", {("l1", torch.float32, "cpu"): broken})
    model, reference = nn.Sequential(nn.Linear(6, 5)), nn.Sequential(nn.Linear(6, 5))
    reference.load_state_dict(model.state_dict())
    paramreg.attach(model, "0.weight", l1=1e-2)
    paramreg.attach(reference, "0.weight", l1=1e-2)
    with pytest.warns(UserWarning, match="could not be compiled for torch.float32 on cpu .*no compiler here"):
        _train(model, torch.optim.Adam(model.parameters(), lr=1e-2), 1)
    assert fused.compile_seconds == {("l1", torch.float32, "cpu"): None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next steps take the eager map silently
        _train(model, torch.optim.Adam(model.parameters(), lr=1e-2), 2)
    monkeypatch.setattr(fused, "enabled", False)
    _train(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), 1)
    _train(reference, torch.optim.Adam(reference.parameters(), lr=1e-2), 2)
    assert torch.equal(model[0].weight, reference[0].weight)


def test_a_tiny_lasso_under_adam_is_the_same_through_both_paths_to_float64_precision(monkeypatch):
    """End to end, float64: 300 steps of Adam with the default prox, fused and eager."""
    results = {}
    for path in ("fused", "eager"):
        monkeypatch.setattr(fused, "enabled", path == "fused")
        monkeypatch.setattr(fused, "min_numel", 2)
        torch.manual_seed(0)
        model = nn.Linear(30, 1).double()
        paramreg.attach(model, "weight", l1=0.05)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)
        X, y = torch.randn(100, 30, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
        for _ in range(300):
            opt.zero_grad()
            ((model(X).squeeze(1) - y) ** 2).mean().backward()
            opt.step()
        results[path] = model.weight.detach().clone()
    torch.testing.assert_close(results["fused"], results["eager"], rtol=1e-12, atol=1e-14)
    assert torch.equal(results["fused"] == 0, results["eager"] == 0)
    assert math.isfinite(fused.compile_seconds[("l1", torch.float64, "cpu")])


@pytest.mark.parametrize("form", [{"l1": True}, {}], ids=["l1", "l0"])
def test_a_target_through_the_fused_map_zeroes_exactly_what_the_eager_map_zeroes(form, monkeypatch):
    """Note [Fused map], last paragraph: an L1 target over two 1024x1024 weights under AdamW. With
    the floors the target took passed to the compiled map, every step has at least the asked
    zeros and exactly the eager map's count (the floor recomputed by the compiled reduction left
    up to 7 of them nonzero)."""
    from paramreg.optim.targets import ramp

    def counts(enabled):
        monkeypatch.setattr(fused, "enabled", enabled)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                              nn.ReLU(), nn.Linear(1024, 10))
        paramreg.attach(model, ["2.weight", "4.weight"], sparsity=0.9, sparsity_steps=6, **form)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
        out = []
        for k in range(1, 8):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            zeros = int((model[2].weight == 0).sum() + (model[4].weight == 0).sum())
            out.append(zeros - round(ramp(0.9, 6, k) * 2 * 1024 * 1024))
        return out

    eager = counts(False)
    names = _kernel_names(monkeypatch)
    through_fused = counts(True)
    kind = "l1" if form else "l0_extended"  # the default L0 target scores extended points (Note [Extrapolated paths])
    assert kind in names  # the fused map ran (this test's own calls: the compiled kernels are shared by the suite)
    assert f"{kind}_critical" in names  # and the critical strengths
    assert min(through_fused) >= 0 and through_fused == eager


def _target_run(monkeypatch, enabled, form, allocation, broken_after=None, before_step=None, groups=False):
    """Per step, the weights of a small CNN under an AdamW target (fused maps ``enabled`` or not);
    ``broken_after``: from that step on, every compiled kernel raises (a shape past Dynamo's
    recompile limit), so that each later call runs its formula eagerly; ``before_step(k, model)``
    is called before step k's update; ``groups``: the convolutions in a parameter group of their
    own, at another lr."""
    monkeypatch.setattr(fused, "enabled", enabled)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    paramreg.attach(model, "*.weight", sparsity=0.9, sparsity_steps=5, allocation=allocation, **form)
    params = ([{"params": [*model[0].parameters(), *model[2].parameters()], "lr": 3e-3},
               {"params": [*model[5].parameters(), *model[7].parameters()]}] if groups else model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, amsgrad=allocation == "uniform")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    out = []
    for k in range(6):
        if k == broken_after:
            def broken(*args):
                raise RuntimeError("recompile limit")
            for key in list(fused._compiled):
                monkeypatch.setitem(fused._compiled, key, broken)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if before_step is not None:
            before_step(k, model)
        opt.step()
        out.append([p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")])
    return out


def _kernel_names(monkeypatch) -> list[str]:
    """The names of the compiled kernels called from now on; a native selection's pass (Note
    [Native selection] in optim/native.py) as "native" and its points' kind ("native_extended")."""
    names = []
    original, native_select = fused._call, native.select

    def recording(name, *args):
        names.append(name)
        return original(name, *args)

    def recording_native(kind, *args, **kwargs):
        names.append(f"native{kind}")
        return native_select(kind, *args, **kwargs)

    monkeypatch.setattr(fused, "_call", recording)
    monkeypatch.setattr(native, "select", recording_native)
    return names


@pytest.fixture(params=["native pass", "kernel pass"])
def one_pass(request, monkeypatch):
    """The one pass of Note [Selection that zeroes] in optim/applying.py by the native selection
    (Note [Native selection] in optim/native.py) or by the compiled kernel with numpy's search."""
    native_pass = request.param == "native pass"
    if native_pass:
        assert native.available(), (native.enabled, native._library, native.build_flags)  # built on this machine: the test runs the native pass, not a fallback
    monkeypatch.setattr(native, "enabled", native_pass)
    return native_pass


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("form", [{"lookahead": 2}, {"lookahead": 0}, {}, {"l1": True}], ids=["l0 ahead", "l0", "l0 extended", "l1"])
@pytest.mark.parametrize("selection", ["gathered", "sampled", "passes"])
def test_a_target_zeroes_the_same_weights_through_the_fused_and_the_eager_path(form, allocation, selection, one_pass, monkeypatch):
    """The compiled critical strengths in several blocks per tensor (blocks of 300 over 432 to
    2,304 weights), through every selection (one gathered partition; a drawn bracket, whose one
    pass also finds what a global L0 target's map zeroes, Note [Selection that zeroes] in
    optim/applying.py; the histogram passes with their bracket counts) and both allocations:
    every step's zero set is the eager path's, exactly (they differ only in the sqrt's last bit,
    far inside 2^-18)."""
    from paramreg.optim import targets

    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(fused, "CRITICAL_BLOCK", 300)
    if selection != "gathered":
        monkeypatch.setattr(targets, "GATHERED", 0)
    if selection == "passes":
        monkeypatch.setattr(targets, "SAMPLE", 0)
    calls = _count_calls(monkeypatch, every=True)
    names = _kernel_names(monkeypatch)
    through_fused = _target_run(monkeypatch, True, form, allocation)
    # the one pass that selects and finds the zeros runs where it should: over every block (the
    # native pass: every tensor) at every step of the ramp (5); the step after it counts the zero
    # weights instead (Note [Sampled bracket])
    passing = selection == "sampled" and allocation == "global" and "l1" not in form
    pieces = len(through_fused[0]) if one_pass else sum(-(-w.numel() // 300) for w in through_fused[0])
    assert sum(name.endswith("_select") for name in names) == (0 if one_pass or not passing else 5 * pieces)
    assert sum(name.startswith("native") for name in names) == (5 * pieces if one_pass and passing else 0)
    if not (one_pass and passing):  # there the native kernels do all of it, counted above
        assert len(calls) > 6 * 4  # compiled kernels beyond the held zeros' (6 steps, 4 weights)
    if passing:  # and its map, every step: no map's pass
        assert not {"l0", "l0_ahead", "l0_extended"} & set(names)
    eager = _target_run(monkeypatch, False, form, allocation)
    for step_fused, step_eager in zip(through_fused, eager, strict=True):
        assert all(torch.equal(a == 0, b == 0) for a, b in zip(step_fused, step_eager, strict=True))
    assert sum(int((w == 0).sum()) for w in eager[-1]) >= 0.9 * sum(w.numel() for w in eager[-1])


@pytest.mark.parametrize("case", ["answer below the bracket", "answer above it", "strength past its top",
                                  "signed zeros and denormals", "more to keep than GUESSED", "two parameter groups"])
@pytest.mark.parametrize("form", [{"lookahead": 2}, {}, {"regrow": True}], ids=["l0 ahead", "l0 extended", "l0 regrowing"])
def test_the_one_pass_selection_zeroes_what_the_map_zeroes_or_falls_back(form, case, one_pass, monkeypatch):
    """Note [Selection that zeroes] in optim/applying.py: a drawn bracket that misses the m-th
    value below or above (the guessed pass and the histogram passes then resolve it), a strength
    raised past the bracket's top (``BOUNDARY`` of 1/2, in both runs: the map runs as a pass),
    weights at −0.0 (held at −0.0 by their zeroed gradient and momentum; the map writes +0.0 over
    them) and at ±1e-41 (denormal), more new zeros and bracketed scores than it may keep
    (``GUESSED`` of 20, in both runs: the passes and the map's pass run), and a target over two
    parameter groups at different lr: every step's weights are the eager path's, bit for bit,
    signs of zeros included."""
    from paramreg.optim import applying, order_statistic, targets

    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(fused, "CRITICAL_BLOCK", 300)
    monkeypatch.setattr(targets, "GATHERED", 0)
    drawn_bracket = targets._bracket
    normal = float(torch.finfo(torch.float32).tiny)

    def missing(drawn, m, total, held=None):
        found = drawn_bracket(drawn, m, total, held)
        if found is None or not math.isfinite(found[1]):
            return found
        lo, hi = found
        return (hi, 2 * hi) if case == "answer below the bracket" else (max(lo / 4, normal), max(lo / 2, 2 * normal))

    if case.startswith("answer"):
        monkeypatch.setattr(targets, "_bracket", missing)
    if case == "strength past its top":
        monkeypatch.setattr(applying, "BOUNDARY", 0.5)
    if case == "more to keep than GUESSED":
        monkeypatch.setattr(order_statistic, "GUESSED", 20)

    def negative_zeros(k, model):
        if case == "signed zeros and denormals" and k == 3:
            with torch.no_grad():
                model[0].weight.view(-1)[::7] = -0.0
                model[0].weight.view(-1)[3::7] = 1e-41
                model[0].weight.view(-1)[5::7] = -1e-41

    names = _kernel_names(monkeypatch)
    joined = []  # the sizes of what the one pass gathers per tensor (its scores, kept indices)
    concatenate = applying.numpy.concatenate
    monkeypatch.setattr(applying.numpy, "concatenate", lambda arrays, *a, **k: joined.append(sum(map(len, arrays))) or concatenate(arrays, *a, **k))
    groups = case == "two parameter groups"
    through_fused = _target_run(monkeypatch, True, form, "global", before_step=negative_zeros, groups=groups)
    monkeypatch.setattr(applying.numpy, "concatenate", concatenate)
    if case == "more to keep than GUESSED":  # at most GUESSED new zeros and GUESSED scores, kept or not
        assert joined and max(joined) <= 2 * 20, joined
    assert any(name.startswith("native") if one_pass else name.endswith("_select") for name in names)  # the one pass ran, then
    if case.startswith("answer"):
        assert any(name.endswith("_critical") for name in names)  # the passes over the critical strengths
    if case in ("strength past its top", "more to keep than GUESSED"):
        assert any(name in ("l0", "l0_ahead", "l0_extended") for name in names)  # the map as a pass
    if case == "more to keep than GUESSED":
        assert any(name.endswith("_critical") for name in names)  # after the passes over the critical strengths
    eager = _target_run(monkeypatch, False, form, "global", before_step=negative_zeros, groups=groups)
    for step_fused, step_eager in zip(through_fused, eager, strict=True):
        for a, b in zip(step_fused, step_eager, strict=True):
            assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())
    if case == "signed zeros and denormals" and "regrow" not in form:  # held at -0.0 until the map
        tampered = eager[3][0].view(-1)[::7]  # after the step that began with them at -0.0
        assert (tampered == 0).all() and not tampered.signbit().any()


@pytest.mark.parametrize("form", [{"lookahead": 2}, {"lookahead": 0}, {}], ids=["l0 ahead", "l0", "l0 extended"])
def test_a_later_call_that_cannot_compile_runs_the_formula_eagerly(form, one_pass, monkeypatch):
    """A call past the first that Dynamo refuses (a new shape past its recompile limit) runs the
    kernel's formula eagerly, with one warning per kernel (the map, the critical strengths and
    the held zeros; with the native kernels the held zeros take theirs, Note [Native hold] in
    optim/native.py), and the target zeroes what the eager path zeroes."""
    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(fused, "CRITICAL_BLOCK", 300)
    monkeypatch.setattr(fused, "_eager_calls", set())
    with pytest.warns(UserWarning, match="could not be compiled for a new shape .*recompile limit") as caught:
        broken = _target_run(monkeypatch, True, form, "global", broken_after=2)
    kernels = 2 if one_pass else 3
    assert len({str(w.message).split(" for ")[0] for w in caught if "new shape" in str(w.message)}) == len(fused._eager_calls) == kernels
    eager = _target_run(monkeypatch, False, form, "global")
    for step_broken, step_eager in zip(broken, eager, strict=True):
        assert all(torch.equal(a == 0, b == 0) for a, b in zip(step_broken, step_eager, strict=True))


@pytest.mark.parametrize("regularizer", [paramreg.L1(3e-3), paramreg.L0(1e-9), paramreg.GroupLasso(1e-3)], ids=repr)
def test_the_fused_map_advances_the_weights_version_counter(regularizer, monkeypatch):
    """The kernels write through an alias of the weight's storage (``_flat``), which has a version
    counter of its own: the weight's is advanced, so autograd still sees the in-place change."""
    monkeypatch.setattr(fused, "min_numel", 2)
    model, opt = _adam_state(torch.float32)
    w = model[0].weight
    version = w._version
    with torch.no_grad():
        assert fused.map_(opt, opt.param_groups[0], regularizer, [w], [opt.state[w]], 1e-3, 1.0) == []
    assert w._version > version


def _held_run(name, dtype, steps=14):
    """The one-call recipe (``total_steps=12``: ramp from step 3 to 9, then the zeros kept; its
    zeros do not regrow) under optimizer ``name``: the model and the optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).to(dtype)
    paramreg.attach(model, "*.weight", sparsity=0.7, total_steps=12)
    make = {"Adam": lambda p: torch.optim.Adam(p, lr=1e-2), "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
            "SGD": lambda p: torch.optim.SGD(p, lr=0.1), "SGD momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            "RMSprop momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9)}
    opt = make[name](model.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(64, 8, generator=g, dtype=dtype), torch.randint(0, 3, (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


HOLDS = [(torch.float32, "native"), (torch.float32, "compiled"), (torch.float64, "compiled")]  # native: float32 only


@pytest.mark.parametrize("dtype, by", HOLDS, ids=lambda x: str(x))
@pytest.mark.parametrize("name", ["Adam", "NAdam", "SGD", "SGD momentum", "RMSprop momentum"])
def test_the_fused_hold_keeps_the_zeros_as_the_masked_writes_do_bit_for_bit(name, dtype, by, monkeypatch):
    """Note [Held zeros, fused]: a run whose zeros are held by the compiled pass (in float32 also
    the native one, Note [Native hold] in optim/native.py) equals, weights and optimizer state
    bit for bit, the run whose zeros are held by the masked writes."""
    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(native, "enabled", by == "native")
    natives = []
    native_hold = native.hold
    monkeypatch.setattr(native, "hold", lambda *args: natives.append(native_hold(*args)) or natives[-1])
    with monkeypatch.context() as m:
        m.setattr(fused, "hold_", lambda p, momentum: False)
        reference, reference_opt = _held_run(name, dtype)
    taken = []
    original = fused.hold_
    monkeypatch.setattr(fused, "hold_", lambda p, momentum: taken.append(original(p, momentum)) or taken[-1])
    held, held_opt = _held_run(name, dtype)
    assert taken and all(taken)  # every held tensor took the compiled pass (or the native one)
    kernel = "hold" if name == "SGD" else "hold_momentum"
    if by == "native":
        assert len(natives) == len(taken) and all(natives)
    else:
        assert not any(natives) and fused.compile_seconds.get((kernel, dtype, "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), held.state_dict().values(), strict=True))
    states = [[t for s in o.state.values() for t in s.values() if torch.is_tensor(t)] for o in (reference_opt, held_opt)]
    assert len(states[0]) == len(states[1]) and all(torch.equal(a, b) for a, b in zip(*states, strict=True))
    zeros = sum(int((w == 0).sum()) for w in (held[0].weight, held[2].weight))
    assert zeros == round(0.7 * (held[0].weight.numel() + held[2].weight.numel()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_compiled_zero_count_counts_what_count_nonzero_leaves_out(dtype, monkeypatch):
    """``fused.zero_count`` (what a selection answered by its held zeros reads, Note [Sampled
    bracket] in optim/targets.py) counts +0.0 and -0.0, not denormals, NaN or infinities, by its
    compiled kernel, and the same where the kernels are off."""
    monkeypatch.setattr(fused, "min_numel", 2)
    tiny = torch.finfo(dtype).tiny
    w = nn.Parameter(torch.tensor([0.0, -0.0, tiny / 4, math.nan, math.inf, -math.inf, 0.0, 1.0, -tiny], dtype=dtype))
    assert fused.zero_count(w) == 3
    assert fused.compile_seconds.get(("zero_count", dtype, "cpu"))
    monkeypatch.setattr(fused, "enabled", False)
    assert fused.zero_count(w) == 3


@pytest.mark.parametrize("dtype, by", HOLDS, ids=lambda x: str(x))
def test_the_fused_hold_writes_what_masked_fill_writes_at_signed_zeros_infinities_and_nans(dtype, by, monkeypatch):
    """Where the weight is 0 or -0.0 the gradient and the momentum become +0.0, whatever they held
    (inf, NaN, -0.0); elsewhere (a NaN weight too) they keep every bit; both version counters
    advance (the compiled pass, and in float32 the native one)."""
    monkeypatch.setattr(fused, "min_numel", 2)
    monkeypatch.setattr(native, "enabled", by == "native")
    inf, nan = math.inf, math.nan
    w = nn.Parameter(torch.tensor([0.0, -0.0, 1.0, 0.0, 2.0, 0.0, nan, -1.0], dtype=dtype))
    w.grad = torch.tensor([inf, nan, nan, -3.0, inf, -0.0, 5.0, -0.0], dtype=dtype)
    m = torch.tensor([nan, 1.0, 2.0, -inf, -0.0, 4.0, 6.0, -0.0], dtype=dtype)
    zero = w.detach() == 0
    expected = [t.masked_fill(zero, 0) for t in (w.grad, m)]
    versions = (w.grad._version, m._version)
    assert fused.hold_(w, m)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert all(torch.equal(a.view(bits), b.view(bits)) for a, b in zip((w.grad, m), expected, strict=True))
    assert w.grad._version > versions[0] and m._version > versions[1]
    grad = w.grad.clone()
    assert fused.hold_(w, None) and torch.equal(w.grad.view(bits), grad.view(bits))  # the gradient alone: the same
