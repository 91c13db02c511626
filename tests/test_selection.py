"""One selection rule: shell patterns over canonical names, 're:' regexes, callables, lists."""

from torch import nn

import paramreg

from conftest import SmallCNN


def test_star_matches_dots():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 1))
    assert paramreg.select(model, "*.weight") == ["0.0.weight", "1.weight"]
    assert paramreg.select(model, "0.*") == ["0.0.weight", "0.0.bias"]
    assert paramreg.select(model, "?.weight") == ["1.weight"]


def test_regex_is_a_full_match():
    model = SmallCNN()
    assert paramreg.select(model, "re:conv\\d\\.weight") == ["conv1.weight", "conv2.weight"]
    assert paramreg.select(model, "re:.*bias") == ["conv1.bias", "bn1.bias", "conv2.bias", "fc.bias"]


def test_callable_sees_name_and_tensor():
    model = SmallCNN()
    assert paramreg.select(model, lambda name, p: p.dim() == 4) == ["conv1.weight", "conv2.weight"]


def test_list_is_a_union_in_model_order_and_exclude_removes():
    model = SmallCNN()
    assert paramreg.select(model, ["fc.*", "conv1.*"], exclude=["*.bias"]) == ["conv1.weight", "fc.weight"]


def test_names_stay_canonical_while_attached():
    model = SmallCNN()
    plain = paramreg.select(model, "*")
    paramreg.attach(model, "conv*", l1=1e-3)
    assert paramreg.select(model, "*") == plain
