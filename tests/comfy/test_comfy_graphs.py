"""Everyday graphs stay parallel (issue 10): ComfyUI's casting ops, area conditioning, model patches.

Each `sync` run on cpu:2 must equal stock sampling with no fallback; what cannot run in the
workers must fall back visibly, never give a wrong image.
"""
from __future__ import annotations

import pytest
import torch

from test_comfy_sampling import inputs, pcpp, rel_close, sample, unet  # noqa: F401 (fixtures)

pytestmark = pytest.mark.comfy


def _same_weights(comfy, unet, weight_dtype, compute_dtype):  # noqa: F811
    """The fixture's UNet rebuilt with ComfyUI's ops for `weight_dtype` weights computed in `compute_dtype`."""
    config = comfy.supported_models.SD15(dict(unet.model.model_config.unet_config))
    config.set_inference_dtype(weight_dtype, compute_dtype)
    model = config.get_model({})
    model.diffusion_model.load_state_dict(unet.model.diffusion_model.state_dict())
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("weight_dtype", [torch.float8_e4m3fn, torch.float16])
def test_manual_cast_weights_sync_equals_stock(comfy, unet, inputs, weight_dtype):  # noqa: F811
    """fp8 / fp16 weights behind ComfyUI's manual_cast ops (what UNETLoader's weight_dtype builds)."""
    cast = _same_weights(comfy, unet, weight_dtype, torch.float32)
    conv = cast.model.diffusion_model.input_blocks[0][0]
    assert conv.weight.dtype == weight_dtype and conv.comfy_cast_weights  # really cast on the fly
    ref = sample(comfy, cast, inputs)
    model, hook = pcpp(comfy, cast, mode="sync")
    out = sample(comfy, model, inputs)
    assert hook.last_stats["fallback"] is None and hook.last_stats["bands"] == 2
    rel_close(out, ref)
    assert (ref - sample(comfy, unet, inputs)).abs().max() > 1e-3  # the cast weights do change the image


@pytest.fixture
def partial_load(comfy, monkeypatch):
    """Every model load in the test is partial, a third of the model on the device: what ComfyUI does on a
    GPU without room for the whole model (on the CPU it always loads fully, so the budget is forced).
    The same third each time (ComfyUI adds the extra memory to what is loaded already)."""
    loaded = comfy.model_management.LoadedModel
    original = loaded.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        budget = self.model.model_size() // 3
        return original(self, max(1, budget - self.model.model.model_loaded_weight_memory), force_patch_weights)

    monkeypatch.setattr(loaded, "model_load", model_load)


def _with_lora(comfy, patcher, seed: int = 8):
    """A rank-4 LoRA on every weight of the UNet, loaded by ComfyUI's own LoRA code (as LoraLoader does)."""
    import comfy.lora as lora

    g = torch.Generator().manual_seed(seed)
    keys, state = lora.model_lora_keys_unet(patcher.model, {}), patcher.model.state_dict()
    sd = {}
    for name, key in keys.items():
        shape = state[key].shape if key in state else ()
        if name.startswith("lora_unet_") and len(shape) >= 2:
            tail = [1] * (len(shape) - 2)
            sd[f"{name}.lora_up.weight"] = torch.randn([shape[0], 4, *tail], generator=g) * 0.3
            sd[f"{name}.lora_down.weight"] = torch.randn([4, shape[1], *shape[2:]], generator=g) * 0.3
    patched = patcher.clone()
    patched.add_patches(lora.load_lora(sd, keys), 1.0)
    return patched


def _lowvram_functions(patcher) -> list[str]:
    low = patcher.model.diffusion_model
    return [n for n, m in low.named_modules()
            if any(type(f).__name__ == "LowVramPatch" for f in getattr(m, "weight_function", None) or [])]


def test_partially_loaded_model_with_a_lora_sync_equals_stock(comfy, unet, inputs, partial_load):  # noqa: F811
    """lowvram: ComfyUI patches some weights in place and the rest on every forward (LowVramPatch); the
    workers get the base weights and the LoRA and patch their own full copy, never twice."""
    model = _with_lora(comfy, _same_weights(comfy, unet, torch.float32, None))
    ref = sample(comfy, model, inputs)
    assert _lowvram_functions(model) and model.backup, "a partial load: some weights patched on the fly, some in place"
    assert model.model.model_lowvram
    assert (ref - sample(comfy, _same_weights(comfy, unet, torch.float32, None), inputs)).abs().max() > 1e-2
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs)
    assert hook.last_stats["fallback"] is None and hook.last_stats["partial"] is None
    assert _lowvram_functions(model)  # the host keeps its own (its calls stay ComfyUI's); the workers got none
    rel_close(out, ref)


