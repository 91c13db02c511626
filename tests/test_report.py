"""report(): rows per attached tensor, counts that equal a direct count, a readable table."""

import torch

import paramreg

from conftest import SmallCNN, cnn_batch


def test_rows_count_exact_zeros_and_evaluate_the_penalty():
    torch.manual_seed(0)
    model = SmallCNN()
    paramreg.attach(model, "conv*.weight", l1=0.5)
    paramreg.attach(model, "fc.weight", l2=0.1, mode="penalty")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = cnn_batch()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    r = paramreg.report(model)
    assert [row.name for row in r.rows] == ["conv1.weight", "conv2.weight", "fc.weight"]
    for row, w in zip(r.rows, (model.conv1.weight, model.conv2.weight, model.fc.weight), strict=True):
        assert row.zeros == int((w == 0).sum()) and row.numel == w.numel() and row.shape == tuple(w.shape)
    assert r["conv1.weight"].zeros > 0
    assert abs(r["conv2.weight"].penalty - 0.5 * model.conv2.weight.detach().abs().sum().item()) < 1e-5
    assert abs(r["fc.weight"].penalty - 0.05 * model.fc.weight.detach().pow(2).sum().item()) < 1e-5
    assert r["fc.weight"].mode == "penalty" and r["conv1.weight"].regularizer == "L1(strength=0.5)"
    assert r.zeros == sum(row.zeros for row in r.rows)
    assert abs(r.sparsity - r.zeros / r.numel) < 1e-12


def test_table_has_one_line_per_row_and_a_total():
    model = SmallCNN()
    paramreg.attach(model, "*.weight", l1=1e-3)
    text = str(paramreg.report(model))
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["name", "shape", "numel", "zeros", "sparsity"]
    assert len(lines) == 2 + 4 + 2
    assert lines[2].startswith("conv1.weight") and "4x1x3x3" in lines[2] and "L1(strength=0.001) [prox]" in lines[2]
    assert lines[-1].startswith("total (4)")


def test_after_remove_it_reports_every_parameter():
    model = SmallCNN()
    paramreg.attach(model, "*.weight", l1=1e-3)
    paramreg.remove(model)
    r = paramreg.report(model)
    assert [row.name for row in r.rows] == [n for n, _ in model.named_parameters()]
    assert all(row.regularizer is None and row.penalty is None for row in r.rows)
    assert "-" in str(r).splitlines()[2]


def test_report_skips_uninitialized_lazy_parameters():
    model = torch.nn.Sequential(torch.nn.LazyLinear(3), torch.nn.Linear(3, 2))
    assert [row.name for row in paramreg.report(model).rows] == ["1.weight", "1.bias"]


def test_iterating_a_report_yields_its_rows_and_to_dict_gives_flat_numbers():
    torch.manual_seed(0)
    model = SmallCNN()
    paramreg.attach(model, "conv*.weight", l1=0.5)
    with torch.no_grad():
        model.conv1.weight[0] = 0
    r = paramreg.report(model)
    assert [row.name for row in r] == ["conv1.weight", "conv2.weight"]
    assert list(r) == list(r.rows)
    logged = r.to_dict(prefix="paramreg/")
    assert set(logged) == {f"paramreg/{n}/{k}" for n in ("conv1.weight", "conv2.weight", "total") for k in ("sparsity", "zeros", "penalty")}
    assert logged["paramreg/conv1.weight/zeros"] == 9 == int((model.conv1.weight == 0).sum())
    assert logged["paramreg/conv1.weight/sparsity"] == 9 / 36
    assert logged["paramreg/total/zeros"] == r.zeros and logged["paramreg/total/penalty"] == r.penalty
    assert abs(logged["paramreg/conv2.weight/penalty"] - 0.5 * float(model.conv2.weight.detach().abs().sum())) < 1e-5
    assert all(type(v) in (int, float) for v in logged.values())
    paramreg.remove(model)  # nothing attached: rows of every parameter, no penalties
    assert not any(k.endswith("/penalty") for k in paramreg.report(model).to_dict())
