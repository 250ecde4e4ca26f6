"""Writes the example workflows: UI format (<name>.json, listed by ComfyUI's template browser) and
API format (api/<name>.api.json, the body of POST /prompt; the browser only lists workflows/*.json).

One description per graph, so the two formats cannot drift apart. Run from anywhere:

    python workflows/build_workflows.py                # the .json files
    python workflows/build_workflows.py --thumbnails   # also <name>.jpg, rendered by the built-in model

Stdlib only for the .json files: it knows the inputs of the few node types it uses (tests/comfy
checks them against a running ComfyUI's /object_info). The thumbnails run `python -m pcpp_core demo`
(torch, Pillow) on 2 CPU workers; the template browser shows <name>.jpg beside <name>.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
API_DIR = HERE / "api"  # ComfyUI lists */workflows/*.json as templates, not subfolders
SEED = "control_after_generate"  # a seed widget: the UI stores one more value after it

# type -> (linked inputs [(name, type)], widget names in order, outputs [(name, type)])
NODE_TYPES: dict[str, tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]] = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PCPPKSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        ["seed", SEED, "steps", "cfg", "sampler_name", "scheduler", "denoise",
         "devices", "neighbour_fraction", "mode", "warmup_steps", "cfg_split"],
        [("LATENT", "LATENT")]),
    "PCPPParallelModel": ([("model", "MODEL")], ["devices", "neighbour_fraction", "mode", "warmup_steps", "cfg_split"],
                          [("MODEL", "MODEL")]),
    "CFGGuider": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")], ["cfg"],
                  [("GUIDER", "GUIDER")]),
    "KSamplerSelect": ([], ["sampler_name"], [("SAMPLER", "SAMPLER")]),
    "BasicScheduler": ([("model", "MODEL")], ["scheduler", "steps", "denoise"], [("SIGMAS", "SIGMAS")]),
    "RandomNoise": ([], ["noise_seed", SEED], [("NOISE", "NOISE")]),
    "SamplerCustomAdvanced": (
        [("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
        [], [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "UNETLoader": ([], ["unet_name", "weight_dtype"], [("MODEL", "MODEL")]),
    "DualCLIPLoader": ([], ["clip_name1", "clip_name2", "type"], [("CLIP", "CLIP")]),
    "VAELoader": ([], ["vae_name"], [("VAE", "VAE")]),
    "ModelSamplingFlux": ([("model", "MODEL")], ["max_shift", "base_shift", "width", "height"], [("MODEL", "MODEL")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], ["guidance"], [("CONDITIONING", "CONDITIONING")]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
}

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
FLUX_DEV = "flux1-dev.safetensors"  # ComfyUI's Flux example: models/diffusion_models, text_encoders, vae
FLUX_TEXT = ("t5xxl_fp16.safetensors", "clip_l.safetensors")
FLUX_VAE = "ae.safetensors"
POSITIVE = "a photograph of a lighthouse on a rocky coast at sunset, dramatic clouds, highly detailed"
NEGATIVE = "blurry, low quality, watermark, text"


def engine(devices="auto", fraction=0.3, mode="pcpp", warmup=4, cfg_split=False) -> dict:
    return {"devices": devices, "neighbour_fraction": fraction, "mode": mode, "warmup_steps": warmup,
            "cfg_split": cfg_split}


def txt2img(ckpt: str, size: int, steps: int, cfg: float, sampler: str, scheduler: str, prefix: str,
            cfg_split: bool) -> dict[int, tuple]:
    """Checkpoint -> prompts -> PCPP KSampler -> VAE decode -> save. Node id -> (type, widgets, links)."""
    return {
        4: ("CheckpointLoaderSimple", {"ckpt_name": ckpt}, {}),
        6: ("CLIPTextEncode", {"text": POSITIVE}, {"clip": (4, 1)}),
        7: ("CLIPTextEncode", {"text": NEGATIVE}, {"clip": (4, 1)}),
        5: ("EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, {}),
        3: ("PCPPKSampler", {"seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
                             "denoise": 1.0, **engine(cfg_split=cfg_split)},
            {"model": (4, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (5, 0)}),
        8: ("VAEDecode", {}, {"samples": (3, 0), "vae": (4, 2)}),
        9: ("SaveImage", {"filename_prefix": prefix}, {"images": (8, 0)}),
    }


def parallel_model_custom_advanced() -> dict[int, tuple]:
    """PCPP Parallel Model makes a stock SamplerCustomAdvanced graph parallel."""
    return {
        4: ("CheckpointLoaderSimple", {"ckpt_name": SD15}, {}),
        10: ("PCPPParallelModel", engine(), {"model": (4, 0)}),
        6: ("CLIPTextEncode", {"text": POSITIVE}, {"clip": (4, 1)}),
        7: ("CLIPTextEncode", {"text": NEGATIVE}, {"clip": (4, 1)}),
        11: ("CFGGuider", {"cfg": 7.0}, {"model": (10, 0), "positive": (6, 0), "negative": (7, 0)}),
        12: ("KSamplerSelect", {"sampler_name": "euler"}, {}),
        13: ("BasicScheduler", {"scheduler": "normal", "steps": 20, "denoise": 1.0}, {"model": (10, 0)}),
        14: ("RandomNoise", {"noise_seed": 42}, {}),
        5: ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}),
        15: ("SamplerCustomAdvanced", {}, {"noise": (14, 0), "guider": (11, 0), "sampler": (12, 0),
                                           "sigmas": (13, 0), "latent_image": (5, 0)}),
        8: ("VAEDecode", {}, {"samples": (15, 0), "vae": (4, 2)}),
        9: ("SaveImage", {"filename_prefix": "PCPP/sd15_parallel_model"}, {"images": (8, 0)}),
    }


def flux_txt2img() -> dict[int, tuple]:
    """Flux dev as ComfyUI's own example builds it (diffusion model, T5-XXL + CLIP-L, ae VAE, FluxGuidance,
    CFG 1 so the zeroed negative is never evaluated) with PCPP KSampler in place of KSampler."""
    return {
        12: ("UNETLoader", {"unet_name": FLUX_DEV, "weight_dtype": "default"}, {}),
        30: ("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024},
             {"model": (12, 0)}),
        11: ("DualCLIPLoader", {"clip_name1": FLUX_TEXT[0], "clip_name2": FLUX_TEXT[1], "type": "flux"}, {}),
        6: ("CLIPTextEncode", {"text": POSITIVE}, {"clip": (11, 0)}),
        26: ("FluxGuidance", {"guidance": 3.5}, {"conditioning": (6, 0)}),
        33: ("ConditioningZeroOut", {}, {"conditioning": (6, 0)}),
        27: ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}),
        3: ("PCPPKSampler", {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                             "denoise": 1.0, **engine()},
            {"model": (30, 0), "positive": (26, 0), "negative": (33, 0), "latent_image": (27, 0)}),
        10: ("VAELoader", {"vae_name": FLUX_VAE}, {}),
        8: ("VAEDecode", {}, {"samples": (3, 0), "vae": (10, 0)}),
        9: ("SaveImage", {"filename_prefix": "PCPP/flux_dev"}, {"images": (8, 0)}),
    }


WORKFLOWS = {
    "sd15_txt2img_pcpp_ksampler": txt2img(SD15, 512, 20, 8.0, "euler", "normal", "PCPP/sd15", cfg_split=False),
    "sdxl_txt2img_pcpp_cfg_split": txt2img(SDXL, 1024, 25, 7.0, "dpmpp_2m", "karras", "PCPP/sdxl", cfg_split=True),
    "sd15_parallel_model_sampler_custom_advanced": parallel_model_custom_advanced(),
    "flux_dev_txt2img_pcpp_ksampler": flux_txt2img(),
}

# the model family the band diagram estimates bytes for (node property `pcpp_model`, a preset of
# web/pcpp_diagram.js the user switches by clicking its name; SD1.x when unset), from the graph's model file
DIAGRAM_MODEL = {SDXL: "sdxl", FLUX_DEV: "flux"}
PCPP_NODES = {"PCPPKSampler", "PCPPParallelModel"}
LOADERS = {"CheckpointLoaderSimple", "UNETLoader"}


def api_format(graph: dict[int, tuple]) -> dict[str, dict]:
    out = {}
    for node_id, (kind, widgets, links) in graph.items():
        inputs = dict(widgets)
        inputs.update({name: [str(src), slot] for name, (src, slot) in links.items()})
        out[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": kind}}
    return out


# [width, height] a node gets in ComfyUI's front end 1.49.6 once drawn (the PCPP nodes: with their band
# diagram at this width), rounded up; the layout below keeps every node clear of the others at these
# sizes, which tests/browser/workflows.test.mjs measures after loading each workflow.
SIZES: dict[str, tuple[int, int]] = {
    "CheckpointLoaderSimple": (315, 98),
    "CLIPTextEncode": (400, 200),
    "EmptyLatentImage": (315, 106),
    "VAEDecode": (210, 46),
    "SaveImage": (315, 270),
    "PCPPKSampler": (460, 640),
    "PCPPParallelModel": (460, 420),
    "CFGGuider": (315, 98),
    "KSamplerSelect": (315, 58),
    "BasicScheduler": (315, 106),
    "RandomNoise": (315, 82),
    "SamplerCustomAdvanced": (272, 126),
    "UNETLoader": (315, 82),
    "DualCLIPLoader": (315, 130),
    "VAELoader": (315, 58),
    "ModelSamplingFlux": (315, 130),
    "FluxGuidance": (317, 58),
    "ConditioningZeroOut": (222, 26),
    "EmptySD3LatentImage": (315, 106),
}
TITLE = 30  # the title bar, drawn above a node's pos
GAP = (60, 40)  # between columns, between nodes in a column (title bars not counted)


def columns(graph: dict[int, tuple]) -> dict[int, int]:
    """Column of each node, left to right along the links: a node one right of its furthest input; a node
    without inputs just left of its first consumer, so every link runs rightwards and short."""
    col: dict[int, int] = {}

    def depth(node_id: int) -> int:
        if node_id not in col:
            col[node_id] = 1 + max((depth(src) for src, _ in graph[node_id][2].values()), default=-1)
        return col[node_id]

    for node_id in graph:
        depth(node_id)
    for node_id, (_, _, links) in graph.items():
        if not links:
            consumers = [col[dst] for dst, (_, _, l) in graph.items() if any(src == node_id for src, _ in l.values())]
            col[node_id] = max(0, min(consumers, default=1) - 1)
    return col


def layout(graph: dict[int, tuple]) -> dict[int, list[int]]:
    """pos of each node: columns as wide as their widest node, nodes stacked in graph order."""
    col = columns(graph)
    widths = [max(SIZES[graph[n][0]][0] for n in graph if col[n] == c) for c in range(max(col.values()) + 1)]
    pos, bottom = {}, [60] * len(widths)
    for node_id, (kind, _, _) in graph.items():
        c = col[node_id]
        y = bottom[c] + TITLE
        pos[node_id] = [40 + sum(widths[:c]) + GAP[0] * c, y]
        bottom[c] = y + SIZES[kind][1] + GAP[1]
    return pos


def diagram_model(graph: dict[int, tuple]) -> str | None:
    """The diagram preset for the model file the graph loads (None: the diagram's default, SD1.x)."""
    files = [w.get("ckpt_name", w.get("unet_name")) for kind, w, _ in graph.values() if kind in LOADERS]
    return next((DIAGRAM_MODEL[f] for f in files if f in DIAGRAM_MODEL), None)


def ui_format(graph: dict[int, tuple]) -> dict:
    """LiteGraph's workflow JSON, the format the ComfyUI frontend saves and loads by drag-and-drop."""
    links, nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node_id, (kind, _, node_links) in graph.items():
        linked = dict(NODE_TYPES[kind][0])
        for name, (src, slot) in node_links.items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, node_id, [n for n, _ in NODE_TYPES[kind][0]].index(name), linked[name]])
            outgoing.setdefault((src, slot), []).append(link_id)
    by_dst = {(l[3], l[4]): l[0] for l in links}
    pos = layout(graph)
    model = diagram_model(graph)
    for order, (node_id, (kind, widgets, _)) in enumerate(graph.items()):
        linked, widget_names, outputs = NODE_TYPES[kind]
        values = []
        for name in widget_names:
            values.append("randomize" if name == SEED else widgets[name])
        nodes.append({
            "id": node_id, "type": kind, "pos": pos[node_id], "size": list(SIZES[kind]),
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": by_dst.get((node_id, i))} for i, (n, t) in enumerate(linked)],
            "outputs": [{"name": n, "type": t, "links": outgoing.get((node_id, i), []), "slot_index": i}
                        for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": kind,
                           **({"pcpp_model": model} if model and kind in PCPP_NODES else {})},
            "widgets_values": values,
        })
    return {"last_node_id": max(graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


# the built-in model's training image drawn for each template's thumbnail (its prompt is no text)
THUMBNAILS = {
    "sd15_txt2img_pcpp_ksampler": "astronaut",
    "sdxl_txt2img_pcpp_cfg_split": "coffee",
    "sd15_parallel_model_sampler_custom_advanced": "rocket",
    "flux_dev_txt2img_pcpp_ksampler": "chelsea",
}


def thumbnail(name: str, size: int = 64, shown: int = 256) -> None:
    """<name>.jpg: the parallel image of `python -m pcpp_core demo` (2 CPU workers, mode pcpp, f=0.3)."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.png"
        subprocess.run([sys.executable, "-m", "pcpp_core", "demo", "--devices", "cpu:2", "--size", str(size),
                        "--image", THUMBNAILS[name], "--out", str(out)], cwd=HERE.parent, check=True)
        with Image.open(out) as row:  # one process | parallel | difference, side by side
            picture = row.crop((size, 0, 2 * size, size)).convert("RGB")
    picture.resize((shown, shown), Image.Resampling.LANCZOS).save(HERE / f"{name}.jpg", quality=90)


def main(argv: list[str]) -> None:
    API_DIR.mkdir(exist_ok=True)
    for name, graph in WORKFLOWS.items():
        (HERE / f"{name}.json").write_text(json.dumps(ui_format(graph), indent=2) + "\n")
        (API_DIR / f"{name}.api.json").write_text(json.dumps(api_format(graph), indent=2) + "\n")
        if "--thumbnails" in argv:
            thumbnail(name)


if __name__ == "__main__":
    main(sys.argv[1:])
