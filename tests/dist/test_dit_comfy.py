"""The DiT plan on ComfyUI's own Flux and SD3 MMDiT classes (tiny random configs) on CPU workers.

Needs a ComfyUI checkout (COMFYUI_PATH) importable by this interpreter (ComfyUI's venv: einops
etc.); skipped with the reason otherwise. .ci/run runs this file in each ComfyUI tier:
  COMFYUI_PATH=$HOME/.cache/pcpp-comfyui/ComfyUI $HOME/.cache/pcpp-comfyui/venv/bin/python \\
      -m pytest tests/dist/test_dit_comfy.py -q
The workers boot as the nodes boot them (nodes.worker_boot with --cpu) and unpickle the models
from ComfyUI's own modules (the checkout is on the host's sys.path, which the workers inherit).
"""
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from pcpp_core import Bands, Engine, PatchConfig, PoolConfig, bytes_sent
from pcpp_core.plans_dit import flux_specs, mmdit_specs
from pcpp_core.reference import masked_self_attention

pytestmark = pytest.mark.dist
ATOL = 2e-5
TEXT = 5
COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not os.path.isdir(os.path.join(COMFY, "comfy")):
    pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout: ComfyUI's Flux/MMDiT classes are not tested",
                allow_module_level=True)


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's modules, imported on first use: on sys.path before, pytest's set-up of the repo
    root package would import the pack's __init__ as ComfyUI (comfy_api present)."""
    if COMFY not in sys.path:
        sys.path.insert(0, os.path.abspath(COMFY))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
        import comfy.ops
        from comfy.ldm.flux.model import Flux
        from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    except ImportError as e:  # the system python has no einops: run this file with ComfyUI's venv
        pytest.skip(f"ComfyUI at {COMFY} is not importable by {sys.executable}: {e}")
    return SimpleNamespace(ops=comfy.ops.disable_weight_init, Flux=Flux, MMDiT=OpenAISignatureMMDITWrapper)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """disable_weight_init leaves weights uninitialised: fixed-seed random values for every one."""
    g = torch.Generator().manual_seed(seed)
    for t in [*model.parameters(), *model.buffers()]:
        t.data = torch.randn(t.shape, generator=g) * (0.5 / max(1, t.shape[-1]) ** 0.5 if t.dim() > 1 else 0.2)
    return model.eval().requires_grad_(False)


def tiny_flux(c) -> torch.nn.Module:
    return _randomize(c.Flux(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=16, hidden_size=32,
                           mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                           theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
                           operations=c.ops), 0)


def tiny_mmdit(c) -> torch.nn.Module:
    """SD3.5-medium-like: RMS QK-norm, an image-only self-attention in block 0, a pre_only last block."""
    ctx = {"target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 128}}
    return _randomize(c.MMDiT(
        input_size=None, patch_size=2, in_channels=4, depth=2, adm_in_channels=8, context_embedder_config=ctx,
        pos_embed_max_size=32, num_patches=1024, qk_norm="rms", x_block_self_attn_layers=[0],
        operations=c.ops), 1)


MODELS = {"flux": (tiny_flux, flux_specs), "mmdit": (tiny_mmdit, mmdit_specs)}


def inputs(kind: str, seed: int = 1):
    """A non-square 20 x 12 latent (10 x 6 patches: 3 bands 3/3/4, 4 bands 2/2/3/3), text, pooled vector."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 20, 12, generator=g)
    kwargs = {"context": torch.randn(2, TEXT, 16, generator=g), "y": torch.randn(2, 8, generator=g)}
    if kind == "flux":
        kwargs["guidance"] = torch.tensor([3.5, 3.5])
        return (x, torch.tensor([0.3, 0.8])), kwargs
    return (x, torch.tensor([300.0, 800.0])), kwargs


def plain(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


@pytest.fixture(scope="module")
def models(comfy):
    return {k: make(comfy) for k, (make, _) in MODELS.items()}


@pytest.fixture(scope="module")
def comfy_engines():
    made: dict[int, Engine] = {}
    env = (("PCPP_WORKER_PRELOAD", "nodes.worker_boot"), ("PCPP_COMFY_ARGS", json.dumps({"cpu": True})))

    class Lazy(dict):
        def __missing__(self, n: int) -> Engine:
            made[n] = Engine(PoolConfig(devices=("cpu",) * n, threads_per_worker=1, call_timeout_s=120, env=env))
            return made[n]

    yield Lazy()
    for e in made.values():
        e.shutdown()


def expected(kind, model, x, n, fraction):
    bands = Bands.split(x.shape[2], x.shape[3], n, 1)
    specs = MODELS[kind][1](model, TEXT)
    return {b: bytes_sent(specs, bands, b, batch=2, element_size=4, fraction=fraction) for b in range(n)}


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("kind", ["flux", "mmdit"])
def test_sync_equals_single_process(comfy_engines, models, kind, n):
    model, engine = models[kind], comfy_engines[n]
    engine.new_run(PatchConfig(mode="sync"))
    args, kwargs = inputs(kind)
    out = engine(model, *args, slot="s", **kwargs)
    ref = plain(model, args, kwargs)
    assert ref.abs().max() > 0.1 and torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert engine.stats.calls[-1].bytes_sent == expected(kind, model, args[0], n, None)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["flux", "mmdit"])
def test_fresh_pcpp_equals_masked_single_process(comfy_engines, models, kind, fraction):
    model, engine, n = models[kind], comfy_engines[3], 3
    engine.new_run(PatchConfig(mode="pcpp", fraction=fraction, fresh_activations=True))
    args, kwargs = inputs(kind)
    out = engine(model, *args, slot="s", **kwargs)
    x = args[0]
    with masked_self_attention(model, Bands.split(x.shape[2], x.shape[3], n, 1), fraction):
        ref = plain(model, args, kwargs)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if fraction < 1.0:
        assert (out - plain(model, args, kwargs)).abs().max() > 1e-4
    assert engine.stats.calls[-1].bytes_sent == expected(kind, model, x, n, fraction)
