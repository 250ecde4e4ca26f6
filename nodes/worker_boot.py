"""Runs first inside every engine worker (PCPP_WORKER_PRELOAD): ComfyUI's flags as the host has them.

ComfyUI reads its command line once, when `comfy.cli_args` is imported, and
`comfy.model_management` picks its device at import. A worker is a plain
`python -m pcpp_core.worker`: without this it would parse an empty command line, and on a
CPU-only torch die asking CUDA for a device while unpickling the first ComfyUI class. Copying
the host's flags also gives the workers the host's attention backend and precision choices,
so `sync` mode reproduces the host's numbers, and the engine's self-attention ComfyUI's
upcast rule (--force-upcast-attention / --dont-upcast-attention, the module's attn_precision).
"""
from __future__ import annotations

import json
import os

from comfy.cli_args import args  # parses an empty command line: comfy.options left it off

for _name, _value in json.loads(os.environ.get("PCPP_COMFY_ARGS", "{}")).items():  # options.ARGS_ENV
    if hasattr(args, _name):
        setattr(args, _name, _value)

from comfy.ldm.modules import attention as _comfy_attention  # after the flags: it reads them at import
from pcpp_core.layers.attention import set_attention_precision

set_attention_precision(
    lambda module, dtype: _comfy_attention.get_attn_precision(getattr(module, "attn_precision", None), dtype))
