"""PCPP Parallel Model's stats in the headless API's /history (issue 10 item 5).

The node runs before the sampler, so its UI dict is filled after the run, in place (nodes/hook.py
publish); each prompt's /history entry must hold that prompt's own run, never a cached earlier one.
One headless server (test_comfy_server.comfy_server) runs every prompt here.
"""
from __future__ import annotations

import pytest

from test_comfy_server import comfy_server, why

pytestmark = pytest.mark.comfy

PM = "10"  # PCPP Parallel Model's node id in the prompts below


def prompt(seed: int, steps: int = 3, freeu: bool = False, save: str | None = None) -> dict:
    """CheckpointLoader -> [FreeU_V2] -> PCPP Parallel Model (cpu:2, sync) -> KSampler -> VAEDecode ->
    PreviewImage (or SaveImage with the prefix `save`)."""
    model = ["4", 0]
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": [PM, 0], "seed": seed, "steps": steps, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["6", 0],
                                                   "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    if save is not None:
        g["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": save}}
    if freeu:
        g["11"] = {"class_type": "FreeU_V2", "inputs": {"model": model, "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}}
        model = ["11", 0]
    g[PM] = {"class_type": "PCPPParallelModel", "inputs": {"model": model, "devices": "cpu:2", "mode": "sync",
                                                           "neighbour_fraction": 0.3, "warmup_steps": 4,
                                                           "cfg_split": False}}
    return g


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with comfy_server(tmp_path_factory.mktemp("comfy-history")) as srv:
        yield srv


def stats_of(server, entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", f"{why(entry)}\n{server.tail()}"
    [stats] = entry["outputs"][PM]["pcpp_stats"]
    return stats


def runs_logged(server) -> int:
    return server.log.read_text(errors="replace").count("PCPP run:")


def test_each_prompts_history_holds_its_own_runs_stats(server):
    first = server.run(prompt(seed=101, steps=3))
    one = stats_of(server, first)
    assert one["fallback"] is None and one["partial"] is None and one["devices"] == ["cpu", "cpu"]
    assert (one["mode"], one["bands"], one["calls"], one["height"]) == ("sync", 2, 3, 16)

    second = server.run(prompt(seed=102, steps=2))  # the Parallel Model's own inputs unchanged
    two = stats_of(server, second)
    assert two["fallback"] is None and two["calls"] == 2  # this prompt's run, not the first one's
    assert stats_of(server, server.call(f"/history/{first['prompt'][1]}")[first["prompt"][1]]) == one  # unchanged

    runs = runs_logged(server)
    again = server.run(prompt(seed=102, steps=2))  # the same prompt again: all cached, nothing runs
    assert again["status"]["status_str"] == "success" and runs_logged(server) == runs
    assert PM not in again["outputs"]  # ComfyUI lists no cached node but the output nodes: no stale stats


def test_a_fallback_reaches_history(server):
    stats = stats_of(server, server.run(prompt(seed=103, freeu=True)))
    assert "FreeU" in stats["fallback"] and stats["calls"] == 3 and stats["bands"] == 1


def test_a_change_after_the_sampler_does_not_sample_again(server):
    first = stats_of(server, server.run(prompt(seed=104, save="pcpp_a")))
    assert first["calls"] == 3
    runs = runs_logged(server)
    again = server.run(prompt(seed=104, save="pcpp_b"))  # only SaveImage changed: the sampler stays cached
    assert again["status"]["status_str"] == "success", why(again)
    assert runs_logged(server) == runs and "9" in again["outputs"]
