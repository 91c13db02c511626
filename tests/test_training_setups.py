"""Training setups beyond the plain loop: clipping, several optimizers, torch.compile, DDP."""

import pathlib
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import paramreg

from conftest import mlp, mlp_batch


def test_gradient_clipping_before_the_step():
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "*.weight", l1=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = model[0].weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    clipped = model[0].weight.grad.clone()
    opt.step()
    assert torch.equal(model[0].weight.detach(), F.softshrink(torch.add(start, clipped, alpha=-0.1), 0.1 * 0.05))


def test_each_parameter_is_regularized_by_the_optimizer_that_steps_it():
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "*.weight", l1=0.5)
    first = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)
    second = torch.optim.SGD([model[2].weight, model[2].bias], lr=0.01)
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    first.step()
    assert torch.equal(model[0].weight.detach(), F.softshrink(torch.add(w0, model[0].weight.grad, alpha=-0.1), 0.05))
    assert torch.equal(model[2].weight, w2)  # not stepped yet, so not regularized yet
    second.step()  # its own learning rate is the step size
    assert torch.equal(model[2].weight.detach(), F.softshrink(torch.add(w2, model[2].weight.grad, alpha=-0.01), 0.005))


def test_torch_compile_forward_has_no_graph_break_and_matches_eager():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    paramreg.attach(model, "*.bias", soft_threshold=0.01)
    x, _ = mlp_batch()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))


def _run_distributed(kind, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name("distributed_job.py")), kind, str(port), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _one_process(kind):
    """The same training in one process on both ranks' batches: the mean loss over 32 examples
    averages the same gradients."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import distributed_job as job

    model = job.build(kind)
    opt = job.optimizer(kind, model.parameters())
    for step in range(job.STEPS):
        (x0, y0), (x1, y1) = job.batch(step, 0), job.batch(step, 1)
        opt.zero_grad()
        F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        opt.step()
    return paramreg.folded(model).state_dict()


@pytest.mark.parametrize("kind", ["ddp", "zero"])
def test_ddp_two_processes_agree_and_match_one_process(kind, tmp_path):
    _run_distributed(kind, tmp_path)
    ranks = [torch.load(tmp_path / f"{kind}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        del r["report.zeros"]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    expected = _one_process(kind)  # ZeroRedundancyOptimizer: the prox once, by the rank that owns the shard
    for key in expected:
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=0, atol=1e-6)
    assert (ranks[0]["0.weight"] == 0).any()


def test_fsdp2_sharded_training_matches_one_process(tmp_path):
    """fully_shard splits every weight by rows over 2 ranks: L1 maps each shard; the group lasso
    over input columns and the nuclear norm need the whole tensor, which DTensor's ops gather."""
    _run_distributed("fsdp", tmp_path)
    got = torch.load(tmp_path / "fsdp-rank0.pt", weights_only=True)
    # the report counts whole tensors, not this rank's shard
    assert got.pop("report.zeros").tolist() == [int((got[f"{i}.weight"] == 0).sum()) for i in (0, 2, 4)]
    expected = _one_process("fsdp")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-6)
    assert (got["0.weight"] == 0).any() and (got["0.weight"] != 0).any()
    columns = got["2.weight"].norm(dim=0)
    assert (columns == 0).any() and (columns != 0).any()
    assert torch.linalg.matrix_rank(got["4.weight"]) < 4
