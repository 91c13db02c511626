"""Multi-process jobs for test_training_setups.py: two CPU processes (gloo), the prox after each step.

    python distributed_job.py KIND OUTDIR

The ranks meet through a file in OUTDIR (``init_method="file://..."``): no port is chosen in advance,
so runs on the same machine (two test suites at once) never meet each other; gloo's own
connections take ports the OS hands out. Process-group setup and every collective time out after
``TIMEOUT``, so a rank that waits for a peer that died fails instead of hanging.

KIND: "ddp" (DistributedDataParallel, SGD with momentum, L1), "zero" (DDP with
ZeroRedundancyOptimizer around Adam, L1 in Adam's metric), "fsdp" (FSDP2 ``fully_shard``, Adam:
L1 in Adam's metric, group lasso over input columns, which span both shards, and the nuclear norm).
Rank 0 writes the trained full state_dict to OUTDIR/<kind>-rank<r>.pt (every rank for ddp/zero).
KIND "fsdp-target": FSDP2 as "fsdp", with one sparsity target over every weight (the last one
sharded unevenly), Adam; the collectives of the last step (CommDebugMode) go to
OUTDIR/fsdp-target-comms-rank<r>.json.
KIND "fsdp-keep-zeros": FSDP2 with ``keep_zeros=True`` attached before ``fully_shard`` (its mask
a plain tensor), the last weight sharded unevenly.
KIND "fsdp-classes": L1 attached before ``fully_shard``, DCP's ``get_state_dict`` in the middle of
training, more steps, then ``paramreg.remove``; each rank writes the class of every Linear at each
of those points, and that a forward ran after each, to OUTDIR/fsdp-classes-rank<r>.json.
KIND "ddp-target": "ddp" with a sparsity target over every weight; "zero-target": "zero" with one
(each rank steps the weights it owns: rank 0 "2.weight", rank 1 the other two; how many tensors
each rank's outer and inner optimizer hold the zeros of to OUTDIR/zero-target-held-rank<r>.json);
"zero-target-one":
"zero" with a target over "2.weight" alone, which rank 1 does not own, that keeps its zeros after
a 3-step ramp; "zero-target-coupled": "zero" with a target over channels coupled across the first
two layers (``attach_channels``), which paramreg refuses before the step moves anything (each rank
writes the message to OUTDIR/zero-target-coupled-error-rank<r>.txt); "zero-target-warmup": "zero-target"
with a frozen parameter of 1,000 elements, which ZeRO gives to rank 0 alone, and an lr warm-up
from 0, so that rank 0's first step is a null step while rank 1's is not; "zero-target-uniform":
"zero-target" with ``allocation="uniform"`` (each weight selected by its owner alone).
KIND "fsdp-floor": FSDP2 with a target that keeps its zeros (regrow=False, the last weight sharded
unevenly) under Adam with beta2 = 0.5, for FLOOR_STEPS steps: long enough that the held zeros'
second moment, which decays by beta2 a step, is raised by the floor pass (Note [Decaying state of
held zeros] in optim/hooks.py) on DTensor shards; each rank writes, per weight, the largest second
moment at the ramp's end, and how many held zeros it has and their least and largest second moment
after the last step, to OUTDIR/fsdp-floor-moments-rank<r>.json.
KIND "fsdp-targets": every case of TARGET_CASES (l0, rows, columns) at both WIDTHS in turn, each
step's collectives and their bytes to OUTDIR/fsdp-<case>-comms-rank<r>.json.
KIND "fsdp-dcp": the DCP round trips of DCP_CASES, to OUTDIR/fsdp-dcp-<i>-rank0.pt.
KIND "hang": each rank writes its pid to OUTDIR/started-rank<r>, then rank 0 sleeps and rank 1
waits for it in a barrier (the test that a hung job is ended with all its processes).
"""

import datetime
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import paramreg

