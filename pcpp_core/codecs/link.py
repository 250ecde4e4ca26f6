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

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from .base import Codec

Rows = tuple[int, int]
NO_ROWS: Rows = (0, 0)


@dataclass(frozen=True)
class Fold:
    """A K/V send [B, r, W, C] whose rows at positions `pooled` (pcpp's far rows) travel as the
    means of `pool` neighbouring columns (the last group may be short): [B, n, C] tokens, the
    full rows first. Only residuals are folded: the receiver adds each pooled change to all
    `pool` columns it stands for, so its copy keeps the exact warm-up detail and follows the
    coarse change; nearest upsampling of a mean is what a pooled key with a log(pool) logit
    bias computes in attention, here without touching the attention maths."""

    pooled: tuple[int, ...]
    pool: int

    def _parts(self, shape: tuple[int, ...]) -> tuple[list[int], list[int], int]:
        far = set(self.pooled)
        near = [i for i in range(shape[1]) if i not in far]
        return near, list(self.pooled), -(-shape[2] // self.pool)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the folded tensor of a [B, r, W, C] send: [B, n, C]."""
        near, far, groups = self._parts(shape)
        return (shape[0], len(near) * shape[2] + len(far) * groups, shape[3])

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """[B, r, W, C] -> [B, n, C]: full rows, then the pooled rows' column means."""
        b, _, w, c = x.shape
        near, far, groups = self._parts(tuple(x.shape))
        xf = x.index_select(1, torch.tensor(far, device=x.device))  # [B, rf, W, C]
        pad = groups * self.pool - w
        if pad:
            xf = torch.cat([xf, xf.new_zeros(b, len(far), pad, c)], dim=2)
        counts = torch.full((groups,), float(self.pool), device=x.device, dtype=x.dtype)
        counts[-1] = self.pool - pad
        means = xf.view(b, len(far), groups, self.pool, c).sum(dim=3) / counts.view(1, 1, -1, 1)
        full = x.index_select(1, torch.tensor(near, device=x.device, dtype=torch.long))
        return torch.cat([full.reshape(b, -1, c), means.reshape(b, -1, c)], dim=1)

    def unfold(self, y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[B, n, C] -> `shape` [B, r, W, C]: each mean repeated over the columns it stands for."""
        b, r, w, c = shape
        near, far, groups = self._parts(shape)
        cut = len(near) * w
        out = y.new_empty(shape)
        if near:
            out.index_copy_(1, torch.tensor(near, device=y.device), y[:, :cut].reshape(b, len(near), w, c))
        wide = y[:, cut:].reshape(b, len(far), groups, c).repeat_interleave(self.pool, dim=2)[:, :, :w]
        out.index_copy_(1, torch.tensor(far, device=y.device), wide)
        return out


class Baselines:
    def __init__(self) -> None:
        self._held: dict[Hashable, tuple[torch.Tensor, Rows]] = {}

    def reset(self) -> None:
        self._held.clear()

    def snapshot(self) -> dict[Hashable, tuple[torch.Tensor, Rows]]:
        """Every baseline (copies on the CPU), for tests that compare both sides."""
        return {k: (t.detach().cpu().clone(), rows) for k, (t, rows) in self._held.items()}

    def held(self, key: Hashable) -> torch.Tensor | None:
        """The tensor held under `key` (None: nothing yet)."""
        held = self._held.get(key)
        return None if held is None else held[0]

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
               channel_dim: int, fold: Fold | None = None) -> torch.Tensor:
        """Sender: the payload for `x` (rows `sel` of a band spanning `span`, or None for no rows);
        a residual codec also advances the copy of the receiver's baseline by the decoded value.
        `fold`: some rows travel pooled (residual codecs only)."""
        if not codec.residual:
            return codec.encode(x, channel_dim)
        t, idx = self._view(key, tuple(x.shape), sel, span, x)
        base = t if idx is None else t.index_select(1, idx)
        change = x.float() - base.float()
        if fold is not None:
            change = fold.fold(change)  # [B, n, C]
        data = codec.encode(change, channel_dim)
        dec = codec.decode(data, tuple(change.shape), channel_dim, x.dtype)
        self._store(key, t, idx, base + (dec if fold is None else fold.unfold(dec, tuple(x.shape))))
        return data

    def decode(self, codec: Codec, key: Hashable, data: torch.Tensor, shape: tuple[int, ...],
               sel: Sequence[int] | None, span: Rows, channel_dim: int, dtype: torch.dtype,
               hold: bool = False, fold: Fold | None = None) -> torch.Tensor:
        """Receiver: the reconstructed rows `sel`, or with `hold` the whole held span with them
        updated; advances the baseline exactly as the sender did."""
        if fold is None:
            dec = codec.decode(data, shape, channel_dim, dtype)
        else:
            dec = fold.unfold(codec.decode(data, fold.shape(shape), channel_dim, dtype), shape)
        if not codec.residual and not hold:
            return dec
        t, idx = self._view(key, shape, sel, span, dec)
        if codec.residual:
            dec = (t if idx is None else t.index_select(1, idx)) + dec
        held = self._store(key, t, idx, dec)
        return held if hold else dec
