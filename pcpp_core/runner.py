"""Worker side of one model evaluation: cut the inputs to this band, run the patched model."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import nn

from .config import Mode, PatchConfig
from .errors import ConfigError
from .codecs import NONE
from .exchange import CallState, Exchange, Transport
from .geometry import Bands
from .plans import apply_plan, find_plan

log = logging.getLogger("pcpp.runner")


@dataclass
class CallRequest:
    """One model evaluation as the host sends it to every worker of a group."""

    args: tuple  # args[0] is the full latent x: [B, C, H, W]
    kwargs: dict
    slot: Hashable  # the caller's call slot (e.g. cond/uncond composition); shape is added here
    config: PatchConfig
    group: tuple[int, ...]  # global ranks of this call's bands, top to bottom
    step: int | None = None  # sampler step (warm-up counts steps); None: the call's index in its slot


@dataclass
class CallStats:
    rank: int
    band: int
    seconds: float
    bytes_sent: int
    synchronous: bool


@dataclass
class _Slot:
    index: int
    calls: int = 0


def map_tensors(obj: Any, fn) -> Any:
    """Apply `fn` to every tensor in nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def cut_spatial(obj: Any, bands: Bands, band: int) -> Any:
    """Cut every [B, C, H_l, W_l] residual to this band's rows at its level."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 4:
            return t
        for level in range(bands.levels + 1):
            if t.shape[2] == bands.level_size(level)[0]:
                r0, r1 = bands.rows(band, level)
                return t[:, :, r0:r1]
        raise ConfigError(f"a spatial residual of shape {tuple(t.shape)} matches no level of a "
                          f"{bands.height}x{bands.width} latent")

    return map_tensors(obj, cut)


def _synchronize(device: torch.device) -> None:
    """Wait for the compute stream only: the stale exchange's transfers, on NCCL's own streams,
    stay in flight behind the next call."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclass
class BandRunner:
    """Owns this worker's patched model, its exchange and its call slots."""

    model: nn.Module
    rank: int
    exchange: Exchange = field(default_factory=Exchange)
    _slots: dict[Hashable, _Slot] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.plan = find_plan(self.model)
        self.levels = self.plan.levels(self.model)
        apply_plan(self.model, self.plan, self.exchange)

    def reset(self, timeout: float | None = None) -> bool:
        """A new sampling run: forget every slot, counter and stale buffer. False when in-flight
        transfers did not finish within `timeout` seconds (see Exchange.reset)."""
        self._slots.clear()
        return self.exchange.reset(timeout)

    def run(self, req: CallRequest, transport: Callable[[tuple[int, ...]], Transport]) -> tuple[torch.Tensor, CallStats]:
        """One evaluation on this worker's band; `transport(group)` talks to the group's ranks."""
        x = req.args[0]  # [B, C, H, W]
        band = req.group.index(self.rank)
        bands = Bands.split(x.shape[2], x.shape[3], len(req.group), self.levels)
        slot = self._slots.setdefault((req.slot, tuple(x.shape), req.group), _Slot(len(self._slots)))
        cfg = req.config
        sync = cfg.is_synchronous(slot.calls if req.step is None else req.step, first_of_slot=slot.calls == 0)
        call = CallState(
            slot=slot.index,
            bands=bands,
            band=band,
            synchronous=sync,
            window=None if sync and not cfg.fresh_activations else cfg.window_fraction,
            exchange=cfg.mode is not Mode.NAIVE,
            compress=cfg.compress if cfg.mode in (Mode.PCPP, Mode.DISTRIFUSION) else NONE,
            far_refresh=cfg.far_refresh if cfg.mode is Mode.PCPP and not cfg.fresh_activations else 0,
            far_pool=cfg.far_pool,
            index=slot.calls,
        )
        slot.calls += 1
        self.plan.check_call(req.kwargs)
        kwargs = {k: cut_spatial(v, bands, band) if k in self.plan.spatial_kwargs else v
                  for k, v in req.kwargs.items()}
        _synchronize(x.device)  # CUDA: the clock measures kernels, not their launches
        start = time.perf_counter()
        self.exchange.begin(call, transport(req.group))
        try:
            with torch.inference_mode():
                out = self.plan.output(self.model(*req.args, **kwargs))
        finally:
            sent = self.exchange.end()
        _synchronize(out.device)
        seconds = time.perf_counter() - start
        if self.plan.full_output and bands.count > 1 and out.shape[2] == bands.height:
            out = out[:, :, slice(*bands.rows(band))].clone()  # a DiT's whole-image output: the band's rows
        if out.shape[2] != bands.rows(band)[1] - bands.rows(band)[0]:
            raise ConfigError(f"the model returned {tuple(out.shape)} for band {band}; expected its rows only")
        return out, CallStats(self.rank, band, seconds, sent, sync)
