"""Training setups beyond the plain loop: clipping, several optimizers, torch.compile, DDP."""

import json
import os
import pathlib
import sys
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import paramreg
from paramreg.optim import hooks

from conftest import end_job, mlp, mlp_batch, run_job, start_job

JOB = pathlib.Path(__file__).with_name("distributed_job.py")


def test_gradient_clipping_before_the_step():
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "*.weight", l1=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = model[0].weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    clipped = model[0].weight.grad.clone()
    opt.step()
    assert torch.equal(model[0].weight.detach(), F.softshrink(torch.add(start, clipped, alpha=-0.1), 0.1 * 0.05))


def test_each_parameter_is_regularized_by_the_optimizer_that_steps_it():
    x, y = mlp_batch()
    model = mlp()
    paramreg.attach(model, "*.weight", l1=0.5)
    first = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)
    second = torch.optim.SGD([model[2].weight, model[2].bias], lr=0.01)
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    first.step()
    assert torch.equal(model[0].weight.detach(), F.softshrink(torch.add(w0, model[0].weight.grad, alpha=-0.1), 0.05))
    assert torch.equal(model[2].weight, w2)  # not stepped yet, so not regularized yet
    second.step()  # its own learning rate is the step size
    assert torch.equal(model[2].weight.detach(), F.softshrink(torch.add(w2, model[2].weight.grad, alpha=-0.01), 0.005))


def test_torch_compile_forward_has_no_graph_break_and_matches_eager():
    model = mlp()
    paramreg.attach(model, "*.weight", l1=1e-3)
    paramreg.attach(model, "*.bias", soft_threshold=0.01)
    x, _ = mlp_batch()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))


