"""Low-bit residuals with error feedback (CompactFusion, arXiv 2507.17511).

Between two denoising steps an activation changes little, so the sender quantises only the
change `x - baseline`, where the baseline is exactly what the receiver reconstructed so far;
both sides then add the *decoded* change to their baseline. Whatever the quantiser loses in one
step stays in the next step's residual (error feedback), so the error does not accumulate.

1 bit: sign with one mean-|r| scale per (batch item, channel), the L2-optimal magnitude for a
sign code. 2 bits: the 4-level Lloyd-Max quantiser of a Gaussian in units of the group's RMS.
Scales travel as bfloat16 (8-bit mantissa: 0.4% on a magnitude, nothing next to a 1-2 bit code;
fp32's range): on short sends (a few rows, thousands of channels) scales are a third of the bytes.
The encoder quantises with the rounded scale, so both sides decode the same values.
"""
from __future__ import annotations

import math

import torch

from .base import (Codec, as_groups, from_groups, groups, numel, pack_bits, pack_scales,
                   unpack_bits, unpack_scales)

# Lloyd-Max 4-level quantiser of N(0, 1): thresholds 0, +-0.9816; outputs +-0.4528, +-1.5104
_LM2_THRESHOLD = 0.9816
_LM2_LEVELS = (-1.5104, -0.4528, 0.4528, 1.5104)
SCALE_DTYPE = torch.bfloat16


class ResidualCodec(Codec):
    residual = True

    def __init__(self, bits: int):
        if bits not in (1, 2):
            raise ValueError(f"bits={bits}: the residual codec has 1- and 2-bit quantisers")
        self.bits = bits
        self.name = f"residual-{bits}bit"
        self.summary = (f"{bits}-bit change since the last step, error feedback: ~{16 // bits}x fewer bytes "
                        "than fp16, the error of one step is corrected in the next")

    def nbytes(self, shape: tuple[int, ...], channel_dim: int, element_size: int) -> int:
        return math.ceil(numel(shape) * self.bits / 8) + groups(shape, channel_dim) * SCALE_DTYPE.itemsize

    def encode(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        g = as_groups(x, channel_dim)  # [G, N] residual
        if self.bits == 1:
            scale = g.abs().mean(dim=1).to(SCALE_DTYPE)  # [G]
            codes = (g >= 0).to(torch.uint8)
        else:
            scale = g.pow(2).mean(dim=1).sqrt().to(SCALE_DTYPE)  # [G], rounded as it travels
            u = g / scale.float().clamp_min(1e-30).view(-1, 1)
            t = _LM2_THRESHOLD  # codes 0..3: below -t, [-t, 0), [0, t), from t up
            codes = (u >= -t).to(torch.uint8) + (u >= 0).to(torch.uint8) + (u >= t).to(torch.uint8)
        return pack_scales(pack_bits(codes, self.bits), scale, SCALE_DTYPE)

    def decode(self, data: torch.Tensor, shape: tuple[int, ...], channel_dim: int,
               dtype: torch.dtype) -> torch.Tensor:
        n, gcount = numel(shape), groups(shape, channel_dim)
        payload, scale = unpack_scales(data, gcount, SCALE_DTYPE)
        codes = unpack_bits(payload, self.bits, n).view(gcount, -1)  # [G, N]
        if self.bits == 1:
            unit = codes.float() * 2 - 1
        else:
            unit = torch.tensor(_LM2_LEVELS, device=data.device)[codes]
        return from_groups(unit * scale.view(-1, 1), shape, channel_dim, dtype)
