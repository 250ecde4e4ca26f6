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


# ---- diagnostics (`python -m pcpp_core doctor`) ---------------------------------------------

def _pattern(src: int, dst: int, repeat: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """Bytes that differ per (src, dst, repeat), so a stale or misrouted buffer cannot pass."""
    salt = 1 + src * 131 + dst * 17 + repeat * 7
    i = torch.arange(nbytes, dtype=torch.int32, device=device)  # [nbytes]
    return ((i * (2 * salt + 1) + salt) % 256).to(torch.uint8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(device: torch.device) -> None:
    dist.barrier(device_ids=[device.index or 0] if device.type == "cuda" else None)


def measure_p2p(rank: int, world: int, device: torch.device, nbytes: int, repeats: int) -> list[dict[str, Any]]:
    """Send `nbytes` from every rank to every other rank, one ordered pair at a time, through the
    transport the layers use (`torch_p2p`); the receiver times `repeats` transfers after one
    untimed one (NCCL sets up a pair's connection on first use) and checks every byte.

    Every rank of the default group must call this together. Returns this rank's receptions:
    [{"src", "dst", "bytes", "seconds", "gbps", "correct"}].
    """
    post = torch_p2p(tuple(range(world)))
    results: list[dict[str, Any]] = []
    for src in range(world):
        for dst in range(world):
            if src == dst:
                continue
            if rank == src:
                payloads = [_pattern(src, dst, r, nbytes, device) for r in range(repeats + 1)]
                for p in payloads:
                    for w in post({dst: p}, {}, 0):
                        w.wait()
                _sync(device)
            elif rank == dst:
                results.append(_receive(post, src, dst, nbytes, repeats, device))
            _barrier(device)
    return results


def _receive(post: Transport, src: int, dst: int, nbytes: int, repeats: int, device: torch.device) -> dict[str, Any]:
    buffers = [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(repeats + 1)]
    for w in post({}, {src: buffers[0]}, 0):  # untimed: connection set-up
        w.wait()
    _sync(device)
    start = time.perf_counter()
    for buf in buffers[1:]:
        for w in post({}, {src: buf}, 0):
            w.wait()
    _sync(device)
    seconds = time.perf_counter() - start
    correct = all(torch.equal(b, _pattern(src, dst, r, nbytes, device)) for r, b in enumerate(buffers))
    return {"src": src, "dst": dst, "bytes": nbytes, "seconds": seconds,
            "gbps": nbytes * repeats / max(seconds, 1e-9) / 1e9, "correct": correct}