STEPS = 5
TIMEOUT = datetime.timedelta(seconds=120)
REGULARIZERS = {
    "ddp": [("*.weight", {"l1": 0.05})],
    "zero": [("*.weight", {"l1": 0.002})],
    "fsdp": [
        ("0.weight", {"l1": 0.002}),
        ("2.weight", {"group_lasso": {"strength": 0.1, "groups": "in"}}),  # zeroes 8 of 16 columns in Adam's safeguarded metric
        ("4.weight", {"nuclear_norm": 10.0}),  # lr·a = 0.1 a step: the smallest singular value (0.38) goes
    ],
    "fsdp-classes": [("*.weight", {"l1": 0.002})],
    # every rank steps and selects over its whole replica (DDP), or over the tensors it owns (ZeRO)
    "ddp-target": [("*.weight", {"sparsity": 0.6, "sparsity_steps": 4})],
    "zero-target": [("*.weight", {"sparsity": 0.6, "sparsity_steps": 4})],
    "zero-target-one": [("2.weight", {"sparsity": 0.6, "sparsity_steps": 3, "keep_zeros": True})],
    "zero-target-coupled": [],  # attach_channels in build()
    "zero-target-warmup": [("*.weight", {"sparsity": 0.6, "sparsity_steps": 4})],
    "zero-target-uniform": [("*.weight", {"sparsity": 0.6, "sparsity_steps": 4, "allocation": "uniform"})],
    # the last layer's 5 rows shard unevenly over 2 ranks (3 + 2)
    "fsdp-target": [("*.weight", {"sparsity": 0.6, "sparsity_steps": 4})],
    "fsdp-keep-zeros": [("*.weight", {"keep_zeros": True})],  # attached before fully_shard: a plain mask
    "fsdp-floor": [("*.weight", {"sparsity": 0.6, "sparsity_steps": 4})],
}
FLOOR_STEPS = 130  # after a 4-step ramp, 0.5^126 = tiny of the second moments then (at most 2e-3 here): denormal unless raised
# KIND "fsdp-targets" runs each of these in turn (one process group, so one start-up for all): an L0
# target, a group target over rows (each row on one rank) and one over columns (each column on both
# ranks), each at two widths; the last weight's 5 rows shard unevenly (3 + 2), the others evenly
TARGET_CASES = {
    "l0": [("*.weight", {"l0": True, "sparsity": 0.6, "sparsity_steps": 4})],
    "rows": [("*.weight", {"group_lasso": {"strength": 1.0, "groups": "out"}, "sparsity": 0.5, "sparsity_steps": 4})],
    "columns": [("*.weight", {"group_lasso": {"strength": 1.0, "groups": "in"}, "sparsity": 0.5, "sparsity_steps": 4})],
}
WIDTHS = {"": 16, "-wide": 64}
for _name, _calls in TARGET_CASES.items():
    for _suffix in WIDTHS:
        REGULARIZERS[f"fsdp-{_name}{_suffix}"] = _calls


def build(kind):
    torch.manual_seed(0)
    outputs = 4 if kind in ("ddp", "zero", "fsdp", "fsdp-classes") else 5
    width = WIDTHS["-wide" if kind.endswith("-wide") else ""]
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs))
    if kind == "fsdp-keep-zeros":  # every third weight zero, to be kept
        with torch.no_grad():
            for layer in (model[0], model[2], model[4]):
                layer.weight.view(-1)[::3] = 0.0
    for targets, keywords in REGULARIZERS[kind]:
        paramreg.attach(model, targets, **keywords)
    if kind == "zero-target-coupled":
        paramreg.attach_channels(model, "0.weight", example_inputs=torch.randn(2, 8), sparsity=0.5, sparsity_steps=4)
    if kind == "zero-target-warmup":  # the largest parameter, so ZeRO gives rank 0 nothing else
        model.register_parameter("frozen", nn.Parameter(torch.zeros(1000), requires_grad=False))
    return model


def optimizer(kind, params):
    if kind == "fsdp-floor":
        return torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.5))
    return torch.optim.SGD(params, lr=0.1, momentum=0.9) if kind.startswith("ddp") else torch.optim.Adam(params, lr=0.01)


def steps(kind) -> int:
    return FLOOR_STEPS if kind == "fsdp-floor" else STEPS


def batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def worker(rank, kind, out):
    torch.set_num_threads(1)
    store = os.path.join(os.path.abspath(out), "rendezvous")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=TIMEOUT)
    if kind == "hang":
        with open(os.path.join(out, f"started-rank{rank}"), "w") as f:
            f.write(str(os.getpid()))
        if rank == 0:
            time.sleep(3600)
        dist.barrier()
        return
    if kind in ("fsdp-targets", "fsdp-dcp"):
        (fsdp_targets if kind == "fsdp-targets" else fsdp_dcp)(rank, out)
        dist.barrier()
        dist.destroy_process_group()
        return
    model = build(kind)
    if kind == "fsdp-classes":
        wrapped, opt = fsdp_classes(model, rank, out)
    else:
        if kind in ("fsdp", "fsdp-target", "fsdp-keep-zeros", "fsdp-floor"):
            from torch.distributed.fsdp import fully_shard

            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            wrapped = fully_shard(model)
            opt = optimizer(kind, model.parameters())
        else:
            wrapped = nn.parallel.DistributedDataParallel(model)
            if kind.startswith("zero"):
                from torch.distributed.optim import ZeroRedundancyOptimizer

                opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
                if kind == "zero-target-warmup":
                    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 2))  # lr 0 in the first step
            else:
                opt = optimizer(kind, model.parameters())
        if kind == "fsdp-target":
            train(wrapped, opt, rank, range(STEPS - 1))
            counted_step(wrapped, opt, rank, out)
        elif kind == "zero-target-coupled":  # refused at the first step, on every rank alike
            try:
                train(wrapped, opt, rank, range(STEPS))
            except paramreg.ParamregError as e:
                with open(os.path.join(out, f"{kind}-error-rank{rank}.txt"), "w") as f:
                    f.write(str(e))
        elif kind == "zero-target-warmup":
            train(wrapped, opt, rank, range(STEPS), warmup)
        elif kind == "fsdp-floor":
            floor_run(wrapped, opt, rank, out)
        else:
            train(wrapped, opt, rank, range(STEPS))
        if kind == "zero-target":
            held(opt, rank, out)
        save(model, kind, rank, out)
    # Both ranks are done before anything is torn down, and the wrapped model (DDP's reducer
    # holds the process group) goes before the group: freed after it, at the worker's return,
    # gloo's teardown hung now and then (seen under load and on a quiet machine)
    dist.barrier()
    del wrapped, opt
    gc.collect()
    dist.destroy_process_group()


