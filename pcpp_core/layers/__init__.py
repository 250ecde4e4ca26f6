"""One module per kind of layer that looks across band borders, on a common base."""
from .attention import WindowAttention
from .base import BandLayer
from .conv import ExactFirstConv, HaloConv
from .groupnorm import BandGroupNorm

__all__ = ["BandLayer", "ExactFirstConv", "HaloConv", "BandGroupNorm", "WindowAttention"]
