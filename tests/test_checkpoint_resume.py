"""Exact resume: N steps, save, rebuild in a fresh process, M more steps == N + M steps at once (bitwise)."""

import pathlib

import pytest
import torch

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
