"""Engines on CPU worker pools (gloo), shared per module: a pool start costs seconds."""
from __future__ import annotations

import pytest
import torch

from pcpp_core import Engine, PoolConfig
from pcpp_testmodels import tiny_comfy_unet, tiny_diffusers_unet

MODELS = {"comfy": tiny_comfy_unet, "diffusers": tiny_diffusers_unet}


@pytest.fixture(scope="session")
def engines():
    """engines[n]: an Engine on n CPU workers, started on first use, shut down at the end of the session."""
    made: dict[int, Engine] = {}

    class Lazy(dict):
        def __missing__(self, n: int) -> Engine:
            self[n] = made[n] = Engine(PoolConfig(devices=("cpu",) * n, threads_per_worker=1, call_timeout_s=120))
            return made[n]

    yield Lazy()
    for e in made.values():
        e.shutdown()


@pytest.fixture(scope="session")
def mutant_engine():
    """An Engine on 2 CPU workers with tests/dist/mutants.py preloaded (broken variants by slot)."""
    engine = Engine(PoolConfig(devices=("cpu", "cpu"), threads_per_worker=1, call_timeout_s=120,
                               env=(("PCPP_WORKER_PRELOAD", "mutants"),)))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def models():
    return {k: f() for k, f in MODELS.items()}


def inputs(kind: str, batch: int = 2, height: int = 32, width: int = 24, seed: int = 1):
    """(args, kwargs) for one call of a test model: latent, timesteps, text context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g)
    t = torch.linspace(50, 900, batch)
    ctx = torch.randn(batch, 5, 32, generator=g)
    key = "context" if kind == "comfy" else "encoder_hidden_states"
    return (x, t), {key: ctx}


def plain(model, kind: str, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out if kind == "comfy" else out.sample