def _run_distributed(kind, tmp_path):
    run_job(JOB, kind, tmp_path, timeout=300)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by init, does not)."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:  # no /proc: ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_hung_distributed_job_is_ended_with_every_process_it_started(tmp_path):
    """What the test helpers do when a job hangs: its workers (mp.spawn's children) go with it."""
    job = start_job(JOB, "hang", tmp_path)
    try:
        started = [tmp_path / f"started-rank{r}" for r in (0, 1)]
        deadline = time.monotonic() + 240  # generous: the workers only have to start (a busy machine is slow)
        while not all(f.exists() and f.read_text() for f in started):
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        workers = [int(f.read_text()) for f in started]
        assert all(_alive(pid) for pid in workers)
    finally:
        end_job(job)
    deadline = time.monotonic() + 60  # killed at once; init reaps the orphaned zombies when it gets to them
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _one_process(kind):
    """The same training in one process on both ranks' batches: the mean loss over 32 examples
    averages the same gradients."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import distributed_job as job

    model = job.build(kind)
    opt = job.optimizer(kind, model.parameters())
    for step in range(job.steps(kind)):
        (x0, y0), (x1, y1) = job.batch(step, 0), job.batch(step, 1)
        opt.zero_grad()
        F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1])).backward()
        opt.step()
    return paramreg.folded(model).state_dict()


@pytest.mark.parametrize("kind", ["ddp", "zero"])
def test_ddp_two_processes_agree_and_match_one_process(kind, tmp_path):
    _run_distributed(kind, tmp_path)
    ranks = [torch.load(tmp_path / f"{kind}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        del r["report.zeros"]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    expected = _one_process(kind)  # ZeroRedundancyOptimizer: the prox once, by the rank that owns the shard
    for key in expected:
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=0, atol=1e-6)
    assert (ranks[0]["0.weight"] == 0).any()


def test_ddp_sparsity_target_is_exact_on_every_rank_and_matches_one_process(tmp_path):
    """DDP (SGD with momentum) with one sparsity target over every weight: each rank selects over its
    whole replica, so every rank holds exactly round(0.6·N) zeros after the ramp, the ranks agree
    bitwise, and the zero set is that of the same training in one process (weights within 1e-5 of
    their largest magnitude: DDP's all-reduced mean of two 16-example gradients rounds unlike one
    32-example mean; measured 1.6e-8 absolute)."""
    _run_distributed("ddp-target", tmp_path)
    ranks = [torch.load(tmp_path / f"ddp-target-rank{r}.pt", weights_only=True) for r in (0, 1)]
    budget = round(0.6 * sum(ranks[0][f"{i}.weight"].numel() for i in (0, 2, 4)))
    for r in ranks:
        assert int(r.pop("report.zeros").sum()) == budget
        assert sum(int((r[f"{i}.weight"] == 0).sum()) for i in (0, 2, 4)) == budget
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    expected = _one_process("ddp-target")
    for key in expected:
        assert torch.equal(ranks[0][key] == 0, expected[key] == 0), key
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=0, atol=1e-5 * float(expected[key].abs().max()))


@pytest.mark.parametrize("kind", ["zero-target", "zero-target-one", "zero-target-warmup", "zero-target-uniform"])
def test_a_sparsity_target_under_zero_redundancy_optimizer_selects_over_every_rank(kind, tmp_path):
    """ZeroRedundancyOptimizer (Adam) steps each weight on the one rank that owns it; the target still
    selects over all of them (Note [Targets across ZeRO's ranks] in optim/applying.py): after the
    ramp every rank holds exactly the budget, the ranks agree bitwise, and the zero set is that of
    the same training in one process; each rank holds the zeros of the weights it owns, in its
    inner optimizer's step alone (the outer one's broadcast brings the others). "zero-target-one":
    a target over one weight that rank 1 does not own, kept after its ramp (rank 1 still takes
    part in every selection). "zero-target-uniform": each weight reaches 60% itself, selected by
    its owner alone. "zero-target-warmup": rank 0 owns only a frozen parameter, and its first
    step (lr 0) is a null step that skips the hook while rank 1's is not: no rank waits for the
    other (this hung), and the budget is exact."""
    _run_distributed(kind, tmp_path)
    ranks = [torch.load(tmp_path / f"{kind}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    selected = ["2.weight"] if kind == "zero-target-one" else ["0.weight", "2.weight", "4.weight"]
    budget = round(0.6 * sum(ranks[0][k].numel() for k in selected))
    if kind == "zero-target-uniform":  # each weight its own 60%
        budget = sum(round(0.6 * ranks[0][k].numel()) for k in selected)
        for r in ranks:
            assert all(int((r[k] == 0).sum()) == round(0.6 * r[k].numel()) for k in selected)
    for r in ranks:
        assert int(r.pop("report.zeros").sum()) == budget
        assert sum(int((r[k] == 0).sum()) for k in selected) == budget
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    if kind == "zero-target":  # the zeros held by each rank's inner optimizer alone, of the weights it owns
        held = [json.loads((tmp_path / f"zero-target-held-rank{r}.json").read_text()) for r in (0, 1)]
        assert held == [{"outer": 0, "inner": 1}, {"outer": 0, "inner": 2}], held
    if kind == "zero-target-warmup":
        return  # trained with a warm-up: no one-process run to compare with
    expected = _one_process(kind)
    for key in expected:
        assert torch.equal(ranks[0][key] == 0, expected[key] == 0), key
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=0, atol=1e-5 * float(expected[key].abs().max()))


def test_zero_redundancy_optimizer_refuses_a_target_over_coupled_tensors(tmp_path):
    """Channels coupled across layers may be stepped on different ranks: refused at the first
    step, on both ranks, with what to use instead, before the step moved any weight."""
    _run_distributed("zero-target-coupled", tmp_path)
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import distributed_job as job

    initial = paramreg.folded(job.build("zero-target-coupled")).state_dict()
    for rank in (0, 1):
        message = (tmp_path / f"zero-target-coupled-error-rank{rank}.txt").read_text()
        assert "ZeroRedundancyOptimizer on 2 ranks" in message and "FSDP2" in message and "coupled" in message
        saved = torch.load(tmp_path / f"zero-target-coupled-rank{rank}.pt", weights_only=True)
        del saved["report.zeros"]
        assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in initial)


def _fsdp_against_one_process(kind, tmp_path, relative: float = 0.0):
    """The FSDP2 job ``kind`` on 2 ranks, rank 0's trained state_dict (gathered), checked against
    the same training in one process (within 2e-6, or ``relative`` of each tensor's largest
    magnitude), and the report's zero counts."""
    _run_distributed(kind, tmp_path)
    got = torch.load(tmp_path / f"{kind}-rank0.pt", weights_only=True)
    # the report counts whole tensors, not this rank's shard
    assert got.pop("report.zeros").tolist() == [int((got[f"{i}.weight"] == 0).sum()) for i in (0, 2, 4)]
    expected = _one_process(kind)
    for key in expected:
        atol = relative * float(expected[key].abs().max()) if relative else 2e-6
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol)
    return got, expected


