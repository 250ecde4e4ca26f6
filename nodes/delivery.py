"""How ComfyUI's weights reach the workers, and which devices hold a copy of them.

Host side (in the sampling run): `weight_source` describes the sampling ModelPatcher's weights
as base + patches for the engine (pcpp_core.weights.WeightSource):

    base      the diffusion model without weight patches: its tensors, except that every weight
              ComfyUI has patched in place is replaced by the ModelPatcher's backup of it (the
              exact original); named by a token kept on ComfyUI's BaseModel, so a LoRA change
              never re-sends the model
    patches   `ModelPatcher.patches` (ComfyUI's own description: LoRA/LoKr/LoHa adapters,
              merges, strengths), pickled with every tensor on the CPU; named by the
              ModelPatcher's patches_uuid

    module_attrs  the staged copy without ComfyUI's lowvram weight functions: a partially loaded
              model keeps some weights unpatched and patches them on every forward
              (LowVramPatch in `weight_function`), which the patches above already describe; any
              other weight function is refused (ConfigError), the run falls back visibly

Worker side: `apply_patches` (named by the WeightSource as "nodes.delivery:apply_patches" and
imported inside each worker, after worker_boot) computes each patched weight with ComfyUI's own
code, the same steps as ModelPatcher.patch_weight_to_device, on the worker's own device.

Kept free of top-level ComfyUI imports: a worker imports this module by name.
"""
from __future__ import annotations

import io
import logging
import pickle
import uuid
from typing import Any, Mapping

import torch

from pcpp_core import ConfigError, WeightSource

log = logging.getLogger("pcpp.nodes")

PREFIX = "diffusion_model."  # ComfyUI's weight keys are relative to its BaseModel
APPLIER = "nodes.delivery:apply_patches"  # as the workers import it (the pack root is on their path)
_TOKEN = "_pcpp_base_key"


def weight_source(patcher: Any) -> WeightSource | None:
    """The sampling ModelPatcher's weights as base + patches, or None when they cannot travel that way
    (hook patches, which change per conditioning, or weights stored through set_/convert_ functions):
    then the engine sends the whole model as it is, which is right, only bigger."""
    base = getattr(patcher, "model", None)
    if base is None:
        return None
    lowvram = lowvram_attrs(base.diffusion_model) if hasattr(base, "diffusion_model") else {}
    whole = None
    if getattr(patcher, "hook_patches", None) or getattr(patcher, "current_hooks", None) is not None:
        whole = "the model has hook patches"
    patches = {k[len(PREFIX):]: v for k, v in getattr(patcher, "patches", {}).items() if k.startswith(PREFIX) and v}
    if whole is None and patches and _has_custom_setters(base, patches):
        whole = "weights stored through set_/convert_ functions (quantized ops)"
    if whole is not None:
        if lowvram:
            raise ConfigError(f"{whole} and it is partially loaded (lowvram): the workers can get neither its patched "
                              "weights nor base + patches; load it fully (more free VRAM, or --highvram)")
        log.info("PCPP: %s; the workers get the whole patched model on each change", whole)
        return None
    token = base.__dict__.get(_TOKEN)
    if token is None:  # one per loaded checkpoint: ComfyUI changes its weights only through patches
        token = base.__dict__[_TOKEN] = uuid.uuid4().hex
    backup = getattr(patcher, "backup", {})

    def base_tensors() -> dict[str, torch.Tensor]:
        return {k[len(PREFIX):]: b.weight for k, b in list(backup.items()) if k.startswith(PREFIX)}

    if not patches:
        return WeightSource(base_key=token, base_tensors=base_tensors, module_attrs=lambda: lowvram)
    return WeightSource(base_key=token, base_tensors=base_tensors, patches_key=str(patcher.patches_uuid),
                        patches=lambda: pack_patches(patches), applier=APPLIER, module_attrs=lambda: lowvram)


