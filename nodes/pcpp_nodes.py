"""The V3 nodes: PCPP KSampler and PCPP Parallel Model (ids and inputs are a fixed contract)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import ComfyExtension, io
from pcpp_core import ConfigError
from pcpp_core.codecs import codec_names

from .hook import apply_pcpp, current_prompt_id, remove_pcpp
from .settings import MAX_FRACTION, MODES, PCPPSettings, resolve_devices

CATEGORY = "sampling/pcpp"
# what users type into the node search (front end: name, display_name, search_aliases)
SEARCH_ALIASES = ["multi-GPU", "multi GPU", "multiple GPUs", "parallel", "patch parallel", "patch parallelism",
                  "DistriFusion", "PCPP", "distributed sampling"]


def schema(**fields: Any) -> io.Schema:
    """io.Schema, with search_aliases where ComfyUI's V3 Schema has the field (0.33.0 does, v0.8.0 does not)."""
    if "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {}):
        fields["search_aliases"] = SEARCH_ALIASES
    return io.Schema(**fields)


def engine_inputs() -> list[io.Input]:
    """The engine settings both nodes take; the web extension relies on these names."""
    return [
        io.String.Input("devices", default="auto",
                        tooltip="Where the bands run: auto (every visible CUDA GPU), a list such as "
                                "cuda:0,cuda:1, or cpu:N for N CPU worker processes (at most the cores "
                                "the server may use, unless it was started with PCPP_MAX_WORKERS). Fewer "
                                "than two devices runs plain ComfyUI sampling, and the stats say so."),
        io.Float.Input("neighbour_fraction", default=0.3, min=0.0, max=MAX_FRACTION, step=0.05,
                       tooltip="How many rows of each neighbouring band a band's self-attention sees, in units "
                               "of the band's own height: 0 = own band only, 1 = as many rows of each "
                               "neighbour as the band has (the whole neighbour when bands are even). More is "
                               "closer to the single-GPU image and sends more data (pcpp mode only)."),
        io.Combo.Input("mode", options=list(MODES), default="pcpp",
                       tooltip="pcpp: neighbour window with stale activations (fast). distrifusion: whole-"
                               "image window. naive: bands denoised alone (baseline). sync: exact, every step "
                               "waits for fresh data (same image as one device). off: plain ComfyUI sampling."),
        io.Int.Input("warmup_steps", default=4, min=0, max=10000,
                     tooltip="Sampler steps that run synchronously (exact) before stale activations are "
                             "used; more steps, closer to the single-GPU image."),
        io.Boolean.Input("cfg_split", default=False,
                         tooltip="Run the positive and negative prompt on two halves of the devices "
                                 "(needs an even number of devices and cfg > 1)."),
        io.Combo.Input("exchange", options=list(codec_names()), default="none", optional=True,
                       tooltip="How activations travel between devices after the warm-up steps (pcpp and "
                               "distrifusion). none: exact fp16, most bytes. int8: half the bytes, "
                               "tiny error. residual-2bit / residual-1bit: only the change since the last "
                               "step, 2 or 1 bits per value with error feedback: 8-16x fewer bytes, a "
                               "little more error; worth it on PCIe, rarely on NVLink. Warm-up and sync "
                               "steps always travel exact."),
        io.Int.Input("far_refresh", default=0, min=0, max=64, optional=True,
                     tooltip="pcpp only. 0: attention sees the neighbour window only. N > 0: it also sees "
                             "the rest of the image from each device's copy, each attention layer's copy "
                             "refreshed every N steps: close to distrifusion's image for fewer bytes. With "
                             "a residual exchange the far rows travel as the change of 16-column means: "
                             "2 with residual-2bit is within 0.5 dB of distrifusion at about 4% of its "
                             "bytes (SDXL, 4 GPUs)."),
    ]


