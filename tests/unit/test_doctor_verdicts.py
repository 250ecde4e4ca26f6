"""The doctor's judgement and output without hardware: discovery verdicts from made-up machines,
the verdict/JSON formatting, hints for errors a check raises, argument errors."""
from __future__ import annotations

import json

import pytest
import torch

from pcpp_core import doctor
from pcpp_core.doctor import Check, format_check, summary, verdict_line
from pcpp_core.doctor_discovery import GIB, GPU, Facts, judge
from pcpp_core.errors import ConfigError, WorkerError
from pcpp_core.exchange import _pattern


def machine(**over) -> Facts:
    """A healthy Linux box with two GPUs, peer access and plenty of /dev/shm."""
    base = dict(system="Linux", wsl=False, docker=False, python="3.11", torch="2.5.0+cu124", cuda_build="12.4",
                distributed=True, nccl=True, gloo=True, cpu_count=16, cuda_visible=None, cuda_count=2,
                gpus=[GPU(0, "NVIDIA H100", 70 * GIB, 80 * GIB), GPU(1, "NVIDIA H100", 70 * GIB, 80 * GIB)],
                peer={(0, 1): True, (1, 0): True}, shm_free=32 * GIB, tmp_dir="/tmp", tmp_free=100 * GIB)
    base.update(over)
    return Facts(**base)


GPUS = ("cuda:0", "cuda:1")


def test_healthy_gpu_machine_passes_without_a_hint():
    v = judge(machine(), GPUS)
    assert v.passed and v.hint is None
    assert "cuda:0 NVIDIA H100" in v.detail and "peer access 2/2" in v.detail


def test_missing_gpu_names_the_index_and_how_many_are_visible():
    v = judge(machine(), ("cuda:0", "cuda:3"))
    assert not v.passed
    assert "cuda:3 does not exist (2 visible)" in v.detail
    assert "0..1" in v.hint


def test_windows_without_nccl_fails_with_the_wsl_hint():
    v = judge(machine(system="Windows", nccl=False), GPUS)
    assert not v.passed and "NCCL is not available" in v.detail
    assert "WSL2" in v.hint


def test_cpu_only_torch_asked_for_gpus_fails_and_points_to_the_cpu_path():
    v = judge(machine(torch="2.5.0+cpu", cuda_build=None, nccl=False, cuda_count=0, gpus=[], peer={}), GPUS)
    assert not v.passed and "CPU-only build" in v.detail
    assert "--devices cpu:2" in v.hint


def test_small_shm_in_docker_warns_but_passes():
    v = judge(machine(docker=True, shm_free=64 * 1024 ** 2), GPUS)
    assert v.passed
    assert "--shm-size" in v.hint


def test_no_peer_access_and_little_gpu_memory_warn_but_pass():
    low = [GPU(0, "RTX", 2 * GIB, 24 * GIB), GPU(1, "RTX", 20 * GIB, 24 * GIB)]
    v = judge(machine(gpus=low, peer={(0, 1): False, (1, 0): False}), GPUS)
    assert v.passed
    assert "cuda:0<->cuda:1" in v.hint and "cuda:0 has 2.1 GB free" in v.hint
    assert "cuda:1 has" not in v.hint


def test_cpu_workers_need_gloo_not_cuda():
    facts = machine(cuda_build=None, nccl=False, cuda_count=0, gpus=[], peer={})
    assert judge(facts, ("cpu",) * 3).passed
    v = judge(machine(gloo=False), ("cpu",) * 2)
    assert not v.passed and "gloo" in v.detail


def test_auto_with_no_gpu_fails_with_a_hint():
    v = judge(machine(cuda_count=0, gpus=[], peer={}), ())
    assert not v.passed and "cpu:2" in v.hint


def test_summary_is_ok_only_when_every_check_passed_and_has_exactly_the_documented_keys():
    checks = [Check("discovery", True, "fine"), Check("p2p", False, "wrong bytes", "update the driver", {"x": 1})]
    out = summary(checks)
    assert out["ok"] is False
    assert [set(c) for c in out["checks"]] == [{"name", "passed", "detail", "hint"}] * 2
    assert out["checks"][1]["hint"] == "update the driver"
    assert json.loads(json.dumps(out)) == out
    assert summary(checks[:1])["ok"] is True
    assert summary([])["ok"] is False


def test_human_rows_mark_pass_fail_skip_and_print_hints():
    ok, bad, skip = Check("sync", True, "diff 1e-6"), Check("p2p", False, "hung", "try X"), doctor.skipped("bytes", "y")
    assert format_check(ok).startswith("  ✓ sync") and "hint" not in format_check(ok)
    assert format_check(bad).startswith("  ✗ p2p") and "hint: try X" in format_check(bad)
    assert format_check(skip).startswith("  - bytes") and "hint" not in format_check(skip)
    assert not skip.passed  # a skipped check never counts as passed
    assert format_check(bad, ("ok", "FAIL")).startswith("  FAIL p2p")
    assert verdict_line([ok], 3.0).startswith("verdict: OK")
    line = verdict_line([ok, bad, skip], 3.0)
    assert "FAILED (p2p; 1 check(s) skipped)" in line


def test_a_check_that_raises_becomes_a_failed_check_with_a_hint():
    def hang(_setup):
        raise WorkerError("no answer to 'p2p' within 120 s (call_timeout_s); the worker is hung", rank=1)

    c = doctor._guarded("p2p", hang, None)
    assert not c.passed and c.detail.startswith("WorkerError: worker rank 1")
    assert "NCCL_P2P_DISABLE=1" in c.hint and "Traceback" in c.data["traceback"]
    oom = doctor._guarded("sync", lambda s: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")), None)
    assert "out of memory" in oom.hint


@pytest.mark.parametrize("spec", ["cuda:0,cpu", "gpu:1", "cpu:0", "cuda:0,cuda:0"])
def test_unparseable_devices_are_a_config_error_naming_the_flag(spec):
    with pytest.raises(ConfigError, match="--devices"):
        doctor.resolve_devices(spec)


def test_missing_gpus_are_not_an_argument_error():
    assert doctor.resolve_devices("cuda:0,cuda:7") == ("cuda:0", "cuda:7")  # discovery judges them
    assert doctor.resolve_devices("cpu:3") == ("cpu",) * 3


def test_bad_arguments_exit_2(capsys):
    assert doctor.main(["--devices", "tpu:0"]) == 2
    assert "--devices" in capsys.readouterr().err
    assert doctor.main(["--devices", "cpu:3", "--size", "12"]) == 2


def test_transfer_patterns_differ_per_direction_and_repeat():
    a = _pattern(0, 1, 0, 4096, torch.device("cpu"))
    assert a.dtype == torch.uint8 and a.shape == (4096,)
    assert len(set(a.tolist())) == 256  # every byte value occurs
    for other in (_pattern(1, 0, 0, 4096, torch.device("cpu")), _pattern(0, 1, 1, 4096, torch.device("cpu"))):
        assert not torch.equal(a, other)