def test_fsdp2_sharded_training_matches_one_process(tmp_path):
    """fully_shard splits every weight by rows over 2 ranks: L1 maps each shard; the group lasso
    over input columns and the nuclear norm need the whole tensor, which DTensor's ops gather."""
    got, _ = _fsdp_against_one_process("fsdp", tmp_path)
    assert (got["0.weight"] == 0).any() and (got["0.weight"] != 0).any()
    columns = got["2.weight"].norm(dim=0)
    assert (columns == 0).any() and (columns != 0).any()
    assert torch.linalg.matrix_rank(got["4.weight"]) < 4


def test_fsdp2_sparsity_target_over_uneven_shards_matches_one_process_without_gathering(tmp_path):
    """One target over every weight of an FSDP2 model whose last weight (5 rows) shards unevenly
    over 2 ranks: the selection counts each rank's shard and all-reduces the counts (Note [Target
    sparsity] in optim/targets.py), so the step gathers nothing and the zeros are those of the same
    training in one process."""
    got, expected = _fsdp_against_one_process("fsdp-target", tmp_path)
    for key in expected:
        assert torch.equal(got[key] == 0, expected[key] == 0), key  # the same zero set
    weights = [got[f"{i}.weight"] for i in (0, 2, 4)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * sum(w.numel() for w in weights))  # the ramp's end, reached exactly
    for rank in (0, 1):
        comms = json.loads((tmp_path / f"fsdp-target-comms-rank{rank}.json").read_text())
        assert not any("gather" in op for op in comms), comms  # nothing gathered: no strengths, no weights
        # the safeguard's norms (one 0-dim all-reduce per weight), at most 3 of the selection's counts and one
        # of the per-tensor counts that the maximum per tensor checks (Note [Allocation])
        assert comms.get("c10d.allreduce_", 0) <= 4 and comms.get("c10d_functional.all_reduce", 0) == 3, comms


COUNTS_PASS = (65536 + 2) * 8  # one pass of the selection: an all_reduce of its bins' int64 counts (Note [Exact selection])


def _zero_groups(w, name):
    """The zero groups of ``w`` under the target case ``name``: elements, rows or columns."""
    return int((w == 0).sum()) if name == "l0" else int((w.norm(dim=1 if name == "rows" else 0) == 0).sum())


