"""Training setups beyond the plain loop: clipping, several optimizers, torch.compile, DDP."""

import pathlib
import socket
import subprocess
import sys

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


def test_ddp_two_processes_agree_and_match_one_process(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import ddp_job

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name("ddp_job.py")), str(port), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # one process on both ranks' batches: the mean loss over 32 examples averages the same gradients
    model = ddp_job.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(ddp_job.STEPS):
        (x0, y0), (x1, y1) = ddp_job.batch(step, 0), ddp_job.batch(step, 1)
        opt.zero_grad()
        F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        opt.step()
    expected = paramreg.folded(model).state_dict()
    for key in expected:
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=0, atol=1e-6)
    assert (ranks[0]["0.weight"] == 0).any()
