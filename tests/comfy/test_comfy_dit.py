"""In-process: the nodes' hook on tiny random Flux and SD3 (MMDiT) models built through ComfyUI's
own model classes (`supported_models.Flux/SD3(...).get_model`, no file), 2 CPU workers.

A 20 x 12 latent (10 x 6 patches). Every comparison is against stock `comfy.sample.sample` on the
same ModelPatcher, noise and conditioning.
"""
from __future__ import annotations

import pytest
import torch

from test_comfy_sampling import pcpp, rel_close, sample

pytestmark = pytest.mark.comfy

LATENT = (1, 16, 20, 12)


def _patcher(comfy, model):
    with torch.no_grad():
        for p in [*model.diffusion_model.parameters(), *model.diffusion_model.buffers()]:  # SD3's pos_embed
            p.normal_(0.0, (p[0].numel() ** -0.5) if p.dim() > 1 else 0.1)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def flux(comfy):
    cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=32,
               mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000,
               patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    torch.manual_seed(0)
    return _patcher(comfy, comfy.supported_models.Flux(cfg).get_model({}))


@pytest.fixture(scope="module")
def sd3(comfy):
    ctx = {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}}
    cfg = dict(in_channels=16, patch_size=2, depth=2, adm_in_channels=32, context_embedder_config=ctx,
               pos_embed_max_size=32, num_patches=1024, pos_embed_scaling_factor=None, qk_norm="rms",
               x_block_self_attn_layers=[0])
    torch.manual_seed(0)
    return _patcher(comfy, comfy.supported_models.SD3(cfg).get_model({}))


def _inputs(**positive_extra):
    g = torch.Generator().manual_seed(1)
    return {"positive": [[torch.randn(1, 7, 64, generator=g),
                          {"pooled_output": torch.randn(1, 32, generator=g), **positive_extra}]],
            "negative": [[torch.randn(1, 7, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]],
            "noise": torch.randn(LATENT, generator=g)}


@pytest.mark.parametrize("cfg", [1.0, 3.0])  # Flux dev/schnell are guidance-distilled (CFG 1); 3: cond+uncond
def test_flux_sync_equals_stock(comfy, flux, cfg):
    inputs = _inputs(guidance=3.5)
    ref = sample(comfy, flux, inputs, "euler", cfg)
    parallel, hook = pcpp(comfy, flux, mode="sync")
    out = sample(comfy, parallel, inputs, "euler", cfg)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["bands"] == 2 and stats["bytes_per_call"] > 0
    rel_close(out, ref)


@pytest.mark.parametrize("mode", ["sync", "pcpp"])
def test_sd3_runs_on_bands(comfy, sd3, mode):
    """ComfyUI calls SD3's MMDiT without DIFFUSION_MODEL wrappers; for the run the nodes route its
    forward through them (nodes/routing.py) and remove that again afterwards."""
    inputs = _inputs()
    ref = sample(comfy, sd3, inputs, "euler", 3.0)
    parallel, hook = pcpp(comfy, sd3, mode=mode, neighbour_fraction=0.0, warmup_steps=1)
    out = sample(comfy, parallel, inputs, "euler", 3.0)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["bands"] == 2 and stats["calls"] == 3
    assert "forward" not in vars(sd3.model.diffusion_model)  # the class's own forward again
    if mode == "sync":
        rel_close(out, ref)
    else:  # stale windows after warm-up: fewer bytes, close but not equal
        assert 0 < stats["bytes_per_call"] < stats["bytes_per_call_warmup"]
        assert torch.isfinite(out).all() and (out - ref).abs().max() > 0


def test_pcpp_sends_less_after_warm_up(comfy, flux):
    inputs = _inputs(guidance=3.5)
    ref = sample(comfy, flux, inputs, "euler", 1.0)
    parallel, hook = pcpp(comfy, flux, mode="pcpp", neighbour_fraction=0.0, warmup_steps=1)
    out = sample(comfy, parallel, inputs, "euler", 1.0)
    stats = hook.last_stats
    assert stats["fallback"] is None and 0 < stats["bytes_per_call"] < stats["bytes_per_call_warmup"]
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 0  # stale windows: close, not equal


def test_reference_latents_fall_back_with_the_reason(comfy, flux):
    """Kontext-style extra image tokens are not split: plain sampling, the very same numbers."""
    inputs = _inputs(guidance=3.5, reference_latents=[torch.randn(1, 16, 8, 8)])
    ref = sample(comfy, flux, inputs, "euler", 1.0)
    parallel, hook = pcpp(comfy, flux, mode="sync")
    out = sample(comfy, parallel, inputs, "euler", 1.0)
    assert "reference latents" in hook.last_stats["fallback"]
    assert torch.equal(out, ref)


def test_model_that_never_reaches_the_wrapper_says_so(comfy, sd3, monkeypatch):
    """Were SD3 not routed (the nodes' own fix switched off), its calls would bypass PCPP: the run
    must say it sampled on one device, not report a parallel run that never happened."""
    monkeypatch.setattr(comfy.hook.routing, "needs_routing", lambda model: False)
    inputs = _inputs()
    ref = sample(comfy, sd3, inputs, "euler", 3.0)
    parallel, hook = pcpp(comfy, sd3, mode="sync")
    out = sample(comfy, parallel, inputs, "euler", 3.0)
    assert "never called PCPP's DIFFUSION_MODEL wrapper" in hook.last_stats["fallback"]
    assert torch.equal(out, ref)


def test_flux_cfg_split_equals_stock(comfy, flux):
    """cfg_split: cond and uncond halves (guidance and pooled vectors cut with them) on one worker each."""
    inputs = _inputs(guidance=3.5)
    ref = sample(comfy, flux, inputs, "euler", 3.0)
    parallel, hook = pcpp(comfy, flux, mode="sync", cfg_split=True)
    out = sample(comfy, parallel, inputs, "euler", 3.0)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["bands"] == 1 and stats["devices"] == ["cpu", "cpu"]
    rel_close(out, ref)


def test_flux_far_rows_travel_unpooled(comfy, flux):
    """A UNet's far rows are pooled with a residual codec (RESIDUAL_FAR_POOL); a DiT's are not (its
    token rows are narrow: pooling cost the tiny DiT 10 dB, README)."""
    inputs = _inputs(guidance=3.5)
    parallel, hook = pcpp(comfy, flux, mode="pcpp", exchange="residual-2bit", far_refresh=2, warmup_steps=1)
    out = sample(comfy, parallel, inputs, "euler", 1.0)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["far_refresh"] == 2 and stats["far_pool"] == 1
    assert torch.isfinite(out).all() and 0 < stats["bytes_per_call"] < stats["bytes_per_call_warmup"]
