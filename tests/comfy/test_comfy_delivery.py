"""Model delivery in a headless ComfyUI: LoRA changes send patches only, no /dev/shm, cleanup on exit.

Each server gets its own TMPDIR (and staging dir) so other test runs on the machine cannot
confuse the checks. Where `unshare -m` is permitted, servers run in a private mount namespace
with a 1 MB tmpfs on /dev/shm (far smaller than the model), as in a Docker container.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_comfy_server import COMFY_HOME, COMFYUI_PATH, RANDOM_CHECKPOINT, REPO, Server, _free_port, why
from test_comfy_sampling import rel_close

pytestmark = pytest.mark.comfy

SMALL_SHM = "mount -t tmpfs -o size=1m pcpp-test-shm /dev/shm"
LORA = "pcpp_test_lora.safetensors"
LORA_TARGETS = ("attn1.to_q.weight", "attn2.to_v.weight", "ff.net.2.weight", "proj_in.weight")


def _unshare_ok() -> str | None:
    """None when this machine lets us mount in a private namespace, else why not."""
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", SMALL_SHM], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare is not available ({e})"
    return None if r.returncode == 0 else f"unshare -m / mount is not permitted here: {r.stderr.strip()}"


UNSHARE = _unshare_ok()


def make_lora(path: Path, seed: int = 0) -> int:
    """A random LoRA whose keys match the random checkpoint's UNet; returns its tensor bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(RANDOM_CHECKPOINT), "pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model.") and key.endswith(LORA_TARGETS):
                shape = f.get_slice(key).get_shape()
                name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                tail = [1] * (len(shape) - 2)  # 1x1 convs: [out, r, 1, 1] @ [r, in, 1, 1]
                out[f"{name}.lora_up.weight"] = (torch.randn([shape[0], 4, *tail], generator=g) * 0.2).half()
                out[f"{name}.lora_down.weight"] = (torch.randn([4, shape[1], *tail], generator=g) * 0.2).half()
                out[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(out, str(path))
    return sum(t.numel() * t.element_size() for t in out.values())


def start_server(root: Path, name: str, env: dict[str, str], namespace: str | None = None,
                 tmp: Path | None = None) -> Server:
    """A server on a fresh base dir under `root`, its own TMPDIR; `namespace`: shell run first under unshare -m."""
    base = root / name
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-PCPP").symlink_to(REPO, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "tiny.safetensors").symlink_to(RANDOM_CHECKPOINT)
    (base / "models" / "loras").mkdir(parents=True)
    if (root / LORA).is_file():
        (base / "models" / "loras" / LORA).symlink_to(root / LORA)
    tmp = tmp or root / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, str(Path(COMFYUI_PATH) / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base)]
    if (COMFY_HOME / "frontend-stub").is_dir():
        cmd += ["--front-end-root", str(COMFY_HOME / "frontend-stub")]
    if namespace is not None:  # unshare execs sh, sh execs python: the Popen pid is the server's
        cmd = ["unshare", "-m", "sh", "-c", f'{namespace} && exec "$0" "$@"', *cmd]
    full_env = {k: v for k, v in os.environ.items() if k != "PCPP_STAGING_DIR"}
    full_env.update(TMPDIR=str(tmp), **env)
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=base, env=full_env)
    srv = Server(f"http://127.0.0.1:{port}", base, proc, log)
    srv.tmp = tmp
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{srv.tail()}"
        try:
            srv.call("/system_stats")
            return srv
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, f"the server did not answer within 180 s:\n{srv.tail()}"
            time.sleep(0.5)


def stop(srv: Server, sig: int = signal.SIGTERM) -> None:
    if srv.proc.poll() is None:
        srv.proc.send_signal(sig)
        try:
            srv.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()
    deadline = time.monotonic() + 10  # the workers notice their host is gone within half a second
    while _pcpp_children(srv.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _pcpp_children(pid: int) -> list[int]:
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"pcpp_core.worker" in Path(f"/proc/{p}/cmdline").read_bytes() and _ppid(int(p)) == pid:
                found.append(int(p))
        except OSError:
            continue
    return found


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def pcpp_entries(directory: Path | str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if "pcpp" in n)
    except FileNotFoundError:
        return []


def graph(strength: float | None, fraction: float = 0.3, seed: int = 11, stock: bool = True) -> dict:
    """Checkpoint (-> LoraLoader) -> stock KSampler and PCPP KSampler (sync, cpu:2), latents saved."""
    model = ["ckpt", 0]
    g: dict = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}}}
    if strength is not None:
        g["lora"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": ["ckpt", 1], "lora_name": LORA,
                                                             "strength_model": strength, "strength_clip": 0.0}}
        model = ["lora", 0]
    sampler = {"seed": seed, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
               "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0]}
    g.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "pcpp": {"class_type": "PCPPKSampler", "inputs": {**sampler, "devices": "cpu:2", "neighbour_fraction": fraction,
                                                          "mode": "sync", "warmup_steps": 1, "cfg_split": False}},
        "save_pcpp": {"class_type": "SaveLatent", "inputs": {"samples": ["pcpp", 0], "filename_prefix": "pcpp"}},
    })
    if stock:
        g["stock"] = {"class_type": "KSampler", "inputs": sampler}
        g["save_stock"] = {"class_type": "SaveLatent", "inputs": {"samples": ["stock", 0], "filename_prefix": "stock"}}
    return g


