"""k x k convolutions on a band: border rows from the neighbours, or exact from the full input."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..geometry import conv_halo
from .base import BandLayer


def check_conv(conv: nn.Conv2d, name: str) -> None:
    """Refuse convolutions whose borders the band rules do not cover."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedModelError(f"{name}: conv padding {conv.padding!r}/{conv.padding_mode} is not supported")
    if conv.dilation != (1, 1) or conv.stride[0] not in (1, 2):
        raise UnsupportedModelError(
            f"{name}: conv with stride {conv.stride} and dilation {conv.dilation} is not supported"
        )


class _ConvBase(BandLayer):
    def _conv(self, xb: torch.Tensor) -> torch.Tensor:
        """The wrapped conv on a band whose border rows (halo) are already in place: [B, C, h+halo, W].

        The conv runs through its own forward, never reading `weight`/`bias`, so ComfyUI's casting
        ops (manual_cast, lowvram weight functions, scaled fp8, GGUF-style modules) stay in charge.
        Its own row padding then adds `padding` zero rows above and below the halo; `extra` more
        rows on top make that offset a whole number of output rows, which are sliced off (exact:
        every kept output row reads only halo and band rows).
        """
        c: nn.Conv2d = self.inner
        k, s, p = c.kernel_size[0], c.stride[0], c.padding[0]
        extra = (-p) % s
        if extra:
            xb = F.pad(xb, (0, 0, extra, 0))
        y = c(xb)  # [B, C', rows with the conv's own row padding, W']
        first = (p + extra) // s
        rows = (xb.shape[2] - extra - k) // s + 1  # what a conv without row padding would give
        return y[:, :, first:first + rows]

    def _halo(self) -> tuple[int, int]:
        c: nn.Conv2d = self.inner
        return conv_halo(c.kernel_size[0], c.stride[0], c.padding[0])

    def _own_padding_is_halo(self, rows: int) -> bool:
        """Whether the conv on a band of `rows` rows with its own zero row padding gives the
        rows of _conv with zero halos: the same rows above, and as many output rows (the
        3x3 convs of a UNet, stride 1 or 2, on bands of even height)."""
        c: nn.Conv2d = self.inner
        k, s, p = c.kernel_size[0], c.stride[0], c.padding[0]
        above, below = self._halo()
        return above == p and (rows + 2 * p - k) // s == (rows + above + below - k) // s


class ExactFirstConv(_ConvBase):
    """The first conv sees the full input latent, so its band output is exact with no exchange."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W] full image
        call = self.call
        if call is None or call.bands.count == 1:
            return self.inner(x)
        above, below = self._halo()
        r0, r1 = call.bands.rows(call.band)
        lo, hi = max(0, r0 - above), min(x.shape[2], r1 + below)
        xb = F.pad(x[:, :, lo:hi], (0, 0, above - (r0 - lo), below - (hi - r1)))
        return self._conv(xb)  # [B, C', h, W']


class HaloConv(_ConvBase):
    """Border rows above and below come from the neighbouring bands (zeros at the image edge)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, h, W] band
        if not self.split_active() or (self.band_local() and self._own_padding_is_halo(x.shape[2])):
            return self.inner(x)  # naive: zero borders, which the conv's own padding already adds
        call = self.call
        above, below = self._halo()
        band, last = call.band, call.bands.count - 1
        top = x.new_zeros(*x.shape[:2], above, x.shape[3])  # image edge: the conv's zero padding
        bottom = x.new_zeros(*x.shape[:2], below, x.shape[3])
        if call.exchange and (above or below):
            sends, recvs = {}, {}
            if band > 0 and below:
                sends[band - 1] = x[:, :, :below]  # my top rows are the rows below the previous band
            if band < last and above:
                sends[band + 1] = x[:, :, x.shape[2] - above:]  # my bottom rows: above the next band
            if band > 0 and above:
                recvs[band - 1] = (tuple(top.shape), (0, 0))
            if band < last and below:
                recvs[band + 1] = (tuple(bottom.shape), (0, 0))
            got = self.swap(sends, recvs, x, channel_dim=1)  # halo rows [B, C, r, W]: compressible
            top = got[band - 1].tensor if band - 1 in got else top
            bottom = got[band + 1].tensor if band + 1 in got else bottom
        return self._conv(torch.cat([top, x, bottom], dim=2))
