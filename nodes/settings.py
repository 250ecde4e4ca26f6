"""The inputs both nodes share: validated settings, the devices they name, and the worker pool's
config. Plain data and checks, no sampling (that is hook.py)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

import comfy.cli_args
from pcpp_core import ConfigError, Mode, PatchConfig, PoolConfig, parse_devices
from pcpp_core.codecs import codec_names, get_codec
from pcpp_core.config import RESIDUAL_FAR_POOL
from pcpp_core.limits import HostLimits

from .options import ARGS_ENV

log = logging.getLogger("pcpp.nodes")

MODES = (*(m.value for m in Mode), "off")  # off: plain ComfyUI sampling, a node-level choice
MAX_FRACTION = 2.0  # the widget's range, in units of the band's own height (see PCPPSettings)
TIMEOUT_ENV = "PCPP_CALL_TIMEOUT_S"

# PCPP_MAX_WORKERS and PCPP_POOL_IDLE_S, read once when ComfyUI loads the pack (at server start)
LIMITS = HostLimits.from_env()
for _problem in LIMITS.problems:
    log.error("PCPP: %s", _problem)


@dataclass(frozen=True)
class PCPPSettings:
    """The engine inputs both nodes share, validated; messages name the node input to change."""

    devices: str = "auto"
    neighbour_fraction: float = 0.3
    mode: str = "pcpp"
    warmup_steps: int = 4
    cfg_split: bool = False
    exchange: str = "none"  # codec of the stale calls (pcpp_core.codecs)
    far_refresh: int = 0  # pcpp far context (PatchConfig.far_refresh)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not a mode; valid: {', '.join(MODES)}")
        f = self.neighbour_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= MAX_FRACTION:
            raise ConfigError(f"neighbour_fraction={f!r} is out of range: use 0 (own band only) to "
                              f"{MAX_FRACTION:g}, in units of the band's own height (1 = as many rows of each "
                              "neighbour as the band has: the whole neighbour when bands are even)")
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"warmup_steps={w!r} must be an integer >= 0")
        if self.exchange not in codec_names():
            raise ConfigError(f"exchange={self.exchange!r} is not a codec; valid: {', '.join(codec_names())}")
        r = self.far_refresh
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= 64:
            raise ConfigError(f"far_refresh={r!r} must be an integer from 0 (window only) to 64")
        resolve_devices(self.devices)  # raises for a list that names no usable device

    @property
    def off(self) -> bool:
        return self.mode == "off"

    @property
    def far_pool(self) -> int:
        """Columns per far token on a UNet: pooled with a residual codec (the far rows' change is
        smooth; see RESIDUAL_FAR_POOL), full resolution otherwise. Not a node input: one knob fewer."""
        far = self.mode == "pcpp" and self.far_refresh > 0
        return RESIDUAL_FAR_POOL if far and get_codec(self.exchange).residual else 1

    def patch_config(self, transformer: bool = False) -> PatchConfig:
        """The engine's run config. A transformer's far rows travel unpooled: on the tiny DiT, whose
        token rows are 8 wide, pooling cost 10 dB (README, Compressed exchange), and nothing here
        has measured it on Flux-sized rows."""
        return PatchConfig(mode=self.mode, fraction=float(self.neighbour_fraction),
                           warmup_steps=self.warmup_steps, cfg_split=self.cfg_split, compress=self.exchange,
                           far_refresh=self.far_refresh if self.mode == "pcpp" else 0,
                           far_pool=1 if transformer else self.far_pool)


def resolve_devices(spec: str) -> tuple[tuple[str, ...], str | None]:
    """(devices, None) to run in parallel, or (devices, why plain sampling must run instead).

    `auto` with fewer than two GPUs is not an error: it means "whatever is there", and one
    device runs plain ComfyUI sampling; it never means CPU workers. A list that cannot be
    parsed, names a missing GPU, or asks for more CPU workers than this server allows
    (LIMITS: the cores it may use, or PCPP_MAX_WORKERS) is an error (ConfigError naming `devices`).
    """
    if str(spec).strip().lower() == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        found = tuple(f"cuda:{i}" for i in range(n))
        if n < 2:
            return found, f"devices='auto' found {n} CUDA GPU(s); parallel sampling needs at least 2"
        return found, None
    devices = parse_devices(spec)
    LIMITS.check_cpu_workers(spec, devices)  # before any worker is started: a prompt must not fork the host away
    if len(devices) < 2:
        return devices, f"devices={spec!r} is one device only; parallel sampling needs at least 2"
    return devices, None


def call_timeout_s() -> float:
    """Seconds a model call may take before its worker counts as hung: $PCPP_CALL_TIMEOUT_S, default 300."""
    text = os.environ.get(TIMEOUT_ENV, "300")
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds") from None


def pool_config(devices: tuple[str, ...]) -> PoolConfig:
    """Workers that import ComfyUI with the host's flags (see worker_boot)."""
    flags = {k: v for k, v in vars(comfy.cli_args.args).items() if isinstance(v, (bool, int, float, str, type(None)))}
    flags["cpu"] = devices[0] == "cpu"  # a CPU worker must never ask CUDA for a device
    env = (("PCPP_WORKER_PRELOAD", "nodes.worker_boot"), (ARGS_ENV, json.dumps(flags, sort_keys=True)))
    return PoolConfig(devices=devices, env=env, call_timeout_s=call_timeout_s(), idle_timeout_s=LIMITS.pool_idle_s)
