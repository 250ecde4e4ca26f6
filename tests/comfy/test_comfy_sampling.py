"""In-process: the nodes' hook on a small multi-level SD1.5-architecture UNet, 2 CPU workers.

The model is built through ComfyUI's own classes (no file, no detection), with two
downsamplings so the bands must survive every level. Every comparison is against stock
`comfy.sample.sample` on the same ModelPatcher, noise and conditioning.
"""
from __future__ import annotations

import logging

import pytest
import torch

pytestmark = pytest.mark.comfy

DEVICES = "cpu:2"
STEPS = 3
LATENT = (1, 4, 16, 16)  # 2 bands of 8 rows: 2 rows each at the deepest level


def rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> float:
    """Max abs difference, asserted within `tol` of the latent's scale.

    A random-weight model makes latents of magnitude ~100 after a few steps, and sampling
    amplifies each call's fp32 round-off (one call through the workers agrees to ~4e-6 on
    outputs of magnitude ~2); so the bound is atol 1e-5 relative to the latent's size.
    """
    diff = (out - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert diff <= tol * scale, f"max |out - ref| = {diff:.3g} > {tol:g} * {scale:.3g}"
    return diff


@pytest.fixture(scope="session")
def unet(comfy):
    """A ModelPatcher around a 2-level SD1.5-architecture UNet with unit-scale random weights."""
    unet_config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32,
                       num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2], transformer_depth=[1, 1, 1],
                       transformer_depth_output=[1] * 6, transformer_depth_middle=1, context_dim=64,
                       use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
                       num_heads=2, num_head_channels=-1, adm_in_channels=None, use_temporal_attention=False)
    torch.manual_seed(0)
    model = comfy.supported_models.SD15(unet_config).get_model({})
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.fill_(1.0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="session")
def inputs():
    g = torch.Generator().manual_seed(1)
    return {"positive": [[torch.randn(1, 7, 64, generator=g), {}]],
            "negative": [[torch.randn(1, 7, 64, generator=g), {}]],
            "noise": torch.randn(LATENT, generator=g)}


def sample(comfy, model, inputs, sampler="euler", cfg=3.0, latent=None, callback=None):
    noise = inputs["noise"] if latent is None else torch.randn(latent, generator=torch.Generator().manual_seed(2))
    return comfy.sample.sample(model, noise, STEPS, cfg, sampler, "normal", inputs["positive"], inputs["negative"],
                               torch.zeros_like(noise), seed=1, callback=callback, disable_pbar=True)


def pcpp(comfy, model, **settings):
    settings.setdefault("devices", DEVICES)
    return comfy.hook.apply_pcpp(model, comfy.hook.PCPPSettings(**settings))


@pytest.mark.parametrize("sampler,cfg", [("euler", 1.0), ("euler", 3.0), ("heun", 1.0), ("heun", 3.0)])
def test_sync_equals_stock(comfy, unet, inputs, sampler, cfg):
    ref = sample(comfy, unet, inputs, sampler, cfg)
    model, hook = pcpp(comfy, unet, mode="sync")
    out = sample(comfy, model, inputs, sampler, cfg)
    stats = hook.last_stats
    assert stats["fallback"] is None and stats["bands"] == 2 and stats["mode"] == "sync"
    evals_per_step = 2 if sampler == "heun" else 1
    assert stats["calls"] == evals_per_step * STEPS - (evals_per_step - 1)  # heun's last step is one euler call
    rel_close(out, ref)


@pytest.mark.parametrize("mode, exchange, far, pool", [("pcpp", "none", 0, 1), ("distrifusion", "none", 0, 1),
                                                       ("naive", "none", 0, 1), ("pcpp", "residual-2bit", 2, 16)])
