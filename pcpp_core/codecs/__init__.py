"""Exchange codecs: how activations travel between bands after warm-up. One file per codec on
the `Codec` interface (base.py); this registry is the only list of names (config, nodes, bench).

Pure tensor maths: the exchange (`pcpp_core/exchange.py`) calls `encode`/`decode` around its
sends and receives and keeps the residual baselines in a `Baselines` (link.py).
"""
from __future__ import annotations

from ..errors import ConfigError
from .base import Codec, RawCodec
from .link import Baselines, Fold
from .lowp import Int8Codec
from .residual import ResidualCodec

CODECS: dict[str, Codec] = {c.name: c for c in (RawCodec(), Int8Codec(), ResidualCodec(2), ResidualCodec(1))}
NONE = "none"


def codec_names() -> tuple[str, ...]:
    return tuple(CODECS)


def get_codec(name: str) -> Codec:
    try:
        return CODECS[str(name).strip().lower()]
    except KeyError:
        raise ConfigError(f"compress={name!r} is not an exchange codec; valid: {', '.join(CODECS)}") from None


__all__ = ["Baselines", "Fold", "CODECS", "Codec", "NONE", "codec_names", "get_codec"]
