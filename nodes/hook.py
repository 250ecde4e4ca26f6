"""The sampling hook: PCPP on a cloned ModelPatcher through ComfyUI's wrapper system.

Two wrappers, one key ("pcpp"):

    OUTER_SAMPLE     once per sampling run: decide parallel or plain (and say why), reset the
                     engine's stale buffers, key call slots by the run's sigma schedule
    DIFFUSION_MODEL  once per model call: the engine computes `diffusion_model(x, t, ...)` on
                     bands in worker processes, or the call runs on the host when it cannot

ComfyUI's own sampler loop, progress bar, previews and Cancel stay in charge; the workers only
ever see the diffusion model (with the user's weight patches applied) and plain tensors.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

import comfy.cli_args
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
from pcpp_core import BandSizeError, ConfigError, Engine, PatchConfig, StagingError, find_plan, shared_engine
from pcpp_core.staging import install_cleanup
from pcpp_core.slots import SlotTracker

from . import delivery, routing
from .options import HOOK_KEY, RUN_KEY, split_transformer_options, unsupported_kwargs
from .settings import PCPPSettings, pool_config, resolve_devices

log = logging.getLogger("pcpp.nodes")

_WRAPPERS = comfy.patcher_extension.WrappersMP
install_cleanup()  # staging dirs go on SIGTERM/SIGINT too: set here, in ComfyUI's main thread (prompts run in another)


class PCPPHook:
    """The node's settings as they travel in transformer_options; the last run's stats come back here."""

    def __init__(self, settings: PCPPSettings, node_id: str | None = None):
        self.settings = settings
        self.node_id = node_id  # PCPP Parallel Model's id: its stats go to the front end as a message
        self.last_stats: dict[str, Any] | None = None
        # (prompt id, the dict PCPP Parallel Model returned as its UI stats): ComfyUI's /history entry
        # of that prompt holds this very dict, so a run of the same prompt fills it in place (publish)
        self.ui_stats: tuple[str | None, dict[str, Any]] | None = None


@dataclass
class RunState:
    """One sampling run: the engine (None while plain), why it is plain, and its call slots."""

    settings: PCPPSettings
    devices: tuple[str, ...]
    shape: tuple[int, ...]
    patcher: Any = None  # the sampling ModelPatcher: which weight patches are applied now
    engine: Engine | None = None
    started: Engine | None = None  # the engine whose run began (kept after a fallback): end() ends it
    fallback: str | None = None
    plain_calls: int = 0
    plain_seconds: float = 0.0
    host_device: str = "cpu"  # where the host's copy of the diffusion model is during this run
    model_bytes_sent: int = 0  # weights sent before a fallback dropped the engine
    host_calls: dict[str, int] = field(default_factory=dict)  # why some calls ran whole on the host -> how many
    _weights: Any = False  # the run's delivery.weight_source, computed on first use (False: not yet)
    tracker: SlotTracker | None = None  # from the run's sigmas (None: unknown, see call_slot)
    check_call: Callable[[dict], None] = lambda inputs: None  # the model plan's refusals of call inputs
    patch: PatchConfig | None = None  # the engine's run config (None: the run never started one)

    def fall_back(self, reason: str) -> None:
        """From now on this run samples plainly; said once in the log and in the node's stats."""
        if self.fallback is None:
            done = len(self.engine.stats.calls) if self.engine is not None else 0
            self.fallback = f"{reason} (after {done} parallel model calls)" if done else reason
            reason = self.fallback
            self.model_bytes_sent = self.engine.stats.model_bytes_sent if self.engine is not None else 0
            log.warning("PCPP: running plain ComfyUI sampling instead of mode=%s: %s", self.settings.mode, reason)
        self.engine = None

    def end(self) -> None:
        """The engine's run is over: its idle clock (PCPP_POOL_IDLE_S) may start."""
        if self.started is not None:
            self.started.end_run()
            self.started = None

    def call_slot(self, composition: tuple, sigmas: Any) -> tuple[Hashable, int | None]:
        """(slot, step) of one model call from its sigma (slots.SlotTracker).

        Heun-like samplers evaluate the model twice per step and fire the step callback between
        the two, so the slot comes from the call's sigma, never from the callback. ComfyUI
        (0.33 and 0.8: samplers._calc_cond_batch) puts the call's sigmas in
        transformer_options["sigmas"]; without it (or without a schedule) every call of a
        composition shares one slot and warm-up counts that slot's calls: right for
        one-evaluation samplers.
        """
        if self.tracker is None or not isinstance(sigmas, torch.Tensor) or sigmas.numel() == 0:
            return (composition, "call", 0), None
        return self.tracker.evaluation(composition, float(sigmas.flatten()[0]))

    def weights_tag(self) -> str:
        """ComfyUI's own name for the weights' state: the engine re-sends the model when it changes.

        Pointers alone miss a new LoRA strength whose weights land where the last ones were freed.
        """
        base = getattr(self.patcher, "model", None)
        hooks = getattr(self.patcher, "current_hooks", None)
        return f"{getattr(base, 'current_weight_patches_uuid', None)}:{id(hooks) if hooks is not None else None}"

    def weights(self) -> Any:
        """Base + patches for the engine (None: the whole model as it is, keyed by weights_tag)."""
        if self._weights is False:
            self._weights = delivery.weight_source(self.patcher) if self.patcher is not None else None
        return self._weights

    def host_call(self, reason: str, run_model: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One call runs whole on the host while the run stays parallel (e.g. a small area crop)."""
        if reason not in self.host_calls:
            log.warning("PCPP: some model calls run whole on the host: %s", reason)
        self.host_calls[reason] = self.host_calls.get(reason, 0) + 1
        return self.plain(run_model)

    def partial(self) -> str | None:
        """The node's text for calls that ran on the host in a parallel run, or None."""
        if not self.host_calls or self.fallback is not None:
            return None
        total = self.plain_calls + (len(self.engine.stats.calls) if self.engine is not None else 0)
        ran = sum(self.host_calls.values())
        return f"{ran} of {total} model calls ran whole on the host: " + "; ".join(self.host_calls)

    def plain(self, run_model: Callable[[], torch.Tensor]) -> torch.Tensor:
        start = time.perf_counter()
        out = run_model()
        self.plain_seconds += time.perf_counter() - start
        self.plain_calls += 1
        return out

    def summary(self) -> dict[str, Any]:
        """The stats the node shows: the engine's, or the plain calls' when it fell back."""
        if self.fallback is None and self.engine is not None:
            stats = self.engine.stats.summary()
            stats["weights_on"] = [*stats["weights_on"], f"{self.host_device} (host)"]
        else:
            calls = self.plain_calls
            stats = {"mode": self.settings.mode, "fraction": float(self.settings.neighbour_fraction), "bands": 1,
                     "devices": list(self.devices), "calls": calls,
                     "seconds_per_call": self.plain_seconds / calls if calls else 0.0,
                     "bytes_per_call": 0, "bytes_per_call_warmup": 0, "model_bytes_sent": self.model_bytes_sent,
                     "weights_on": [f"{self.host_device} (host)"]}
        stats["height"], stats["width"] = (self.shape[2], self.shape[3]) if len(self.shape) == 4 else (0, 0)
        stats["fallback"] = self.fallback
        stats["partial"] = self.partial()
        stats["exchange"] = self.settings.exchange
        stats["far_refresh"] = self.settings.far_refresh
        stats["far_pool"] = self.patch.far_pool if self.patch is not None else self.settings.far_pool
        return stats


def start_run(settings: PCPPSettings, diffusion_model: Any, shape: tuple[int, ...], patcher: Any = None) -> RunState:
    """Parallel if everything known before the first call allows it; otherwise plain, with the reason."""
    devices, reason = resolve_devices(settings.devices)
    run = RunState(settings, devices, shape, patcher)
    if reason is None and len(shape) != 4:
        reason = f"the latent has shape {list(shape)}; only image latents [B, C, H, W] are split into bands"
    if reason is None:
        try:
            plan = find_plan(diffusion_model)
            run.check_call = plan.check_call  # e.g. ControlNet on a Flux model
            run.patch = settings.patch_config(transformer=plan.transformer)
            engine = shared_engine(pool_config(devices))
            engine.new_run(run.patch)
            run.started = engine
            engine.check_shape(diffusion_model, shape[2], shape[3], 2 if settings.cfg_split else 1)
            run.engine = engine
        except ConfigError as e:  # an unsupported family, or a latent too small for the devices
            reason = str(e)
        except BaseException:
            run.end()
            raise
    if reason is not None:
        run.fall_back(reason)
    return run


def outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                         disable_pbar=False, seed=None, **kwargs):
    """One sampling run; state lives in a clone of the guider's options and is dropped in `finally`."""
    guider = executor.class_obj
    hook: PCPPHook = guider.model_options["transformer_options"][HOOK_KEY]
    diffusion_model = getattr(guider.model_patcher.model, "diffusion_model", None)
    run = start_run(hook.settings, diffusion_model, tuple(noise.shape), guider.model_patcher)
    patcher, load_device = guider.model_patcher, guider.model_patcher.load_device
    moved = delivery.host_device_for_run(patcher, run.devices) if run.engine is not None else None
    if moved is not None:  # one copy per GPU: the host samples on the offload device (see ARCHITECTURE.md)
        patcher.load_device = moved
    run.host_device = str(patcher.load_device)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 1:
        run.tracker = SlotTracker([float(s) for s in sigmas.flatten()])
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][RUN_KEY] = run
    route = routing.needs_routing(diffusion_model) and run.engine is not None  # SD3's MMDiT: routing.py
    try:
        with routing.routed(diffusion_model) if route else contextlib.nullcontext():
            out = executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, **kwargs)
        if run.engine is not None and run.tracker is not None and not run.engine.stats.calls and not run.host_calls:
            run.fall_back(f"{type(diffusion_model).__name__} never called PCPP's DIFFUSION_MODEL wrapper: "
                          "this run sampled on one device")
        return out
    finally:
        run.end()
        guider.model_options = original
        patcher.load_device = load_device
        hook.last_stats = run.summary()
        log.info("PCPP run: %s", json.dumps(hook.last_stats))
        publish(hook)


