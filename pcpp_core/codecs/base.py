"""The one interface every exchange codec implements: pure tensor maths, no communication.

A codec turns one tensor that travels between two bands into a flat uint8 payload (quantised
values followed by their float32 scales) and back. Scales are per *group*: one (batch item,
channel) pair, so a tensor [B, C, ...] with its channel at `channel_dim` has B * C scales; that
matches how activations vary (some channels are large everywhere, others small). `nbytes`
is the exact payload size from the shape alone, so the analytic byte count
(`geometry.bytes_sent`) and the bytes the exchange actually sends agree by construction.

A *residual* codec encodes `x - baseline` where the baseline is what the receiver already holds
(see `codecs.link`); it never sees the baseline itself.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

SCALE_BYTES = 4  # scales travel as float32


def groups(shape: tuple[int, ...], channel_dim: int) -> int:
    """Number of scale groups (batch items x channels) of a tensor of `shape`."""
    return shape[0] * shape[channel_dim] if shape else 1


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def as_groups(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[B, ..., C, ...] -> [B * C, N] float32, one row per scale group."""
    y = x.movedim(channel_dim, 1) if x.dim() > 1 else x.view(1, -1)
    return y.reshape(y.shape[0] * y.shape[1], -1).float() if x.dim() > 1 else y.float()


def from_groups(g: torch.Tensor, shape: tuple[int, ...], channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `as_groups`: [B * C, N] -> `shape` in `dtype`."""
    if len(shape) <= 1:
        return g.reshape(shape).to(dtype)
    cd = channel_dim % len(shape)
    moved = (shape[0], shape[cd]) + tuple(s for i, s in enumerate(shape) if i not in (0, cd))
    return g.reshape(moved).movedim(1, cd).to(dtype).contiguous()


def pack_scales(payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One flat uint8 tensor: the scales' bytes in `dtype` (aligned at 0), then the payload bytes."""
    return torch.cat([scales.to(dtype).contiguous().view(torch.uint8).reshape(-1), payload.reshape(-1)])


def unpack_scales(data: torch.Tensor, scale_count: int,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(payload bytes, float32 scales [scale_count]) of a `pack_scales` tensor."""
    cut = scale_count * dtype.itemsize
    return data[cut:], data[:cut].view(dtype).float()


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2**bits) ([G, N] integer) -> uint8 [ceil(G * N * bits / 8)], little end first."""
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.view(-1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)  # [per]
    return (flat << shifts).sum(dim=1, dtype=torch.uint8) if per > 1 else flat.reshape(-1)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` codes as int64."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)
    codes = (data.view(-1, 1) >> shifts) & ((1 << bits) - 1)  # [bytes, per]
    return codes.reshape(-1)[:count].long()


class Codec(ABC):
    """Encode one tensor into a uint8 payload and back; `nbytes` is the payload size exactly."""

    name: str = ""
    residual: bool = False  # encodes the change against a baseline both sides hold
    summary: str = ""

    @abstractmethod
    def nbytes(self, shape: tuple[int, ...], channel_dim: int, element_size: int) -> int:
        """Bytes of the payload for a tensor of `shape` (`element_size` = bytes of the raw dtype)."""

    @abstractmethod
    def encode(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """x (any float dtype) -> flat uint8 payload of `nbytes(x.shape, ...)` bytes."""

    @abstractmethod
    def decode(self, data: torch.Tensor, shape: tuple[int, ...], channel_dim: int,
               dtype: torch.dtype) -> torch.Tensor:
        """Payload -> tensor of `shape` and `dtype`; deterministic, the same on both sides."""


class RawCodec(Codec):
    """No compression: the tensor's own bytes (what the exchange does without a codec)."""

    name = "none"
    summary = "exact activations (fp16 on GPU): most bytes, no added error"

    def nbytes(self, shape: tuple[int, ...], channel_dim: int, element_size: int) -> int:
        return numel(shape) * element_size

    def encode(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        return x.contiguous().view(torch.uint8).reshape(-1)

    def decode(self, data: torch.Tensor, shape: tuple[int, ...], channel_dim: int,
               dtype: torch.dtype) -> torch.Tensor:
        return data.view(dtype).reshape(shape)