def lowvram_attrs(diffusion_model: Any) -> dict[str, list]:
    """"module.weight_function" -> the list without ComfyUI's LowVramPatch entries, for every module
    a partial (lowvram) load gave one; ConfigError naming any other kind of weight function.

    A LowVramPatch computes `ModelPatcher.patches[key]` on the unpatched weight at each forward:
    the workers apply those patches to their own full copy (apply_patches), so they must not get
    it. The host's modules keep theirs: calls that run on the host stay ComfyUI's own.
    """
    import comfy.model_patcher

    lowvram = comfy.model_patcher.LowVramPatch
    attrs: dict[str, list] = {}
    for name, m in diffusion_model.named_modules():
        for attr in ("weight_function", "bias_function"):
            funcs = getattr(m, attr, None) or []
            other = [f for f in funcs if not isinstance(f, lowvram)]
            if other:
                kinds = ", ".join(sorted({getattr(f, "__qualname__", None) or type(f).__qualname__ for f in other}))
                raise ConfigError(f"{name}: its weights are changed on the fly by {kinds} ({attr}, e.g. a weight "
                                  "wrapper); the workers cannot run that: remove the node that adds it")
            if funcs:
                attrs[f"{name}.{attr}"] = other
    return attrs


def _has_custom_setters(base: Any, patches: Mapping[str, Any]) -> bool:
    import comfy.model_patcher

    for name in patches:
        _, set_func, convert_func = comfy.model_patcher.get_key_weight(base, PREFIX + name)
        if set_func is not None or convert_func is not None:
            return True
    return False


class _CPUPickler(pickle.Pickler):
    """Pickles tensors as CPU tensors: a worker must never meet the host's device."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            return obj.detach().cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        return NotImplemented


def pack_patches(patches: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    try:
        _CPUPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(dict(patches))
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise ConfigError(f"the model's weight patches cannot be sent to the workers ({e}); "
                          "a node patched weights with a function defined on the fly") from e
    return buf.getvalue()


def apply_patches(weights: Mapping[str, torch.Tensor], data: bytes) -> dict[str, torch.Tensor]:
    """In a worker: name -> patched weight, computed as ModelPatcher.patch_weight_to_device does."""
    import comfy.float
    import comfy.lora
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    to_seed = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed  # 0.8: model_patcher
    out = {}
    for name, patch_list in pickle.loads(data).items():
        weight = weights.get(name)
        if weight is None:
            raise ConfigError(f"a weight patch names {PREFIX + name}, which the workers' model lacks")
        key = PREFIX + name  # ComfyUI's key: its patch code and rounding seed use it
        temp = mm.cast_to_device(weight, weight.device, mm.lora_compute_dtype(weight.device), copy=True)
        patched = comfy.lora.calculate_weight(patch_list, temp, key)
        out[name] = comfy.float.stochastic_rounding(patched, weight.dtype, seed=to_seed(key))
    return out


# -- one copy per GPU ----------------------------------------------------------------------

def _gpu(device: Any) -> str | None:
    d = torch.device(device) if not isinstance(device, torch.device) else device
    return f"cuda:{d.index or 0}" if d.type == "cuda" else None


def host_copy_must_go(host_device: Any, worker_devices: tuple[str, ...]) -> bool:
    """Whether the host's loaded copy of the diffusion model sits on a GPU that also runs a worker.

    Only GPUs count: CPU memory is shared (the CPU workers map one file), and a GPU without a
    worker may keep the host's copy for plain sampling."""
    host = _gpu(host_device)
    return host is not None and host in {_gpu(d) for d in worker_devices}


def offload_host_copy(patcher: Any) -> bool:
    """Unload a copy of `patcher`'s model that an earlier plain run left on its GPU, through
    ComfyUI's model management (which restores the unpatched weights and moves them to the
    offload device). Returns whether one was found."""
    import comfy.model_management as mm

    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if getattr(loaded.model, "model", None) is patcher.model:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
            mm.soft_empty_cache()
            log.info("PCPP: unloaded the host's copy of the diffusion model from %s: a worker runs there",
                     patcher.load_device)
            return True
    return False


def host_device_for_run(patcher: Any, worker_devices: tuple[str, ...]) -> Any | None:
    """The device the host samples on instead of its load device during a parallel run, or None.

    When a worker runs on the host's GPU, ComfyUI would load its own copy of the diffusion model
    there too: instead the run's host side (the sampler's arithmetic; every model call runs in
    the workers) uses the patcher's offload device, and a copy already loaded is unloaded.
    Plain sampling on a later prompt loads the model again as ComfyUI always does.
    """
    if not host_copy_must_go(patcher.load_device, worker_devices):
        return None
    offload_host_copy(patcher)
    return patcher.offload_device