def train(model, opt, rank, steps, scheduler=None):
    for step in steps:
        x, y = batch(step, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def floor_run(wrapped, opt, rank, out):
    """FLOOR_STEPS steps; per weight, this rank's largest second moment after the ramp's 4 steps,
    and the least and the largest second moment at a held zero after the last step."""
    weights = [p for p in opt.param_groups[0]["params"] if p.dim() == 2]  # the three weights, in order
    train(wrapped, opt, rank, range(4))
    largest = [float(opt.state[w]["exp_avg_sq"].to_local().max()) for w in weights]
    train(wrapped, opt, rank, range(4, FLOOR_STEPS))
    held = [opt.state[w]["exp_avg_sq"].to_local()[w.to_local() == 0] for w in weights]
    with open(os.path.join(out, f"fsdp-floor-moments-rank{rank}.json"), "w") as f:
        json.dump({"largest at the ramp's end": largest, "held": [v.numel() for v in held],
                   "least held": [float(v.min()) if v.numel() else None for v in held],
                   "most held": [float(v.max()) if v.numel() else None for v in held]}, f)


def held(opt, rank, out):
    """How many tensors the pre-step hold of the outer ZeroRedundancyOptimizer and of its inner
    optimizer keep the zeros of, to OUTDIR/zero-target-held-rank<r>.json."""
    from paramreg.optim import state

    optimizers = {"outer": opt, "inner": opt.optim}
    counts = {name: len(found.held) if (found := state.get(o)) is not None else 0 for name, o in optimizers.items()}
    with open(os.path.join(out, f"zero-target-held-rank{rank}.json"), "w") as f:
        json.dump(counts, f)


def counted_step(model, opt, rank, out):
    """The last step, forward and backward outside and the optimizer step (with the target's
    selection) inside CommDebugMode: the collectives the step and its prox make."""
    from torch.distributed.tensor.debug import CommDebugMode

    x, y = batch(STEPS - 1, rank)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with CommDebugMode() as comm:
        opt.step()
    with open(os.path.join(out, f"fsdp-target-comms-rank{rank}.json"), "w") as f:
        json.dump({str(op): n for op, n in comm.get_comm_counts().items()}, f)


def shard(model):
    """FSDP2 over every Linear and the root; returns the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def comm_bytes():
    """CommDebugMode that also sums, per collective, the bytes of the tensors passed to it (what a
    rank sends: for an all_reduce its whole buffer, for an all_gather its own shard)."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.utils._pytree import tree_leaves

    class CommBytes(CommDebugMode):
        def __init__(self):
            super().__init__()
            self.bytes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = dict(self.comm_counts)
            result = super().__torch_dispatch__(func, types, args, kwargs)
            for op, n in list(self.comm_counts.items()):
                if n != before.get(op, 0):
                    sent = sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
                    self.bytes[str(op)] = self.bytes.get(str(op), 0) + sent
            return result

        def summary(self):
            return {str(op): {"count": n, "bytes": self.bytes.get(str(op), 0)} for op, n in self.comm_counts.items() if n}

    return CommBytes()


def fsdp_targets(rank, out):
    """Each of TARGET_CASES at each width: sharded, trained STEPS steps with every optimizer step (its
    target's selection and maps) inside :func:`comm_bytes`; rank 0 saves the trained state_dict as
    OUTDIR/fsdp-<case>-rank0.pt, every rank its steps' collectives as OUTDIR/fsdp-<case>-comms-rank<r>.json."""
    for case in (f"fsdp-{name}{suffix}" for name in TARGET_CASES for suffix in WIDTHS):
        model = build(case)
        wrapped = shard(model)
        opt = optimizer(case, model.parameters())
        steps = []
        for step in range(STEPS):
            x, y = batch(step, rank)
            opt.zero_grad()
            nn.functional.cross_entropy(wrapped(x), y).backward()
            with comm_bytes() as comm:
                opt.step()
            steps.append(comm.summary())
        save(model, case, rank, out)
        with open(os.path.join(out, f"{case}-comms-rank{rank}.json"), "w") as f:
            json.dump(steps, f)
        del wrapped, opt, model
        gc.collect()


# KIND "fsdp-dcp": DCP round trips of an FSDP2 model, each case (DCP_CASES) in a directory of its own.
# Two sets of attach calls cover every kind of state paramreg counts: "target" (SGD with momentum, so
# a momentum fill too): a target mid-ramp, a strength schedule, keep_zeros on the unevenly sharded
# weight; "groups" (AdamW): L1, group lasso over columns (spanning both ranks), an l0 target.
DCP_SETS = {
    "target": [
        ("0.weight", {"sparsity": 0.5, "sparsity_steps": 6}),
        ("2.weight", {"l1": lambda k: 1e-2 * min(1.0, k / 4)}),
        ("4.weight", {"keep_zeros": True}),
    ],
    "groups": [
        ("0.weight", {"l1": 2e-3}),
        ("2.weight", {"group_lasso": {"strength": 0.1, "groups": "in"}}),
        ("4.weight", {"l0": True, "sparsity": 0.4, "sparsity_steps": 6}),
    ],
}
# (set, attached before fully_shard, flatten_optimizer_state_dict, the fresh optimizer has state before
# the template is taken): every set x before/after x flatten, the last factor alternating (a half
# fraction of the 16 combinations, each factor on and off in each set)
DCP_CASES = [
    (name, before, flatten, before != flatten) for name in DCP_SETS for before in (True, False) for flatten in (False, True)
]
DCP_SAVE, DCP_STEPS = 3, 7  # saved after 3 steps (the targets mid-ramp), trained to 7


def dcp_model(name, before):
    """The set's model, sharded, with its regularizers attached before or after fully_shard."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        model[4].weight.view(-1)[::3] = 0.0  # for keep_zeros
    if not before:
        shard(model)
    for targets, keywords in DCP_SETS[name]:
        paramreg.attach(model, targets, **keywords)
    if before:
        shard(model)
    return model


def dcp_optimizer(name, params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9) if name == "target" else torch.optim.AdamW(params, lr=1e-2)


def fsdp_dcp(rank, out):
    """Each of DCP_CASES: a run trained DCP_SAVE steps, saved with get_state_dict and dcp.save, trained on
    to DCP_STEPS; a fresh model and optimizer (with state made by a first get_state_dict, or none),
    get_state_dict as the template (DCP's zero-lr step initialises the optimizer), dcp.load,
    set_state_dict, trained to DCP_STEPS. Rank 0 saves both final state_dicts (gathered) and what was
    seen on the way to OUTDIR/fsdp-dcp-<i>-rank0.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    def carriers(model):
        return [m.parametrizations.weight[0] for m in model if hasattr(m, "parametrizations")]

    for i, (name, before, flatten, existing) in enumerate(DCP_CASES):
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        where = os.path.join(os.path.abspath(out), f"dcp-{i}")
        full = dcp_model(name, before)
        full_opt = dcp_optimizer(name, full.parameters())
        train(full, full_opt, rank, range(DCP_SAVE))
        model_sd, optim_sd = get_state_dict(full, full_opt, options=options)
        keys = sorted({k for k in (optim_sd if flatten else [k for e in optim_sd["state"].values() for k in e]) if "paramreg_" in k})
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=where)
        train(full, full_opt, rank, range(DCP_SAVE, DCP_STEPS))

        resumed = dcp_model(name, before)
        resumed_opt = dcp_optimizer(name, resumed.parameters())
        if existing:
            get_state_dict(resumed, resumed_opt, options=options)  # the optimizer's state exists before paramreg stepped
        model_sd, optim_sd = get_state_dict(resumed, resumed_opt, options=options)
        fresh_calls = [c.calls for c in carriers(resumed)]  # DCP's zero-lr steps are not counted
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=where)
        set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=options)
        train(resumed, resumed_opt, rank, range(DCP_SAVE, DCP_STEPS))
        seen = {
            "full": gathered(full), "resumed": gathered(resumed), "paramreg keys": keys, "fresh calls": fresh_calls,
            "calls": [[c.calls for c in carriers(m)] for m in (full, resumed)],
            "fills": [paramreg_fills(o) for o in (full_opt, resumed_opt)],
        }
        if rank == 0:
            torch.save(seen, os.path.join(out, f"fsdp-dcp-{i}-rank0.pt"))
        del full, full_opt, resumed, resumed_opt
        gc.collect()


