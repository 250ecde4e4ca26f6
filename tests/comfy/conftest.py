"""tests/comfy: the node pack inside a real ComfyUI, found through COMFYUI_PATH.

Without COMFYUI_PATH every test here is skipped, with the reason. Test modules import ComfyUI
only through these fixtures, so collection never needs it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
_MISSING = (
    "COMFYUI_PATH is not set" if not COMFYUI_PATH else
    f"COMFYUI_PATH={COMFYUI_PATH} holds no ComfyUI (main.py missing)" if not Path(COMFYUI_PATH, "main.py").is_file()
    else None
)
SKIP_REASON = f"{_MISSING}: point it at a ComfyUI source tree (see ../shared/comfyui/README.md)" if _MISSING else None


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported as a library on the CPU, and the pack loaded the way ComfyUI loads it."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: a CPU torch has no CUDA to ask
    import torch

    torch.set_num_threads(1)  # tiny models: a second thread only spins against the two workers
    import comfy.controlnet
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    spec = importlib.util.spec_from_file_location("comfyui_pcpp", REPO / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_pcpp"] = pack
    spec.loader.exec_module(pack)
    from comfyui_pcpp.nodes import hook, options, pcpp_nodes

    yield SimpleNamespace(controlnet=comfy.controlnet, model_management=comfy.model_management, model_patcher=comfy.model_patcher,
                          sample=comfy.sample, supported_models=comfy.supported_models,
                          pack=pack, hook=hook, options=options, nodes=pcpp_nodes)
    import pcpp_core

    pcpp_core.shutdown_shared()  # the warm worker pool of the in-process tests
