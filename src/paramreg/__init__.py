"""paramreg: attach L1/L2 regularizers to PyTorch parameters by name.

    paramreg.attach(model, "conv*.weight", l1=1e-4)   # select by name, attach a regularizer
    ...train with your own loop and optimizer...        # exact proximal step after each step
    paramreg.remove(model)                               # fold: a plain model again

Conventions: L1 with strength a is a·Σ abs(w); L2 with strength b is (b/2)·Σ w² (torch's
``weight_decay=b``); the proximal map of step t is argmin_z ½‖z − w‖² + t·R(z).
"""

from .catalogue.base import Regularizer, register
from .catalogue.constraints import NM, Box, KeepZeros, MaxNorm, NonNegative, TopK, UnitNorm
from .catalogue.coupled import CoupledGroupLasso
from .catalogue.elementwise import L0, L1, L2, ElasticNet
from .catalogue.reparametrizations import SoftThreshold
from .catalogue.structured import GroupLasso, NuclearNorm, SparseGroupLasso
from .errors import ParamregError
from .lifecycle.attaching import attach, set_strength
from .lifecycle.removing import remove
from .modules.selection import select
from .optim.penalty import penalty, prox_step
from .tools.checkpoint import attach_spec, spec
from .tools.cost import Comparison, Cost, compare, cost
from .tools.factorizing import factorize
from .tools.folding import check_plain, folded
from .tools.report import Report, report
from .tools.shrinking import attach_channels, shrink

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
