"""The DiT plan on CPU workers with the bundled *trained* tiny DiT (pcpp_core/tiny_dit.py, Flux layout).

Latent 20 x 12 (10 x 6 patches, an 80 x 48 image): 3 bands are 3/3/4 patch rows, 4 bands 2/2/3/3.
sync equals one process; fresh pcpp equals the masked single-process reference; bytes are the
analytic count (4 condition tokens). The engines are tests/dist/conftest.py's, shared with test_dit.py.
"""
import pytest
import torch

from pcpp_core import Bands, PatchConfig, bytes_sent
from pcpp_core.plans import find_plan
from pcpp_core.plans_dit import flux_specs
from pcpp_core.reference import masked_self_attention
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
