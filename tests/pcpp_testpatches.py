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
