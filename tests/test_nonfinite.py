"""NaN and Inf: reported, never created by a prox, never folded into a plain model silently."""

import pytest
import torch
from torch import nn

import paramreg

from conftest import assert_same_snapshot, mlp, snapshot
from test_catalogue import CASES


def test_report_flags_nonfinite_weights():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    with torch.no_grad():
        model[0].weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    report = paramreg.report(model)
    assert report["0.weight"].nonfinite == 3 and report["2.weight"].nonfinite == 0 and report.nonfinite == 3
    text = str(report)
    assert "!! 3 NaN/Inf" in next(line for line in text.splitlines() if line.startswith("0.weight"))
    assert text.splitlines()[-1] == "!! 3 NaN/Inf entries in 1 tensor(s)"
    assert "!!" not in str(paramreg.report(mlp()))


def test_a_diverged_step_shows_in_the_report():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].weight.grad = torch.full_like(model[0].weight, float("nan"))
    opt.step()  # a plain optimizer step, no GradScaler to skip it
    assert paramreg.report(model)["0.weight"].nonfinite == model[0].weight.numel()


@pytest.mark.parametrize("reg", CASES, ids=repr)
def test_prox_keeps_finite_weights_finite(reg):
    g = torch.Generator().manual_seed(0)
    extremes = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e15, -1e15, 3.0, -3.0])
    for w in (torch.randn(4, 8, generator=g), torch.zeros(4, 8), extremes.repeat(4, 1)):
        for t in (0.0, 1e-3, 1.0, 1e6):
            assert torch.isfinite(reg.prox(w, t)).all(), (w, t)


def test_remove_refuses_nonfinite_weights_unless_told():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    before = snapshot(model)
    with pytest.raises(paramreg.ParamregError, match=r"'2.weight' \(shape \(3, 8\), torch.float32\) hold NaN or Inf.*allow_nonfinite=True"):
        paramreg.remove(model)
    with pytest.raises(paramreg.ParamregError, match="hold NaN or Inf"):
        paramreg.folded(model)
    assert_same_snapshot(before, snapshot(model))
    paramreg.remove(model, "0.weight")  # a finite tensor alone is fine
    plain = paramreg.folded(model, allow_nonfinite=True)
    assert type(plain[2]) is nn.Linear and torch.isnan(plain[2].weight[1, 1])
    paramreg.remove(model, allow_nonfinite=True)
    assert type(model[2]) is nn.Linear
