"""Common base of the band layers: wraps the original module, talks only to the Exchange."""
from __future__ import annotations

import torch
from torch import nn

from ..exchange import CallState, Exchange


class BandLayer(nn.Module):
    """Replaces `inner` in the model; runs it on this worker's band.

    Outside a call (no CallState) or with a single band the wrapped module runs unchanged, so a
    patched model still works as a plain model.
    """

    def __init__(self, inner: nn.Module, name: str, exchange: Exchange):
        super().__init__()
        self.inner = inner
        self.layer_name = name
        object.__setattr__(self, "exchange", exchange)  # shared state, not a submodule

    @property
    def call(self) -> CallState | None:
        return self.exchange.call

    def split_active(self) -> bool:
        call = self.call
        return call is not None and call.bands.count > 1

    def band_local(self) -> bool:
        """The wrapped module alone computes this layer on the band: outside a call, with one
        band, or in a naive call (nothing exchanged: each band is an image of its own, so zero
        borders, local GroupNorm statistics and attention over the band's own tokens are exactly
        what the module does on the band). The fast path: no Python around the module."""
        call = self.call
        return call is None or call.bands.count == 1 or not call.exchange

    def swap(self, sends, recvs, like: torch.Tensor, **codec):
        """Exchange through the shared Exchange; `codec` = channel_dim/send_rows for compressible data."""
        return self.exchange.swap(self.layer_name, sends, recvs, like.dtype, like.device, **codec)

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}"
