"""Band geometry and the exact byte count of one call: pure arithmetic, no torch.

Everything that decides which rows a band owns, which rows its attention window sees and which
rows travel between bands lives here, so the exchange, the analytic byte count, the benchmarks
and the web diagram (web/pcpp_geometry.js, checked against this file) agree by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Protocol

from .errors import ConfigError

_EPS = 1e-9  # f*h computed in binary floating point: 0.3*10 must round up to 3, not 4


def window_rows(fraction: float, band_height: int) -> int:
    """ceil(fraction * band_height) neighbour rows, robust to float noise."""
    return max(0, math.ceil(fraction * band_height - _EPS))


def split_rows(height: int, bands: int, levels: int) -> tuple[int, ...]:
    """Band boundaries (bands+1 values) on multiples of 2**levels; later bands take the remainder.

    3 bands on 128 rows with 3 downsamplings: (0, 40, 80, 128).
    """
    unit = 1 << levels
    if bands < 1:
        raise ConfigError(f"bands={bands} must be >= 1")
    if height % unit:
        raise ConfigError(
            f"latent height {height} rows is not a multiple of {unit} (the model downsamples {levels} times); "
            f"use a height of a multiple of {unit} rows ({unit * 8} pixels for an 8x VAE)"
        )
    units = height // unit
    if units < bands:
        raise ConfigError(
            f"latent height {height} rows is too small for {bands} devices: each band needs at least "
            f"{unit} rows; the smallest valid latent height is {bands * unit} rows ({bands * unit * 8} pixels "
            f"for an 8x VAE), or use fewer devices"
        )
    base, extra = divmod(units, bands)
    sizes = [base + (1 if i >= bands - extra else 0) for i in range(bands)]
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s * unit)
    return tuple(bounds)


@dataclass(frozen=True)
class Bands:
    """Horizontal bands of a latent [.., height, width], valid at every level down to `levels`."""

    height: int
    width: int
    levels: int
    bounds: tuple[int, ...]

    @classmethod
    def split(cls, height: int, width: int, count: int, levels: int) -> "Bands":
        return cls(height, width, levels, split_rows(height, count, levels))

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def level_size(self, level: int) -> tuple[int, int]:
        """(rows, cols) of the whole image at `level`; a stride-2 conv rounds odd widths up."""
        w = self.width
        for _ in range(level):
            w = (w + 1) // 2
        return self.height >> level, w

    def rows(self, band: int, level: int = 0) -> tuple[int, int]:
        return self.bounds[band] >> level, self.bounds[band + 1] >> level

    def window(self, band: int, level: int, fraction: float | None) -> tuple[int, int]:
        """Rows of the image band `band`'s self-attention sees at `level` (None = whole image)."""
        start, stop = self.rows(band, level)
        height = self.level_size(level)[0]
        if fraction is None:
            return 0, height
        k = window_rows(fraction, stop - start)
        return max(0, start - k), min(height, stop + k)

    def needed(self, dst: int, src: int, level: int, fraction: float | None) -> tuple[int, int]:
        """Rows of band `src` (image rows) that band `dst`'s window needs; empty when start == stop."""
        if dst == src:
            return 0, 0
        w0, w1 = self.window(dst, level, fraction)
        s0, s1 = self.rows(src, level)
        lo, hi = max(w0, s0), min(w1, s1)
        return (lo, hi) if lo < hi else (0, 0)

    def sent_rows(self, dst: int, src: int, level: int, fraction: float | None,
                  far: bool = False) -> tuple[int, ...]:
        """Image rows of band `src` that travel to band `dst` in one stale call (sorted).

        The rows `dst`'s window needs; with `far` (pcpp's far context, on the calls where this
        layer refreshes it, see `far_due`) also every other row of `src`'s band.
        """
        lo, hi = self.needed(dst, src, level, fraction)
        if not far or dst == src:
            return tuple(range(lo, hi))
        return tuple(range(*self.rows(src, level)))

    def far_rows(self, dst: int, src: int, level: int, fraction: float | None) -> tuple[int, ...]:
        """The rows of `src`'s band outside `dst`'s window: its far context from `src`."""
        lo, hi = self.needed(dst, src, level, fraction)
        return tuple(r for r in range(*self.rows(src, level)) if not lo <= r < hi) if dst != src else ()

    def level_of_tokens(self, band: int, tokens: int) -> int:
        """The level whose band shape holds `tokens` tokens (attention sees [B, tokens, C])."""
        for level in range(self.levels + 1):
            r0, r1 = self.rows(band, level)
            if (r1 - r0) * self.level_size(level)[1] == tokens:
                return level
        raise ConfigError(
            f"an attention layer saw {tokens} tokens, which matches no level of band {band} "
            f"({self.bounds[band + 1] - self.bounds[band]}x{self.width} at level 0); "
            "the model reshapes tokens in a way the engine does not know"
        )


