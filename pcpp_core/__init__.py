"""PCPP engine: Partially Conditioned Patch Parallelism for diffusion UNets (plain torch).

Never imports ComfyUI; works on plain torch.nn.Modules.
"""
from .config import Mode, PatchConfig, PoolConfig, parse_devices
from .engine import Engine, RunStats, model_version, shared_engine, shutdown_shared
from .errors import ConfigError, PCPPError, StagingError, UnsupportedModelError, WorkerError
from .geometry import Bands, LayerSpec, bytes_sent, split_rows
from .plans import find_plan, profile_layers
from .weights import WeightSource

__all__ = [
    "Bands", "ConfigError", "Engine", "LayerSpec", "Mode", "PCPPError", "PatchConfig", "PoolConfig",
    "RunStats", "UnsupportedModelError", "WorkerError", "bytes_sent", "find_plan", "model_version", "profile_layers", "parse_devices",
    "split_rows", "shared_engine", "shutdown_shared", "StagingError", "WeightSource",
]