def test_partially_loaded_model_falls_back_whole_on_the_host_correctly(comfy, unet, inputs, partial_load):  # noqa: F811
    """The host path with lowvram weight functions: a FreeU run falls back, and equals stock."""
    from comfy_extras.nodes_freelunch import FreeU_V2

    model = FreeU_V2.execute(_with_lora(comfy, _same_weights(comfy, unet, torch.float32, None)),
                             1.3, 1.4, 0.9, 0.2).result[0]
    ref = sample(comfy, model, inputs)
    assert _lowvram_functions(model)
    out = sample(comfy, pcpp(comfy, model, mode="sync")[0], inputs)
    assert torch.equal(out, ref)


def test_unknown_weight_functions_fall_back_visibly(comfy, unet, inputs):  # noqa: F811
    """A weight wrapper (a weight function that is not a lowvram patch) is not run in the workers: named."""
    model = _same_weights(comfy, unet, torch.float32, None)
    model.add_weight_wrapper("diffusion_model.out.2.weight", _half)
    ref = sample(comfy, model, inputs)
    assert model.model.diffusion_model.out[2].weight_function == [_half]
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs)
    assert "out.2: its weights are changed on the fly by _half" in hook.last_stats["fallback"]
    assert torch.equal(out, ref)


def _half(weight: torch.Tensor) -> torch.Tensor:
    return weight * 0.5


