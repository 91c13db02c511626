"""Sparsity at scale: a GPT-style model of 10M+ parameters trained with FSDP2 to a sparsity target,
saved with DCP mid-training, resumed into a fresh model and optimizer, and reported.

    torchrun --standalone --nproc_per_node=2 examples/at_scale.py            # about 11M parameters
    torchrun --standalone --nproc_per_node=2 examples/at_scale.py --quick    # a small model, seconds

On the CPU the ranks talk through gloo; on GPUs (one per rank) through nccl, unchanged. The data
are the bytes of the Python standard library's own source (examples/study_text.py's corpus: nothing
is downloaded). Every block's Linear weights carry one sparsity target with the whole recipe in one
call: nothing zeroed for the first sixth of the steps, a cubic ramp to 90% by two thirds, then
those zeros kept while the rest trains on (Note [Ramp, then keep the zeros] in
paramreg/optim/targets.py). Each rank holds its shard of every weight; the target's strength is
found by counting each rank's shard and all-reducing the counts (Note [Target sparsity]). Halfway
through, the run is saved with ``torch.distributed.checkpoint`` and continued in a freshly built
model and optimizer loaded from it, as a resumed job would be.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

import paramreg
from study_text import CharTransformer, Setup, batch_at, load_corpus

FULL = Setup(data_bytes=3_000_000, layers=6, width=384, heads=6, context=128, batch=8, lr=1e-3)
QUICK = Setup(data_bytes=200_000, layers=2, width=64, heads=4, context=32, batch=4, lr=1e-3)
WEIGHTS = r"re:blocks\.\d+\.(qkv|proj|fc1|fc2)\.weight"
SPARSITY = 0.9


def build(setup: Setup, steps: int, device):
    """The model (the same on every rank), its target attached, sharded; and its optimizer."""
    torch.manual_seed(0)
    model = CharTransformer(setup).to(device)
    paramreg.attach(model, WEIGHTS, sparsity=SPARSITY, sparsity_steps=(steps // 6, 2 * steps // 3), keep_zeros=True, l1=True)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.0)


def train(model, opt, train_bytes, setup, rank, steps, device) -> float:
    """The steps in ``steps`` (each rank its own batches); the mean seconds per step."""
    started = time.perf_counter()
    for k in steps:
        x, y = (t.to(device) for t in batch_at(train_bytes, setup, rank, k))
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
    return (time.perf_counter() - started) / max(len(steps), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few steps: seconds")
    parser.add_argument("--steps", type=int, help="optimizer steps in all (default 30; 12 with --quick)")
    parser.add_argument("--out", default="at_scale_checkpoint", help="folder of the DCP checkpoint")
    args = parser.parse_args()
    # the model returns its logits as they are; FSDP2 warns about any view it returns
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    setup = QUICK if args.quick else FULL
    steps = args.steps or (12 if args.quick else 30)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    train_bytes = load_corpus(setup.data_bytes)[0]["train"]

    model, opt = build(setup, steps, device)
    parameters = sum(p.numel() for p in model.parameters())  # DTensor numel: the whole tensor's
    half = steps // 2
    first = train(model, opt, train_bytes, setup, rank, range(half), device)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.out)
    del model, opt, model_state, optim_state

    model, opt = build(setup, steps, device)  # a resumed job: built afresh, then loaded
    model_state, optim_state = get_state_dict(model, opt)  # the template (its zero-lr step does not count)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=args.out)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    second = train(model, opt, train_bytes, setup, rank, range(half, steps), device)

    report = paramreg.report(model)  # gathers the shards: on every rank
    if rank == 0:
        selected = sum(row.numel for row in report)
        print(f"{parameters:,} parameters, {selected:,} selected, {world} ranks ({'nccl' if cuda else 'gloo'}), "
              f"{steps} steps, saved with DCP after step {half} and resumed")
        print(f"seconds per step: {first:.2f} before the checkpoint, {second:.2f} after")
        print(report)
    dist.barrier()
    del model, opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
