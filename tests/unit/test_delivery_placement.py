"""One copy per GPU, as logic: the nodes' decision with fake devices (no GPU, no ComfyUI needed)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nodes.delivery import host_copy_must_go, host_device_for_run


@pytest.mark.parametrize("host,workers,must_go", [
    ("cuda:0", ("cuda:0", "cuda:1"), True),  # devices=auto: worker 0 shares the host's GPU
    (torch.device("cuda", 1), ("cuda:0", "cuda:1"), True),
    (torch.device("cuda"), ("cuda:0", "cuda:1"), True),  # no index: the first GPU
    ("cuda:0", ("cuda:1", "cuda:2"), False),  # the host's GPU runs no worker: keep ComfyUI's copy there
    ("cpu", ("cpu", "cpu"), False),  # CPU memory is shared; the CPU workers map one file
    (torch.device("cpu"), ("cuda:0", "cuda:1"), False),
])
def test_host_copy_goes_only_from_a_gpu_that_runs_a_worker(host, workers, must_go):
    assert host_copy_must_go(host, workers) is must_go


def test_no_conflict_keeps_the_load_device_without_touching_comfyui():
    patcher = SimpleNamespace(load_device=torch.device("cuda", 3), offload_device=torch.device("cpu"), model=object())
    assert host_device_for_run(patcher, ("cuda:0", "cuda:1")) is None