def test_fsdp2_l0_and_group_targets_match_one_process_and_their_collectives_do_not_grow_with_the_model(tmp_path):
    """FSDP2 on 2 ranks with an l0=True target, a group target over rows (each row on one rank) and
    one over columns (each column split over both ranks), each at widths 16 and 64 (464 and 4,928
    weights; the first two weights shard evenly, the last one's 5 rows unevenly, 3 + 2): each hits
    its budget exactly, with the zero set of the same training in one process and weights within
    1e-5 of each tensor's largest magnitude (FSDP2's reduce-scatter sums the ranks' gradients in
    another order, which Adam's division by sqrt(v) carries on; measured at most 1e-6 of it).

    Every optimizer step (Adam, the target's critical strengths, selection and map) is counted with
    CommDebugMode and the bytes passed to each collective: nothing is gathered. For l0 and rows the
    only collectives are the selection's count all_reduces (524,304 bytes a pass, 2 passes, plus
    24 bytes of per-tensor counts: 1,048,632 bytes in every step, at both widths) and the
    safeguard's three 4-byte norms.
    Columns add the all_reduces of the column norms (each selection pass's and the map's), which
    grow with the number of columns and not with the weights: 2,732 to 3,404 bytes at width 16,
    10,028 to 11,564 at 64; their count all_reduces are the same at both widths."""
    import distributed_job as job

    _run_distributed("fsdp-targets", tmp_path)
    seen = {}
    for name, calls in job.TARGET_CASES.items():
        asked = calls[0][1]["sparsity"]
        for suffix in job.WIDTHS:
            case = f"fsdp-{name}{suffix}"
            got = torch.load(tmp_path / f"{case}-rank0.pt", weights_only=True)
            del got["report.zeros"]
            expected = _one_process(case)
            for key in expected:
                assert torch.equal(got[key] == 0, expected[key] == 0), (case, key)
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5 * float(expected[key].abs().max()))
            weights = [got[f"{i}.weight"] for i in (0, 2, 4)]
            groups = sum(w.numel() if name == "l0" else w.shape[0 if name == "rows" else 1] for w in weights)
            assert sum(_zero_groups(w, name) for w in weights) == round(asked * groups), case  # the budget, exactly
            for rank in (0, 1):
                steps = json.loads((tmp_path / f"{case}-comms-rank{rank}.json").read_text())
                assert len(steps) == job.STEPS
                for ops in steps:
                    assert set(ops) <= {"c10d.allreduce_", "c10d_functional.all_reduce"}, (case, ops)  # nothing gathered
                    counts = ops["c10d.allreduce_"]
                    assert counts["bytes"] == 2 * COUNTS_PASS + 3 * 8, (case, ops)  # 2 passes, 3 tensors' counts
                    if name != "columns":
                        assert ops["c10d_functional.all_reduce"] == {"count": 3, "bytes": 12}, (case, ops)
                seen[case, rank] = steps
    for rank in (0, 1):
        for name in ("l0", "rows"):
            assert seen[f"fsdp-{name}", rank] == seen[f"fsdp-{name}-wide", rank]  # the same bytes at 464 and 4,928 weights
        narrow, wide = seen["fsdp-columns", rank], seen["fsdp-columns-wide", rank]
        assert [s["c10d.allreduce_"] for s in narrow] == [s["c10d.allreduce_"] for s in wide]
    print({f"{case} rank {rank}": [{op: c["bytes"] for op, c in ops.items()} for ops in steps] for (case, rank), steps in seen.items()})


