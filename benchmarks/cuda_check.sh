#!/usr/bin/env bash
# The GPU check: the whole test suite (tests parametrized by device also run on "cuda") and the
# benchmark suite and a target's cost up to 1B selected weights on CUDA (peak memory as the GPU's
# peak allocation), from a source checkout,
# with the machine's own torch.
#   bash benchmarks/cuda_check.sh OUTDIR
set -uo pipefail
out=${1:-.}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name())" | tee "$out/device.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="--doctest-modules -ra" tests src/paramreg 2>&1 | tee "$out/tests.log" | tail -25
python3 benchmarks/suite.py --device cuda 2>&1 | tee "$out/bench.log"
python3 benchmarks/target_cost.py --device cuda --sizes 1 8 25 100 250 1000 --gpt 2>&1 | tee "$out/target_cost.log"
python3 benchmarks/target_cost.py --device cuda --sizes 100 --optimizers AdamW --whole-run 400 2>&1 | tee "$out/whole_run.log"
