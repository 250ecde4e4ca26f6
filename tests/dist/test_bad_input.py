"""Bad input mid-use: an error naming the input, raised before any worker is asked, and the
engine keeps working with the same pool afterwards."""
import pytest
import torch
from torch import nn

from pcpp_core import BandSizeError, ConfigError, Engine, PatchConfig, PoolConfig, UnsupportedModelError
from conftest import inputs, plain

pytestmark = pytest.mark.dist


def _still_exact(engine, model):
    engine.new_run(PatchConfig(mode="sync"))
    a, k = inputs("comfy")
    torch.testing.assert_close(engine(model, *a, **k), plain(model, "comfy", a, k), atol=1e-5, rtol=0)


def test_bad_inputs_leave_nothing_half_done(engines, models):
    model, engine = models["comfy"], engines[2]
    _still_exact(engine, model)
    pids, calls = engine.pool.pids, len(engine.stats.calls)
    engine.new_run(PatchConfig(mode="pcpp", warmup_steps=1))
    a, k = inputs("comfy")
    engine(model, *a, **k)
    small_a, small_k = inputs("comfy", height=16)  # the latent changes size mid-run
    with pytest.raises(ConfigError, match=r"x \(the latent\) changed size during a sampling run.*32x24"):
        engine(model, *small_a, **small_k)  # the same (default) call slot
    engine(model, *small_a, slot="area", **small_k)  # another size in its own slot is fine
    engine(model, *a, **k)  # and the first slot goes on
    with pytest.raises(ConfigError, match="x must be a latent"):
        engine(model, a[0][0], a[1], **k)
    engine.new_run(PatchConfig(mode="sync"))
    tiny_a, tiny_k = inputs("comfy", height=4)  # fewer rows than two bands need
    with pytest.raises(BandSizeError, match="too small for 2 devices.*smallest valid latent height is 8 rows"):
        engine(model, *tiny_a, **tiny_k)
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        engine(nn.Sequential(nn.Conv2d(4, 4, 3)), *a, **k)
    assert engine.pool.pids == pids  # no worker was disturbed
    engine(model, *small_a, **small_k)  # a new run may use another size
    _still_exact(engine, model)
    assert engine.pool.pids == pids


def test_unsupported_model_starts_no_pool():
    engine = Engine(PoolConfig(devices=("cpu", "cpu")))
    a, k = inputs("comfy")
    with pytest.raises(UnsupportedModelError, match="is not a supported family"):
        engine(nn.Sequential(nn.Conv2d(4, 4, 3)), *a, **k)
    assert not engine.pool.started
