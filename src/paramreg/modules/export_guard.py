"""The export guard: every exporter that would record paramreg's carriers is refused here, with the fix.

Note [Export guard]
    An export of an attached model records paramreg's carriers: ``torch.export`` and the ONNX
    exporters store each carried tensor twice (also as ``...parametrizations.weight.original``),
    ``torch.jit.trace`` keeps the ``parametrizations`` submodules, ``torch.jit.script`` stops at
    them. paramreg sees each of these while it happens and raises :class:`ParamregError` saying
    to ``remove`` or export ``folded(model)`` instead. Where each one is seen (the test that pins
    it is in tests/test_export.py):

    =====================================  ==========================================================  ==========================================
    exporter                               intercepted in                                              test
    =====================================  ==========================================================  ==========================================
    ``torch.jit.script``                   ``__prepare_scriptable__`` of paramreg's module class,      ``test_exporting_an_attached_model_fails_loudly_with_the_fix``
                                           which TorchScript calls on every module before compiling
    ``torch.jit.trace``                    the ``parametrizations`` attribute of paramreg's class,      same                                      
                                           read while ``torch.jit._trace._trace_module_map`` is set
    ``torch.export.export`` (non-strict)   the same attribute, read while                              same                                      
                                           ``torch.compiler.is_exporting()``
    ``torch.onnx.export(dynamo=False)``    the state-dict hook (``state_dict()`` while                 same                                      
                                           ``torch.onnx.is_in_onnx_export()``)
    ``torch.onnx.export(dynamo=True)``     ``Carrier.extra_repr``: the exporter prints the model       same                                      
                                           before each capture (and would fall back from a refused
                                           non-strict capture to a strict one)
    ``torch.export.export(strict=True)``   not seen (dynamo reads the parameters without paramreg's    ``test_strict_torch_export_is_not_seen_and_check_plain_is_the_guard``
                                           code): :func:`paramreg.check_plain` is the guard
    =====================================  ==========================================================  ==========================================

    ``torch.compile`` reads none of these, so it keeps working while attached. paramreg's module
    class (modules/classes.py) asks :func:`exporting` and calls :func:`refuse`; the state-dict
    hook (modules/state_dict.py) and the carrier's repr call :func:`refuse_in_onnx_export`;
    nothing else in paramreg decides whether an export is under way.
"""

from __future__ import annotations

import torch

from ..errors import ParamregError

__all__ = ["exporting", "refuse", "refuse_in_onnx_export"]

# torch.compiler.is_exporting is newer than the oldest torch paramreg supports
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def refuse(names: str, how: str):
    """Raise: ``how`` (an exporter) runs on a model whose tensors ``names`` paramreg carries."""
    raise ParamregError(
        f"{how} of a model with paramreg attached ({names}): the export would record "
        f"paramreg's carriers. Call paramreg.remove(model) before exporting, or export paramreg.folded(model) "
        f"(a plain copy; the model stays attached)"
    )


def exporting() -> str | None:
    """The exporter under way that reads ``module.parametrizations`` (``torch.jit.trace`` or
    ``torch.export``), or None."""
    if getattr(torch.jit._trace, "_trace_module_map", None) is not None:  # torch.jit.trace builds its module
        return "torch.jit.trace"
    if _is_exporting():  # torch.export.export, torch.onnx.export(dynamo=True)
        return "torch.export"
    return None


def refuse_in_onnx_export(names: str) -> None:
    """From ``state_dict()`` and the carrier's repr: raise while an ONNX export runs."""
    if torch.onnx.is_in_onnx_export():
        refuse(names, "torch.onnx.export")
