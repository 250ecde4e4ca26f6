"""The ComfyUI adapter: the only package of the pack that imports ComfyUI.

    options.py      which transformer_options / model kwargs can travel to worker processes (no ComfyUI)
    hook.py         the sampling hook: wrappers on a cloned ModelPatcher, per-run state, fallbacks
    pcpp_nodes.py   the V3 nodes PCPPKSampler and PCPPParallelModel, and the extension
    worker_boot.py  imported inside each engine worker before the model is unpickled

Kept import-light: a worker imports `nodes.worker_boot`, which must not pull ComfyUI's API in.
"""
from __future__ import annotations


async def comfy_entrypoint():
    import logging

    from pcpp_core.version import __version__

    from .pcpp_nodes import PCPPExtension

    # here, not at import: worker processes import this package too (nodes.worker_boot)
    logging.getLogger("pcpp.nodes").info("ComfyUI-PCPP %s loaded: PCPPKSampler, PCPPParallelModel", __version__)
    return PCPPExtension()