def _with_area(inputs, width: int, height: int, x: int, y: int):  # noqa: F811
    """ConditioningSetArea on a second prompt, then ConditioningCombine with the first (pixels, as the nodes take)."""
    import node_helpers

    g = torch.Generator().manual_seed(3)
    area = node_helpers.conditioning_set_values([[torch.randn(1, 7, 64, generator=g), {}]], {
        "area": (height // 8, width // 8, y // 8, x // 8), "strength": 1.0, "set_area_to_bounds": False})
    return dict(inputs, positive=inputs["positive"] + area)  # ConditioningCombine: the lists joined


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_area_conditioning_sync_equals_stock(comfy, unet, inputs, cfg):  # noqa: F811
    """An 8x8 crop of a 16x16 latent: its own call slot, split into its own two bands."""
    area = _with_area(inputs, 64, 64, 64, 32)
    ref = sample(comfy, unet, area, cfg=cfg)
    assert (ref - sample(comfy, unet, inputs, cfg=cfg)).abs().max() > 1e-3  # the area prompt matters
    model, hook = pcpp(comfy, unet, mode="sync")
    out = sample(comfy, model, area, cfg=cfg)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["partial"] is None and stats["bands"] == 2
    rel_close(out, ref)


def test_area_too_small_for_the_bands_runs_whole_on_the_host_and_says_so(comfy, unet, inputs):  # noqa: F811
    """A 4x4 crop cannot be cut into two bands of 4 rows: that call runs on the host, the rest in parallel."""
    area = _with_area(inputs, 32, 32, 0, 0)
    ref = sample(comfy, unet, area)
    model, hook = pcpp(comfy, unet, mode="sync")
    out = sample(comfy, model, area)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["bands"] == 2
    assert stats["partial"].startswith(f"3 of {stats['calls'] + 3} model calls ran whole on the host: a 4x4 latent")
    rel_close(out, ref)


def _blocks_with_attention(unet):  # noqa: F811
    """(block_name, number, transformer_index, cross-attention width) of every transformer block, as
    ComfyUI's patches_replace keys name them."""
    found = []
    for name, m in unet.model.diffusion_model.named_modules():
        parts = name.split(".")
        if not name.endswith("attn2") or "transformer_blocks" not in parts:
            continue
        where = {"input_blocks": "input", "output_blocks": "output", "middle_block": "middle"}[parts[0]]
        number = 0 if where == "middle" else int(parts[1])
        found.append((where, number, int(parts[parts.index("transformer_blocks") + 1]), m.to_k.out_features))
    return found


def test_ip_adapter_style_attn2_replacement_sync_equals_stock(comfy, unet, inputs):  # noqa: F811
    """An attn2 replacement holding tensors travels to the workers and runs on each band."""
    from pcpp_testpatches import ImagePromptAttention

    g = torch.Generator().manual_seed(4)
    model = unet.clone()
    blocks = _blocks_with_attention(unet)
    assert len(blocks) >= 3
    for where, number, index, width in blocks:
        patch = ImagePromptAttention(torch.randn(1, 4, width, generator=g), torch.randn(1, 4, width, generator=g))
        model.set_model_attn2_replace(patch, where, number, index)
    ref = sample(comfy, model, inputs)
    assert (ref - sample(comfy, unet, inputs)).abs().max() > 1e-3  # the patch matters
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs)
    assert hook.last_stats["fallback"] is None and hook.last_stats["partial"] is None
    rel_close(out, ref)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_perturbed_attention_guidance_sync_equals_stock(comfy, unet, inputs, cfg):  # noqa: F811
    """PAG's extra model call per step (its own call slot) with attn1 replaced by "attention = value"."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    model = PerturbedAttentionGuidance.execute(unet, 3.0).result[0]
    ref = sample(comfy, model, inputs, cfg=cfg)
    assert (ref - sample(comfy, unet, inputs, cfg=cfg)).abs().max() > 1e-3  # PAG matters
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs, cfg=cfg)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["partial"] is None
    assert stats["calls"] == 2 * 3  # the step's own call(s) batched, plus PAG's perturbed call, each step
    rel_close(out, ref)


def _patched(comfy, unet, case):  # noqa: F811
    if case == "FreeU_V2":
        from comfy_extras.nodes_freelunch import FreeU_V2
        return FreeU_V2.execute(unet, 1.3, 1.4, 0.9, 0.2).result[0], "FreeU"
    if case == "PatchModelAddDownscale":
        from comfy_extras.nodes_model_downscale import PatchModelAddDownscale
        return PatchModelAddDownscale.execute(unet, 1, 2.0, 0.0, 1.0, False, "bicubic", "bicubic").result[0], \
            "Deep Shrink"
    if case == "HyperTile":
        from comfy_extras.nodes_hypertile import HyperTile
        return HyperTile.execute(unet, 64, 2, 0, False)[0], "HyperTile"  # a tuple, not a NodeOutput
    model = unet.clone()  # a replacement a worker cannot import: a closure
    model.set_model_attn2_replace(lambda q, k, v, extra_options: q * 0.5, "middle", 0, 0)
    return model, "cannot be pickled"


@pytest.mark.parametrize("case", ["FreeU_V2", "PatchModelAddDownscale", "HyperTile", "closure"])
def test_whole_map_patches_run_plain_and_say_why(comfy, unet, inputs, case):  # noqa: F811
    """What the README table says: these run plain ComfyUI sampling, the reason on the node; never a wrong image."""
    model, named = _patched(comfy, unet, case)
    ref = sample(comfy, model, inputs)
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs)
    assert named in hook.last_stats["fallback"]
    assert torch.equal(out, ref)


def test_hypernetwork_sync_equals_stock(comfy, unet, inputs, tmp_path):  # noqa: F811
    """HypernetworkLoader's per-token K/V patches (a random file, loaded by ComfyUI's own loader) run in the workers."""
    from comfy_extras.nodes_hypernetwork import load_hypernetwork_patch

    g = torch.Generator().manual_seed(6)
    sd = {"activation_func": "relu", "is_layer_norm": False, "use_dropout": False}
    for dim in (32, 64):  # the tiny UNet's attention widths (attn1) and its text width (attn2)
        sd[dim] = {i: {"linear.0.weight": torch.randn(dim * 2, dim, generator=g) * dim ** -0.5,
                       "linear.0.bias": torch.zeros(dim * 2),
                       "linear.2.weight": torch.randn(dim, dim * 2, generator=g) * (2 * dim) ** -0.5,
                       "linear.2.bias": torch.zeros(dim)} for i in (0, 1)}
    path = tmp_path / "random_hypernetwork.pt"
    torch.save(sd, path)
    model = unet.clone()
    patch = load_hypernetwork_patch(str(path), 1.0)
    model.set_model_attn1_patch(patch)
    model.set_model_attn2_patch(patch)  # what HypernetworkLoader does
    ref = sample(comfy, model, inputs)
    assert (ref - sample(comfy, unet, inputs)).abs().max() > 1e-3  # the hypernetwork matters
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs)
    assert hook.last_stats["fallback"] is None and hook.last_stats["partial"] is None
    rel_close(out, ref)


def test_unknown_patches_fall_back_visibly(comfy, unet, inputs):  # noqa: F811
    """No silent path: a patch kind the pack does not know runs plain sampling, named on the node."""
    split = comfy.options.split_transformer_options
    for options, named in [({"patches": {"new_kind_patch": [print]}}, "does not know"),
                           ({"patches_replace": {"dit": {("double_block", 0): print}}}, "'dit'"),
                           ({"patches_replace": {"attn1": {("middle", 0): print}}}, "only PerturbedAttention"),
                           ({"some_new_option": object()}, "object")]:
        clean, reason = split(options)
        assert clean == {} and named in reason, (options, reason)
    model = unet.clone()
    model.set_model_patch(lambda h, extra_options: h, "new_kind_patch")  # ComfyUI itself ignores this kind
    ref = sample(comfy, model, inputs)
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs)
    assert "'new_kind_patch'" in hook.last_stats["fallback"] and torch.equal(out, ref)


def test_perturbed_attention_guidance_runs_stale_in_pcpp_mode(comfy, unet, inputs):  # noqa: F811
    """After warm-up PAG's extra call (its own call slot at the same sigma) runs on stale neighbours too."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    model = PerturbedAttentionGuidance.execute(unet, 3.0).result[0]
    parallel, hook = pcpp(comfy, model, mode="pcpp", warmup_steps=1)
    out = sample(comfy, parallel, inputs, cfg=3.0)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["calls"] == 2 * 3
    assert 0 < stats["bytes_per_call"] < stats["bytes_per_call_warmup"]  # steps 2 and 3: window rows only
    assert torch.isfinite(out).all()


def test_self_attention_guidance_runs_plain_and_says_why(comfy, unet, inputs):  # noqa: F811
    """SAG records attention maps through an attn1 replacement (a closure): plain sampling, the reason on the node."""
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    model = SelfAttentionGuidance.execute(unet, 0.5, 2.0).result[0]
    ref = sample(comfy, model, inputs)
    assert (ref - sample(comfy, unet, inputs)).abs().max() > 1e-3  # SAG matters
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs)
    assert "only PerturbedAttentionGuidance's runs on bands" in hook.last_stats["fallback"]
    assert "attn_and_record" in hook.last_stats["fallback"]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("case", ["euler_cfg_pp", "RescaleCFG"])
