"""The doctor's first check: what this machine offers the pool, before any worker starts.

Split in two so the judgement can be tested without the hardware: `gather()` reads the machine
into a `Facts` record (torch build, backends, GPUs, peer access, free space), `judge()` turns
facts and the requested devices into a verdict with a hint for each problem. Problems that stop
the pool fail the check; problems that only matter for real models (little /dev/shm or GPU
memory, no peer access) pass it with a warning in the hint.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

GIB = 1024 ** 3
SHM_WARN_BYTES = 6 * GIB  # a pool writes each model version there once (SDXL's UNet: ~5 GB in fp16)
TMP_WARN_BYTES = 1 * GIB
GPU_FREE_WARN_BYTES = 4 * GIB  # SDXL's UNet in fp16 plus activations at 1024 px


@dataclass
class GPU:
    index: int
    name: str
    free: int  # bytes, torch.cuda.mem_get_info
    total: int


@dataclass
class Facts:
    """Everything discovery looked at; every field is plain data (tests build their own)."""

    system: str  # platform.system(): Linux, Windows, Darwin
    wsl: bool
    docker: bool
    python: str
    torch: str
    cuda_build: str | None  # torch.version.cuda; None for a CPU-only build
    distributed: bool
    nccl: bool
    gloo: bool
    cpu_count: int
    cuda_visible: str | None  # CUDA_VISIBLE_DEVICES as set
    cuda_count: int = 0  # GPUs torch sees
    gpus: list[GPU] = field(default_factory=list)
    peer: dict[tuple[int, int], bool] = field(default_factory=dict)  # (i, j): i can read j's memory
    shm_free: int | None = None  # None: no /dev/shm
    tmp_dir: str = ""
    tmp_free: int | None = None
    cuda_error: str | None = None  # why CUDA could not be queried, if it raised

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["gpus"] = [g.__dict__ for g in self.gpus]
        d["peer"] = {f"{i}->{j}": ok for (i, j), ok in self.peer.items()}
        return d


@dataclass
class Verdict:
    passed: bool
    detail: str
    hint: str | None


def _free(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _in_docker() -> bool:
    if os.path.exists("/.dockerenv"):
        return True
    try:
        with open("/proc/1/cgroup", encoding="utf-8") as fh:
            return any(w in fh.read() for w in ("docker", "containerd", "kubepods"))
    except OSError:
        return False


def gather(devices: tuple[str, ...]) -> Facts:
    """Read the machine. CUDA is queried only for the GPUs in `devices` (and their pairs)."""
    import torch
    import torch.distributed as dist

    avail = dist.is_available()
    facts = Facts(
        system=platform.system(), wsl="microsoft" in platform.release().lower(), docker=_in_docker(),
        python=platform.python_version(), torch=torch.__version__, cuda_build=torch.version.cuda,
        distributed=avail, nccl=avail and dist.is_nccl_available(), gloo=avail and dist.is_gloo_available(),
        cpu_count=os.cpu_count() or 1, cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
        shm_free=_free("/dev/shm") if os.path.isdir("/dev/shm") else None,
        tmp_dir=tempfile.gettempdir(),
    )
    facts.tmp_free = _free(facts.tmp_dir)
    wanted = sorted({int(d.split(":")[1]) for d in devices if d.startswith("cuda:")})
    if not wanted:
        return facts
    try:
        facts.cuda_count = count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for i in (i for i in wanted if i < count):
            free, total = torch.cuda.mem_get_info(i)
            facts.gpus.append(GPU(i, torch.cuda.get_device_name(i), free, total))
        present = [g.index for g in facts.gpus]
        facts.peer = {(i, j): bool(torch.cuda.can_device_access_peer(i, j))
                      for i in present for j in present if i != j}
    except Exception as e:  # a broken driver raises here; the verdict says so
        facts.cuda_error = f"{type(e).__name__}: {e}"
    return facts


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


def _cuda_problems(facts: Facts, wanted: list[int]) -> tuple[list[str], list[str]]:
    """(errors, hints) for the CUDA devices asked for."""
    errors: list[str] = []
    hints: list[str] = []
    count = facts.cuda_count
    if facts.cuda_error:
        errors.append(f"CUDA query failed ({facts.cuda_error})")
        hints.append("check the driver with nvidia-smi; a driver older than this torch build's CUDA "
                     f"({facts.cuda_build}) cannot run it")
    elif facts.cuda_build is None:
        errors.append(f"torch {facts.torch} is a CPU-only build")
        hints.append("install a CUDA build of torch (https://pytorch.org/get-started/locally/), "
                     "or check the CPU path with --devices cpu:2")
    elif count == 0:
        errors.append("torch sees no CUDA GPU")
        hint = "check nvidia-smi; in Docker start the container with --gpus all"
        if facts.cuda_visible is not None:
            hint += f" (CUDA_VISIBLE_DEVICES={facts.cuda_visible!r} is set)"
        hints.append(hint)
    else:
        for i in wanted:
            if i >= count:
                errors.append(f"cuda:{i} does not exist ({count} visible)")
                hints.append(f"use indices 0..{count - 1}"
                             + (f" (CUDA_VISIBLE_DEVICES={facts.cuda_visible} renumbers them from 0)"
                                if facts.cuda_visible is not None else ""))
    if facts.cuda_build is not None and not facts.nccl:  # the pool's backend on GPUs, even for one
        errors.append("NCCL is not available in this torch build")
        if facts.system == "Windows":
            hints.append("Windows: no NCCL - use Linux, or WSL2 with the NVIDIA driver for WSL and a Linux "
                         "CUDA build of torch")
        else:
            hints.append("install a CUDA build of torch from pytorch.org (it ships NCCL)")
    return errors, hints


def _warnings(facts: Facts, devices: tuple[str, ...]) -> list[str]:
    """Problems that pass the tiny model but bite real ones."""
    out: list[str] = []
    if facts.shm_free is not None and facts.shm_free < SHM_WARN_BYTES:
        fix = ("Docker: /dev/shm is small, start the container with --shm-size=16g (or --ipc=host)"
               if facts.docker else "enlarge /dev/shm (mount -o remount,size=16G /dev/shm)")
        out.append(f"/dev/shm has {_gb(facts.shm_free)} free: each model version is written there once "
                   f"(SDXL's UNet ~5 GB) and NCCL uses it between GPUs; {fix}")
    if facts.tmp_free is not None and facts.tmp_free < TMP_WARN_BYTES:
        out.append(f"{facts.tmp_dir} has {_gb(facts.tmp_free)} free; set TMPDIR to a larger disk")
    for g in facts.gpus:
        if g.free < GPU_FREE_WARN_BYTES:
            out.append(f"cuda:{g.index} has {_gb(g.free)} free of {_gb(g.total)}: close what else runs on it "
                       "(nvidia-smi), an SDXL UNet needs ~6 GB")
    no_peer = sorted({tuple(sorted(p)) for p, ok in facts.peer.items() if not ok})
    if no_peer:
        pairs = ", ".join(f"cuda:{i}<->cuda:{j}" for i, j in no_peer)
        out.append(f"no peer-to-peer access between {pairs}: NCCL goes through host memory (slower, still "
                   "correct); normal for many consumer GPUs and VMs, otherwise check IOMMU/ACS in the BIOS")
    cpu_workers = sum(d == "cpu" for d in devices)
    if cpu_workers > facts.cpu_count:
        out.append(f"{cpu_workers} CPU workers on {facts.cpu_count} cores: each gets one thread and they "
                   "share cores, fine for checking, slow for use")
    return out


def judge(facts: Facts, devices: tuple[str, ...]) -> Verdict:
    """The discovery verdict for `devices` (``("cpu",)*N`` or ``("cuda:0", ...)``)."""
    errors: list[str] = []
    hints: list[str] = []
    wanted = [int(d.split(":")[1]) for d in devices if d.startswith("cuda:")]
    if not facts.distributed:
        errors.append("torch.distributed is not available in this torch build")
        hints.append("install torch from pytorch.org (some platform builds leave distributed out)")
    if not devices:
        errors.append("no CUDA GPU is visible for --devices auto")
        hints.append("check nvidia-smi, or check the CPU path with --devices cpu:2")
    elif wanted:
        e, h = _cuda_problems(facts, wanted)
        errors += e
        hints += h
    elif not facts.gloo:
        errors.append("gloo is not available in this torch build")
        hints.append("install torch from pytorch.org; CPU workers need gloo")
    backends = f"nccl {'yes' if facts.nccl else 'no'}, gloo {'yes' if facts.gloo else 'no'}"
    build = f"CUDA {facts.cuda_build}" if facts.cuda_build else "CPU-only build"
    parts = [f"torch {facts.torch} ({build}), {backends}"]
    if facts.gpus:
        parts += [f"cuda:{g.index} {g.name} {_gb(g.free)} free of {_gb(g.total)}" for g in facts.gpus]
        if facts.peer:
            ok = sum(facts.peer.values())
            parts.append(f"peer access {ok}/{len(facts.peer)} directions")
    elif devices and not wanted:
        parts.append(f"{len(devices)} CPU worker(s) on {facts.cpu_count} core(s)")
    parts.append(f"/dev/shm {_gb(facts.shm_free)} free" if facts.shm_free is not None else "no /dev/shm")
    parts.append(f"{facts.tmp_dir} {_gb(facts.tmp_free)} free")
    if facts.docker or facts.wsl:
        parts.append("in Docker" if facts.docker else "in WSL")
    detail = "; ".join(errors) + " | found: " + "; ".join(parts) if errors else "; ".join(parts)
    warnings = _warnings(facts, devices)
    hint = "; ".join(hints + (["also: " + w for w in warnings] if hints else warnings)) or None
    return Verdict(not errors, detail, hint)