def settings_from(devices: str, neighbour_fraction: float, mode: str, warmup_steps: int,
                  cfg_split: bool, exchange: str = "none", far_refresh: int = 0) -> PCPPSettings:
    return PCPPSettings(devices=devices, neighbour_fraction=neighbour_fraction, mode=mode,
                        warmup_steps=warmup_steps, cfg_split=cfg_split, exchange=exchange, far_refresh=far_refresh)


def check_devices(devices: Any) -> bool | str:
    """validate_inputs answer for `devices`: True, or the reason it is rejected before the run."""
    if not isinstance(devices, str):
        return True  # linked from another node: checked when the node runs
    try:
        resolve_devices(devices)
    except ConfigError as e:
        return str(e)
    return True


class PCPPKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="PCPPKSampler",
            display_name="PCPP KSampler (multi-GPU)",
            category=CATEGORY,
            description="Multi-GPU KSampler: splits each denoising step into horizontal bands, one per GPU "
                        "(Partially Conditioned Patch Parallelism, a patch-parallel method after DistriFusion).",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the input latent."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The number of steps used in the denoising process."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The Classifier-Free Guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The algorithm used when sampling."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The scheduler controls how noise is gradually removed."),
                io.Conditioning.Input("positive", tooltip="The conditioning describing what to include."),
                io.Conditioning.Input("negative", tooltip="The conditioning describing what to exclude."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The amount of denoising applied; lower keeps more of the input latent."),
                *engine_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def validate_inputs(cls, devices) -> bool | str:
        return check_devices(devices)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, devices, neighbour_fraction, mode, warmup_steps, cfg_split,
                exchange="none", far_refresh=0) -> io.NodeOutput:
        settings = settings_from(devices, neighbour_fraction, mode, warmup_steps, cfg_split, exchange, far_refresh)
        model, hook = (remove_pcpp(model), None) if settings.off else apply_pcpp(model, settings)
        latent = ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
        stats = hook.last_stats if hook is not None and hook.last_stats else off_stats(settings, latent["samples"])
        return io.NodeOutput(latent, ui={"pcpp_stats": [stats]})


