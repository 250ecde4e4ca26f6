"""Which of ComfyUI's model patches (`transformer_options['patches'|'patches_replace']`) the workers run.

A patch travels to the workers (pickled with its tensors, called there on the band) only when it
is band-local, so `sync` stays exact: it acts per query token and never on the whole feature map.

    patches_replace['attn2']   cross-attention replacements (IP-Adapter style): per query token   -> travel
    patches_replace['attn1']   PerturbedAttentionGuidance's "attention = value": per token          -> travel
                               (as pcpp_core's value_passthrough; other self-attention replacements
                               see the whole image and are refused)
    patches['attn1_patch'|'attn2_patch']  ComfyUI's hypernetwork patch: per-token K/V MLPs        -> travel
                               (as pcpp_core's TokenwiseKV; other input patches are refused)
    everything else            refused with the kind named: the call runs on the host, visibly

A travelling patch must also be importable in a fresh worker process (module-level classes and
functions on the worker's path); a closure or a class a worker cannot import is refused too.
"""
from __future__ import annotations

import importlib.machinery
import pickle
import pickletools
import sys
from typing import Any

from pcpp_core.layers.attention import TokenwiseKV, value_passthrough

# why each core kind that is refused cannot run on a band (the kinds ComfyUI's own nodes use)
WHOLE_MAP = {
    "attn1_patch": "a self-attention input patch (HyperTile, ToMe, ...) that may reshape or mix tokens across "
                   "the whole image",
    "attn1_output_patch": "a self-attention output patch (HyperTile, ToMe, NAG, ...)",
    "attn2_patch": "a cross-attention input patch the pack has not verified per token",
    "attn2_output_patch": "a cross-attention output patch the pack has not verified per token",
    "input_block_patch": "a block patch that resamples the whole feature map (Deep Shrink)",
    "input_block_patch_after_skip": "a block patch that resamples the whole feature map (Deep Shrink)",
    "output_block_patch": "an output block patch that filters the whole feature map (FreeU's Fourier filter)",
    "middle_block_patch": "a middle block patch on the whole feature map",
}


def _is_pag(fn: Any) -> bool:
    return getattr(fn, "__module__", None) == "comfy_extras.nodes_pag" and \
        getattr(fn, "__name__", None) == "perturbed_attention"


def _as_hypernetwork(fn: Any) -> TokenwiseKV | None:
    """ComfyUI's hypernetwork patch (a class defined inside a function: no worker can unpickle it)
    as the equivalent TokenwiseKV, or None for anything else."""
    kind = type(fn)
    if kind.__module__ == "comfy_extras.nodes_hypernetwork" and kind.__name__ == "hypernetwork_patch":
        return TokenwiseKV(dict(fn.hypernet), float(fn.strength))
    return None


def _worker_can_import(obj: Any) -> str | None:
    """None when `obj` pickles and every module it refers to is importable from the worker's path."""
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # closures, lambdas, open handles
        return f"it cannot be pickled ({type(e).__name__}: {e})"
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            module = strings[-2]
            if module not in sys.modules or importlib.machinery.PathFinder.find_spec(module.split(".")[0]) is None:
                return f"a worker cannot import its module {module!r}"
        elif op.name == "GLOBAL":
            module = arg.split(" ")[0]
            if importlib.machinery.PathFinder.find_spec(module.split(".")[0]) is None:
                return f"a worker cannot import its module {module!r}"
    return None


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def travelling_patches(options: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """({'patches_replace': {...}} for the workers, None), or ({}, why the call must run on the host)."""
    patches: dict[str, list] = {}
    for kind, entries in (options.get("patches") or {}).items():
        if not entries:
            continue
        rebuilt = [_as_hypernetwork(fn) for fn in entries] if kind in ("attn1_patch", "attn2_patch") else [None]
        if any(fn is None for fn in rebuilt):
            why = WHOLE_MAP.get(kind, "a kind of patch the pack does not know")
            return {}, f"transformer_options['patches'][{kind!r}] holds {why}; the workers cannot run it on a band"
        patches[kind] = rebuilt
    sent: dict[str, dict] = {}
    for kind, entries in (options.get("patches_replace") or {}).items():
        if not entries:
            continue
        if kind not in ("attn1", "attn2"):
            return {}, f"transformer_options['patches_replace'][{kind!r}] replaces blocks the pack cannot split"
        out = {}
        for block, fn in entries.items():
            if kind == "attn1":
                if not _is_pag(fn):
                    return {}, (f"transformer_options['patches_replace']['attn1'] holds {_name(fn)} at {block}: a "
                                "self-attention replacement sees the whole image; only PerturbedAttentionGuidance's "
                                "runs on bands")
                fn = value_passthrough
            why = _worker_can_import(fn)
            if why is not None:
                return {}, f"transformer_options['patches_replace'][{kind!r}] holds {_name(fn)} at {block}: {why}"
            out[block] = fn
        sent[kind] = out
    return {**({"patches": patches} if patches else {}), **({"patches_replace": sent} if sent else {})}, None
