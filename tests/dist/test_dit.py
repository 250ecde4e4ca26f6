"""The DiT plan on CPU workers with a small Flux-layout model (tests/pcpp_testdit.py): sync equals
one process, fresh pcpp equals the masked single-process reference, bytes equal the analytic count.

The latent is 20 x 12 (10 x 6 patches): 3 bands are 3/3/4 patch rows, 4 bands 2/2/3/3.
"""
import pytest
import torch

from pcpp_core import Bands, ConfigError, PatchConfig, bytes_sent
from pcpp_core.plans_dit import flux_specs
from pcpp_core.reference import masked_self_attention
from pcpp_core.reference_dit import DitStaleReference
from pcpp_testdit import dit_inputs, mini_flux

pytestmark = pytest.mark.dist
ATOL = 1e-5
TEXT = 5  # text tokens of dit_inputs


@pytest.fixture(scope="module")
def flux():
    return mini_flux()


def plain(model, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)


def expected_bytes(model, x, n, fraction, batch=2):
    bands = Bands.split(x.shape[2], x.shape[3], n, 1)
    specs = flux_specs(model, TEXT)
    return {b: bytes_sent(specs, bands, b, batch=batch, element_size=4, fraction=fraction) for b in range(n)}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sync_equals_single_process(engines, flux, n):
    engine = engines[n]
    engine.new_run(PatchConfig(mode="sync"))
    for step in range(2):  # sync never goes stale
        args, kwargs = dit_inputs(seed=step)
        out = engine(flux, *args, slot="s", **kwargs)
        torch.testing.assert_close(out, plain(flux, args, kwargs), atol=ATOL, rtol=0)
        assert engine.stats.calls[-1].bytes_sent == expected_bytes(flux, args[0], n, None)
    assert engine.stats.bands == n


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_fresh_pcpp_equals_masked_single_process(engines, flux, fraction):
    engine, n = engines[3], 3
    engine.new_run(PatchConfig(mode="pcpp", fraction=fraction, fresh_activations=True))
    args, kwargs = dit_inputs()
    out = engine(flux, *args, slot="s", **kwargs)
    x = args[0]
    with masked_self_attention(flux, Bands.split(x.shape[2], x.shape[3], n, 1), fraction):
        ref = plain(flux, args, kwargs)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    whole = plain(flux, args, kwargs)
    if fraction < 1.0:  # the window really is narrower than the image (1.0 covers 3 bands of 3-4 rows)
        assert (out - whole).abs().max() > 1e-4
    assert engine.stats.calls[-1].bytes_sent == expected_bytes(flux, x, n, fraction)


@pytest.mark.parametrize("mode, fraction", [("pcpp", 0.3), ("distrifusion", None), ("naive", 0.0)])
def test_stale_calls_send_the_analytic_bytes(engines, flux, mode, fraction):
    """Warm-up sends the whole image; then each mode its window (naive: nothing), text partials included."""
    engine, n = engines[3], 3
    engine.new_run(PatchConfig(mode=mode, fraction=0.3, warmup_steps=1))
    args, kwargs = dit_inputs()
    outs = [engine(flux, *args, slot="s", **kwargs) for _ in range(3)]
    sent = [c.bytes_sent for c in engine.stats.calls[-3:]]
    if mode == "naive":
        assert all(v == 0 for s in sent for v in s.values())
        return
    assert sent[0] == expected_bytes(flux, args[0], n, None)
    assert sent[1] == sent[2] == expected_bytes(flux, args[0], n, fraction)
    whole = plain(flux, args, kwargs)
    torch.testing.assert_close(outs[0], whole, atol=ATOL, rtol=0)  # warm-up: exact
    # same input every call: stale data equals fresh data of the same input, except what the
    # window leaves out, so distrifusion (whole image) stays exact and pcpp differs
    if mode == "distrifusion":
        torch.testing.assert_close(outs[2], whole, atol=ATOL, rtol=0)
    else:
        assert (outs[2] - whole).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["pcpp", "distrifusion"])
def test_stale_calls_equal_the_dit_stale_reference(engines, flux, mode):
    """After warm-up (other inputs every call), the workers' result equals reference_dit's simulation."""
    engine, n = engines[3], 3
    config = PatchConfig(mode=mode, fraction=0.3, warmup_steps=1)
    engine.new_run(config)
    ref = DitStaleReference(flux, n, config)
    for i in range(3):
        args, kwargs = dit_inputs(seed=10 + i)
        out = engine(flux, *args, slot="s", step=i, **kwargs)
        torch.testing.assert_close(out, ref(*args, slot="s", synchronous=i < 1, **kwargs), atol=ATOL, rtol=0)
    assert (out - plain(flux, args, kwargs)).abs().max() > 1e-3  # stale, not fresh


def test_control_and_reference_latents_are_refused(engines, flux):
    engine = engines[2]
    engine.new_run(PatchConfig(mode="sync"))
    args, kwargs = dit_inputs()
    with pytest.raises(ConfigError, match="ControlNet"):
        engine(flux, *args, control={"input": [torch.zeros(2, 30, 32)]}, **kwargs)
    with pytest.raises(ConfigError, match="reference latents"):
        engine(flux, *args, ref_latents=[torch.zeros(2, 4, 8, 8)], **kwargs)
    out = engine(flux, *args, **kwargs)  # the pool still serves
    torch.testing.assert_close(out, plain(flux, args, kwargs), atol=ATOL, rtol=0)
