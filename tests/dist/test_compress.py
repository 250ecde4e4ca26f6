"""Compressed exchange on real gloo workers: exact bytes, identical baselines, determinism, sync untouched."""
import pytest
import torch

from pcpp_core import Bands, PatchConfig, bytes_sent, find_plan, profile_layers
from pcpp_core.codecs import get_codec
from conftest import inputs

pytestmark = pytest.mark.dist

STEPS = 4


def run(engine, model, cfg, steps=STEPS):
    engine.new_run(cfg)
    return [engine(model, *a, **k) for a, k in (inputs("diffusers", batch=2, seed=s) for s in range(steps))]


@pytest.mark.parametrize("compress, far, pool", [("int8", 0, 1), ("residual-2bit", 0, 1), ("residual-1bit", 0, 1),
                                                 ("none", 2, 1), ("residual-1bit", 2, 1), ("residual-2bit", 2, 4)])
def test_compressed_bytes_equal_the_analytic_count(engines, models, compress, far, pool):
    model, engine, n = models["diffusers"], engines[3], 3
    args, kwargs = inputs("diffusers", batch=2)
    specs = profile_layers(model, find_plan(model), *args, **kwargs)
    bands = Bands.split(args[0].shape[2], args[0].shape[3], n, 2)
    cfg = PatchConfig(mode="pcpp", fraction=0.3, warmup_steps=1, compress=compress, far_refresh=far, far_pool=pool)
    run(engine, model, cfg, steps=4)
    for index, call in enumerate(engine.stats.calls):
        stale = not call.synchronous
        expected = {b: bytes_sent(specs, bands, b, batch=2, element_size=4, fraction=cfg.window_fraction if stale
                                  else None, codec=get_codec(compress) if stale else None,
                                  far_refresh=far if stale else 0, step=index, far_pool=pool) for b in range(n)}
        assert call.bytes_sent == expected
    raw = {b: bytes_sent(specs, bands, b, batch=2, element_size=4, fraction=0.3) for b in range(n)}
    if far:  # the far refreshes add bytes, and differ from step to step
        assert engine.stats.calls[-1].bytes_sent != engine.stats.calls[-2].bytes_sent
    else:
        assert all(engine.stats.calls[-1].bytes_sent[b] < raw[b] for b in range(n))


@pytest.mark.parametrize("mode, far, pool", [("pcpp", 0, 1), ("distrifusion", 0, 1), ("pcpp", 2, 1), ("pcpp", 2, 4)])
def test_residual_baselines_identical_on_both_sides_and_runs_deterministic(engines, models, mode, far, pool):
    model, engine, n = models["diffusers"], engines[3], 3
    cfg = PatchConfig(mode=mode, fraction=0.3, warmup_steps=1, compress="residual-2bit", far_refresh=far,
                      far_pool=pool)
    first = run(engine, model, cfg)
    held = engine.debug_baselines()  # rank -> {((slot, layer), peer band, "tx"/"rx"): (tensor, rows)}
    pairs = 0
    for rank, state in held.items():
        for (key, peer, side), (t, rows) in state.items():
            if side != "tx":
                continue
            other = held[peer][(key, rank, "rx")]  # one group: band == rank
            assert rows == other[1]
            assert torch.equal(t, other[0]), f"{key} rank {rank} -> {peer}: baselines differ"
            pairs += 1
    assert pairs > 10
    second = run(engine, model, cfg)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    exact = run(engine, model, PatchConfig(mode=mode, fraction=0.3, warmup_steps=1, far_refresh=far))  # far_pool 1
    assert not torch.equal(first[-1], exact[-1])  # the codec did change the stale calls
    torch.testing.assert_close(first[0], exact[0], atol=0, rtol=0)  # warm-up stays exact


def test_sync_mode_is_bit_identical_with_and_without_compress(engines, models):
    model, engine = models["comfy"], engines[2]
    seq = [inputs("comfy", batch=2, seed=s) for s in range(3)]
    outs = {}
    for compress in ("none", "residual-1bit", "int8"):
        engine.new_run(PatchConfig(mode="sync", compress=compress))
        outs[compress] = [engine(model, *a, **k) for a, k in seq]
        bytes_none = [c.bytes_sent for c in engine.stats.calls]
        outs[compress + " bytes"] = bytes_none
    for compress in ("residual-1bit", "int8"):
        for a, b in zip(outs["none"], outs[compress]):
            assert torch.equal(a, b)
        assert outs[compress + " bytes"] == outs["none bytes"]
