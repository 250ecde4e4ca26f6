"""What of a ComfyUI model call can travel to the worker processes (plain Python, no ComfyUI).

Everything the engine sends is pickled to the workers on every call, and the workers run the
model without the host's Python objects. Tensors and plain data travel; model patches (callables
that ComfyUI nodes put in `transformer_options`) travel only when they are band-local and a
worker can import them (patches.py); a call holding any other callable must run on the host
instead, and the user must be told.
"""
from __future__ import annotations

import uuid
from typing import Any

import torch

from .patches import travelling_patches

HOOK_KEY = "pcpp"  # transformer_options entry holding the node's settings (PCPPHook)
RUN_KEY = "pcpp_run"  # transformer_options entry holding the current sampling run (RunState)
ARGS_ENV = "PCPP_COMFY_ARGS"  # the host's ComfyUI flags, as JSON, for worker_boot

# ComfyUI machinery that has already run on the host by the time the diffusion model is called
_HOST_ONLY = frozenset({"wrappers", "callbacks", HOOK_KEY, RUN_KEY})
# dicts of callables: harmless while empty, not runnable by a worker once a node fills them
_PATCH_DICTS = ("patches", "patches_replace")
_SCALARS = (type(None), bool, int, float, str, uuid.UUID, torch.dtype, torch.device, torch.Size)


def is_plain(value: Any) -> bool:
    """True when `value` is tensors and plain data only, nested in lists, tuples and dicts."""
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        return True
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return all(is_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, (str, int)) and is_plain(v) for k, v in value.items())
    return False


def split_transformer_options(options: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(what the workers get, None), or ({}, why the call must run on the host)."""
    clean: dict[str, Any] = {}
    for key, value in options.items():
        if key in _HOST_ONLY:
            continue
        if key in _PATCH_DICTS:
            continue
        if not is_plain(value):
            return {}, f"transformer_options[{key!r}] holds a {type(value).__name__}, which workers cannot run"
        clean[key] = value
    patches, reason = travelling_patches(options)  # band-local model patches run in the workers
    if reason is not None:
        return {}, reason
    clean.update(patches)
    return clean, None


def unsupported_kwargs(kwargs: dict[str, Any]) -> str | None:
    """Why these model inputs cannot travel to the workers, or None when they can."""
    for key, value in kwargs.items():
        if not is_plain(value):
            return f"model input {key!r} is a {type(value).__name__}, which workers cannot receive"
    return None
