"""paramreg keeps nothing alive, adds one global post-step hook (and one pre-step hook), and is safe with optimizers in two threads."""

import gc
import threading
import weakref

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

import paramreg
from paramreg.modules import carrier
from paramreg.optim import penalty as optim_penalty
from paramreg.optim import state as optim_state


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def one_run(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    paramreg.attach(model, "*.weight", l1=1e-3)
    paramreg.attach(model, "*.bias", l2=1e-3, mode="penalty")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 16)
    loss = model(x).pow(2).mean() + paramreg.penalty(model)
    loss.backward()
    opt.step()
    paramreg.report(model)
    return weakref.ref(model), weakref.ref(model[0]), weakref.ref(model[0].weight), weakref.ref(opt)


def test_attaching_to_and_dropping_a_thousand_models_leaks_nothing():
    for seed in range(50):  # warm up allocator and caches
        one_run(seed)
    gc.collect()
    # counted relative to the start: other tests' objects may still be alive in this process
    hooks, live, plans = len(torch_optimizer._global_optimizer_post_hooks), len(carrier.live_carriers()), len(optim_state._STATES)
    penalty_plans = len(optim_penalty._penalty_plans)
    pre_hooks = len(torch_optimizer._global_optimizer_pre_hooks)
    start = rss_bytes()
    refs = [one_run(seed) for seed in range(1000)]
    gc.collect()
    assert all(r() is None for run in refs for r in run), "a model, module, parameter or optimizer was kept alive"
    assert len(carrier.live_carriers()) == live
    assert len(optim_state._STATES) == plans  # each optimizer's plan and momentum fills went with it
    assert len(optim_penalty._penalty_plans) == penalty_plans  # each model's cached penalty plan went with it
    assert len(torch_optimizer._global_optimizer_post_hooks) == hooks
    assert len(torch_optimizer._global_optimizer_pre_hooks) == pre_hooks
    assert rss_bytes() - start < 50 * 2**20  # flat: well under the ~0.7 GB that 1000 kept models would take


def train(model, opt, steps=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def make(kind):
    torch.manual_seed(0 if kind == "sgd" else 1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    if kind == "sgd":
        paramreg.attach(model, "*.weight", l1=0.05)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        paramreg.attach(model, "*.weight", group_lasso=0.5)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt


def test_two_models_trained_in_two_threads_match_sequential_training():
    sequential = {kind: make(kind) for kind in ("sgd", "adam")}
    for kind, (model, opt) in sequential.items():
        train(model, opt, seed=len(kind))
    threaded = {kind: make(kind) for kind in ("sgd", "adam")}
    workers = [threading.Thread(target=train, args=(m, o), kwargs={"seed": len(k)}) for k, (m, o) in threaded.items()]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for kind in ("sgd", "adam"):
        for a, b in zip(sequential[kind][0].parameters(), threaded[kind][0].parameters(), strict=True):
            assert torch.equal(a, b), kind
    assert (sequential["sgd"][0][0].weight == 0).any()
