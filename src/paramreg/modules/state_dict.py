"""State-dict hooks: a carried tensor is saved under its plain key and loaded from either key.

While attached, ``state_dict()`` has the plain model's keys (Note [The Parameter stays in its
module] in modules/binding.py): the tensor sits in ``module._parameters`` and in the carrier's
``ParametrizationList``, and the save hook keeps only the plain key. The load pre-hook accepts a
plain checkpoint and one saved with torch's parametrize keys.
"""

from __future__ import annotations

import torch
from torch import nn

from . import export_guard
from .walk import carried, plists, sync

__all__ = ["install", "uninstall"]


def _save_hook(module, state_dict, prefix, local_metadata) -> None:
    """Keep, for each carried tensor, exactly the key the model would have without paramreg."""
    carried_here = carried(module)
    if carried_here and torch.onnx.is_in_onnx_export():  # the TorchScript ONNX exporter (Note [Export guard])
        export_guard.refuse_in_onnx_export(", ".join(f"'{plists(module)[n][0].name}'" for n, _ in carried_here))
    metadata = getattr(state_dict, "_metadata", {})
    for name, alone in carried_here:
        inner = f"{prefix}parametrizations.{name}.original"
        if alone:
            if inner in state_dict:  # the stored tensor, under the plain key, in place
                state_dict[prefix + name] = state_dict.pop(inner)
            base = f"{prefix}parametrizations.{name}"
            if not plists(module)[name][0].reparametrizes:
                for key in [k for k in metadata if k == base or k.startswith(base + ".")]:
                    del metadata[key]
        else:  # the user's parametrizations stay: their key is the real one
            state_dict.pop(prefix + name, None)
    if not any(k.startswith(f"{prefix}parametrizations.") for k in state_dict):
        metadata.pop(f"{prefix}parametrizations", None)


def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Accept a carried tensor under its plain key or its parametrize key (checkpoints with or without paramreg)."""
    for name, _ in carried(module):
        plain, inner = prefix + name, f"{prefix}parametrizations.{name}.original"
        if plain in state_dict and inner not in state_dict:
            state_dict[inner] = state_dict[plain]
        elif inner in state_dict and plain not in state_dict:
            state_dict[plain] = state_dict[inner]
        transform = plists(module)[name][0].transform
        if transform is not None:  # a plain checkpoint has no threshold: keep the current one
            for key, value in transform.state_dict().items():
                state_dict.setdefault(f"{prefix}parametrizations.{name}.0.transform.{key}", value)


def _load_post_hook(module, incompatible_keys) -> None:
    sync(module)  # load_state_dict(assign=True) assigns both slots separately
    found = plists(module)
    for name, _ in carried(module):
        found[name][0].remember(found[name].original)  # a memory of the loaded tensor (KeepZeros: its zeros)


def _installed(module: nn.Module) -> bool:
    return any(h is _save_hook for h in module._state_dict_hooks.values())


def install(module: nn.Module) -> None:
    """Register the three hooks on ``module`` once."""
    if not _installed(module):
        module.register_state_dict_post_hook(_save_hook)
        module.register_load_state_dict_pre_hook(_load_hook)
        module.register_load_state_dict_post_hook(_load_post_hook)


def uninstall(module: nn.Module) -> None:
    """Remove exactly the hooks :func:`install` registered."""
    for hooks, ours in (
        (module._state_dict_hooks, _save_hook),
        (module._load_state_dict_pre_hooks, _load_hook),
        (module._load_state_dict_post_hooks, _load_post_hook),
    ):
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is ours]:
            del hooks[key]
