"""Exact resume: N steps, save, rebuild in a fresh process, M more steps == N + M steps at once (bitwise)."""

import copy
import pathlib

import pytest
import torch
from torch import nn

import paramreg

from conftest import run_job

JOB = pathlib.Path(__file__).with_name("resume_job.py")


def run(*args):
    run_job(JOB, *args, timeout=300)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path, optimizer):
    n, m = 7, 6
    run("full", optimizer, n, m, tmp_path / "full.pt")
    run("first", optimizer, n, tmp_path / "ckpt.pt")
    run("resume", optimizer, n, m, tmp_path / "ckpt.pt", tmp_path / "resumed.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert list(full) == list(resumed)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert (full["0.weight"] == 0).any(), "the run should have produced exact zeros"


def _dcp_run(make_opt, dcp_first: bool, steps: int = 6):
    """A sparsity target trained ``steps`` steps; with ``dcp_first``, DCP's get_state_dict is called
    on the fresh optimizer first (it steps it once with lr 0 and zero gradients: Note [Null steps])."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    paramreg.attach(model, "*.weight", sparsity=0.5, sparsity_steps=4)
    opt = make_opt(model.parameters())
    if dcp_first:
        get_state_dict(model, opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    calls = [m.parametrizations.weight[0].calls for m in (model[0], model[2])]
    return model, calls


def test_dcp_initialising_an_optimizer_is_not_a_step_for_paramreg():
    sgd = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    plain, calls = _dcp_run(sgd, dcp_first=False)
    initialised, initialised_calls = _dcp_run(sgd, dcp_first=True)
    assert initialised_calls == calls == [6, 6]
    # SGD's buffer holds a zero gradient after DCP's step: the run is the same, bitwise
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), initialised.state_dict().values(), strict=True))
    for make_opt in (lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2)):
        model, calls = _dcp_run(make_opt, dcp_first=True)  # no division by lr = 0
        assert calls == [6, 6]
        weights = [model[0].weight, model[2].weight]
        assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * sum(w.numel() for w in weights))


KINDS = {  # attach calls, each kind of counted state: a target, a schedule, keep_zeros and plain L1
    "target": [("0.weight", {"sparsity": 0.5, "sparsity_steps": 6})],
    "schedule": [("0.weight", {"l1": lambda k: 1e-3 * min(1.0, k / 4)})],
    "group lasso": [("0.weight", {"group_lasso": 1e-2})],
    "keep_zeros": [("0.weight", {"l1": 1e-2}), ("2.weight", {"keep_zeros": True})],
}
OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
}


def _dcp_model(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.view(-1)[::3] = 0.0
    for targets, keywords in KINDS[kind]:
        paramreg.attach(model, targets, **keywords)
    return model


def _dcp_train(model, opt, steps):
    for k in steps:
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process, as meant
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_dcp_round_trip_resumes_bitwise(kind, optimizer, flatten, tmp_path):
    """DCP's resume path (Note [Resume] in optim/state.py): get_state_dict of the trained run, dcp.save;
    a fresh model and optimizer, get_state_dict as the template (its zero-lr step initialises the
    optimizer), dcp.load, set_state_dict; then both runs go on: bitwise equal, with
    flatten_optimizer_state_dict on and off (torchtitan's setting drops unknown group keys)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    full = _dcp_model(kind)
    full_opt = OPTIMIZERS[optimizer](full.parameters())
    _dcp_train(full, full_opt, range(3))
    model_sd, optim_sd = get_state_dict(full, full_opt, options=options)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path), no_dist=True)
    _dcp_train(full, full_opt, range(3, 7))

    resumed = _dcp_model(kind)
    resumed_opt = OPTIMIZERS[optimizer](resumed.parameters())
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt, options=options)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path), no_dist=True)
    set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=options)
    _dcp_train(resumed, resumed_opt, range(3, 7))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [c.calls for c in (full[0].parametrizations.weight[0],)] == [resumed[0].parametrizations.weight[0].calls]


def test_a_checkpoint_of_an_older_paramreg_with_group_keys_resumes_the_same():
    """paramreg before 0.2 kept the counts and the fill in the parameter groups; those still load."""
    full = _dcp_model("target")
    opt = OPTIMIZERS["SGD"](full.parameters())
    _dcp_train(full, opt, range(3))
    state = copy.deepcopy(opt.state_dict())  # load_state_dict would share the buffers with the running optimizer
    old = {"state": {i: {k: v for k, v in e.items() if not k.startswith("paramreg_")} for i, e in state["state"].items()},
           "param_groups": [dict(g) for g in state["param_groups"]]}
    group = old["param_groups"][0]
    group["paramreg_momentum_fill"] = state["state"][0]["paramreg_momentum_fill"]
    group["paramreg_steps"] = [[i, e["paramreg_steps"]] for i, e in state["state"].items() if "paramreg_steps" in e]
    assert group["paramreg_steps"] == [[0, 3]]
    resumed = _dcp_model("target")
    resumed.load_state_dict(full.state_dict())
    resumed_opt = OPTIMIZERS["SGD"](resumed.parameters())
    resumed_opt.load_state_dict(old)
    _dcp_train(full, opt, range(3, 7))
    _dcp_train(resumed, resumed_opt, range(3, 7))
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True))


def _target_run(make_opt, steps, first=0, saved=None, **keywords):
    """An L1 target (ramp from step 2 to 6) on the first layer and a plain l1= on the second,
    ``steps`` steps from ``first``, optionally resumed from ``saved`` (model and optimizer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    paramreg.attach(model, "0.weight", sparsity=0.6, sparsity_steps=(2, 6), l1=True, **keywords)
    paramreg.attach(model, "2.weight", l1=1e-2)
    opt = make_opt(model.parameters())
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    g = torch.Generator().manual_seed(1)
    for k in range(first + steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        if k < first:
            continue
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("regrow", [True, False])
@pytest.mark.parametrize("name", ["SGD", "SGD momentum"])
def test_a_resumed_target_under_sgd_continues_its_ramp_and_fill_bitwise(name, regrow, tmp_path):
    """Plain SGD keeps no state for a parameter: the step counts make an entry (they were left
    out, and a resumed ramp started again at 0); with momentum the loaded fill is read before
    anything takes paramreg's keys out (regrow=False restores the counts before the step, and
    took the fill with them: every carrier of the optimizer then stepped at the settled fill)."""
    make_opt = {"SGD": lambda p: torch.optim.SGD(p, lr=0.1), "SGD momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)}[name]
    full, _ = _target_run(make_opt, 10, regrow=regrow)
    for stop in (1, 3, 5):
        model, opt = _target_run(make_opt, stop, regrow=regrow)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
        saved = torch.load(tmp_path / "c.pt", weights_only=True)
        resumed, _ = _target_run(make_opt, 10 - stop, first=stop, saved=saved, regrow=regrow)
        assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True)), stop


def test_an_optimizer_state_dict_taken_mid_run_does_not_roll_the_counts_back_later():
    """torch's state_dict() shares the live per-parameter dicts, so paramreg's keys land in the
    live state (DCP's flattened form needs them there); when the carriers change later, those
    counts are not read back as if loaded."""
    model, opt = _target_run(lambda p: torch.optim.Adam(p, lr=1e-2), 4)
    saved = opt.state_dict()
    assert sum(paramreg.optim.state.STEPS_KEY in entry for entry in saved["state"].values()) == 2  # the two weights
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for k in range(3):
        if k == 1:
            paramreg.attach(model, "2.bias", l2=1e-2)  # the carriers change: the plan is built again
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert model[0].parametrizations.weight[0].calls == 7
