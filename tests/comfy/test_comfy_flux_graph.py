"""A Flux graph as users build it, through ComfyUI's own nodes: UNETLoader on a random tiny Flux
file (tiny_flux.py, written here with a fixed seed) -> ModelSamplingFlux -> FluxGuidance on the
prompt -> KSampler at CFG 1, against PCPP KSampler / PCPP Parallel Model on 2 CPU workers.
ComfyUI 0.8.0's loader cannot load a Flux file this small (tiny_flux.unloadable_reason): there the
loader test skips with that reason and the graph runs on the same weights built as the loader would.

A 20 x 12 latent (160 x 96 pixels, 10 x 6 patches: bands of 5 and 5 patch rows).
"""
from __future__ import annotations

import pytest
import torch

import tiny_flux
from test_comfy_sampling import DEVICES, STEPS, rel_close

pytestmark = pytest.mark.comfy

WIDTH, HEIGHT = 96, 160  # pixels


@pytest.fixture(scope="module")
def flux_file(comfy, tmp_path_factory):
    """(the UNETLoader name, its state dict) of the tiny file in a diffusion_models folder of this test."""
    import folder_paths

    folder = tmp_path_factory.mktemp("diffusion_models")
    sd = tiny_flux.write(folder / "tiny_flux_random.safetensors")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return "tiny_flux_random.safetensors", sd


@pytest.fixture(scope="module")
def loaded(comfy, flux_file):
    """The ModelPatcher UNETLoader makes of the file, or None (with the reason) where this ComfyUI cannot load it."""
    import nodes

    name, sd = flux_file
    reason = tiny_flux.unloadable_reason(sd)
    return (None, reason) if reason else (nodes.UNETLoader().load_unet(name, "default")[0], None)


def test_unet_loader_detects_the_tiny_flux_file(comfy, loaded):
    model, reason = loaded
    if model is None:
        pytest.skip(reason)
    flux = model.model.diffusion_model
    assert type(model.model).__name__ == "Flux" and flux.params.guidance_embed
    assert (flux.hidden_size, flux.num_heads, len(flux.double_blocks), len(flux.single_blocks)) == (128, 1, 1, 1)


@pytest.fixture(scope="module")
def graph(comfy, flux_file, loaded):
    """ModelSamplingFlux on the loaded model (where this ComfyUI cannot load the file: the same
    weights in supported_models.Flux, as the loader would build it), FluxGuidance on the prompt,
    an empty latent."""
    from comfy_extras.nodes_flux import FluxGuidance
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = loaded[0]
    if model is None:
        built = comfy.supported_models.Flux(dict(tiny_flux.CONFIG, image_model="flux")).get_model({})
        built.diffusion_model.load_state_dict(flux_file[1])
        cpu = torch.device("cpu")
        model = comfy.model_patcher.ModelPatcher(built, load_device=cpu, offload_device=cpu)
    (model,) = ModelSamplingFlux().patch(model, 1.15, 0.5, WIDTH, HEIGHT)
    g = torch.Generator().manual_seed(1)
    prompt = [[torch.randn(1, 7, 768, generator=g), {"pooled_output": torch.randn(1, 768, generator=g)}]]
    positive = FluxGuidance.execute(prompt, 3.5).args[0]
    negative = [[torch.zeros(1, 7, 768), {"pooled_output": torch.zeros(1, 768)}]]  # ConditioningZeroOut's
    latent = {"samples": torch.zeros(1, 16, HEIGHT // 8, WIDTH // 8)}
    return model, positive, negative, latent


def _stock(model, positive, negative, latent, cfg=1.0):
    import nodes

    return nodes.KSampler().sample(model, 7, STEPS, cfg, "euler", "simple", positive, negative, latent, 1.0)[0]["samples"]


def test_pcpp_ksampler_sync_equals_stock_ksampler(comfy, graph):
    model, positive, negative, latent = graph
    ref = _stock(model, positive, negative, latent)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    out = comfy.nodes.PCPPKSampler.execute(model, 7, STEPS, 1.0, "euler", "simple", positive, negative, latent, 1.0,
                                           DEVICES, 0.3, "sync", 1, False)
    [stats] = out.ui["pcpp_stats"]
    assert stats["fallback"] is None and stats["bands"] == 2 and stats["calls"] == STEPS  # CFG 1: one call a step
    assert (stats["height"], stats["width"]) == (HEIGHT // 8, WIDTH // 8)
    rel_close(out.args[0]["samples"], ref)


def test_guidance_reaches_the_workers(comfy, graph):
    """Another FluxGuidance value changes the image, in the workers as on the host."""
    from comfy_extras.nodes_flux import FluxGuidance

    model, positive, negative, latent = graph
    other = FluxGuidance.execute(positive, 1.0).args[0]
    ref = _stock(model, other, negative, latent)
    assert (ref - _stock(model, positive, negative, latent)).abs().max() > 1e-3
    out = comfy.nodes.PCPPKSampler.execute(model, 7, STEPS, 1.0, "euler", "simple", other, negative, latent, 1.0,
                                           DEVICES, 0.3, "sync", 1, False)
    rel_close(out.args[0]["samples"], ref)


def test_parallel_model_node_pcpp_runs_on_bands(comfy, graph):
    """PCPP Parallel Model in front of the stock KSampler, mode pcpp: parallel, fewer bytes after warm-up."""
    model, positive, negative, latent = graph
    parallel = comfy.nodes.PCPPParallelModel.execute(model, DEVICES, 0.3, "pcpp", 1, False).args[0]
    hook = parallel.model_options["transformer_options"][comfy.options.HOOK_KEY]
    out = _stock(parallel, positive, negative, latent)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["partial"] is None and stats["bands"] == 2
    assert stats["mode"] == "pcpp" and stats["calls"] == STEPS
    assert 0 < stats["bytes_per_call"] < stats["bytes_per_call_warmup"]
    assert torch.isfinite(out).all()
