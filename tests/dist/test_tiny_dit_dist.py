"""The DiT plan on CPU workers with the bundled *trained* tiny DiT (pcpp_core/tiny_dit.py, Flux layout).

Latent 20 x 12 (10 x 6 patches, an 80 x 48 image): 3 bands are 3/3/4 patch rows, 4 bands 2/2/3/3.
sync equals one process; fresh pcpp equals the masked single-process reference; bytes are the
analytic count (4 condition tokens); stale pcpp equals reference_dit's simulation; a short sampling
run orders the modes as bench quality does; the demo draws with it. The engines are
tests/dist/conftest.py's, shared with test_dit.py (the demo starts its own pool, as users run it).
"""
import json

import pytest
import torch

from pcpp_core import Bands, PatchConfig, bytes_sent
from pcpp_core.bench.quality import psnr_db
from pcpp_core.demo import main as demo_main
from pcpp_core.demo_models import load_demo_model
from pcpp_core.plans import find_plan
from pcpp_core.plans_dit import flux_specs
from pcpp_core.reference import masked_self_attention
from pcpp_core.reference_dit import DitStaleReference
from pcpp_core.tiny_dit import load_tiny_dit

pytestmark = pytest.mark.dist
ATOL = 1e-5
TEXT = 4  # condition tokens


@pytest.fixture(scope="module")
def dit():
    return load_tiny_dit()


def inputs(emb: torch.Tensor, seed: int = 0) -> tuple[tuple, dict]:
    """[cond; uncond] as CFG batches it: image ids 0 and 5, then the null row twice."""
    x = torch.randn(1, 48, 20, 12, generator=torch.Generator().manual_seed(seed)).expand(4, -1, -1, -1)
    t = torch.full((4,), 0.6)
    return (x.contiguous(), t), {"context": emb[[0, 5, 12, 12]]}


def plain(model, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)


def expected_bytes(model, x, n, fraction):
    bands = Bands.split(x.shape[2], x.shape[3], n, 1)
    return {b: bytes_sent(flux_specs(model, TEXT), bands, b, batch=x.shape[0], element_size=4, fraction=fraction)
            for b in range(n)}


def test_found_by_the_flux_plan(dit):
    assert find_plan(dit[0]).family == "flux"


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sync_equals_single_process(engines, dit, n):
    model, emb = dit
    engine = engines[n]
    engine.new_run(PatchConfig(mode="sync"))
    args, kwargs = inputs(emb)
    out = engine(model, *args, slot="s", **kwargs)
    torch.testing.assert_close(out, plain(model, args, kwargs), atol=ATOL, rtol=0)
    assert engine.stats.calls[-1].bytes_sent == expected_bytes(model, args[0], n, None)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_fresh_pcpp_equals_masked_single_process(engines, dit, fraction):
    model, emb = dit
    engine, n = engines[3], 3
    engine.new_run(PatchConfig(mode="pcpp", fraction=fraction, fresh_activations=True))
    args, kwargs = inputs(emb)
    out = engine(model, *args, slot="s", **kwargs)
    with masked_self_attention(model, Bands.split(20, 12, n, 1), fraction):
        ref = plain(model, args, kwargs)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if fraction < 1.0:
        assert (out - plain(model, args, kwargs)).abs().max() > 1e-4
    assert engine.stats.calls[-1].bytes_sent == expected_bytes(model, args[0], n, fraction)


def test_stale_pcpp_equals_the_dit_stale_reference(engines, dit):
    """After warm-up (other inputs every call) the trained model on workers equals reference_dit's simulation."""
    model, emb = dit
    engine, n = engines[3], 3
    config = PatchConfig(mode="pcpp", fraction=0.3, warmup_steps=1)
    engine.new_run(config)
    ref = DitStaleReference(model, n, config)
    for i in range(3):
        args, kwargs = inputs(emb, seed=10 + i)
        out = engine(model, *args, slot="s", step=i, **kwargs)
        torch.testing.assert_close(out, ref(*args, slot="s", synchronous=i < 1, **kwargs), atol=ATOL, rtol=0)
    assert (out - plain(model, args, kwargs)).abs().max() > 1e-3  # stale, not fresh


def test_sampling_runs_order_the_modes(engines):
    """bench quality's measurement, short: naive < pcpp(0.3) <= distrifusion < sync in PSNR against one
    process (README's table has the 20-step run)."""
    m = load_demo_model("dit")
    ids, steps, warmup = [0, 5], 8, 2
    noise = m.noise(len(ids), 64, 0)
    ref = m.decode(m.sample(m.plain(), m.emb[ids], noise, steps, 3.0))
    engine = engines[2]
    db = {}
    for mode in ("sync", "pcpp", "distrifusion", "naive"):
        engine.new_run(PatchConfig(mode=mode, fraction=0.3, warmup_steps=warmup))
        out = m.decode(m.sample(m.on(engine), m.emb[ids], noise, steps, 3.0))
        db[mode] = min(psnr_db(out[i], ref[i]) for i in range(len(ids)))
    assert db["naive"] < db["pcpp"] <= db["distrifusion"] < db["sync"], db
    assert db["sync"] > 80, db  # one process up to round-off


def test_demo_draws_with_the_tiny_dit(tmp_path, capsys):
    """`python -m pcpp_core demo --model dit`: the parallel picture (sync) is the one-process picture."""
    out = tmp_path / "demo.png"
    assert demo_main(["--model", "dit", "--mode", "sync", "--size", "32", "--steps", "3", "--image", "coffee",
                      "--json", "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["model"] == "pcpp-tiny-dit" and r["bands"] == 2 and r["size"] == 32
    assert r["max_abs"] < 1e-4 and r["bytes_per_step"] > 0
    assert out.read_bytes()[:4] == b"\x89PNG"