def run_ok(srv: Server, g: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run a prompt that must succeed: (the PCPP node's stats, latents by save node)."""
    from safetensors.torch import load_file

    entry = srv.run(g)
    assert entry["status"]["status_str"] == "success", why(entry)
    latents = {}
    for node, out in entry["outputs"].items():
        for f in out.get("latents", []):
            latents[node] = load_file(str(srv.base / "output" / f.get("subfolder", "") / f["filename"]))["latent_tensor"]
    [stats] = entry["outputs"]["pcpp"]["pcpp_stats"]
    assert stats["fallback"] is None and stats["bands"] == 2, stats
    return stats, latents


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    if not RANDOM_CHECKPOINT.is_file():
        pytest.skip(f"{RANDOM_CHECKPOINT} is missing: run ../shared/comfyui/setup.sh (or set PCPP_COMFYUI_HOME)")
    path = tmp_path_factory.mktemp("delivery")
    return SimpleNamespace(path=path, lora_bytes=make_lora(path / LORA))


@pytest.fixture(scope="module")
def lora_server(root):
    """/dev/shm is a 1 MB tmpfs where unshare is permitted (else the machine's own)."""
    srv = start_server(root.path, "lora", {}, None if UNSHARE else SMALL_SHM)
    yield srv
    stop(srv)


def test_lora_strengths_match_stock_send_patches_only_and_return_to_base(root, lora_server):
    srv = lora_server
    base_stats, base = run_ok(srv, graph(None))
    rel_close(base["save_pcpp"], base["save_stock"])
    model_bytes = base_stats["model_bytes_sent"]
    assert model_bytes > 20 * root.lora_bytes, base_stats  # the first prompt sends the base model
    assert base_stats["weights_on"] == ["cpu", "cpu", "cpu (host)"]

    sent, results = [], []
    for strength in (1.0, 0.5):
        stats, out = run_ok(srv, graph(strength))
        rel_close(out["save_pcpp"], out["save_stock"])
        sent.append(stats["model_bytes_sent"])
        results.append(out["save_pcpp"])
    assert (results[0] - results[1]).abs().max() > 1e-3 and (results[0] - base["save_pcpp"]).abs().max() > 1e-3
    # the LoRA's UNet tensors (plus a little pickling), never the model: a strength change costs the same
    assert root.lora_bytes <= sent[1] <= root.lora_bytes * 1.05 + 65536, (sent, root.lora_bytes)
    assert sent[0] == sent[1] and sent[1] < model_bytes / 20

    # without the LoRA: the workers restore their backups, nothing is sent, the result is the base one exactly
    stats, out = run_ok(srv, graph(None, fraction=0.31, stock=False))  # fraction: unused in sync, defeats the cache
    assert stats["model_bytes_sent"] == 0, stats
    assert torch.equal(out["save_pcpp"], base["save_pcpp"])


def test_a_dev_shm_smaller_than_the_model_is_not_used(root, lora_server):
    if UNSHARE:
        pytest.skip(UNSHARE)
    shm = f"/proc/{lora_server.proc.pid}/root/dev/shm"  # the server's own /dev/shm, in its namespace
    st = os.statvfs(shm)
    stats, _ = run_ok(lora_server, graph(None, seed=12, stock=False))
    assert st.f_blocks * st.f_frsize <= 1 << 20  # 1 MB, the model is ~100 MB: the runs above passed anyway
    assert pcpp_entries(shm) == []
    assert pcpp_entries(lora_server.tmp), "the pool's rendezvous dir lives in the server's TMPDIR"


@pytest.fixture(scope="module")
def tiny_stage_server(root):
    """PCPP_STAGING_DIR on a 1 MB tmpfs (where unshare is permitted; else a plain server)."""
    stage = root.path / "tiny-stage"
    stage.mkdir()
    if UNSHARE:
        srv = start_server(root.path, "tiny", {})
    else:
        srv = start_server(root.path, "tiny", {"PCPP_STAGING_DIR": str(stage)},
                           f"{SMALL_SHM} && mount -t tmpfs -o size=1m pcpp-test-stage {stage}")
    srv.stage = stage
    yield srv
    stop(srv)


def test_too_small_staging_dir_fails_the_prompt_naming_it_and_the_server_serves_on(tiny_stage_server):
    if UNSHARE:
        pytest.skip(UNSHARE)
    srv, stage = tiny_stage_server, tiny_stage_server.stage
    entry = srv.run(graph(None, stock=False))
    assert entry["status"]["status_str"] == "error"
    message = why(entry)
    assert "StagingError" in message and str(stage) in message and "PCPP_STAGING_DIR" in message, message
    assert "bytes" in message
    assert srv.call("/system_stats")
    g = graph(None, seed=13)
    del g["pcpp"], g["save_pcpp"]  # plain ComfyUI still samples
    entry = srv.run(g)
    assert entry["status"]["status_str"] == "success", why(entry)


def test_nothing_named_pcpp_remains_after_sigterm_or_after_sigkill_and_the_next_start(root, lora_server,
                                                                                      tiny_stage_server):
    tmp = lora_server.tmp
    shm = f"/proc/{lora_server.proc.pid}/root/dev/shm"
    assert pcpp_entries(tmp), "a pool is running: its rendezvous dir exists"
    assert pcpp_entries(shm) == [] and not [n for n in pcpp_entries("/dev/shm") if f"-{lora_server.proc.pid}-" in n]
    stop(lora_server, signal.SIGTERM)
    assert lora_server.proc.returncode is not None
    assert pcpp_entries(tmp) == [], pcpp_entries(tmp)

    killed = tiny_stage_server
    if not pcpp_entries(killed.tmp):  # no PCPP prompt ran there yet: start its pool (the prompt may fail)
        killed.run(graph(None, seed=14, stock=False))
    left = pcpp_entries(killed.tmp)
    stop(killed, signal.SIGKILL)
    assert left and pcpp_entries(killed.tmp) == left  # SIGKILL: no handler runs, the dir stays...
    again = start_server(root.path, "again", {}, None if UNSHARE else SMALL_SHM, tmp=killed.tmp)
    try:
        run_ok(again, graph(None, seed=15, stock=False))
        assert not set(pcpp_entries(killed.tmp)) & set(left)  # ...until the next pool starts and sweeps it
    finally:
        stop(again, signal.SIGTERM)
    assert pcpp_entries(killed.tmp) == []
    assert not [n for n in pcpp_entries("/dev/shm") if f"-{killed.proc.pid}-" in n or f"-{again.proc.pid}-" in n]


# -- one copy per GPU, in process: ComfyUI's real model management on the CPU ----------------

from test_comfy_sampling import inputs, pcpp, sample, unet  # noqa: E402,F401  (fixtures and helpers)


def test_offload_unloads_the_hosts_loaded_copy_through_comfyui(comfy, unet):
    delivery = comfy.hook.delivery
    mm = comfy.model_management
    mm.load_models_gpu([unet])
    assert any(lm.model.model is unet.model for lm in mm.current_loaded_models)
    assert delivery.offload_host_copy(unet) is True
    assert not any(lm.model.model is unet.model for lm in mm.current_loaded_models)
    assert delivery.offload_host_copy(unet) is False  # nothing loaded any more


def test_a_run_that_shares_the_hosts_gpu_samples_on_the_offload_device(comfy, unet, inputs, monkeypatch):
    """Forced on the CPU (load and offload device are both the CPU): the wiring, not the memory."""
    ref = sample(comfy, unet, inputs)
    seen = []
    real = comfy.hook.delivery.host_device_for_run

    def spy(patcher, devices):
        seen.append((patcher.load_device, devices))
        monkeypatch.setattr(comfy.hook.delivery, "host_copy_must_go", lambda host, workers: True)
        return real(patcher, devices)

    monkeypatch.setattr(comfy.hook.delivery, "host_device_for_run", spy)
    model, hook = pcpp(comfy, unet, mode="sync")
    rel_close(sample(comfy, model, inputs), ref)
    assert seen and seen[0][1] == ("cpu", "cpu")
    assert hook.last_stats["weights_on"] == ["cpu", "cpu", "cpu (host)"] and hook.last_stats["fallback"] is None
    assert model.load_device == unet.load_device  # restored after the run


def test_a_first_run_with_a_lora_sends_the_unpatched_base_from_comfyuis_backups(comfy, unet, inputs):
    """The host's weights are patched in place while sampling: the base must come from the backups,
    or the workers would apply the patch twice."""
    plain_ref = sample(comfy, unet, inputs)
    patched = unet.clone()
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    weight = unet.model.state_dict()[key]
    patched.add_patches({key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)) * 0.05,)}, 1.0)
    ref = sample(comfy, patched, inputs)
    unet.model.__dict__.pop(comfy.hook.delivery._TOKEN, None)  # a base model the workers have not seen
    model, hook = pcpp(comfy, patched, mode="sync")
    rel_close(sample(comfy, model, inputs), ref)
    model_bytes = sum(t.numel() * t.element_size() for t in unet.model.diffusion_model.state_dict().values())
    assert hook.last_stats["model_bytes_sent"] > model_bytes  # base + patch
    model, hook = pcpp(comfy, unet, mode="sync")
    rel_close(sample(comfy, model, inputs), plain_ref)
    assert hook.last_stats["model_bytes_sent"] == 0  # dropping the patch: the workers restore their backups
