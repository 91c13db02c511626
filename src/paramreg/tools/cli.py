"""Command line: ``python -m paramreg report PATH`` prints the sparsity table of a saved artifact.

PATH is a PyTorch checkpoint (``.pt``, ``.pth``, ``.ckpt``, ``.bin``; read with
``torch.load(..., weights_only=True)``, never unpickled otherwise), a safetensors file (needs the
``safetensors`` package) or an ONNX model (needs ``onnx``). A checkpoint may be a state_dict or a
dict holding one (under ``model``, ``state_dict`` or any key); a ``paramreg`` spec beside it
(:func:`paramreg.spec`) fills the regularizer column. Any problem reading PATH is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Mapping

import torch

from .checkpoint import FORMAT
from .report import tensor_report

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class ArtifactError(Exception):
    """A readable, one-line reason why an artifact could not be reported."""


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_torch(path: str):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        if "Weights only load failed" in str(e):
            raise ArtifactError(
                "holds pickled Python objects, which are never unpickled here (a whole module saved with "
                "torch.save(model)?); save model.state_dict() instead"
            ) from None
        raise ArtifactError(f"not a readable PyTorch checkpoint ({_first_line(e)})") from None
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, Mapping):
        spec = obj.get("paramreg") if isinstance(obj.get("paramreg"), Mapping) else None
        if spec is not None and spec.get("format") != FORMAT:
            spec = None
        for key in ("model", "state_dict", "model_state_dict", *obj.keys()):
            if _is_state_dict(obj.get(key)):
                return obj[key], spec
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ArtifactError(f"no state_dict (a dict of tensors) in this checkpoint; its keys: {keys}")
    raise ArtifactError(f"the checkpoint holds a {type(obj).__name__}, not a state_dict")


def _from_safetensors(path: str):
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ArtifactError("reading .safetensors needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(path), None
    except Exception as e:
        raise ArtifactError(f"not a readable safetensors file ({_first_line(e)})") from None


def _from_onnx(path: str):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ArtifactError("reading .onnx needs the onnx package: pip install onnx") from None
    try:
        model = onnx.load(path)  # external weights (a .data file beside it) included
        return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}, None
    except Exception as e:
        raise ArtifactError(f"not a readable ONNX model ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # no terminal colour codes
    return (text[0] if text else type(e).__name__)[:200]


def load_artifact(path: str):
    """(tensors, spec or None) from a checkpoint, safetensors or ONNX file; ArtifactError otherwise."""
    if not os.path.exists(path):
        raise ArtifactError("no such file")
    if not os.path.isfile(path):
        raise ArtifactError("not a file")
    suffix = os.path.splitext(path)[1].lower()
    readers = {**dict.fromkeys(TORCH_SUFFIXES, _from_torch), ".safetensors": _from_safetensors, ".onnx": _from_onnx}
    if suffix not in readers:
        raise ArtifactError(f"unknown format {suffix or '(no suffix)'}; expected {', '.join(readers)}")
    with warnings.catch_warnings():  # readers warn about damaged files: the error line says it all
        warnings.simplefilter("ignore")
        return readers[suffix](path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paramreg", description="Inspect regularized models.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="print the sparsity table of a checkpoint, safetensors or ONNX file")
    report.add_argument("path", help="a .pt/.pth/.ckpt/.bin state_dict checkpoint, a .safetensors file or an .onnx model")
    args = parser.parse_args(argv)
    try:
        tensors, spec = load_artifact(args.path)
        table = tensor_report(tensors, spec)
    except ArtifactError as e:
        print(f"paramreg report: error: {args.path}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a malformed spec or tensor: still one line, never a traceback
        print(f"paramreg report: error: {args.path}: {_first_line(e)}", file=sys.stderr)
        return 2
    if not table.rows:
        print(f"paramreg report: error: {args.path}: no floating-point tensors", file=sys.stderr)
        return 2
    print(table)
    return 0