def test_parallel_modes_run_and_report_stats(comfy, unet, inputs, mode, exchange, far, pool):
    model, hook = pcpp(comfy, unet, mode=mode, neighbour_fraction=0.3, warmup_steps=1, exchange=exchange,
                       far_refresh=far)  # far_pool follows: RESIDUAL_FAR_POOL with a residual codec
    out = sample(comfy, model, inputs)
    stats = hook.last_stats
    assert set(stats) == {"mode", "fraction", "bands", "devices", "calls", "seconds_per_call", "bytes_per_call",
                          "bytes_per_call_warmup", "height", "width", "fallback", "partial", "model_bytes_sent",
                          "weights_on", "exchange", "far_refresh", "far_pool"}
    assert stats["mode"] == mode and stats["fraction"] == 0.3 and stats["bands"] == 2
    assert stats["exchange"] == exchange and stats["far_refresh"] == far and stats["far_pool"] == pool
    assert stats["devices"] == ["cpu", "cpu"] and stats["calls"] == STEPS and stats["fallback"] is None
    assert (stats["height"], stats["width"]) == LATENT[2:]
    sent, warmup = stats["bytes_per_call"], stats["bytes_per_call_warmup"]
    assert {"naive": sent == 0,  # bands denoised alone
            "distrifusion": 0 < sent <= warmup,  # all of the other band's K/V, stale
            "pcpp": 0 < sent < warmup}[mode]  # only the rows the neighbour's window needs
    assert stats["seconds_per_call"] > 0 and torch.isfinite(out).all()


def test_weights_are_sent_once_per_model_version(comfy, unet, inputs, caplog):
    model, _ = pcpp(comfy, unet, mode="sync")
    sample(comfy, model, inputs)  # sends this version (or finds it already there)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pcpp.engine"):
        sample(comfy, pcpp(comfy, unet, mode="pcpp")[0], inputs)  # a new node run, the same weights
    assert not [r for r in caplog.records if "sent to" in r.getMessage()]


def test_lora_style_patch_matches_stock_and_is_resent(comfy, unet, inputs):
    plain_ref = sample(comfy, unet, inputs)
    patched = unet.clone()
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    weight = unet.model.state_dict()[key]
    patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05,)}, 1.0)
    ref = sample(comfy, patched, inputs)
    assert (ref - plain_ref).abs().max() > 1e-2  # the patch changes the result
    model, hook = pcpp(comfy, patched, mode="sync")
    rel_close(sample(comfy, model, inputs), ref)
    model, hook = pcpp(comfy, unet, mode="sync")  # and back: the unpatched weights are sent again
    rel_close(sample(comfy, model, inputs), plain_ref)


def test_changed_lora_strength_is_resent(comfy, unet, inputs):
    """Two strengths of one patch: the second patched weight may reuse the first one's memory."""
    key = "diffusion_model.middle_block.0.in_layers.2.weight"
    delta = torch.randn(unet.model.state_dict()[key].shape, generator=torch.Generator().manual_seed(4)) * 0.05
    results = []
    for strength in (1.0, 0.5):
        patched = unet.clone()
        patched.add_patches({key: (delta,)}, strength)
        ref = sample(comfy, patched, inputs)
        rel_close(sample(comfy, pcpp(comfy, patched, mode="sync")[0], inputs), ref)
        results.append(ref)
    assert (results[0] - results[1]).abs().max() > 1e-2


def test_control_residuals_are_cut_per_band(comfy, unet, inputs):
    """ControlNet-style residuals at every level reach each band's rows: sync equals stock."""
    shapes = []  # [C, H, W] of every input block's output, and of the middle block's
    hooks = [b[-1].register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))  # blocks iterate
             for b in [*unet.model.diffusion_model.input_blocks, unet.model.diffusion_model.middle_block]]
    with torch.no_grad():
        unet.model.diffusion_model(torch.zeros(LATENT), torch.zeros(1), context=torch.zeros(1, 7, 64))
    for h in hooks:
        h.remove()

    class Residuals(comfy.controlnet.ControlBase):
        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            g = torch.Generator().manual_seed(7)
            blocks = [torch.randn((x_noisy.shape[0], *s), generator=g) * 0.5 for s in shapes]
            # the UNet pops from the end: inputs last-to-first, outputs first-to-last
            return {"input": blocks[-2::-1], "middle": [blocks[-1]], "output": blocks[:-1]}

        def copy(self):
            c = Residuals()
            self.copy_to(c)
            return c

    with_control = {key: [[c, {"control": Residuals()}] for c, _ in inputs[key]] for key in ("positive", "negative")}
    ref = sample(comfy, unet, {**inputs, **with_control})
    assert (ref - sample(comfy, unet, inputs)).abs().max() > 1e-2  # the residuals matter
    rel_close(sample(comfy, pcpp(comfy, unet, mode="sync")[0], {**inputs, **with_control}), ref)


