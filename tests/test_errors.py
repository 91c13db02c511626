"""Bad input: a ParamregError (a ValueError) that names the parameter or pattern; the model is unchanged."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import paramreg

from conftest import SmallCNN, assert_same_snapshot, snapshot


class WithIntParameter(SmallCNN):
    def __init__(self):
        super().__init__()
        self.steps = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)


def fails(model, match, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(paramreg.ParamregError, match=match) as info:
        paramreg.attach(model, *args, **kwargs)
    assert isinstance(info.value, ValueError)
    assert_same_snapshot(before, snapshot(model))
    return str(info.value)


def test_pattern_that_matches_nothing_lists_the_closest_names():
    message = fails(SmallCNN(), "'conv\\*.wieght' matches no parameter", "conv*.wieght", l1=1e-3)
    assert "'conv1.weight'" in message and "'conv2.weight'" in message
    message = fails(SmallCNN(), "'fc1.weight' matches no parameter", ["conv1.weight", "fc1.weight"], l1=1e-3)
    assert "'fc.weight'" in message


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_bad_strength_names_the_keyword_and_the_pattern(bad):
    message = fails(SmallCNN(), "l1=", "conv1.weight", l1=bad)
    assert "conv1.weight" in message and repr(bad) in message
    fails(SmallCNN(), "l2=", "*.bias", l1=1e-3, l2=bad)


def test_no_regularizer_given():
    fails(SmallCNN(), "no regularizer given", "*.weight")


def test_non_floating_point_tensor():
    message = fails(WithIntParameter(), "'steps' \\(shape \\(3,\\), torch.int64\\) is not a floating-point", "*", l1=1e-3)
    assert "exclude" in message
    paramreg.attach(WithIntParameter(), "*", exclude="steps", l1=1e-3)  # the fix the message suggests


def test_tensor_attached_twice_says_how_to_replace():
    model = SmallCNN()
    paramreg.attach(model, "conv*.weight", l1=1e-3)
    message = fails(model, "'conv1.weight' .* already has L1\\(strength=0.001\\) attached", "*.weight", l2=1e-3)
    assert "paramreg.remove(model, 'conv1.weight')" in message
    assert "2 selected tensor(s)" in message  # every problem is listed at once


def test_unknown_keyword_lists_the_known_ones():
    message = fails(SmallCNN(), "unknown keyword\\(s\\) l3", "*.weight", l3=1e-3)
    assert "l1=" in message and "l2=" in message


def test_mode_must_be_prox_or_penalty():
    fails(SmallCNN(), "mode must be 'prox' or 'penalty', got 'proximal'", "*.weight", l1=1e-3, mode="proximal")


def test_reg_and_keywords_are_exclusive_and_reg_must_be_a_regularizer():
    fails(SmallCNN(), "either as reg= or as keywords", "*.weight", paramreg.L1(1e-3), l1=1e-3)
    fails(SmallCNN(), "reg must be a paramreg.Regularizer", "*.weight", 1e-3)


def test_prox_mode_on_a_user_parametrized_tensor():
    model = SmallCNN()
    parametrizations.orthogonal(model.fc)
    message = fails(model, "'fc.weight' .* is computed by its own parametrization \\(_Orthogonal\\)", "*.weight", l1=1e-3)
    assert "mode='penalty'" in message
    assert paramreg.attach(model, "fc.weight", l1=1e-3, mode="penalty") == ["fc.weight"]


def test_malformed_targets():
    fails(SmallCNN(), "not a valid regular expression", "re:conv[", l1=1e-3)
    fails(SmallCNN(), "targets must be a pattern string", 42, l1=1e-3)
    fails(SmallCNN(), "targets is an empty list", [], l1=1e-3)
    fails(SmallCNN(), "select no parameter", "*.weight", exclude="*", l1=1e-3)
    fails(SmallCNN(), "select no parameter", lambda name, p: False, l1=1e-3)


def test_model_must_be_a_module():
    with pytest.raises(paramreg.ParamregError, match="torch.nn.Module"):
        paramreg.attach([nn.Linear(2, 2)], "*", l1=1e-3)
    with pytest.raises(paramreg.ParamregError, match="torch.nn.Module"):
        paramreg.remove({"weight": torch.zeros(2)})


def test_remove_with_a_pattern_that_matches_nothing():
    model = SmallCNN()
    paramreg.attach(model, "*.weight", l1=1e-3)
    before = snapshot(model)
    with pytest.raises(paramreg.ParamregError, match="'conv3.weight' matches no parameter"):
        paramreg.remove(model, "conv3.weight")
    assert_same_snapshot(before, snapshot(model))


def test_exclude_that_excludes_nothing_warns():
    with pytest.warns(UserWarning, match="exclude pattern 'bn\\*' excluded nothing"):
        paramreg.attach(SmallCNN(), "conv*.weight", exclude="bn*", l1=1e-3)