def ksample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
            latent: dict, denoise: float) -> dict:
    """What KSampler does, on `model`: same noise for the same seed, ComfyUI's progress bar and previews."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                              denoise=denoise, noise_mask=latent.get("noise_mask"), callback=callback,
                              disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    result = latent.copy()
    result["samples"] = out
    return result


def off_stats(settings: PCPPSettings, samples: torch.Tensor) -> dict[str, Any]:
    """Stats for mode=off: plain sampling because the user asked for it (not a fallback)."""
    return {"mode": settings.mode, "fraction": float(settings.neighbour_fraction), "bands": 1, "devices": [],
            "calls": 0, "seconds_per_call": 0.0, "bytes_per_call": 0, "bytes_per_call_warmup": 0,
            "height": int(samples.shape[-2]), "width": int(samples.shape[-1]), "fallback": None,
            "partial": None, "model_bytes_sent": 0, "weights_on": [], "exchange": settings.exchange,
            "far_refresh": settings.far_refresh, "far_pool": settings.far_pool}


class PCPPParallelModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="PCPPParallelModel",
            display_name="PCPP Parallel Model (multi-GPU)",
            category=CATEGORY,
            description="Makes every sampler that uses this model (KSamplerAdvanced, SamplerCustomAdvanced, "
                        "third-party samplers) split each denoising step across several GPUs in bands "
                        "(patch parallelism, PCPP / DistriFusion).",
            inputs=[io.Model.Input("model", tooltip="The model to run in parallel."), *engine_inputs()],
            outputs=[io.Model.Output(tooltip="A copy of the model that samples in parallel; the input is unchanged.")],
            hidden=[io.Hidden.unique_id],  # each run's stats (and any fallback) go to this node on the canvas
        )

    @classmethod
    def validate_inputs(cls, devices) -> bool | str:
        return check_devices(devices)

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> str | float:
        """Runs again exactly when a sampler using its model does (prompt_fingerprint), so each
        prompt's /history entry holds its own run's stats and nothing re-samples for nothing."""
        hidden = getattr(cls, "hidden", None)
        return prompt_fingerprint(str(hidden.unique_id) if getattr(hidden, "unique_id", None) else None)

    @classmethod
    def execute(cls, model, devices, neighbour_fraction, mode, warmup_steps, cfg_split,
                exchange="none", far_refresh=0) -> io.NodeOutput:
        settings = settings_from(devices, neighbour_fraction, mode, warmup_steps, cfg_split, exchange, far_refresh)
        node_id = getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) is not None else None
        if settings.off:
            return io.NodeOutput(remove_pcpp(model))
        parallel, hook = apply_pcpp(model, settings, node_id)
        stats: dict[str, Any] = {}  # empty until a sampler runs this model in this prompt (hook.publish)
        hook.ui_stats = (current_prompt_id(), stats)
        return io.NodeOutput(parallel, ui={"pcpp_stats": [stats]})


DATA_TYPES = frozenset({"LATENT", "IMAGE", "MASK", "AUDIO", "VIDEO", "STRING", "INT", "FLOAT", "BOOLEAN"})


def prompt_fingerprint(node_id: str | None = None) -> str | float:
    """What decides whether a sampler using this node's model runs again, as a hash; NaN (never equal
    to itself: run again) when ComfyUI does not expose the prompt being prepared.

    The stats of a run are written into the UI dict of the node's own execution (hook.publish), so the
    node must run again exactly when a sampler that uses its model runs again, and stay cached otherwise
    (a new file name on SaveImage must not re-sample). A sampler runs again when anything among its
    ancestors changes, so the hash covers the inputs of every ancestor of every node the model reaches
    (links of any type but plain data such as LATENT or IMAGE: MODEL, GUIDER, SIGMAS, custom types).
    """
    try:
        from comfy_execution.progress import get_progress_state

        prompt = get_progress_state().dynprompt.original_prompt
    except Exception:  # noqa: BLE001 (an older or newer ComfyUI without it)
        return float("nan")
    starts = [node_id] if node_id in prompt else [k for k, v in prompt.items()
                                                   if v.get("class_type") == "PCPPParallelModel"]
    reached = model_reach(prompt, starts)
    graph = {k: [prompt[k].get("class_type"), prompt[k].get("inputs")] for k in sorted(ancestors(prompt, reached))}
    return hashlib.sha1(json.dumps(graph, sort_keys=True, default=str).encode()).hexdigest()


def links(node: dict) -> list[tuple[str, int]]:
    """(source node id, output index) of a prompt node's linked inputs."""
    return [(str(v[0]), int(v[1])) for v in node.get("inputs", {}).values()
            if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)]


def model_reach(prompt: dict, starts: list[str]) -> set[str]:
    """The starts and every node fed, directly or through others, by a link that is not plain data."""
    reached, todo = set(starts), list(starts)
    while todo:
        source = todo.pop()
        for k, node in prompt.items():
            if k not in reached and any(s == source and output_type(prompt, s, i) not in DATA_TYPES
                                        for s, i in links(node)):
                reached.add(k)
                todo.append(k)
    return reached


def ancestors(prompt: dict, nodes: set[str]) -> set[str]:
    """The nodes and everything they read from, transitively."""
    seen, todo = set(nodes), list(nodes)
    while todo:
        for s, _ in links(prompt.get(todo.pop(), {})):
            if s in prompt and s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def output_type(prompt: dict, node_id: str, index: int) -> str | None:
    """The type of a node's output (None when unknown: then the link is followed, never missed)."""
    import nodes as comfy_nodes  # ComfyUI's node registry (imported late: it is ComfyUI's `nodes` module)

    try:
        return comfy_nodes.NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]].RETURN_TYPES[index]
    except Exception:  # noqa: BLE001 (unknown class, V3 schema errors: follow the link)
        return None


class PCPPExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [PCPPKSampler, PCPPParallelModel]