def test_fsdp2_dcp_round_trips_resume_the_uninterrupted_run(tmp_path):
    """DCP on an FSDP2 model (2 ranks), get_state_dict/set_state_dict with dcp.save/dcp.load, saved
    after 3 steps (targets mid-ramp) and trained to 7 (the ramps end at 6). Eight cases in one job
    (distributed_job.DCP_CASES): two sets of attach calls, one with a target, a strength schedule and
    keep_zeros on the unevenly sharded weight under SGD with momentum, one with L1, a column group
    lasso and an l0 target under AdamW; each attached before and after fully_shard, with
    flatten_optimizer_state_dict off and on, the fresh optimizer's state made before the template
    in half of them (alternating, so each set has it on and off). In every case DCP's zero-lr
    initialisation neither raises nor counts, the checkpoint holds paramreg's keys, and the resumed
    run ends bitwise equal to the uninterrupted one, with the same step counts and momentum fills."""
    import distributed_job as job

    _run_distributed("fsdp-dcp", tmp_path)
    for i, (name, before, flatten, existing) in enumerate(job.DCP_CASES):
        case = f"{name}, attached {'before' if before else 'after'} fully_shard, flatten {flatten}, state before {existing}"
        seen = torch.load(tmp_path / f"fsdp-dcp-{i}-rank0.pt", weights_only=True)
        assert seen["fresh calls"] == [0, 0, 0], case  # DCP's initialisation step is not a step
        assert any("paramreg_steps" in k for k in seen["paramreg keys"]), case
        assert any("paramreg_momentum_fill" in k for k in seen["paramreg keys"]) == (name == "target"), case
        full_calls, resumed_calls = seen["calls"]
        assert full_calls == resumed_calls == ([7, 7, 0] if name == "target" else [0, 0, 7]), case
        assert seen["fills"][0] == seen["fills"][1] and (seen["fills"][0] != []) == (name == "target"), case
        full, resumed = seen["full"], seen["resumed"]
        assert list(full) == list(resumed) and all("parametrizations" not in k for k in full), case  # plain keys
        for key in full:
            assert torch.equal(full[key], resumed[key]), (case, key)
        zeros = int((full["0.weight" if name == "target" else "4.weight"] == 0).sum())
        assert zeros == (64 if name == "target" else 32), case  # the targets' ends: 50% of 128, 40% of 80
        assert (full["4.weight"].view(-1)[::3] == 0).all() or name != "target", case  # keep_zeros kept them


def test_fsdp2_keep_zeros_attached_before_sharding_keeps_them(tmp_path):
    """KeepZeros' mask is taken at attach, before fully_shard, as a whole plain tensor; it is
    sharded like its weight at the first step (uneven shards too) and the run equals one process."""
    got, _ = _fsdp_against_one_process("fsdp-keep-zeros", tmp_path)
    for i in (0, 2, 4):
        assert (got[f"{i}.weight"].view(-1)[::3] == 0).all() and (got[f"{i}.weight"] != 0).any()


def test_fsdp2_held_zeros_keep_a_normal_second_moment_on_their_shards(tmp_path):
    """A target that keeps its zeros under FSDP2 (the last weight sharded unevenly) and Adam with
    beta2 = 0.5, for 130 steps: every held zero's second moment, on each rank's shard, lies
    between tiny·2^6 and the floor tiny·2^12 the pass raises it to, where it would have decayed
    from at most its weight's largest after the ramp by 0.5^126, below the smallest normal float
    (Note [Decaying state of held zeros] in optim/hooks.py). The run has the zero set of one
    process and weights within 1e-5 of each tensor's largest magnitude, as the FSDP2 targets over
    4 steps: FSDP2's reduce-scatter sums the ranks' gradients in another order, which Adam's
    division by sqrt(v) carries on for 130 steps (measured at most 4.0e-7 of it; the 5-step
    runs' 2e-6 absolute failed after 120 steps, at 8.1e-6)."""
    got, expected = _fsdp_against_one_process("fsdp-floor", tmp_path, relative=1e-5)
    for key in expected:
        assert torch.equal(got[key] == 0, expected[key] == 0), key
    import distributed_job as job

    tiny = torch.finfo(torch.float32).tiny
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"fsdp-floor-moments-rank{rank}.json").read_text())
        assert all(n > 0 for n in seen["held"]), seen  # every shard holds zeros
        moments = zip(seen["largest at the ramp's end"], seen["least held"], seen["most held"], strict=True)
        for largest, least, most in moments:
            assert largest * 0.5 ** (job.FLOOR_STEPS - 4) < tiny  # decayed, it would be denormal
            assert tiny * 2.0 ** (hooks.FLOOR_BITS / 2) <= least <= most <= tiny * 2.0**hooks.FLOOR_BITS, seen


