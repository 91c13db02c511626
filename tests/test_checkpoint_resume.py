"""Exact resume: N steps, save, rebuild in a fresh process, M more steps == N + M steps at once (bitwise)."""

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