def test_node_execute_returns_latent_and_stats(comfy, unet, inputs):
    from comfy_api.latest import io

    latent = {"samples": torch.zeros(LATENT)}
    out = comfy.nodes.PCPPKSampler.execute(unet, 5, STEPS, 1.0, "euler", "normal", inputs["positive"],
                                           inputs["negative"], latent, 1.0, DEVICES, 0.3, "sync", 4, False)
    assert isinstance(out, io.NodeOutput)
    [stats] = out.ui["pcpp_stats"]
    assert stats["mode"] == "sync" and stats["bands"] == 2 and stats["fallback"] is None
    ref = comfy.sample.sample(unet, comfy.sample.prepare_noise(latent["samples"], 5), STEPS, 1.0, "euler", "normal",
                              inputs["positive"], inputs["negative"], latent["samples"], seed=5, disable_pbar=True)
    rel_close(out.args[0]["samples"], ref)


def test_parallel_model_node_clones_and_off_is_plain(comfy, unet):
    out = comfy.nodes.PCPPParallelModel.execute(unet, DEVICES, 0.3, "pcpp", 4, False)
    parallel = out.args[0]
    assert parallel is not unet and not unet.get_wrappers("diffusion_model", "pcpp")
    assert parallel.get_wrappers("diffusion_model", "pcpp")
    off = comfy.nodes.PCPPParallelModel.execute(parallel, DEVICES, 0.3, "off", 4, False).args[0]
    assert not off.get_wrappers("diffusion_model", "pcpp") and not off.get_wrappers("outer_sample", "pcpp")


@pytest.mark.parametrize("case", ["one_device", "too_small", "host_patch"])
def test_fallback_is_plain_sampling_and_said(comfy, unet, inputs, caplog, case):
    model, latent, settings = unet, None, {"mode": "pcpp"}
    if case == "one_device":
        settings["devices"] = "cpu:1"
    elif case == "too_small":
        latent = (1, 4, 4, 16)  # 2 bands cannot each keep a row after 2 downsamplings
    else:
        model = unet.clone()
        model.set_model_attn1_patch(lambda q, k, v, extra_options: (q, k, v))  # a host-side callable
    ref = sample(comfy, model, inputs, latent=latent)
    parallel, hook = pcpp(comfy, model, **settings)
    with caplog.at_level(logging.WARNING, logger="pcpp.nodes"):
        out = sample(comfy, parallel, inputs, latent=latent)
    reason = hook.last_stats["fallback"]
    assert reason and {"one_device": "one device", "too_small": "height", "host_patch": "patches"}[case] in reason
    assert any(reason in r.getMessage() for r in caplog.records if r.name == "pcpp.nodes")
    assert torch.equal(out, ref)  # plain sampling: the very same numbers


def test_unsupported_family_falls_back(comfy):
    run = comfy.hook.start_run(comfy.hook.PCPPSettings(devices=DEVICES), torch.nn.Linear(4, 4), (1, 4, 16, 16))
    assert run.engine is None and "not a supported family" in run.fallback


@pytest.mark.parametrize("field,value,named", [("neighbour_fraction", -1.0, "neighbour_fraction"),
                                               ("devices", "gpu:0", "devices"), ("mode", "fast", "mode"),
                                               ("warmup_steps", -2, "warmup_steps"),
                                               ("exchange", "zip", "exchange"), ("far_refresh", -1, "far_refresh")])
def test_invalid_inputs_are_rejected(comfy, field, value, named):
    from pcpp_core import ConfigError

    with pytest.raises(ConfigError, match=named):
        comfy.hook.PCPPSettings(**{field: value})
    if field == "devices":
        assert named in comfy.nodes.check_devices(value)


