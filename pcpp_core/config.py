"""Validated configuration: what the pool runs on, and how one sampling run is split."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

from .errors import ConfigError
from .limits import usable_cores


class Mode(str, Enum):
    """How bands see each other (see docs/PCPP.md section 4)."""

    PCPP = "pcpp"  # neighbour window of `fraction` band heights, stale after warm-up
    DISTRIFUSION = "distrifusion"  # whole-image window, stale after warm-up
    NAIVE = "naive"  # no exchange at all: each band denoised alone
    SYNC = "sync"  # fresh, whole-image exchange every step: equals one device

    @classmethod
    def parse(cls, value: "Mode | str") -> "Mode":
        if isinstance(value, Mode):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ConfigError(f"mode={value!r} is not a mode; valid: {valid}") from None


MAX_FRACTION = 64.0  # anything this large already covers every image: a window of 64 bands
# far_pool the nodes use with a residual codec and far_refresh: at SDXL 1024² pcpp f=0.3 far/2 with
# residual-2bit sends 3.8% (4 bands) / 2.7% (8 bands) of distrifusion's bytes with it, 8.2% / 7.7%
# without, for 0.4 dB less PSNR than distrifusion on the tiny model (README, Performance)
RESIDUAL_FAR_POOL = 16


@dataclass(frozen=True)
class PatchConfig:
    """How one sampling run is split; may change between runs without restarting the pool."""

    mode: Mode = Mode.PCPP
    fraction: float = 0.3  # neighbour rows each side, in units of the band's own height (pcpp only)
    warmup_steps: int = 4  # leading sampler steps (calls of a slot, without steps) run synchronously
    cfg_split: bool = False  # run cond and uncond halves of a batch on two device groups
    fresh_activations: bool = False  # verification: exchange synchronously every call, keep the window
    compress: str = "none"  # exchange codec of the stale calls (pcpp_core.codecs); warm-up stays exact
    far_refresh: int = 0  # pcpp: also attend to rows outside the window, held by the receiver, each
    #                       attention layer's refreshed once every far_refresh calls (0: the window only)
    far_pool: int = 1  # pcpp far_refresh: far rows travel as means of far_pool columns (residual codecs;
    #                    the nodes use RESIDUAL_FAR_POOL)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise ConfigError(f"fraction={f!r} must be a number between 0 and {MAX_FRACTION}")
        if math.isnan(f) or f < 0 or f > MAX_FRACTION:
            raise ConfigError(
                f"fraction={f!r} is out of range: use 0 (own band only) to {MAX_FRACTION:g} "
                "in units of the band's own height (1 = as many rows of each neighbour as the band has: the "
                "whole neighbour when bands are even; >= the band count covers the image)"
            )
        object.__setattr__(self, "fraction", float(f))
        from .codecs import get_codec  # the registry names the valid codecs

        object.__setattr__(self, "compress", get_codec(self.compress).name)
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"warmup_steps={w!r} must be an integer >= 0")
        r = self.far_refresh
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"far_refresh={r!r} must be an integer >= 0 (0 = the window only)")
        if r and w < 1 and self.mode is Mode.PCPP:
            raise ConfigError(f"far_refresh={r} needs warmup_steps >= 1: the warm-up fills the far rows")
        p = self.far_pool
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ConfigError(f"far_pool={p!r} must be an integer >= 1 (1 = far rows at full resolution)")
        if p > 1 and r and not get_codec(self.compress).residual:
            raise ConfigError(f"far_pool={p} sends the change of the far rows, pooled: it needs a residual "
                              f"exchange codec (compress=residual-2bit or residual-1bit), not {self.compress!r}; "
                              "or use far_pool=1")

    @property
    def window_fraction(self) -> float | None:
        """The attention window in band heights after warm-up: None = whole image, 0 = own band."""
        return {Mode.PCPP: self.fraction, Mode.NAIVE: 0.0}.get(self.mode)

    def is_synchronous(self, step: int, *, first_of_slot: bool = False) -> bool:
        """Whether a call at warm-up position `step` waits for fresh data from the other bands.

        `step` is the sampler step of the call (see slots.SlotTracker), or, for a caller that
        gives none, the call's index within its slot. A slot's first call is synchronous
        whatever its step: there is nothing stale to use yet. Naive mode never exchanges.
        """
        if self.mode is Mode.NAIVE:
            return False
        return (self.mode is Mode.SYNC or self.fresh_activations or first_of_slot
                or step < self.warmup_steps)


_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_devices(spec: "str | list[str] | tuple[str, ...]", *, cuda_count: int | None = None) -> tuple[str, ...]:
    """Parse a device list: ``auto``, ``cpu:N`` (N CPU workers), or ``cuda:0,cuda:1``.

    ``auto`` means every visible CUDA GPU; ``cuda`` alone means all of them too.
    """
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    text = str(spec).strip().lower().replace(" ", "")
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text in ("auto", "cuda"):
        if cuda_count < 1:
            raise ConfigError(f"devices={spec!r}: no CUDA GPU is visible; use cpu:N for N CPU workers")
        return tuple(f"cuda:{i}" for i in range(cuda_count))
    m = _DEVICE_RE.match(text)
    if m and m.group(1) == "cpu":
        n = int(m.group(2) or 1)
        if n < 1:
            raise ConfigError(f"devices={spec!r}: cpu:N needs N >= 1")
        return tuple("cpu" for _ in range(n))
    out: list[str] = []
    for part in filter(None, text.split(",")):
        m = _DEVICE_RE.match(part)
        if not m or m.group(1) != "cuda" or m.group(2) is None:
            raise ConfigError(
                f"devices={spec!r}: cannot parse {part!r}; use auto, cpu:N, or a list like cuda:0,cuda:1"
            )
        idx = int(m.group(2))
        if idx >= cuda_count:
            raise ConfigError(f"devices={spec!r}: {part} does not exist ({cuda_count} CUDA device(s) visible)")
        out.append(f"cuda:{idx}")
    if not out:
        raise ConfigError(f"devices={spec!r} names no device; use auto, cpu:N, or cuda:0,cuda:1")
    if len(set(out)) != len(out):
        raise ConfigError(f"devices={spec!r} names a device twice")
    return tuple(out)


@dataclass(frozen=True)
class PoolConfig:
    """Where the workers run. A change of devices means a new pool."""

    devices: tuple[str, ...] = ("cpu", "cpu")
    call_timeout_s: float = 300.0  # a call that takes longer is a hung worker
    start_timeout_s: float = 120.0
    threads_per_worker: int | None = None  # CPU workers: torch threads each (default: cores / workers)
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # extra environment for workers
    staging_dir: str = ""  # where model files are staged for the workers; $PCPP_STAGING_DIR wins, "" = temp dir
    idle_timeout_s: float = 0.0  # stop the pool after this long with no run and no call; 0 = never

    def __post_init__(self) -> None:
        devs = self.devices
        if isinstance(devs, str):
            devs = parse_devices(devs)
        devs = tuple(devs)
        if not devs:
            raise ConfigError("devices is empty; give at least one device")
        kinds = {d.split(":")[0] for d in devs}
        if len(kinds) != 1:
            raise ConfigError(f"devices={','.join(devs)} mixes CPU and CUDA; use one kind")
        object.__setattr__(self, "devices", devs)
        for name in ("call_timeout_s", "start_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
                raise ConfigError(f"{name}={v!r} must be a positive number of seconds")
        if not isinstance(self.staging_dir, str):
            raise ConfigError(f"staging_dir={self.staging_dir!r} must be a directory path (or '' for the temp dir)")
        v = self.idle_timeout_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"idle_timeout_s={v!r} must be a number of seconds >= 0 (0 = keep the pool warm)")
        t = self.threads_per_worker
        if t is not None and (not isinstance(t, int) or t < 1):
            raise ConfigError(f"threads_per_worker={t!r} must be a positive integer or None")

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].startswith("cuda") else "gloo"

    def worker_threads(self) -> int:
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return max(1, usable_cores() // self.world_size)
