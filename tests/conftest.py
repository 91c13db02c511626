"""Shared models and helpers for the tests."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["fused", "eager"])
def prox_path(request, monkeypatch):
    """The L1, elastic-net and group-lasso maps in the Adam family's metric through the compiled
    kernels for every tensor of two or more elements ("fused"), or through the eager maps
    ("eager"): Note [Fused map] in optim/fused.py."""
    from paramreg.optim import fused

    if request.param == "fused":
        monkeypatch.setattr(fused, "min_numel", 2)
    else:
        monkeypatch.setattr(fused, "enabled", False)
    return request.param


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class TiedLM(nn.Module):
    """Embedding and output layer share one Parameter."""

    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.emb(tokens))))


def cnn_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def mlp_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def snapshot(model):
    """Everything that must not change when a call fails: classes, keys, values, Parameter ids, repr."""
    return {
        "classes": [type(m) for m in model.modules()],
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "repr": repr(model),
    }


def assert_same_snapshot(before, after):
    assert after["classes"] == before["classes"]
    assert after["params"] == before["params"]
    assert list(after["state"]) == list(before["state"])
    for k in before["state"]:  # bitwise, NaN where NaN was
        torch.testing.assert_close(after["state"][k], before["state"][k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert after["repr"] == before["repr"]


def assert_close_to_scale(got, expected, rtol=1e-5):
    """Equal within ``rtol`` of the largest magnitude of ``expected`` (and 1e-5 near zero): outputs
    computed in another order (fewer or factorized layers, another runtime) differ by float32
    roundings of their own size, not by a fixed absolute amount."""
    expected = torch.as_tensor(expected)
    torch.testing.assert_close(torch.as_tensor(got), expected, rtol=0, atol=rtol * float(expected.abs().max()) + 1e-5)


def start_job(*args) -> subprocess.Popen:
    """``python ARGS...`` in a process group of its own, so that :func:`end_job` reaches every
    process it starts (``mp.spawn`` workers too). The job imports the paramreg this process
    imported: its source folder goes first on the job's PYTHONPATH (a relative PYTHONPATH, or an
    editable install of another checkout, would give it another one)."""
    import paramreg

    source = os.path.dirname(os.path.dirname(os.path.abspath(paramreg.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env=env,
    )


def end_job(job: subprocess.Popen) -> None:
    """Kill whatever is left of ``job``'s process group, and reap the job."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty
    job.communicate()


def run_job(*args, timeout: float = 300) -> str:
    """Run ``python ARGS...`` to its end and return its stdout; on a failure or a timeout, every
    process it started is ended before the test fails (no orphans)."""
    job = start_job(*args)
    try:
        out, err = job.communicate(timeout=timeout)
    finally:
        end_job(job)
    assert job.returncode == 0, err[-3000:]
    return out
