"""A full 10-step Euler run with the trained built-in model in every mode."""
import math

import pytest
import torch

from pcpp_core import Engine, PatchConfig, PoolConfig
from pcpp_core.sampling import cfg_eps, euler_sample
from pcpp_core.tiny_model import NULL_ID, load_tiny_unet

pytestmark = pytest.mark.dist


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def test_ten_euler_steps_in_every_mode(record_property):
    unet, emb, alphas = load_tiny_unet()
    cond, uncond = emb[[0, 8]], emb[NULL_ID:NULL_ID + 1].expand(2, -1, -1)
    noise = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = euler_sample(cfg_eps(lambda x, t, c, **_: unet(x, t, encoder_hidden_states=c).sample, cond, uncond, 3.0),
                           noise, alphas, 10)
    engine = Engine(PoolConfig(devices=("cpu", "cpu"), threads_per_worker=1))
    deviation = {}
    try:
        for mode in ("sync", "distrifusion", "pcpp", "naive"):
            engine.new_run(PatchConfig(mode=mode, fraction=0.3, warmup_steps=3))
            fn = cfg_eps(lambda x, t, c, **call: engine(unet, x, t, encoder_hidden_states=c, batch_chunks=2, **call),
                         cond, uncond, 3.0)
            out = euler_sample(fn, noise, alphas, 10)
            assert torch.isfinite(out).all(), mode
            assert len(engine.stats.calls) == 10
            deviation[mode] = (out - ref).abs().max().item()
            record_property(f"{mode}_psnr_db", round(psnr(out, ref), 2))
            record_property(f"{mode}_max_abs", round(deviation[mode], 5))
    finally:
        engine.shutdown()
    assert deviation["sync"] < 1e-3
    assert deviation["distrifusion"] <= deviation["pcpp"] <= deviation["naive"], deviation
    assert deviation["pcpp"] > deviation["sync"]