def test_fsdp2_classes_survive_dcp_and_remove(tmp_path):
    """Attached before fully_shard, DCP's get_state_dict in the middle of training, more steps,
    then remove: every module keeps the class FSDP2 gave it, stays callable, and after remove is
    FSDP2's class for a plain Linear (Note [Module classes] in modules/classes.py)."""
    _run_distributed("fsdp-classes", tmp_path)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"fsdp-classes-rank{rank}.json").read_text())
        assert seen["sharded"] == ["FSDPParametrizedLinear"] * 3
        assert seen["after get_state_dict"] == [True] * 3 and seen["trained after get_state_dict"]
        assert seen["removed"] == ["FSDPLinear"] * 3 and seen["fsdp class of Linear"] == [True] * 3
        assert seen["fsdp modules"] == [True] * 3 and seen["parametrized"] == [False] * 3
        assert seen["trained after remove"]


def test_autocast_bfloat16_with_float32_weights_applies_the_prox_to_the_float32_weights():
    """Mixed precision as torch.autocast does it: the float32 Parameters are the master weights."""
    x, y = mlp_batch()
    model, reference = mlp(), mlp()
    paramreg.attach(model, "*.weight", l1=0.05, step="lr")
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, reference))
    for _ in range(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()
        with torch.no_grad():
            for w in (reference[0].weight, reference[2].weight):
                w.copy_(F.softshrink(w, 0.1 * 0.05))
    assert model[0].weight.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    assert (model[0].weight == 0).any()


def test_hand_kept_float32_master_weights_carry_the_zeros_into_the_bfloat16_copy():
    """A bfloat16 model for compute, float32 master weights stepped by the optimizer: attach to the
    master copy, which is what the optimizer steps."""
    import copy

    x, y = mlp_batch()
    master = mlp()
    paramreg.attach(master, "*.weight", l1=0.02)
    work = copy.deepcopy(paramreg.folded(master)).to(torch.bfloat16)
    opt = torch.optim.Adam(master.parameters(), lr=1e-2)
    for _ in range(10):
        work.zero_grad()
        F.cross_entropy(work(x.bfloat16()).float(), y).backward()
        for m, w in zip(master.parameters(), work.parameters(), strict=True):
            m.grad = w.grad.float()
        opt.step()
        with torch.no_grad():
            for m, w in zip(master.parameters(), work.parameters(), strict=True):
                w.copy_(m)
    zeros = master[0].weight == 0
    assert zeros.any() and (~zeros).any()
    assert torch.equal(work[0].weight == 0, zeros)  # an exact zero stays exact in bfloat16


def _count_compiles():
    compiled = []

    def backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    return compiled, backend


def test_torch_compile_recompiles_no_more_than_the_plain_model():
    x, y = mlp_batch()
    counts = {}
    for attached in (False, True):
        torch._dynamo.reset()
        model = mlp()
        if attached:
            paramreg.attach(model, "*.weight", l1=0.1)  # strong enough for zeros in 4 Adam steps (safeguarded metric)
        compiled, backend = _count_compiles()
        forward = torch.compile(model, backend=backend)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(4):  # the prox changes the weights in place between calls
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()
        forward.eval()
        forward(x)
        counts[attached] = len(compiled)
    assert counts[True] == counts[False] == 1  # in-place weight changes (optimizer, prox) do not recompile
    assert (model[0].weight == 0).any()


def test_compiled_training_step_matches_eager():
    x, y = mlp_batch()
    results = []
    for compile_step in (False, True):
        torch._dynamo.reset()
        model = mlp()
        paramreg.attach(model, "*.weight", l1=0.1)  # strong enough for zeros in 4 Adam steps (safeguarded metric)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)

        def train_step(model=model, opt=opt):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        step = torch.compile(train_step, backend="aot_eager") if compile_step else train_step
        for _ in range(4):
            step()
        results.append(paramreg.folded(model).state_dict())
    eager, compiled = results
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-6)
    assert (compiled["0.weight"] == 0).any()