def far_due(ordinal: int, step: int, far_refresh: int) -> bool:
    """Whether the `ordinal`-th attention layer of a forward pass refreshes its far context in
    the stale call with index `step`: each layer once every `far_refresh` calls, the layers
    staggered so every call refreshes about 1/far_refresh of them (and pays their scales once)."""
    return far_refresh > 0 and (ordinal + step) % far_refresh == 0


def pooled_cols(cols: int, pool: int) -> int:
    """Tokens per far row when `pool` neighbouring columns travel as their mean (last group short)."""
    return -(-cols // max(1, pool))


def send_tokens(rows: Iterable[int], far: Iterable[int], cols: int, pool: int) -> int:
    """Tokens of one K/V send: full-width `rows`, of which those in `far` pooled by `pool`."""
    far = set(far)
    rows = list(rows)
    n_far = sum(1 for r in rows if r in far) if pool > 1 else 0
    return (len(rows) - n_far) * cols + n_far * pooled_cols(cols, pool)


def conv_halo(kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """Rows (above, below) a band needs from its neighbours for a conv on rows that start
    on a multiple of the stride: `padding` above, `kernel - padding - stride` below."""
    return padding, max(0, kernel - padding - stride)


# ---- analytic communication count (docs/PCPP.md section 7) ---------------------------------

LayerKind = Literal["conv", "groupnorm", "attention", "joint"]


@dataclass(frozen=True)
class LayerSpec:
    """What one exchanging layer sends, independent of the data.

    conv: `channels` = input channels; groupnorm: `channels` = groups; attention: `channels` =
    the K (= V) width. `level` is the resolution level the layer runs at. joint (a DiT block's
    text+image attention, layers/joint.py): image K/V rows as attention, plus, when `text` > 0,
    the text queries' partial attention over the band's image tokens, [B, heads, text, D/heads]
    in the model's dtype and its log-sum-exp [B, heads, text] in float32, to every other band.
    """

    kind: LayerKind
    level: int
    channels: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    text: int = 0  # joint: text tokens whose partial attention travels (0: none)
    heads: int = 0  # joint: attention heads


STAT_BYTES = 4  # GroupNorm statistics always travel as float32 (mean, variance per group)


class SizeFormula(Protocol):
    """What `bytes_sent` needs of an exchange codec (pcpp_core.codecs.Codec): its exact size."""

    def nbytes(self, shape: tuple[int, ...], channel_dim: int, element_size: int) -> int: ...


def bytes_sent(
    specs: Iterable[LayerSpec],
    bands: Bands,
    band: int,
    *,
    batch: int,
    element_size: int,
    fraction: float | None,
    exchange: bool = True,
    codec: SizeFormula | None = None,
    far_refresh: int = 0,
    step: int = 0,
    far_pool: int = 1,
) -> int:
    """Bytes band `band` sends in one call (one model evaluation).

    `fraction` is the attention window (None = whole image, as in every synchronous call);
    `exchange=False` is naive mode: nothing is sent. `codec` (stale calls only) sizes each
    K/V and conv-halo send; GroupNorm statistics always travel as fp32. `far_refresh`/`step`/
    `far_pool`: pcpp's far context in the stale call with index `step` (see `far_due`,
    `send_tokens`).
    """
    if not exchange or bands.count == 1:
        return 0

    def size(shape: tuple[int, ...], channel_dim: int) -> int:
        if not math.prod(shape):
            return 0
        if codec is None:
            return math.prod(shape) * element_size
        return codec.nbytes(shape, channel_dim, element_size)

    total = 0
    others = [j for j in range(bands.count) if j != band]
    ordinal = 0  # attention layers in call order: the far refresh is staggered over them
    for spec in specs:
        _, cols = bands.level_size(spec.level)
        if spec.kind == "conv":
            above, below = conv_halo(spec.kernel, spec.stride, spec.padding)
            # my bottom rows are the halo above the next band; my top rows the halo below the previous
            if band + 1 < bands.count:
                total += size((batch, spec.channels, above, cols), 1)
            if band > 0:
                total += size((batch, spec.channels, below, cols), 1)
        elif spec.kind == "groupnorm":
            total += len(others) * 2 * batch * spec.channels * STAT_BYTES
        else:
            far = far_due(ordinal, step, far_refresh)
            ordinal += 1
            for dst in others:
                rows = bands.sent_rows(dst, band, spec.level, fraction, far)
                tokens = send_tokens(rows, bands.far_rows(dst, band, spec.level, fraction) if far else (), cols,
                                     far_pool)
                total += size((batch, tokens, 2 * spec.channels), -1)  # K/V tokens [B, n, 2D]
            if spec.kind == "joint" and spec.text:  # text partials travel raw, every call
                total += len(others) * batch * spec.text * (spec.channels * element_size + spec.heads * STAT_BYTES)
    return total