def gathered(model):
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def paramreg_fills(opt):
    """paramreg's momentum fills of ``opt``'s groups, as its state_dict records them."""
    return [e.get("paramreg_momentum_fill") for e in opt.state_dict()["state"].values() if "paramreg_momentum_fill" in e]


def fsdp_classes(model, rank, out):
    """Attached before fully_shard, read by DCP mid-training, removed after: every module keeps
    the class FSDP2 gave it and stays callable (Note [Module classes] in modules/classes.py)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls

    layers = [m for m in model if isinstance(m, nn.Linear)]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    opt = optimizer("fsdp-classes", model.parameters())
    seen = {"sharded": [type(m).__name__ for m in layers]}
    given = [type(m) for m in layers]
    train(model, opt, rank, range(2))
    get_state_dict(model, opt)  # DCP reads every module's parametrizations
    seen["after get_state_dict"] = [type(m) is c for m, c in zip(layers, given, strict=True)]
    train(model, opt, rank, range(2, 4))  # the modules are still callable
    seen["trained after get_state_dict"] = True
    paramreg.remove(model)
    seen["removed"] = [type(m).__name__ for m in layers]
    seen["fsdp class of Linear"] = [type(m) is get_cls_to_fsdp_cls().get(nn.Linear) for m in layers]
    seen["fsdp modules"] = [isinstance(m, FSDPModule) for m in layers]
    seen["parametrized"] = [hasattr(m, "parametrizations") for m in layers]
    train(model, opt, rank, range(4, 6))  # callable after remove, and no prox any more
    seen["trained after remove"] = True
    with open(os.path.join(out, f"fsdp-classes-rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    return model, opt


def save(model, kind, rank, out):
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    state["report.zeros"] = torch.tensor([row.zeros for row in paramreg.report(model).rows])  # on every rank
    if not kind.startswith("fsdp") or rank == 0:
        torch.save(state, os.path.join(out, f"{kind}-rank{rank}.pt"))


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
