"""A configuration problem found inside a worker comes back as ConfigError naming the rank;
the pool survives when every rank answers, and is restarted when one stays blocked."""
import pytest
import torch

from pcpp_core import ConfigError, PatchConfig
from conftest import inputs, plain
from pcpp_testmodels import tiny_comfy_unet_with_context_in_self_attention

pytestmark = pytest.mark.dist


def test_self_attention_with_a_context_is_a_config_error_and_the_pool_survives(engines, models):
    engine = engines[2]
    a, k = inputs("comfy", batch=1)
    engine.new_run(PatchConfig(mode="pcpp", warmup_steps=1))
    engine(models["comfy"], *a, slot="s", **k)  # a run in progress, with stale buffers
    engine(models["comfy"], *a, slot="s", **k)
    pids = engine.pool.pids
    with pytest.raises(ConfigError, match=r"worker rank 0: UnsupportedModelError: .*attn1: self-attention called "
                                          r"with a context \(the pool is intact\)"):
        engine(tiny_comfy_unet_with_context_in_self_attention(), *a, slot="s", **k)
    assert engine.pool.pids == pids and engine.pool.alive
    engine.new_run(PatchConfig(mode="sync"))
    out = engine(models["comfy"], *a, slot="s", **k)
    torch.testing.assert_close(out, plain(models["comfy"], "comfy", a, k), atol=1e-5, rtol=0)
    assert engine.pool.pids == pids


def test_a_rank_blocked_on_the_failing_one_stops_the_pool_but_the_error_stays_a_config_error(mutant_engine, models):
    engine, model = mutant_engine, models["comfy"]
    a, k = inputs("comfy", batch=1)
    engine.new_run(PatchConfig(mode="sync"))
    engine(model, *a, slot="s", **k)
    pids = engine.pool.pids
    with pytest.raises(ConfigError, match=r"worker rank 1: ConfigError: rank 1 refuses.*rank\(s\) \[0\] did not answer"):
        engine(model, *a, slot="config_error_rank1", **k)
    assert not engine.pool.started
    out = engine(model, *a, slot="s", **k)  # the next call starts a fresh pool
    torch.testing.assert_close(out, plain(model, "comfy", a, k), atol=1e-5, rtol=0)
    assert set(engine.pool.pids).isdisjoint(pids)
