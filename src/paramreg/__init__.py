"""paramreg: attach L1/L2 regularizers to PyTorch parameters by name.

    paramreg.attach(model, "conv*.weight", l1=1e-4)   # select by name, attach a regularizer
    ...train with your own loop and optimizer...        # exact proximal step after each step
    paramreg.remove(model)                               # fold: a plain model again

Conventions: L1 with strength a is a·Σ abs(w); L2 with strength b is (b/2)·Σ w² (torch's
``weight_decay=b``); the proximal map of step t is argmin_z ½‖z − w‖² + t·R(z).
"""

from .checkpoint import attach_spec, check_plain, folded, spec
from .errors import ParamregError
from .lifecycle import attach, remove, set_strength
from .coupled import CoupledGroupLasso
from .cost import Comparison, Cost, compare, cost
from .factorizing import factorize
from .shrinking import attach_channels, shrink
from .constraints import NM, Box, KeepZeros, MaxNorm, NonNegative, TopK, UnitNorm
from .regularizers import L0, L1, L2, ElasticNet, Regularizer, register
from .reparametrizations import SoftThreshold
from .structured import GroupLasso, NuclearNorm, SparseGroupLasso
from .report import Report, report
from .selection import select
from .stepping import penalty, prox_step

__all__ = [
    "attach",
    "remove",
    "set_strength",
    "penalty",
    "prox_step",
    "report",
    "select",
    "spec",
    "attach_spec",
    "folded",
    "check_plain",
    "attach_channels",
    "shrink",
    "factorize",
    "cost",
    "compare",
    "Cost",
    "Comparison",
    "Report",
    "register",
    "Regularizer",
    "L0",
    "L1",
    "L2",
    "ElasticNet",
    "GroupLasso",
    "SparseGroupLasso",
    "NuclearNorm",
    "NonNegative",
    "Box",
    "MaxNorm",
    "UnitNorm",
    "TopK",
    "NM",
    "KeepZeros",
    "SoftThreshold",
    "CoupledGroupLasso",
    "ParamregError",
]

__version__ = "0.1.0"