def test_options_that_cannot_travel(comfy):
    split = comfy.options.split_transformer_options
    clean, reason = split({"cond_or_uncond": [1, 0], "sigmas": torch.ones(2), "patches": {}, "wrappers": {"x": 1},
                           "patches_replace": {"attn1": {}}})
    assert reason is None and set(clean) == {"cond_or_uncond", "sigmas"}
    assert "patches" in split({"patches": {"attn1_patch": [print]}})[1]
    assert "function" in split({"optimized_attention_override": print})[1]


def test_cancel_stops_within_one_call_and_next_run_is_clean(comfy, unet, inputs):
    mm = comfy.model_management
    model, hook = pcpp(comfy, unet, mode="sync")

    def cancel_after_first_step(*args):
        mm.interrupt_current_processing(True)

    with pytest.raises(mm.InterruptProcessingException):
        sample(comfy, model, inputs, callback=cancel_after_first_step)
    assert hook.last_stats["calls"] == 1
    mm.interrupt_current_processing(False)
    ref = sample(comfy, unet, inputs)
    rel_close(sample(comfy, model, inputs), ref)


def test_hung_worker_times_out_with_a_clear_error_and_the_next_run_recovers(comfy, unet, inputs, monkeypatch):
    import time

    from pcpp_core import WorkerError

    monkeypatch.setenv("PCPP_CALL_TIMEOUT_S", "3")
    monkeypatch.setenv("PCPP_TEST_HANG_RANK", "1")  # the worker's test hook: rank 1 sleeps in its first call
    model, _ = pcpp(comfy, unet, mode="sync")
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker rank \d: no answer to 'call' within 3 s.*hung"):
        sample(comfy, model, inputs)
    assert time.monotonic() - start < 30  # pool start + model load + the 3 s limit
    monkeypatch.delenv("PCPP_CALL_TIMEOUT_S")
    monkeypatch.delenv("PCPP_TEST_HANG_RANK")
    model, hook = pcpp(comfy, unet, mode="sync")
    rel_close(sample(comfy, model, inputs), sample(comfy, unet, inputs))
    assert hook.last_stats["fallback"] is None


def test_bad_call_timeout_is_named(comfy, monkeypatch):
    from pcpp_core import ConfigError

    monkeypatch.setenv("PCPP_CALL_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="PCPP_CALL_TIMEOUT_S='soon'"):
        comfy.hook.pool_config(("cpu", "cpu"))


@pytest.mark.parametrize("sampler,expected", [
    # heun and dpmpp_2s_ancestral (eta 1: its midpoint is sigma_{k+1}): A_k at sigma_k, B_k at sigma_{k+1}
    ("heun", [("start", 0, 0), ("on", 0, 1), ("on", 1, 1), ("on", 0, 2), ("on", 1, 2)]),
    ("dpmpp_2s_ancestral", [("start", 0, 0), ("on", 0, 1), ("on", 1, 1), ("on", 0, 2), ("on", 1, 2)]),
    # dpmpp_sde: B_k between the schedule sigmas
    ("dpmpp_sde", [("start", 0, 0), ("off", 0, 1), ("on", 0, 1), ("off", 0, 2), ("on", 0, 2)]),
])
def test_two_evaluation_samplers_get_one_slot_per_evaluation_kind(comfy, unet, inputs, monkeypatch, sampler, expected):
    """The step callback fires between A and B; slots come from the sigma, so A_k meets A_{k-1}'s
    buffers and B_k B_{k-1}'s (A, B, A, B, A: the last step is one Euler call)."""
    from pcpp_core.engine import Engine

    calls = []
    real = Engine.__call__

    def spy(self, model, x, *args, slot=None, step=None, **kwargs):
        calls.append((slot, step))
        return real(self, model, x, *args, slot=slot, step=step, **kwargs)

    monkeypatch.setattr(Engine, "__call__", spy)
    model, hook = pcpp(comfy, unet, mode="pcpp", warmup_steps=1)
    out = sample(comfy, model, inputs, sampler)
    assert hook.last_stats["fallback"] is None and torch.isfinite(out).all()
    compositions = {slot[0] for slot, _ in calls}
    assert len(compositions) == 1  # cond and uncond in one batch
    assert [(slot[1], slot[2], step) for slot, step in calls] == expected