def test_guidance_functions_sync_equal_stock(comfy, unet, inputs, case):  # noqa: F811
    """A CFG++ sampler and a post-CFG function run on the host around the model calls, which stay parallel."""
    from comfy_extras.nodes_model_advanced import RescaleCFG

    model, sampler = (unet, "euler_cfg_pp") if case == "euler_cfg_pp" else (RescaleCFG().patch(unet, 0.7)[0], "euler")
    ref = sample(comfy, model, inputs, sampler=sampler)
    assert (ref - sample(comfy, unet, inputs)).abs().max() > 1e-3  # the guidance matters
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs, sampler=sampler)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["partial"] is None and stats["calls"] == 3
    rel_close(out, ref)


def test_post_cfg_function_that_calls_the_model_again_sync_equals_stock(comfy, unet, inputs):  # noqa: F811
    """A post-CFG function with its own model call (SAG's kind, without its attention recording): the extra
    call is its own call slot and runs in the workers too."""
    from comfy.samplers import calc_cond_batch

    def again(args):
        (extra,) = calc_cond_batch(args["model"], [args["uncond"]], args["input"] * 0.9, args["sigma"],
                                   args["model_options"])
        return args["denoised"] + 0.5 * (args["uncond_denoised"] - extra)

    model = unet.clone()
    model.set_model_sampler_post_cfg_function(again, disable_cfg1_optimization=True)
    ref = sample(comfy, model, inputs)
    assert (ref - sample(comfy, unet, inputs)).abs().max() > 1e-3  # the extra call matters
    parallel, hook = pcpp(comfy, model, mode="sync")
    out = sample(comfy, parallel, inputs)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["partial"] is None and stats["calls"] == 2 * 3
    rel_close(out, ref)
