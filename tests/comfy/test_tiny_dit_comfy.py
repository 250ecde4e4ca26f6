"""The tiny DiT is ComfyUI's Flux: its weights load strictly into comfy.ldm.flux.model.Flux and both agree
(the tiny DiT reads the network's output as x0 and returns the velocity, tiny_dit.velocity)."""
from __future__ import annotations

import json

import torch

from pcpp_core.tiny_dit import ASSET, load_tiny_dit, velocity


def test_tiny_dit_weights_run_in_comfy_flux(comfy):
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    ours, emb = load_tiny_dit()
    flux = Flux(operations=comfy.ops.disable_weight_init, **json.loads((ASSET / "config.json").read_text()))
    sd = ours.state_dict()
    if any(k.endswith("_norm.scale") for k in flux.state_dict()):  # 0.8.0: RMSNorm's parameter is `scale`
        # (BFL's file naming, which 0.33's loader renames to `weight` in Flux.process_unet_state_dict)
        sd = {k.removesuffix(".weight") + ".scale" if k.endswith("_norm.weight") else k: v for k, v in sd.items()}
    flux.load_state_dict(sd, strict=True)
    flux.eval()
    x = torch.randn(2, 48, 10, 14, generator=torch.Generator().manual_seed(0))  # 5 x 7 patches
    t, c = torch.tensor([0.25, 0.75]), emb[[3, 12]]
    calls = {"comfy": 0, "tiny": 0}

    def counting(who):
        def override(func, *args, **kwargs):
            calls[who] += 1
            return func(*args, **kwargs)
        return override

    with torch.no_grad():  # Flux's y defaults to zeros; the tiny DiT's to the mean condition token
        x0 = flux(x, t, c, y=c.mean(1), transformer_options={"optimized_attention_override": counting("comfy")})
        want = velocity(x, x0, t)
        got = ours(x, t, c, transformer_options={"optimized_attention_override": counting("tiny")})
    assert calls["comfy"] == calls["tiny"] == len(ours.double_blocks) + len(ours.single_blocks)
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
