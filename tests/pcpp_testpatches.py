"""A weight-patch applier the test workers import (they see the tests folder on their path).

The payload is a pickled {name: delta}; the patched weight is base + delta, the same arithmetic
the tests do on the host, so host-patched and worker-patched weights are bit-identical.
"""
from __future__ import annotations

import pickle
from typing import Mapping

import torch


def add_deltas(weights: Mapping[str, torch.Tensor], data: bytes) -> dict[str, torch.Tensor]:
    deltas = pickle.loads(data)
    return {name: weights[name] + delta.to(weights[name].device) for name, delta in deltas.items()}


def payload(deltas: dict[str, torch.Tensor]) -> bytes:
    return pickle.dumps(deltas, protocol=pickle.HIGHEST_PROTOCOL)


class ImagePromptAttention:
    """An attn2 replacement of the IP-Adapter kind: the text cross-attention plus `scale` times an
    attention over image-prompt tokens it holds as tensors (a module-level class: workers import it)."""

    def __init__(self, ip_k: torch.Tensor, ip_v: torch.Tensor, scale: float = 0.8):
        self.ip_k, self.ip_v, self.scale = ip_k, ip_v, scale  # [1, T, D] each

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        ip_k, ip_v = (t.to(q).expand(q.shape[0], -1, -1) for t in (self.ip_k, self.ip_v))
        return _attention(q, k, v, heads) + self.scale * _attention(q, ip_k, ip_v, heads)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = q.shape
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d/heads]
    return out.transpose(1, 2).reshape(b, n, d)
