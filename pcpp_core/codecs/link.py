"""Baselines of the residual codecs: what each receiver holds, kept identically on both sides.

For every (call slot, layer occurrence, peer) the sender keeps its copy of the receiver's
baseline ("tx") and the receiver its own ("rx"). Both start from the exact data of the
synchronous warm-up calls and are then advanced only by *decoded* residuals, in call order, so
they stay bit-identical without ever being sent. A baseline covers a range of image rows (dim 1
of attention K/V [B, rows, W, 2D]); a later, narrower window slices it. Pure tensor state: the
exchange decides when to call it.
"""
from __future__ import annotations

from typing import Hashable

import torch

from .base import Codec

Rows = tuple[int, int]


class Baselines:
    def __init__(self) -> None:
        self._held: dict[Hashable, tuple[torch.Tensor, Rows]] = {}

    def reset(self) -> None:
        self._held.clear()

    def snapshot(self) -> dict[Hashable, tuple[torch.Tensor, Rows]]:
        """Every baseline (copies on the CPU), for tests that compare both sides."""
        return {k: (t.detach().cpu().clone(), rows) for k, (t, rows) in self._held.items()}

    def remember(self, key: Hashable, exact: torch.Tensor, rows: Rows) -> torch.Tensor:
        """A synchronous call's exact data becomes the baseline; returns it."""
        self._held[key] = (exact.clone(), rows)
        return exact

    def _base(self, key: Hashable, shape: tuple[int, ...], rows: Rows, like: torch.Tensor) -> torch.Tensor:
        held = self._held.get(key)
        if held is not None:
            t, (h0, h1) = held
            if tuple(t.shape) == shape and (h0, h1) == rows:
                return t
            if rows != (0, 0) and h0 <= rows[0] and rows[1] <= h1:
                part = t[:, rows[0] - h0: rows[1] - h0]
                if tuple(part.shape) == shape:
                    return part
        return torch.zeros(shape, dtype=like.dtype, device=like.device)  # nothing held yet: start at 0

    def encode(self, codec: Codec, key: Hashable, x: torch.Tensor, rows: Rows, channel_dim: int) -> torch.Tensor:
        """Sender: the payload for `x`; advances the copy of the receiver's baseline by the decoded value."""
        if not codec.residual:
            return codec.encode(x, channel_dim)
        base = self._base(key, tuple(x.shape), rows, x)
        data = codec.encode(x.float() - base.float(), channel_dim)
        self._held[key] = (base + codec.decode(data, tuple(x.shape), channel_dim, x.dtype), rows)
        return data

    def decode(self, codec: Codec, key: Hashable, data: torch.Tensor, shape: tuple[int, ...], rows: Rows,
               channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Receiver: the reconstructed tensor; advances the baseline exactly as the sender did."""
        if not codec.residual:
            return codec.decode(data, shape, channel_dim, dtype)
        base = self._base(key, shape, rows, torch.empty(0, dtype=dtype, device=data.device))
        out = base + codec.decode(data, shape, channel_dim, dtype)
        self._held[key] = (out, rows)
        return out
