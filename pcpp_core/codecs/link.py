"""What each receiver holds of its neighbours, kept identically on both sides.

For every (call slot, layer occurrence, peer) the sender keeps its copy of the receiver's
baseline ("tx") and the receiver its own ("rx"). Both start from the exact data of the
synchronous warm-up calls and are then advanced only by *decoded* values, in call order, so
they stay bit-identical without ever being sent. A baseline covers a span of image rows
(dim 1 of attention K/V [B, rows, W, 2D]); a stale call updates only the rows it carries, so the
rest keep their older values (pcpp's far context reads them). Conv halos have no row span
(span (0, 0)): the whole tensor is the baseline. Pure tensor state: the exchange decides when.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from .base import Codec

Rows = tuple[int, int]
NO_ROWS: Rows = (0, 0)


class Baselines:
    def __init__(self) -> None:
        self._held: dict[Hashable, tuple[torch.Tensor, Rows]] = {}

    def reset(self) -> None:
        self._held.clear()

    def snapshot(self) -> dict[Hashable, tuple[torch.Tensor, Rows]]:
        """Every baseline (copies on the CPU), for tests that compare both sides."""
        return {k: (t.detach().cpu().clone(), rows) for k, (t, rows) in self._held.items()}

    def remember(self, key: Hashable, exact: torch.Tensor, span: Rows) -> torch.Tensor:
        """A synchronous call's exact data (rows `span`) becomes the baseline; returns `exact`."""
        self._held[key] = (exact.clone(), span)
        return exact

    def _view(self, key: Hashable, shape: tuple[int, ...], sel: Sequence[int] | None, span: Rows,
              like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(held tensor, positions of rows `sel` in it); a zero baseline if nothing fits yet."""
        held = self._held.get(key)
        if sel is None:
            if held is None or tuple(held[0].shape) != shape:
                held = (torch.zeros(shape, dtype=like.dtype, device=like.device), NO_ROWS)
                self._held[key] = held
            return held[0], None
        if held is not None:
            t, (h0, h1) = held
            if (h0 <= sel[0] and sel[-1] < h1 and t.shape[0] == shape[0] and t.shape[2:] == shape[2:]):
                return t, torch.tensor(sel, device=t.device) - h0
        s0, s1 = span if span != NO_ROWS else (sel[0], sel[-1] + 1)
        t = torch.zeros((shape[0], s1 - s0) + tuple(shape[2:]), dtype=like.dtype, device=like.device)
        self._held[key] = (t, (s0, s1))
        return t, torch.tensor(sel, device=t.device) - s0

    def _store(self, key: Hashable, t: torch.Tensor, idx: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        if idx is None:
            self._held[key] = (new, NO_ROWS)
            return new
        t.index_copy_(1, idx, new)
        return t

    def encode(self, codec: Codec, key: Hashable, x: torch.Tensor, sel: Sequence[int] | None, span: Rows,
               channel_dim: int) -> torch.Tensor:
        """Sender: the payload for `x` (rows `sel` of a band spanning `span`, or None for no rows);
        a residual codec also advances the copy of the receiver's baseline by the decoded value."""
        if not codec.residual:
            return codec.encode(x, channel_dim)
        t, idx = self._view(key, tuple(x.shape), sel, span, x)
        base = t if idx is None else t.index_select(1, idx)
        data = codec.encode(x.float() - base.float(), channel_dim)
        self._store(key, t, idx, base + codec.decode(data, tuple(x.shape), channel_dim, x.dtype))
        return data

    def decode(self, codec: Codec, key: Hashable, data: torch.Tensor, shape: tuple[int, ...],
               sel: Sequence[int] | None, span: Rows, channel_dim: int, dtype: torch.dtype,
               hold: bool = False) -> torch.Tensor:
        """Receiver: the reconstructed rows `sel`, or with `hold` the whole held span with them
        updated; advances the baseline exactly as the sender did."""
        dec = codec.decode(data, shape, channel_dim, dtype)
        if not codec.residual and not hold:
            return dec
        t, idx = self._view(key, shape, sel, span, dec)
        if codec.residual:
            dec = (t if idx is None else t.index_select(1, idx)) + dec
        held = self._store(key, t, idx, dec)
        return held if hold else dec
