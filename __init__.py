"""ComfyUI-PCPP: one image denoised faster on several GPUs (Partially Conditioned Patch Parallelism).

ComfyUI loads this file; `nodes/` is the only package that imports ComfyUI, `pcpp_core/` is the
engine. Importing the pack outside ComfyUI (pytest at the repo root, tools) registers nothing.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    # workers and the nodes import the engine as the top-level package `pcpp_core`; appended, not
    # prepended, so the pack's `nodes/` never shadows ComfyUI's own `nodes` module
    sys.path.append(_PACK_DIR)

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # ComfyUI looks this name up

    __all__.append("comfy_entrypoint")
