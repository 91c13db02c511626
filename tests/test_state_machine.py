"""The whole lifecycle as a state machine: random sequences of attach, remove, training steps,
checkpoint reloads, export copies and the user's own parametrizations, with the invariants checked
after every step.

CI runs the "ci" profile; ``PARAMREG_HYPOTHESIS_PROFILE=long python -m pytest tests/test_state_machine.py``
runs a longer one.
"""

import copy
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn
from torch.nn.utils import parametrize

import paramreg
from paramreg.modules.carrier import Carrier

settings.register_profile(
    "ci", max_examples=100, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "long", max_examples=1000, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
PROFILE = os.environ.get("PARAMREG_HYPOTHESIS_PROFILE", "ci")


class Net(nn.Module):
    """Tied embedding and head, two hidden layers: every kind of tensor the lifecycle meets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.lin1 = nn.Linear(8, 8)
        self.lin2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.lin2(torch.tanh(self.lin1(self.emb(tokens))))))


class Scale(nn.Module):
    """A user's own parametrization: weight = 2·stored, with its right inverse (values unchanged)."""

    def forward(self, w):
        return 2 * w

    def right_inverse(self, w):
        return w / 2


TOKENS = torch.arange(10)
PATTERNS = ["*", "*.weight", "*.bias", "lin*", "lin1.*", "emb.weight", "head.weight", r"re:lin[12]\.weight", "nope.*"]
REGULARIZERS = [
    paramreg.L1(0.05),
    paramreg.L2(0.1),
    paramreg.ElasticNet(l1=0.02, l2=0.1),
    paramreg.GroupLasso(0.2),
    paramreg.NonNegative(),
    paramreg.TopK(0.5),
    paramreg.NM(2, 4),
    paramreg.SoftThreshold(0.02),
]
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
}
USER_TARGETS = ["lin1.weight", "lin2.weight", "lin2.bias"]


def canonical_params(model):
    """Canonical name -> the stored Parameter object, whoever parametrizes it."""
    out = {}
    for module_name, module in model.named_modules():
        if "parametrizations" in module_name.split("."):
            continue  # parametrize's containers and paramreg's carriers
        prefix = f"{module_name}." if module_name else ""
        for name, p in module._parameters.items():
            if p is not None:
                out.setdefault(prefix + name, p)
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                out.setdefault(prefix + name, plist.original)
    return out


def user_parametrizations(model):
    return {
        (f"{m}.{t}"): [type(x).__name__ for x in plist if not isinstance(x, Carrier)]
        for m, module in model.named_modules()
        if parametrize.is_parametrized(module) and not m.endswith("parametrizations")
        for t, plist in module.parametrizations.items()
        if any(not isinstance(x, Carrier) for x in plist)
    }


class Lifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = Net()
        self.user = []  # canonical names with the user's Scale, in registration order
        self.names = paramreg.select(self.model, "*")
        self.params = {n: id(p) for n, p in canonical_params(self.model).items()}

    def reference(self):
        """A model without paramreg, with the same user parametrizations."""
        ref = Net()
        for name in self.user:
            module, tensor = name.rsplit(".", 1)
            parametrize.register_parametrization(ref.get_submodule(module), tensor, Scale())
        return ref

    @rule(pattern=st.sampled_from(PATTERNS), reg=st.sampled_from(REGULARIZERS), mode=st.sampled_from(["prox", "penalty"]))
    def attach(self, pattern, reg, mode):
        before = copy.deepcopy(self.model.state_dict())
        keys = list(self.model.state_dict())
        try:
            paramreg.attach(self.model, pattern, reg, mode=mode)
        except paramreg.ParamregError:
            assert list(self.model.state_dict()) == keys
            assert all(torch.equal(v, before[k]) for k, v in self.model.state_dict().items())

    @rule(pattern=st.sampled_from([None, *PATTERNS]))
    def remove(self, pattern):
        try:
            paramreg.remove(self.model, pattern)
        except paramreg.ParamregError:
            assert pattern == "nope.*"

    @rule(kind=st.sampled_from(sorted(OPTIMIZERS)))
    def train_step(self, kind):
        opt = OPTIMIZERS[kind](self.model.parameters())
        opt.zero_grad()
        loss = nn.functional.cross_entropy(self.model(TOKENS), TOKENS) + paramreg.penalty(self.model)
        loss.backward()
        opt.step()

    @rule(name=st.sampled_from(USER_TARGETS))
    def user_parametrization(self, name):
        module, tensor = name.rsplit(".", 1)
        owner = self.model.get_submodule(module)
        if parametrize.is_parametrized(owner, tensor):
            return  # on a tensor of its own only
        parametrize.register_parametrization(owner, tensor, Scale())
        self.user.append(name)

    @rule()
    def save_and_reload(self):
        state, spec = self.model.state_dict(), paramreg.spec(self.model)
        fresh = self.reference()
        paramreg.attach_spec(fresh, spec)
        fresh.load_state_dict(state, strict=True)
        assert torch.equal(fresh(TOKENS), self.model(TOKENS))
        assert paramreg.spec(fresh) == spec

    @precondition(lambda self: bool(paramreg.spec(self.model)["attached"]))
    @rule()
    def folded_copy(self):
        plain = paramreg.folded(self.model)
        assert torch.equal(plain(TOKENS), self.model(TOKENS))
        assert paramreg.spec(plain)["attached"] == {}

    @invariant()
    def canonical_names_and_parameters_are_unchanged(self):
        # (the user's own parametrizations reorder a module's tensors, as torch does)
        assert sorted(paramreg.select(self.model, "*")) == sorted(self.names)
        assert {n: id(p) for n, p in canonical_params(self.model).items()} == self.params
        if not self.user:  # while attached, the plain names in the plain order
            assert paramreg.select(self.model, "*") == self.names
            assert [n for n, _ in self.model.named_parameters() if ".transform." not in n] == self.names

    @invariant()
    def report_counts_what_the_module_computes_with(self):
        for row in paramreg.report(self.model).rows:
            module, tensor = row.name.rsplit(".", 1)
            assert row.zeros == int((getattr(self.model.get_submodule(module), tensor) == 0).sum()), row.name

    @invariant()
    def users_parametrizations_are_kept(self):
        assert user_parametrizations(self.model) == {n: ["Scale"] for n in self.user}

    @invariant()
    def removing_everything_gives_the_plain_model(self):
        plain = paramreg.folded(self.model)
        ref = self.reference()
        assert [type(m) for m in plain.modules()] == [type(m) for m in ref.modules()] or self.user
        assert [parametrize.type_before_parametrizations(m) for m in plain.modules()] == [
            parametrize.type_before_parametrizations(m) for m in ref.modules()
        ]
        assert list(plain.state_dict()) == list(ref.state_dict())
        assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert not any(isinstance(m, Carrier) for m in plain.modules())
        assert torch.equal(plain(TOKENS), self.model(TOKENS))
        assert plain.head.weight is plain.emb.weight


Lifecycle.TestCase.settings = settings.get_profile(PROFILE)
TestLifecycle = Lifecycle.TestCase
