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
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .codecs import NONE, Baselines, Codec, Fold, get_codec
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
    compress: str = NONE  # codec of the stale (asynchronous) calls; synchronous calls travel exact
    far_refresh: int = 0  # pcpp far context: rows outside the window held by the receiver, each
    #                       attention layer's refreshed once every far_refresh calls (geometry.far_due)
    far_pool: int = 1  # far rows travel as means of this many columns (residual codecs)
    index: int = 0  # this call's index in its slot (picks the layers that refresh their far rows)


@dataclass
class Piece:
    """Data received from one band; `rows` says which image rows it holds where that matters."""

    tensor: torch.Tensor
    rows: Rows = (0, 0)


@dataclass
class _Inflight:
    works: list[Any]
    buffers: dict[int, torch.Tensor]  # what arrives, per band (raw, or a codec's payload)
    rows: dict[int, Rows]
    sent: list[torch.Tensor]  # kept alive until the sends complete
    decode: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # codec hook, run once
    _pieces: dict[int, Piece] | None = None

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

    def received(self) -> dict[int, Piece]:
        """Wait, then the data per band (decoded exactly once: residual baselines advance here)."""
        self.wait()
        if self._pieces is None:
            dec = self.decode
            self._pieces = {b: Piece(dec(b, t) if dec else t, self.rows[b]) for b, t in self.buffers.items()}
        return self._pieces


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
    _attention: int = 0  # attention layers seen in this call (geometry.far_due staggers over them)
    baselines: Baselines = field(default_factory=Baselines)  # residual codecs' state, per run

    def begin(self, call: CallState, transport: Transport | None) -> None:
        self.call, self.transport = call, transport
        self.bytes_sent = 0
        self._attention = 0
        self._occurrence.clear()

    def attention_ordinal(self) -> int:
        """Index of the calling attention layer in this call's forward pass (counts each call)."""
        self._attention += 1
        return self._attention - 1

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
        self.baselines.reset()
        return clean

    def settled_baselines(self) -> dict:
        """Debug view for tests: decode what has arrived but is not used yet (the same decode the
        next call would run, done once), then copy every residual baseline to the CPU."""
        with torch.inference_mode():  # the baselines are inference tensors, updated in place
            for inflight in self._inflight.values():
                inflight.received()
        return self.baselines.snapshot()

    def swap(
        self,
        layer: str,
        sends: dict[int, torch.Tensor],
        recvs: dict[int, tuple[tuple[int, ...], Rows]],
        dtype: torch.dtype,
        device: torch.device,
        *,
        channel_dim: int | None = None,
        send_rows: dict[int, Sequence[int]] | None = None,
        recv_rows: dict[int, Sequence[int]] | None = None,
        spans: dict[int, Rows] | None = None,
        hold: bool = False,
        send_far: dict[int, Sequence[int]] | None = None,
        recv_far: dict[int, Sequence[int]] | None = None,
    ) -> dict[int, Piece]:
        """Send `sends[band]` to each band; return, per band in `recvs`, its data for this call.

        Synchronous calls wait and return this call's data. Asynchronous calls return the data
        received during the previous call of this slot (stale) and leave this call's exchange
        in flight; the first call of a slot has nothing stale and runs synchronously.
        `channel_dim` marks the data compressible by the run's codec (scales per channel);
        `send_rows`/`recv_rows` name the image rows (dim 1) of each send/receive and `spans[band]`
        each band's rows, for the baselines; `hold`: the receiver keeps each band's whole span
        and returns it (pcpp's far context), the rows that arrive updating it; `send_far`/
        `recv_far`: which of those rows are far rows, pooled by the call's `far_pool`.
        `sends[own band]` (raw data only) never travels: it comes back under the own band with the
        others, fresh or from the previous call alike, so every band can combine the same pieces
        (the DiT text stream, layers/joint.py).
        """
        call = self.call
        assert call is not None and self.transport is not None, "swap() outside a call"
        n = self._occurrence[layer]
        self._occurrence[layer] += 1
        key = (call.slot, f"{layer}#{n}")
        tag = self._tags.setdefault(f"{call.slot}:{key[1]}", len(self._tags))
        sends = {b: t.contiguous() for b, t in sends.items()}
        own = sends.pop(call.band, None)  # loopback: kept, and returned with the same freshness as the rest
        codec = None if channel_dim is None or (call.compress == NONE and not hold) else get_codec(call.compress)
        assert own is None or codec is None, "a loopback send travels raw"
        rows = _RowInfo(call.band, send_rows or {}, recv_rows or {}, spans or {}, hold, send_far or {},
                        recv_far or {}, call.far_pool)
        wire, buffers, decode = self._codec_hook(codec, key, sends, recvs, dtype, device, channel_dim, rows)
        works = self.transport(wire, buffers, tag)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in wire.values())
        if own is not None:
            buffers = {**buffers, call.band: own}
        got_rows = {b: rows.span(b) if hold else recvs[b][1] if b in recvs else (0, 0)  # held: the whole span
                    for b in buffers}
        fresh = _Inflight(list(works), buffers, got_rows, list(wire.values()), decode)
        previous = self._inflight.get(key)
        self._inflight[key] = fresh
        if call.synchronous or previous is None:
            if previous is not None:
                previous.wait()
            return self._with_held(key, fresh.received(), rows)
        # arrived during the previous call of this slot; never blocks this call's sends
        return self._with_held(key, previous.received(), rows)

    def _with_held(self, key: tuple[int, str], got: dict[int, Piece], rows: "_RowInfo") -> dict[int, Piece]:
        """With `hold`, also the held span of every band that sent nothing this time (a far
        context not due for refresh): what the receiver holds is this call's view of it."""
        if not rows.hold:
            return got
        more = {b: Piece(t, rows.span(b)) for b in rows.spans if b != rows.band and b not in got
                for t in [self.baselines.held((key, b, "rx"))] if t is not None}
        return {**got, **more} if more else got

    def _codec_hook(self, codec: Codec | None, key: tuple[int, str], sends: dict[int, torch.Tensor],
                    recvs: dict[int, tuple[tuple[int, ...], Rows]], dtype: torch.dtype, device: torch.device,
                    channel_dim: int | None, rows: "_RowInfo"):
        """(what goes on the wire, receive buffers, decode hook) of one swap.

        No codec: raw tensors. Synchronous calls: raw tensors too (exact), which also become the
        baselines. Stale calls: each codec payload, decoded when the data is used.
        """
        raw = {b: torch.empty(shape, dtype=dtype, device=device) for b, (shape, _) in recvs.items()}
        if codec is None:
            return sends, raw, None
        assert channel_dim is not None
        base = self.baselines
        keep = codec.residual or rows.hold
        if self.call.synchronous:
            if not keep:
                return sends, raw, None
            for b, t in sends.items() if codec.residual else ():  # the sender's copy of a residual baseline
                base.remember((key, b, "tx"), t, rows.span(rows.band))
            return sends, raw, lambda b, t: base.remember((key, b, "rx"), t, rows.span(b))
        wire = {b: base.encode(codec, (key, b, "tx"), t, rows.sent(b), rows.span(rows.band), channel_dim,
                               rows.fold(rows.sent(b), rows.send_far.get(b)))
                for b, t in sends.items()}
        size = dtype.itemsize
        folds = {b: rows.fold(rows.received(b), rows.recv_far.get(b)) for b in recvs}
        buffers = {b: torch.empty(codec.nbytes(folds[b].shape(shape) if folds[b] else shape, channel_dim, size),
                                  dtype=torch.uint8, device=device)
                   for b, (shape, _) in recvs.items()}
        return wire, buffers, lambda b, t: base.decode(codec, (key, b, "rx"), t, recvs[b][0], rows.received(b),
                                                       rows.span(b), channel_dim, dtype, rows.hold, folds[b])


@dataclass(frozen=True)
class _RowInfo:
    """Which image rows a swap's sends and receives carry (empty dicts: no row semantics)."""

    band: int
    send: dict[int, Sequence[int]]
    recv: dict[int, Sequence[int]]
    spans: dict[int, Rows]
    hold: bool
    send_far: dict[int, Sequence[int]]
    recv_far: dict[int, Sequence[int]]
    pool: int

    def fold(self, rows: Sequence[int] | None, far: Sequence[int] | None) -> Fold | None:
        """How a send of image rows `rows` travels when `far` of them are far rows (None: as is)."""
        if self.pool <= 1 or not rows or not far:
            return None
        far = set(far)
        return Fold(tuple(i for i, r in enumerate(rows) if r in far), self.pool)

    def span(self, band: int) -> Rows:
        return self.spans.get(band, (0, 0))

    def sent(self, band: int) -> Sequence[int] | None:
        return self.send.get(band)

    def received(self, band: int) -> Sequence[int] | None:
        return self.recv.get(band)


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
