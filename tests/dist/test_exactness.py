"""Parallel output against single-process output: sync is exact, pcpp's window is pinned."""
import pytest
import torch

from pcpp_core import Bands, PatchConfig
from pcpp_core.reference import masked_self_attention
from conftest import inputs, plain

pytestmark = pytest.mark.dist
ATOL = 1e-5


@pytest.mark.parametrize("kind", ["comfy", "diffusers"])
@pytest.mark.parametrize("n", [2, 3, 4])  # 3 bands on 32 rows: 8/12/12 (uneven)
@pytest.mark.parametrize("batch", [1, 2])
def test_sync_equals_single_process(engines, models, kind, n, batch):
    model, engine = models[kind], engines[n]
    engine.new_run(PatchConfig(mode="sync"))
    for step in range(2):  # two calls: sync never goes stale
        args, kwargs = inputs(kind, batch=batch, seed=step)
        out = engine(model, *args, slot="s", **kwargs)
        torch.testing.assert_close(out, plain(model, kind, args, kwargs), atol=ATOL, rtol=0)
    assert engine.stats.bands == n


@pytest.mark.parametrize("kind", ["comfy", "diffusers"])
def test_sync_with_cfg_split_equals_single_process(engines, models, kind):
    model, engine = models[kind], engines[4]
    engine.new_run(PatchConfig(mode="sync", cfg_split=True))
    args, kwargs = inputs(kind, batch=2)
    out = engine(model, *args, slot="cfg", batch_chunks=2, **kwargs)
    torch.testing.assert_close(out, plain(model, kind, args, kwargs), atol=ATOL, rtol=0)
    assert engine.stats.bands == 2  # two groups of two bands
    assert engine.stats.calls[-1].bytes_sent.keys() == {0, 1, 2, 3}


@pytest.mark.parametrize("kind", ["comfy", "diffusers"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_fresh_pcpp_equals_masked_single_process(engines, models, kind, fraction):
    model, engine, n = models[kind], engines[3], 3
    engine.new_run(PatchConfig(mode="pcpp", fraction=fraction, fresh_activations=True))
    args, kwargs = inputs(kind, batch=2)
    out = engine(model, *args, slot="s", **kwargs)
    x = args[0]
    with masked_self_attention(model, Bands.split(x.shape[2], x.shape[3], n, 2), fraction):
        ref = plain(model, kind, args, kwargs)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if fraction < 1.0:  # the window really is narrower than the image
        assert (out - plain(model, kind, args, kwargs)).abs().max() > 1e-4


def test_control_residuals_are_cut_per_band(engines, models):
    model, engine = models["comfy"], engines[2]
    args, kwargs = inputs("comfy", batch=2)
    g = torch.Generator().manual_seed(5)
    # popped from the end by the output blocks: levels 2, 2, 1, 1, 0, 0
    shapes = [(2, 32, 32, 24)] * 2 + [(2, 32, 16, 12)] * 2 + [(2, 32, 8, 6)] * 2
    middle = torch.randn(2, 32, 8, 6, generator=g)
    output = [torch.randn(*s, generator=g) for s in shapes]

    def control():
        return {"middle": [middle.clone()], "output": [o.clone() for o in output]}

    engine.new_run(PatchConfig(mode="sync"))
    out = engine(model, *args, control=control(), **kwargs)
    ref = plain(model, "comfy", args, dict(kwargs, control=control()))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (ref - plain(model, "comfy", args, kwargs)).abs().max() > 1e-3  # the residuals matter


def test_uneven_output_assembly_and_slot_isolation(engines, models):
    """Interleaving another slot must not change a slot's results (cond never reads uncond)."""
    model, engine = models["diffusers"], engines[3]
    calls = [inputs("diffusers", batch=1, seed=s) for s in range(3)]
    other = inputs("diffusers", batch=1, seed=99)
    engine.new_run(PatchConfig(mode="distrifusion", warmup_steps=1))
    alone = [engine(model, *a, slot="cond", **k) for a, k in calls]
    engine.new_run(PatchConfig(mode="distrifusion", warmup_steps=1))
    mixed = []
    for a, k in calls:
        mixed.append(engine(model, *a, slot="cond", **k))
        engine(model, *other[0], slot="uncond", **other[1])
    for x, y in zip(alone, mixed):
        assert torch.equal(x, y)
    # and the stale steps really differ from fresh ones (otherwise the check above proves nothing)
    fresh = plain(model, "diffusers", *calls[2])
    assert (alone[2] - fresh).abs().max() > 1e-5


def test_new_run_resets_warmup_and_buffers(engines, models):
    model, engine = models["diffusers"], engines[2]
    cfg = PatchConfig(mode="pcpp", warmup_steps=1)
    seq = [inputs("diffusers", batch=1, seed=s) for s in range(2)]
    engine.new_run(cfg)
    first = [engine(model, *a, **k) for a, k in seq]
    assert [c.synchronous for c in engine.stats.calls] == [True, False]
    engine.new_run(cfg)
    second = [engine(model, *a, **k) for a, k in seq]
    assert [c.synchronous for c in engine.stats.calls] == [True, False]
    for x, y in zip(first, second):
        assert torch.equal(x, y)
