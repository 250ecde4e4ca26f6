"""The server's bounds: CPU-worker ceiling from affinity, quota and PCPP_MAX_WORKERS; idle time."""
import math
import os

import pytest

from pcpp_core import ConfigError, PoolConfig, parse_devices
from pcpp_core.limits import (DEFAULT_POOL_IDLE_S, MAX_WORKERS_ENV, POOL_IDLE_ENV, HostLimits, cgroup_cpu_quota,
                              usable_cores)


def test_usable_cores_counts_the_affinity_mask_not_the_machine():
    assert usable_cores(affinity={0, 5, 7}, quota=0) == 3
    assert usable_cores(affinity={3}, quota=0) == 1
    if hasattr(os, "sched_getaffinity"):
        assert usable_cores(quota=0) == len(os.sched_getaffinity(0))


def test_usable_cores_is_capped_by_a_cgroup_quota():
    assert usable_cores(affinity=set(range(64)), quota=2) == 2
    assert usable_cores(affinity={0, 1}, quota=8) == 2  # the quota never raises the count


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two workers may run, each half the time
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1, no quota
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({}, None),  # no cgroup files at all
    ({"cpu.max": "garbage"}, None),
])
def test_cgroup_cpu_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected


def test_default_ceiling_is_the_usable_cores():
    limits = HostLimits.from_env({}, cores=2)
    assert (limits.max_cpu_workers, limits.pool_idle_s, limits.problems) == (2, DEFAULT_POOL_IDLE_S, ())
    assert "2 core(s)" in limits.max_cpu_workers_source
    assert HostLimits.from_env({MAX_WORKERS_ENV: "  "}, cores=6).max_cpu_workers == 6  # empty = unset


@pytest.mark.parametrize("text, expected", [("3", 3), (" 12 ", 12), ("1", 1)])
def test_variable_sets_the_ceiling_above_or_below_the_cores(text, expected):
    limits = HostLimits.from_env({MAX_WORKERS_ENV: text}, cores=2)
    assert limits.max_cpu_workers == expected and limits.problems == ()
    assert limits.max_cpu_workers_source == f"{MAX_WORKERS_ENV}={expected}"


@pytest.mark.parametrize("text", ["abc", "0", "-2", "2.5", "1e3"])
def test_unusable_variable_keeps_the_default_and_says_so(text):
    limits = HostLimits.from_env({MAX_WORKERS_ENV: text}, cores=2)
    assert limits.max_cpu_workers == 2
    [problem] = limits.problems
    assert MAX_WORKERS_ENV in problem and repr(text) in problem and "default" in problem


@pytest.mark.parametrize("text, expected", [("0", 0.0), ("1.5", 1.5), ("600", 600.0)])
def test_pool_idle_variable(text, expected):
    limits = HostLimits.from_env({POOL_IDLE_ENV: text}, cores=2)
    assert limits.pool_idle_s == expected and limits.problems == ()
    PoolConfig(devices=("cpu", "cpu"), idle_timeout_s=limits.pool_idle_s)  # always a valid pool setting


@pytest.mark.parametrize("text", ["-1", "soon", "nan", "inf"])
def test_unusable_pool_idle_variable_keeps_the_default(text):
    limits = HostLimits.from_env({POOL_IDLE_ENV: text}, cores=2)
    assert limits.pool_idle_s == DEFAULT_POOL_IDLE_S
    [problem] = limits.problems
    assert POOL_IDLE_ENV in problem and repr(text) in problem


def test_too_many_cpu_workers_are_refused_naming_devices_the_count_and_the_limit():
    limits = HostLimits.from_env({}, cores=2)
    limits.check_cpu_workers("cpu:2", parse_devices("cpu:2"))  # within the limit: no error
    with pytest.raises(ConfigError) as err:
        limits.check_cpu_workers("cpu:3", parse_devices("cpu:3"))
    message = str(err.value)
    assert "devices='cpu:3'" in message and "3 CPU worker" in message and "at most 2" in message
    assert MAX_WORKERS_ENV in message  # how to raise it


def test_refusal_repeats_why_the_variable_was_ignored():
    limits = HostLimits.from_env({MAX_WORKERS_ENV: "lots"}, cores=1)
    with pytest.raises(ConfigError, match=r"at most 1 .*'lots' is not a whole number"):
        limits.check_cpu_workers("cpu:2", ("cpu", "cpu"))


def test_cuda_lists_are_not_bound_by_the_cpu_ceiling():
    limits = HostLimits.from_env({}, cores=1)
    limits.check_cpu_workers("cuda:0,cuda:1,cuda:2", parse_devices("cuda:0,cuda:1,cuda:2", cuda_count=4))
    with pytest.raises(ConfigError, match="twice"):  # the GPU bound stays parse_devices'
        parse_devices("cuda:0,cuda:0", cuda_count=4)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_devices("cuda:4", cuda_count=4)


@pytest.mark.parametrize("value", [-1, math.nan, math.inf, "300", True])
def test_bad_idle_timeout_names_the_field(value):
    with pytest.raises(ConfigError, match="idle_timeout_s"):
        PoolConfig(devices=("cpu", "cpu"), idle_timeout_s=value)
