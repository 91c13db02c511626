"""python -m paramreg report PATH: a table for good artifacts, one line and exit 2 for anything else."""

import pickle
import random
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

import paramreg
from paramreg.tools.cli import main

from conftest import SmallCNN


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    paramreg.attach(model, "conv*.weight", l1=0.5)
    with torch.no_grad():
        model.conv1.weight[:2] = 0
    path = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "paramreg": paramreg.spec(model)}, path)
    return path, model


def run(capsys, path):
    code = main(["report", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, path):
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"paramreg report: error: {path}: ")
    assert "Traceback" not in err


def test_checkpoint_with_spec(capsys, checkpoint):
    path, model = checkpoint
    code, out, err = run(capsys, path)
    assert code == 0 and err == ""
    lines = out.splitlines()
    conv1 = next(line for line in lines if line.startswith("conv1.weight"))
    assert "4x1x3x3" in conv1 and " 18 " in conv1 and "50.0%" in conv1 and "L1(strength=0.5) [prox]" in conv1
    assert lines[-1].startswith("total")
    assert "bn1.num_batches_tracked" not in out  # integer buffers are not weights


def test_plain_state_dict_safetensors_and_onnx(capsys, checkpoint, tmp_path):
    _, model = checkpoint
    plain = paramreg.folded(model).eval()
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, tmp_path / "plain.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (torch.randn(1, 1, 8, 8),), tmp_path / "plain.onnx", dynamo=False, do_constant_folding=False)
    for name in ("plain.pth", "plain.safetensors", "plain.onnx"):
        code, out, err = run(capsys, tmp_path / name)
        assert code == 0, err
        assert any(line.startswith("conv1.weight") and "50.0%" in line for line in out.splitlines()), name


def test_damaged_and_foreign_inputs(capsys, checkpoint, tmp_path):
    path, _ = checkpoint
    data = path.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.onnx").write_text("not a model")
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "notes.txt").write_text("hello")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    cases = ["empty.pt", "truncated.pt", "text.onnx", "truncated.safetensors", "notes.txt", "tensor.pt", "nostate.pt", "missing.pt", "."]
    for name in cases:
        target = tmp_path / name
        assert_one_line_error(*run(capsys, target), target)


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/paramreg-pwned", "w"))


def test_foreign_pickles_are_never_unpickled(capsys, tmp_path):
    import os

    if os.path.exists("/tmp/paramreg-pwned"):
        os.remove("/tmp/paramreg-pwned")
    target = tmp_path / "evil.pt"
    with open(target, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    torch.save({"model": _Payload()}, tmp_path / "evil2.pt")
    for path in (target, tmp_path / "evil2.pt"):
        assert_one_line_error(*run(capsys, path), path)
    assert not os.path.exists("/tmp/paramreg-pwned")


def test_bit_flips_never_give_a_traceback(capsys, checkpoint, tmp_path):
    path, _ = checkpoint
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for i in range(40):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        target = tmp_path / f"flip{i}.pt"
        target.write_bytes(bytes(damaged))
        code, out, err = run(capsys, target)
        assert code in (0, 2) and "Traceback" not in err
        if code == 2:
            assert_one_line_error(code, out, err, target)


def test_module_entry_point(checkpoint):
    path, _ = checkpoint
    done = subprocess.run([sys.executable, "-m", "paramreg", "report", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "conv1.weight" in done.stdout
    evil = path.with_name("evil.pt")
    torch.save({"model": _Payload()}, evil)
    for target in (str(path) + ".missing", evil):
        done = subprocess.run([sys.executable, "-m", "paramreg", "report", str(target)], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr


def _fuzz_inputs(seed_files, count, rng):
    """Damaged copies of real artifacts: truncations, bit flips, byte runs overwritten, random junk."""
    for i in range(count):
        name, data = seed_files[i % len(seed_files)]
        kind = i % 4
        if kind == 0:
            damaged = data[: rng.randrange(len(data))]
        elif kind == 1:
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 16)):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        elif kind == 2:
            damaged = bytearray(data)
            start = rng.randrange(len(damaged))
            damaged[start : start + rng.randint(1, 64)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            damaged = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2048)))
        yield name, bytes(damaged)


FUZZ_INPUTS = 300


def test_fuzz_report_with_damaged_checkpoints_safetensors_and_onnx(capsys, checkpoint, tmp_path):
    import signal

    path, model = checkpoint
    plain = paramreg.folded(model).eval()
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, tmp_path / "seed.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (torch.randn(1, 1, 8, 8),), tmp_path / "seed.onnx", dynamo=False, do_constant_folding=False)
    seeds = [(p.suffix, p.read_bytes()) for p in (path, tmp_path / "seed.safetensors", tmp_path / "seed.onnx")]

    def watchdog(signum, frame):
        raise AssertionError("report hung on a damaged input")

    previous = signal.signal(signal.SIGALRM, watchdog)
    outcomes = {0: 0, 2: 0}
    try:
        for i, (suffix, data) in enumerate(_fuzz_inputs(seeds, FUZZ_INPUTS, random.Random(1))):
            target = tmp_path / f"fuzz{i}{suffix}"
            target.write_bytes(data)
            signal.alarm(20)
            code, out, err = run(capsys, target)
            signal.alarm(0)
            assert code in (0, 2), (target, code)
            if code == 2:
                assert_one_line_error(code, out, err, target)
            outcomes[code] += 1
            target.unlink()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    print(f"fuzz: {FUZZ_INPUTS} damaged inputs, {outcomes[0]} still readable, {outcomes[2]} one-line errors")
    assert outcomes[2] > FUZZ_INPUTS // 2  # most damage is detected, and all of it is one line
