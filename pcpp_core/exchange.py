"""The one object that owns every buffer, async handle and byte counter of a worker.

Layers describe what they send to which band and what they expect back; the exchange decides
whether the call waits for fresh data (synchronous: warm-up, sync mode) or hands back what
arrived during the previous call of the same slot while this call's sends go out in the
background (stale, asynchronous). Layers never call torch.distributed.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from .geometry import Bands

log = logging.getLogger("pcpp.exchange")

Rows = tuple[int, int]


@dataclass(frozen=True)
class CallState:
    """What every layer of one model evaluation needs to know about the split."""

    slot: int  # index of the call slot (batch composition + shape); buffers never cross slots
    bands: Bands
    band: int  # this worker's band
    synchronous: bool  # wait for fresh data from the other bands before using it
    window: float | None  # attention window in band heights; None = whole image
    exchange: bool = True  # False in naive mode: nothing is sent, borders are zero, stats local


@dataclass
class Piece:
    """Data received from one band; `rows` says which image rows it holds where that matters."""

    tensor: torch.Tensor
    rows: Rows = (0, 0)


@dataclass
class _Inflight:
    works: list[Any]
    received: dict[int, Piece]
    sent: list[torch.Tensor]  # kept alive until the sends complete

    def wait(self, deadline: float | None = None) -> bool:
        """Wait for every transfer; with a `deadline` (time.monotonic), False once it passes."""
        for w in self.works:
            if deadline is None:
                w.wait()
                continue
            try:
                if w.wait(timeout=timedelta(seconds=max(0.001, deadline - time.monotonic()))) is False:
                    return False
            except RuntimeError:  # gloo: timed out waiting for the peer's side
                return False
        self.works.clear()
        self.sent.clear()
        return True


Transport = Callable[[dict[int, torch.Tensor], dict[int, torch.Tensor], int], list[Any]]


def torch_p2p(peers: tuple[int, ...]) -> Transport:
    """Point-to-point transport over the default process group; `peers[band]` is the global rank
    of a band of this call's group (with cfg_split, each group has its own ranks)."""

    def post(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], tag: int) -> list[Any]:
        ops = [dist.P2POp(dist.isend, t, peers[b], tag=tag) for b, t in sends.items()]
        ops += [dist.P2POp(dist.irecv, t, peers[b], tag=tag) for b, t in recvs.items()]
        return dist.batch_isend_irecv(ops) if ops else []

    return post


@dataclass
class Exchange:
    """Per-worker communication state: stale buffers keyed by (slot, layer), bytes per call."""

    transport: Transport | None = None
    call: CallState | None = None
    bytes_sent: int = 0
    _inflight: dict[tuple[int, str], _Inflight] = field(default_factory=dict)
    _occurrence: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _tags: dict[str, int] = field(default_factory=dict)

    def begin(self, call: CallState, transport: Transport | None) -> None:
        self.call, self.transport = call, transport
        self.bytes_sent = 0
        self._occurrence.clear()

    def end(self) -> int:
        self.call = None
        return self.bytes_sent

    def reset(self, timeout: float | None = None) -> bool:
        """Drop every stale buffer (a new sampling run); finishes outstanding transfers first.

        After an error a peer may never post its side of a transfer: with a `timeout` (seconds)
        this gives up and returns False, and the state is no longer safe to use (the host then
        stops the pool: an orphaned receive would take a later call's data).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        clean = all(inflight.wait(deadline) for inflight in self._inflight.values())
        self._inflight.clear()
        self._tags.clear()
        return clean

    def swap(
        self,
        layer: str,
        sends: dict[int, torch.Tensor],
        recvs: dict[int, tuple[tuple[int, ...], Rows]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> dict[int, Piece]:
        """Send `sends[band]` to each band; return, per band in `recvs`, its data for this call.

        Synchronous calls wait and return this call's data. Asynchronous calls return the data
        received during the previous call of this slot (stale) and leave this call's exchange
        in flight; the first call of a slot has nothing stale and runs synchronously.
        """
        call = self.call
        assert call is not None and self.transport is not None, "swap() outside a call"
        n = self._occurrence[layer]
        self._occurrence[layer] += 1
        key = (call.slot, f"{layer}#{n}")
        tag = self._tags.setdefault(f"{call.slot}:{key[1]}", len(self._tags))
        sends = {b: t.contiguous() for b, t in sends.items()}
        buffers = {b: torch.empty(shape, dtype=dtype, device=device) for b, (shape, _) in recvs.items()}
        works = self.transport(sends, buffers, tag)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in sends.values())
        fresh = _Inflight(list(works), {b: Piece(buffers[b], recvs[b][1]) for b in buffers}, list(sends.values()))
        previous = self._inflight.get(key)
        self._inflight[key] = fresh
        if call.synchronous or previous is None:
            if previous is not None:
                previous.wait()
            fresh.wait()
            return fresh.received
        previous.wait()  # arrived during the previous call of this slot; never blocks this call's sends
        return previous.received
