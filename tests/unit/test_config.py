import math

import pytest

from pcpp_core import ConfigError, Mode, PatchConfig, PoolConfig, parse_devices


@pytest.mark.parametrize("fraction", [-0.1, math.nan, math.inf, 1e9, "0.3", None, True])
def test_bad_fraction_names_the_input(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        PatchConfig(fraction=fraction)


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ConfigError, match=r"mode='fast'.*pcpp, distrifusion, naive, sync"):
        PatchConfig(mode="fast")


@pytest.mark.parametrize("warmup", [-1, 1.5, "4"])
def test_bad_warmup(warmup):
    with pytest.raises(ConfigError, match="warmup_steps"):
        PatchConfig(warmup_steps=warmup)


def test_modes_and_windows():
    assert PatchConfig(mode="PCPP").mode is Mode.PCPP
    assert PatchConfig(mode="pcpp", fraction=0.5).window_fraction == 0.5
    assert PatchConfig(mode="distrifusion").window_fraction is None
    assert PatchConfig(mode="sync").window_fraction is None
    assert PatchConfig(mode="naive").window_fraction == 0.0


def test_synchronous_calls():
    pc = PatchConfig(mode="pcpp", warmup_steps=2)
    assert [pc.is_synchronous(i) for i in range(4)] == [True, True, False, False]
    assert all(PatchConfig(mode="sync").is_synchronous(i) for i in range(6))
    assert not any(PatchConfig(mode="naive").is_synchronous(i) for i in range(3))
    assert all(PatchConfig(fresh_activations=True, warmup_steps=0).is_synchronous(i) for i in range(3))
    # a slot's first call has nothing stale to use: synchronous at any step
    assert pc.is_synchronous(7, first_of_slot=True) and not pc.is_synchronous(7)
    assert not PatchConfig(mode="naive").is_synchronous(0, first_of_slot=True)


def test_parse_devices():
    assert parse_devices("cpu:3", cuda_count=0) == ("cpu", "cpu", "cpu")
    assert parse_devices("auto", cuda_count=2) == ("cuda:0", "cuda:1")
    assert parse_devices(" cuda:1, cuda:0 ", cuda_count=2) == ("cuda:1", "cuda:0")
    assert parse_devices(["cuda:0"], cuda_count=1) == ("cuda:0",)


@pytest.mark.parametrize("spec, match", [
    ("gpu0", "cannot parse 'gpu0'"),
    ("cuda:0,,cuda:x", "cannot parse 'cuda:x'"),
    ("", "names no device"),
    ("cpu:0", "cpu:N needs N >= 1"),
    ("cuda:0,cuda:0", "twice"),
    ("cuda:3", "cuda:3 does not exist"),
    ("auto", "no CUDA GPU is visible"),
])
def test_bad_devices_name_the_input(spec, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_devices(spec, cuda_count=1 if spec != "auto" else 0)
    assert "devices=" in str(e.value)


def test_pool_config():
    pc = PoolConfig(devices="cpu:2")
    assert pc.devices == ("cpu", "cpu") and pc.backend == "gloo" and pc.world_size == 2
    assert PoolConfig(devices=("cuda:0", "cuda:1")).backend == "nccl"
    with pytest.raises(ConfigError, match="mixes CPU and CUDA"):
        PoolConfig(devices=("cpu", "cuda:0"))
    with pytest.raises(ConfigError, match="call_timeout_s"):
        PoolConfig(call_timeout_s=0)
