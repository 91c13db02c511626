"""A training job that test_checkpoint_resume.py runs in fresh processes.

    python resume_job.py full   OPTIMIZER N M OUT     # N + M steps without interruption
    python resume_job.py first  OPTIMIZER N CKPT      # N steps, then save model + optimizer + spec
    python resume_job.py resume OPTIMIZER N M CKPT OUT  # rebuild from CKPT, M more steps

The optimizer is built before ``attach`` in the first job and after ``attach_spec`` in the resumed
one, so the test also shows that its state stays aligned with the right parameters.
"""

import sys

import torch
from torch import nn

import paramreg


def build():
    torch.manual_seed(0)
    # several parameters of the same shape: a misaligned optimizer state would load silently
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def regularize(model, kind):
    threshold = 0.002  # per step: l1 strength times the learning rate
    paramreg.attach(model, "*.weight", exclude="1.weight", l1=threshold / LR[kind])
    paramreg.attach(model, "*.bias", l2=0.01, mode="penalty")


LR = {"sgd": 0.05, "adam": 0.01}


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR[kind], momentum=0.9)
    return torch.optim.Adam(params, lr=LR[kind])


def train(model, opt, start, stop):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + paramreg.penalty(model)).backward()
        opt.step()


def main(mode, kind, *args):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = build()
    if mode == "full":
        n, m, out = int(args[0]), int(args[1]), args[2]
        opt = make_optimizer(kind, model.parameters())
        regularize(model, kind)
        train(model, opt, 0, n + m)
    elif mode == "first":
        n, ckpt = int(args[0]), args[1]
        opt = make_optimizer(kind, model.parameters())
        regularize(model, kind)
        train(model, opt, 0, n)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "paramreg": paramreg.spec(model)}, ckpt)
        return
    else:
        n, m, ckpt, out = int(args[0]), int(args[1]), args[2], args[3]
        checkpoint = torch.load(ckpt, weights_only=True)
        paramreg.attach_spec(model, checkpoint["paramreg"])
        opt = make_optimizer(kind, model.parameters())
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        train(model, opt, n, n + m)
    torch.save(paramreg.folded(model).state_dict(), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
