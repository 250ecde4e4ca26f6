"""The host-side engine: a warm worker pool, the model sent once per version, one call per step.

    engine = Engine(PoolConfig(devices=("cpu", "cpu")))
    engine.new_run(PatchConfig(mode="pcpp", fraction=0.3))
    out = engine(model, x, t, encoder_hidden_states=ctx)   # like model(x, t, ...), on bands
    engine.end_run()   # with PoolConfig(idle_timeout_s=...), the idle clock starts now
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Hashable

import torch
from torch import nn

from .config import PatchConfig, PoolConfig
from .errors import BandSizeError, ConfigError, WorkerError
from .geometry import Bands
from .plans import check_weight_functions, find_plan
from .pool import WorkerPool
from .runner import CallRequest, CallStats, map_tensors
from .staging import make_private_dir, remove_dir, staging_root
from .weights import WeightSource, stage_model, swapped_attrs

log = logging.getLogger("pcpp.engine")


def model_version(model: nn.Module, key: Hashable = None) -> str:
    """Changes whenever a parameter or buffer is replaced or modified in place (LoRA patching
    does one or the other), the model object changes, or the caller's `key` changes.

    The key covers what pointers cannot see: a patched weight allocated where the previous
    patch's weight was freed, or an in-place change of an inference tensor (no version counter).
    A host that patches weights passes its own name for their state (the nodes: ComfyUI's
    weight-patch uuid).
    """
    # runs on every call: one walk over the modules' own tables, no qualified names or string
    # formatting (SD1.5: about 4x cheaper than named_parameters); a module's identity and its
    # tensors' order stand in for the names
    parts: list = [id(model), type(model).__qualname__, repr(key)]
    for m in model.modules():
        parts.append(id(m))
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None:
                    parts.append((name, t.data_ptr(), _tensor_version(t), t.shape, t.dtype, t.device))
    return hashlib.sha1(repr(hash(tuple(parts))).encode()).hexdigest()


def _tensor_version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (loaded under torch.inference_mode) keeps no version counter
        return -1


@dataclass
class StepRecord:
    seconds: float  # wall time of the whole call on the host
    bytes_sent: dict[int, int]  # rank -> bytes sent in this call
    synchronous: bool
    compute_seconds: dict[int, float]


@dataclass
class RunStats:
    """What one sampling run cost; the nodes show it, the benchmarks print it."""

    mode: str = ""
    fraction: float = 0.0
    bands: int = 0
    devices: tuple[str, ...] = ()
    calls: list[StepRecord] = field(default_factory=list)
    model_bytes_sent: int = 0  # weights and weight patches sent to the workers during this run (per worker)
    weights_on: tuple[str, ...] = ()  # devices holding a copy of the weights (the host adds its own)

    def summary(self) -> dict[str, Any]:
        calls = self.calls
        steady = [c for c in calls if not c.synchronous] or calls
        return {
            "mode": self.mode,
            "fraction": self.fraction,
            "bands": self.bands,
            "devices": list(self.devices),
            "calls": len(calls),
            "seconds_per_call": sum(c.seconds for c in calls) / len(calls) if calls else 0.0,
            "bytes_per_call": max((max(c.bytes_sent.values(), default=0) for c in steady), default=0),
            "bytes_per_call_warmup": max((max(c.bytes_sent.values(), default=0) for c in calls if c.synchronous),
                                         default=0),
            "model_bytes_sent": self.model_bytes_sent,
            "weights_on": list(self.weights_on or self.devices),
        }


class Engine:
    """Runs a model's forward pass on horizontal bands across a pool of worker processes."""

    def __init__(self, pool_config: PoolConfig):
        self.pool_config = pool_config
        self.pool = WorkerPool(pool_config)
        self.patch = PatchConfig()
        self.stats = RunStats()
        self._version: str | None = None
        self._patches_key: Hashable = None  # the weight patch set the workers have applied
        self._levels = 0
        self._slot_sizes: dict[Hashable, tuple[int, int]] = {}  # call slot -> its latent rows x cols
        self.model_loads = 0  # how many times a model version was sent to the workers
        self._lock = threading.Lock()  # one call, run change or shutdown at a time (the idle timer too)
        self._active = False  # between new_run() and end_run(): the pool is never stopped as idle
        self._idle_timer: threading.Timer | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the pool if it is not running (first use, or after a failure shut it down).

        A worker that died since the last call is not restarted here: the next request
        reports it as a WorkerError naming the rank, and the call after that starts afresh.
        """
        if not self.pool.started:
            self._version, self._patches_key = None, None
            self.pool.start()

    def shutdown(self) -> None:
        with self._lock:
            self._shutdown_locked()

    def _shutdown_locked(self) -> None:
        self._cancel_idle_timer()
        self.pool.shutdown()
        self._version, self._patches_key = None, None

    def new_run(self, patch: PatchConfig) -> None:
        """Start a sampling run: stale buffers and warm-up counters begin again, and the pool is
        not stopped as idle until end_run(), however long the host pauses between calls."""
        with self._lock:
            self._cancel_idle_timer()
            self.patch = patch
            self.stats = RunStats(patch.mode.value, patch.fraction, 0, self.pool_config.devices)
            self._slot_sizes = {}  # each slot's latent size is fixed by its first call in the run
            if self.pool.started and self._version is not None:
                self.pool.request({r: ("reset", None) for r in range(self.pool.size)})  # failed: pool stopped
            self._active = True

    def end_run(self) -> None:
        """The sampling run is over (finished, cancelled or failed): the idle clock starts."""
        with self._lock:
            self._active = False
            self._arm_idle_timer()

    # -- idle shutdown (PoolConfig.idle_timeout_s) ------------------------------------------
    def _arm_idle_timer(self) -> None:
        """(Re)start the idle clock; called with the lock held whenever the engine falls idle."""
        self._cancel_idle_timer()
        timeout = self.pool_config.idle_timeout_s
        if timeout and not self._active and self.pool.started:
            self._idle_timer = threading.Timer(timeout, self._stop_if_idle)
            self._idle_timer.daemon = True  # never keeps the host alive
            self._idle_timer.name = "pcpp-idle-timer"
            self._idle_timer.start()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()  # a timer already waiting for the lock sees it is stale and returns
            self._idle_timer = None

    def _stop_if_idle(self) -> None:
        with self._lock:
            if self._idle_timer is not threading.current_thread() or self._active:
                return  # re-armed, cancelled or a run began while this timer waited for the lock
            self._idle_timer = None
            if self.pool.started:
                log.info("stopping the %d-worker pool (%s): idle for %g s (idle_timeout_s; PCPP_POOL_IDLE_S in "
                         "ComfyUI); the next call starts a fresh one", self.pool.size,
                         ",".join(self.pool_config.devices), self.pool_config.idle_timeout_s)
                self._shutdown_locked()

    def debug_baselines(self) -> dict[int, dict]:
        """Every worker's residual-codec baselines (rank -> {key: (tensor, rows)}), for tests
        that check sender and receiver hold identical copies; changes nothing."""
        return self.pool.request({r: ("baselines", None) for r in range(self.pool.size)})

    # -- model ----------------------------------------------------------------------------
    def load(self, model: nn.Module, model_key: Hashable = None, weights: WeightSource | None = None) -> None:
        """Send `model` to the workers unless this version is already there.

        Without `weights` the version is model_version(model, model_key): any change of the
        weights sends the whole model. With `weights` the base model is sent once per
        `weights.base_key` (unpatched: `weights.base_tensors()` replaces the values the host has
        patched in place), and a new `weights.patches_key` sends only the patch description.
        """
        if weights is None:
            version = model_version(model, model_key)
        else:
            version = hashlib.sha1(f"{id(model)}:{type(model).__qualname__}:{weights.base_key!r}".encode()).hexdigest()
        if version != self._version or not self.pool.started:
            plan = find_plan(model)  # refuse unsupported models before any work, even a pool start
            attrs = weights.module_attrs() if weights is not None else {}
            with swapped_attrs(model, attrs):
                check_weight_functions(model)  # as the workers would get it
            self.start()
            self._send_base(model, version, weights.base_tensors() if weights is not None else {}, attrs,
                            f"{plan.family}, {'new model' if self._version is None else 'new base model'}")
        patches_key = weights.patches_key if weights is not None else None
        if patches_key != self._patches_key:
            self._send_patches(weights if patches_key is not None else None)

    def _send_base(self, model: nn.Module, version: str, base: dict, attrs: dict, why: str) -> None:
        """Stage the (unpatched) model as a file in the staging dir; every worker maps it."""
        t0 = time.perf_counter()
        stage = make_private_dir(staging_root(self.pool_config.staging_dir), "stage")
        try:
            path, nbytes = stage_model(model, base, stage, f"model-{version[:12]}.pt", attrs)
            replies = self._request({r: ("load", {"path": path, "version": version}) for r in range(self.pool.size)},
                                    timeout=max(self.pool_config.call_timeout_s, 600))
        finally:
            remove_dir(stage)  # the workers keep their mappings; the name is no longer needed
        self._levels = replies[0]["levels"]
        self._version, self._patches_key = version, None  # a fresh copy carries no patches
        self.model_loads += 1
        self.stats.model_bytes_sent += nbytes
        log.info("model %s (%s, %d downsamplings) sent to %d workers in %.2f s: %d bytes through %s",
                 version[:12], why, self._levels, self.pool.size, time.perf_counter() - t0, nbytes, stage)

    def _send_patches(self, weights: WeightSource | None) -> None:
        """Each worker restores its base weights and applies this patch set (None: base only)."""
        t0 = time.perf_counter()
        payload = None
        if weights is not None:
            payload = {"key": weights.patches_key, "applier": weights.applier, "data": weights.patches()}
        replies = self._request({r: ("patch", payload) for r in range(self.pool.size)},
                                timeout=max(self.pool_config.call_timeout_s, 600))
        nbytes = len(payload["data"]) if payload else 0
        self._patches_key = None if weights is None else weights.patches_key
        self.stats.model_bytes_sent += nbytes
        log.info("weight patches sent to %d workers in %.2f s: patch change, %d bytes, %d weights patched",
                 self.pool.size, time.perf_counter() - t0, nbytes, replies[0])

    def check_shape(self, model: nn.Module, height: int, width: int, batch_chunks: int = 1) -> Bands:
        """Bands for a latent of this size, or ConfigError naming the smallest valid size."""
        bands = len(self._groups(batch_chunks, batch_chunks)[0])  # one image per chunk: the smallest batch
        return Bands.split(height, width, bands, find_plan(model).levels(model))

    def _groups(self, batch: int, batch_chunks: int) -> list[tuple[int, ...]]:
        """Global ranks per device group: two halves for a cond+uncond batch with cfg_split."""
        ranks = tuple(range(self.pool_config.world_size))
        if self.patch.cfg_split and batch_chunks == 2 and batch % 2 == 0 and len(ranks) % 2 == 0:
            half = len(ranks) // 2
            return [ranks[:half], ranks[half:]]
        return [ranks]

    # -- one evaluation -------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, *args: Any, slot: Hashable = None,
                 batch_chunks: int = 1, model_key: Hashable = None, step: int | None = None,
                 weights: WeightSource | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """`model(x, *args, **kwargs)` computed on bands; returns the full output on x's device.

        `slot` names the call slot (e.g. the cond/uncond composition, and which evaluation of
        the step): stale buffers never cross slots. `batch_chunks=2` says the batch is two
        equal halves (cond, uncond) that cfg_split may put on two device groups. `model_key`
        joins the model's fingerprint (model_version); `weights` sends base + patches instead (load).
        `step` is the sampler step of the call (slots.SlotTracker gives slot and step from the
        sigma): warm-up counts steps; without it, the slot's first `warmup_steps` calls are the
        warm-up. A slot's first call is always synchronous.
        """
        if x.dim() != 4:
            raise ConfigError(f"x must be a latent [B, C, H, W]; got shape {tuple(x.shape)}")
        with self._lock:
            self.load(model, model_key, weights)
            self._check_slot_size(slot, x)
            groups = self._groups(x.shape[0], batch_chunks)
            try:  # refuse before sending
                Bands.split(x.shape[2], x.shape[3], len(groups[0]), self._levels)
            except ConfigError as e:
                raise BandSizeError(str(e)) from e
            self._slot_sizes.setdefault(slot, tuple(x.shape[2:]))
            per = x.shape[0] // len(groups)
            cpu_args = map_tensors((x, *args), lambda t: t.detach().cpu())
            cpu_kwargs = map_tensors(kwargs, lambda t: t.detach().cpu())
            messages = {}
            for g, group in enumerate(groups):
                a, kw = (cpu_args, cpu_kwargs) if len(groups) == 1 else _batch_slice(
                    (cpu_args, cpu_kwargs), x.shape[0], g * per, (g + 1) * per)
                msg = ("call", CallRequest(a, kw, slot, self.patch, group, step))
                messages.update({r: msg for r in group})  # one object per group: pickled once
            t0 = time.perf_counter()
            replies = self._request(messages)
            seconds = time.perf_counter() - t0
            out = self._assemble(replies, groups, x, per)
            stats: list[CallStats] = [s for _, s in replies.values()]
            self.stats.bands = len(groups[0])
            self.stats.calls.append(StepRecord(seconds, {s.rank: s.bytes_sent for s in stats},
                                               stats[0].synchronous, {s.rank: s.seconds for s in stats}))
            self._arm_idle_timer()  # outside a run, every call restarts the idle clock
            return out

    def _request(self, messages: dict[int, Any], timeout: float | None = None) -> dict[int, Any]:
        """pool.request; after a worker's ConfigError, every rank drops its run state (a bounded
        wait for in-flight transfers) so the pool can serve the next call, or the pool stops."""
        try:
            return self.pool.request(messages, timeout)
        except ConfigError:
            if self.pool.started:
                try:
                    clean = self.pool.request({r: ("reset", {"timeout_s": 5.0}) for r in range(self.pool.size)})
                    if not all(clean.values()):
                        log.warning("a worker's transfers did not finish after a configuration error; "
                                    "stopping the pool (it restarts on the next call)")
                        self.pool.kill()
                except WorkerError as e:  # the pool is stopped already
                    log.warning("resetting the workers after a configuration error failed: %s", e)
            raise

    def _check_slot_size(self, slot: Hashable, x: torch.Tensor) -> None:
        """One latent size per call slot and run. A run may call the model on several sizes
        (area conditioning crops the latent), each in its own slot; the batch may change too
        (cond and uncond together or apart). A slot whose rows and columns change is an error:
        its stale activations of another size mean nothing."""
        size = self._slot_sizes.get(slot)
        if size is not None and tuple(x.shape[2:]) != size:
            raise ConfigError(
                f"x (the latent) changed size during a sampling run in call slot {slot!r}: {tuple(x.shape)} "
                f"after {size[0]}x{size[1]}; give each latent size its own slot, or call new_run() first"
            )

    def _assemble(self, replies: dict[int, Any], groups: list[tuple[int, ...]], x: torch.Tensor,
                  per: int) -> torch.Tensor:
        first = replies[groups[0][0]][0]
        out = torch.empty((x.shape[0], first.shape[1], x.shape[2], first.shape[3]), dtype=first.dtype)
        for g, group in enumerate(groups):
            row = 0
            for r in group:
                band = replies[r][0]  # [B/groups, C, h, W]
                out[g * per:(g + 1) * per, :, row:row + band.shape[2]] = band
                row += band.shape[2]
        return out.to(x.device)


def _batch_slice(tree: Any, batch: int, lo: int, hi: int) -> Any:
    """Every tensor whose first dimension is the batch, cut to [lo, hi)."""
    return map_tensors(tree, lambda t: t[lo:hi] if t.dim() > 0 and t.shape[0] == batch else t)


_SHARED: dict[str, Engine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(pool_config: PoolConfig) -> Engine:
    """The process-wide engine for these devices, kept warm across runs (until idle for
    `pool_config.idle_timeout_s`, when that is set).

    Asking for other devices (or other pool settings) shuts the previous pool down first, so
    a long-lived host never holds two pools.
    """
    key = repr(pool_config)
    with _SHARED_LOCK:
        engine = _SHARED.get(key)
        if engine is None:
            for old in _SHARED.values():
                old.shutdown()
            _SHARED.clear()
            engine = _SHARED[key] = Engine(pool_config)
        return engine


def shutdown_shared() -> None:
    with _SHARED_LOCK:
        for engine in _SHARED.values():
            engine.shutdown()
        _SHARED.clear()
