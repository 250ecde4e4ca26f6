"""GroupNorm over the whole image from band statistics (DistriFusion's corrected async GroupNorm)."""
from __future__ import annotations

import torch
from torch import nn

from .base import BandLayer


def band_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group (mean, variance) of a band in float32: [B, G, 2]."""
    xg = x.reshape(x.shape[0], groups, -1).float()
    var, mean = torch.var_mean(xg, dim=-1, unbiased=False)
    return torch.stack([mean, var], dim=-1)


def combine_stats(stats: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Whole-image (mean, variance) from per-band statistics weighted by band size.

    Each band's stats may be fresh or stale. The mixture variance sum w (v + m^2) - mean^2 equals
    "stale total + (fresh own - stale own)" of DistriFusion's correction, and cannot go negative
    except by round-off (clamped in the caller).
    """
    total = float(sum(weights))
    s = torch.stack(stats).double()  # [N, B, G, 2]
    w = torch.tensor(weights, dtype=torch.float64, device=s.device).view(-1, 1, 1) / total
    mean = (w * s[..., 0]).sum(0)
    second = (w * (s[..., 1] + s[..., 0] ** 2)).sum(0)
    return torch.stack([mean, second - mean**2], dim=-1).float()


def guard_variance(stats: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Where the combined variance went negative, the band's own (local) variance; the combined
    mean stays: [B, G, 2] -> [B, G, 2]."""
    var = torch.where(stats[..., 1] < 0, own[..., 1], stats[..., 1])
    return torch.stack([stats[..., 0], var], dim=-1)


class BandGroupNorm(BandLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, h, W] band
        if self.band_local():  # naive: the band's own statistics are the module's
            return self.inner(x)
        call = self.call
        gn: nn.GroupNorm = self.inner
        own = band_stats(x, gn.num_groups)  # [B, G, 2]
        stats = own
        if call.exchange:
            others = [b for b in range(call.bands.count) if b != call.band]
            got = self.swap({b: own for b in others}, {b: (tuple(own.shape), (0, 0)) for b in others}, own)
            per_band = [own if b == call.band else got[b].tensor for b in range(call.bands.count)]
            sizes = [r1 - r0 for r0, r1 in (call.bands.rows(b) for b in range(call.bands.count))]
            stats = combine_stats(per_band, sizes)
            stats = guard_variance(stats, own)  # estimate gone negative: local variance
        # y = x * a + b with per-(sample, channel) a, b in float32, one pass over x (as torch's
        # own group_norm kernel computes it): a = rsqrt(var + eps) * scale, b = shift - mean * a
        per_group = gn.num_channels // gn.num_groups
        a = torch.rsqrt(stats[..., 1] + gn.eps).repeat_interleave(per_group, dim=1)  # [B, C]
        b = -stats[..., 0].repeat_interleave(per_group, dim=1) * a
        if gn.affine:
            scale, shift = affine_of(gn, x)  # [C] each
            a, b = a * scale, b * scale + shift
        view = a.shape + (1,) * (x.dim() - 2)
        return torch.addcmul(b.view(view), x.float(), a.view(view)).to(x.dtype)  # [B, C, h, W]


def affine_of(gn: nn.GroupNorm, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a GroupNorm as its own forward applies them: float32 [C] each.

    Band layers never read `weight` directly (ComfyUI may cast, patch or dequantize it on the
    fly): the module runs on a probe whose every group normalises to +-1/sqrt(1 + eps), and the
    affine is read off its output.
    """
    probe = torch.ones(1, gn.num_channels, 2, dtype=like.dtype, device=like.device)  # [1, C, 2]
    probe[:, :, 1] = -1  # each group: mean 0, variance 1
    out = gn(probe).float()[0]  # [C, 2]: w * (+-n) + b
    n = (1.0 + gn.eps) ** -0.5
    return (out[:, 0] - out[:, 1]) / (2 * n), (out[:, 0] + out[:, 1]) / 2
