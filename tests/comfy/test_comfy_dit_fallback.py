"""Flux/SD3 graphs: the engine splits these models (tests/dist/test_dit*.py), the nodes do not route
them yet; a run falls back to one device with that reason, before any worker starts."""


def test_flux_run_falls_back_with_the_reason(comfy):
    from comfy.ldm.flux.model import Flux  # binds Flux only: `comfy` stays the fixture
    from comfy.ops import disable_weight_init

    model = Flux(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=16, hidden_size=32, mlp_ratio=2.0,
                 num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=False, txt_ids_dims=[], operations=disable_weight_init)
    run = comfy.hook.start_run(comfy.hook.PCPPSettings(devices="cpu:2"), model, (1, 4, 16, 16))
    assert run.engine is None and run.started is None
    assert "not parallelised by the nodes yet" in run.fallback