STATS_EVENT = "pcpp.stats"  # websocket event: {"node": id, "stats": {...}} for PCPP Parallel Model


def current_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is executing now (its executing-node context), or None (a script)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return context.prompt_id if context is not None else None


def publish(hook: PCPPHook) -> None:
    """The run's stats to the front end, and into /history for a node that has no output after the run.

    PCPP Parallel Model runs before the sampler: the event (keyed by the node's id) lets the canvas
    show them, fallback included, and the UI dict the node returned in this same prompt is filled in
    place, which is the dict ComfyUI's /history entry of the prompt holds. A dict of another prompt is
    never touched (the node re-runs when its prompt changes: PCPPParallelModel.fingerprint_inputs).
    No server (a script using ComfyUI as a library): the log line above is all there is.
    """
    if hook.ui_stats is not None and hook.ui_stats[0] == current_prompt_id():
        hook.ui_stats[1].clear()
        hook.ui_stats[1].update(hook.last_stats or {})
    if hook.node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(STATS_EVENT, {"node": str(hook.node_id), "stats": hook.last_stats})


_NAMED_INPUTS = frozenset({"timesteps", "timestep", "context", "y", "control", "transformer_options"})


def _model_inputs(executor, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The diffusion model's inputs by name (the executor passes them positionally, in the order
    of the model's forward: routing.input_names)."""
    return {**dict(zip(routing.input_names(executor.class_obj), args)), **kwargs}


def diffusion_model_wrapper(executor, x, *args, **kwargs):
    """`diffusion_model(x, timesteps, ...)` on bands when the workers can run it, else on the host."""
    comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel stops within one call
    inputs = _model_inputs(executor, args, kwargs)
    transformer_options = inputs.get("transformer_options") or {}
    run: RunState | None = transformer_options.get(RUN_KEY)

    def host() -> torch.Tensor:
        return executor(x, *args, **kwargs)

    if run is None:  # called outside a sampling run (e.g. by another node): nothing to split
        return host()
    if run.engine is not None:
        clean, reason = split_transformer_options(transformer_options)
        extra = {k: v for k, v in inputs.items() if k not in _NAMED_INPUTS}  # guidance, ref_latents, ...
        reason = reason or _inner_wrappers(executor) or unsupported_kwargs(extra) or _refused(run, inputs)
        if reason is not None:
            run.fall_back(reason)
    if run.engine is None:
        return run.plain(host)
    cond_or_uncond = tuple(transformer_options.get("cond_or_uncond") or (0,))
    chunks = 2 if len(cond_or_uncond) == 2 and x.shape[0] % 2 == 0 else 1
    composition = (cond_or_uncond, tuple(x.shape[2:]))  # each latent size its own slot: area crops
    slot, step = run.call_slot(composition, transformer_options.get("sigmas"))
    try:
        with routing.class_forward(executor.class_obj):  # staged as ComfyUI built it (SD3: see routing.py)
            return run.engine(executor.class_obj, x, **{**inputs, "transformer_options": clean}, slot=slot,
                              step=step, batch_chunks=chunks, model_key=run.weights_tag(), weights=run.weights())
    except StagingError:  # the machine's staging dir, not this run's inputs: the prompt fails naming it
        raise
    except BandSizeError as e:  # e.g. an area-conditioning crop too small for the bands: this call whole
        return run.host_call(f"a {x.shape[2]}x{x.shape[3]} latent cannot be split ({e})", host)
    except ConfigError as e:  # e.g. weights patched on the fly (lowvram), ControlNet on a DiT
        run.fall_back(str(e))
        return run.plain(host)


def _refused(run: RunState, inputs: dict) -> str | None:
    """Why the model's plan does not split a call with these inputs (before any worker sees them)."""
    try:
        run.check_call(inputs)
    except ConfigError as e:
        return str(e)
    return None


def _inner_wrappers(executor) -> str | None:
    """Another node's diffusion-model wrapper inside ours would be skipped by the workers."""
    inner = [w for w in executor.wrappers[executor.idx + 1:] if w is not diffusion_model_wrapper]
    if inner:
        names = ", ".join(getattr(w, "__qualname__", type(w).__name__) for w in inner)
        return f"another node wraps the diffusion model inside PCPP ({names}); the workers cannot run it"
    return None


_HOOKED = ((_WRAPPERS.OUTER_SAMPLE, outer_sample_wrapper), (_WRAPPERS.DIFFUSION_MODEL, diffusion_model_wrapper))


def apply_pcpp(model: Any, settings: PCPPSettings, node_id: str | None = None) -> tuple[Any, PCPPHook]:
    """A clone of the ModelPatcher that samples with PCPP; the input model is left untouched.
    `node_id`: the node to send each run's stats to (see publish)."""
    patched = remove_pcpp(model).clone()
    hook = PCPPHook(settings, node_id)
    patched.model_options.setdefault("transformer_options", {})[HOOK_KEY] = hook
    for kind, wrapper in _HOOKED:
        patched.add_wrapper_with_key(kind, HOOK_KEY, wrapper)
    return patched, hook


def remove_pcpp(model: Any) -> Any:
    """`model` itself when no PCPP node hooked it, else a clone without the hook (mode=off, or a
    PCPP node downstream of another: the last one's settings win)."""
    if not any(model.get_wrappers(kind, HOOK_KEY) for kind, _ in _HOOKED):
        return model
    plain = model.clone()
    for kind, _ in _HOOKED:
        plain.remove_wrappers_with_key(kind, HOOK_KEY)
    plain.model_options.get("transformer_options", {}).pop(HOOK_KEY, None)
    return plain
