"""Headless ComfyUI (--cpu, loopback) with the pack in custom_nodes: what a user and a script see.

The server runs the example workflows from workflows/api/ through POST /prompt. Model files are
the random-weight ones from the ComfyUI test setup, linked under the names the workflows use;
the SDXL workflow gets the SD1.5-architecture file under the SDXL name (a random SDXL with its
CLIP-G is several GB), which still runs its graph, cfg_split included. Sizes and step counts are
cut down for the CPU, and devices=cpu:2 makes the engine start real worker processes inside
the server (where a multiprocessing spawn would re-run main.py). The Flux workflow gets a random
tiny Flux file (tiny_flux.py) under its name, a 16-channel random TAESD under its VAE's name, and
the random CLIP-L through CLIPLoader in place of DualCLIPLoader (a random T5-XXL is 4.7 B
parameters; the tiny Flux reads CLIP-L's 768-wide states): its graph from UNETLoader to
FluxGuidance and PCPP KSampler at CFG 1 is what runs.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")  # conftest skips every test here when it is unusable
WORKFLOWS = REPO / "workflows"  # UI format: ComfyUI's template browser lists workflows/*.json
API_WORKFLOWS = sorted((WORKFLOWS / "api").glob("*.api.json"))  # POST /prompt bodies, not listed
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
COMFY_HOME = Path(os.environ.get("PCPP_COMFYUI_HOME", Path(COMFYUI_PATH or ".").resolve().parent))
RANDOM_CHECKPOINT = COMFY_HOME / "models" / "checkpoints" / "tiny_sd15_random.safetensors"
RANDOM_CLIP_L = COMFY_HOME / "models" / "text_encoders" / "random_clip_l.safetensors"
ENGINE_INPUTS = ("devices", "neighbour_fraction", "mode", "warmup_steps", "cfg_split", "exchange", "far_refresh")
OPTIONAL_INPUTS = ("exchange", "far_refresh")  # optional: API prompts written before it still validate
_seed = iter(range(int(time.time()) % 100000, 10**9))  # the server caches identical prompts


class Server:
    def __init__(self, url: str, base: Path, proc: subprocess.Popen, log: Path):
        self.url, self.base, self.proc, self.log = url, base, proc, log

    def call(self, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
        return json.loads(body) if body else {}  # /interrupt answers with an empty body

    def run(self, graph: dict, timeout: float = 300, prompt_id: str | None = None) -> dict:
        """POST /prompt (unless `prompt_id` is already queued), then poll /history until the prompt
        is done; returns its history entry."""
        if prompt_id is None:
            prompt_id = self.call("/prompt", {"prompt": graph, "client_id": str(uuid.uuid4())})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.call(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"] != "":
                return entry
            assert self.proc.poll() is None, f"the server died:\n{self.tail()}"
            time.sleep(0.25)
        pytest.fail(f"prompt {prompt_id} not done within {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def why(entry: dict) -> str:
    """The error of a failed prompt, short: its message and the end of its traceback."""
    for kind, msg in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{msg['node_type']}: {msg['exception_message']}\n{''.join(msg['traceback'][-3:])}"
    return entry["status"]["status_str"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfy):
    base = tmp_path_factory.mktemp("comfy-base")
    flux_unloadable = _flux_models(base / "models")
    with comfy_server(base) as srv:
        srv.flux_unloadable = flux_unloadable
        yield srv


def _flux_models(models: Path) -> str | None:
    """The Flux workflow's model files as random stand-ins (see the module docstring); returns why this
    ComfyUI cannot load the tiny Flux file (None: it can)."""
    import tiny_flux

    sd = None
    for node in _api_nodes("UNETLoader"):
        sd = tiny_flux.write(models / "diffusion_models" / node["inputs"]["unet_name"])
    for node in _api_nodes("VAELoader"):
        tiny_flux.write_vae(models / "vae" / node["inputs"]["vae_name"])
    (models / "text_encoders").mkdir(parents=True, exist_ok=True)
    (models / "text_encoders" / RANDOM_CLIP_L.name).symlink_to(RANDOM_CLIP_L)
    return None if sd is None else tiny_flux.unloadable_reason(sd)


def _api_nodes(class_type: str) -> list[dict]:
    return [node for p in API_WORKFLOWS for node in json.loads(p.read_text()).values()
            if node["class_type"] == class_type]


def _environ() -> dict[str, str]:
    """The test's environment without the pack's server limits: each server states its own."""
    return {k: v for k, v in os.environ.items() if k not in ("PCPP_MAX_WORKERS", "PCPP_POOL_IDLE_S")}


@contextlib.contextmanager
def comfy_server(base: Path, env: dict[str, str] | None = None, cpus: set[int] | None = None):
    """A headless ComfyUI in `base` with the pack linked in; `env` added to its environment,
    `cpus` its affinity mask (the cores it may use)."""
    if not RANDOM_CHECKPOINT.is_file():
        pytest.skip(f"{RANDOM_CHECKPOINT} is missing: run ../shared/comfyui/setup.sh (or set PCPP_COMFYUI_HOME)")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-PCPP").symlink_to(REPO, target_is_directory=True)
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    names = {node["inputs"]["ckpt_name"] for p in API_WORKFLOWS for node in json.loads(p.read_text()).values()
             if node["class_type"] == "CheckpointLoaderSimple"}
    for name in names:
        (checkpoints / name).symlink_to(RANDOM_CHECKPOINT)
    port = _free_port()
    log = base / "server.log"
    cmd = [sys.executable, str(Path(COMFYUI_PATH) / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base)]
    if (COMFY_HOME / "frontend-stub").is_dir():
        cmd += ["--front-end-root", str(COMFY_HOME / "frontend-stub")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=base, env={**_environ(), **(env or {})},
                                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    srv = Server(f"http://127.0.0.1:{port}", base, proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{srv.tail()}"
            try:
                srv.call("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"the server did not answer within 180 s:\n{srv.tail()}"
                time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()  # the workers watch their parent and exit with it
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def object_info(server):
    return server.call("/object_info")


def small(graph: dict, devices: str | None = "cpu:2") -> dict:
    """The workflow cut down for a CPU: 128x128 images, 3 steps, a fresh seed, `devices` for every PCPP node
    (and CLIP-L alone for Flux's two text encoders)."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage", "ModelSamplingFlux"):
            inputs.update(width=128, height=128)
        if node["class_type"] == "DualCLIPLoader":  # T5-XXL + CLIP-L -> the random CLIP-L alone
            node.update(class_type="CLIPLoader", inputs={"clip_name": RANDOM_CLIP_L.name, "type": "stable_diffusion"})
        for key in ("seed", "noise_seed"):
            if key in inputs:
                inputs[key] = next(_seed)
        if "steps" in inputs:
            inputs["steps"] = 3
        if devices is not None and "devices" in inputs:
            inputs["devices"] = devices
    return graph


def outputs_of(server: Server, entry: dict) -> tuple[list[Path], list[dict]]:
    files, stats = [], []
    for out in entry["outputs"].values():
        files += [server.base / "output" / f.get("subfolder", "") / f["filename"] for f in out.get("images", [])]
        stats += out.get("pcpp_stats", [])
    return files, stats


def test_object_info_lists_both_nodes_with_their_inputs(object_info):
    ksampler = ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image",
                "denoise")
    for node_id, display, extra in (("PCPPKSampler", "PCPP KSampler (multi-GPU)", ksampler),
                                    ("PCPPParallelModel", "PCPP Parallel Model (multi-GPU)", ("model",))):
        info = object_info[node_id]
        assert info["display_name"] == display and info["category"] == "sampling/pcpp"
        required = info["input"]["required"]
        optional = info["input"].get("optional", {})
        assert set(required) == set(extra) | set(ENGINE_INPUTS) - set(OPTIONAL_INPUTS)
        assert set(optional) == set(OPTIONAL_INPUTS)
        for name, (_, options) in {**required, **optional}.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert optional["exchange"][1]["options"] == ["none", "int8", "residual-2bit", "residual-1bit"]
        assert (optional["far_refresh"][0], optional["far_refresh"][1]["default"]) == ("INT", 0)
        frac = required["neighbour_fraction"][1]
        assert (required["neighbour_fraction"][0], frac["default"], frac["min"], frac["max"], frac["step"]) == \
            ("FLOAT", 0.3, 0.0, 2.0, 0.05)
        assert required["mode"][1]["options"] == ["pcpp", "distrifusion", "naive", "sync", "off"]
        assert (required["devices"][0], required["devices"][1]["default"]) == ("STRING", "auto")
        assert (required["warmup_steps"][1]["default"], required["warmup_steps"][1]["min"]) == (4, 0)
        assert (required["cfg_split"][0], required["cfg_split"][1]["default"]) == ("BOOLEAN", False)
    assert object_info["PCPPKSampler"]["output"] == ["LATENT"]
    assert object_info["PCPPParallelModel"]["output"] == ["MODEL"]


def test_the_log_names_the_pack_version_once_at_load(server):
    from pcpp_core.version import __version__  # the one pyproject.toml equals (tests/unit/test_pyproject.py)

    lines = [l for l in server.tail(100_000).splitlines() if "ComfyUI-PCPP" in l and " loaded" in l]
    assert len(lines) == 1 and f"ComfyUI-PCPP {__version__} loaded" in lines[0], lines


def test_node_search_finds_the_nodes_by_what_users_type(object_info):
    """The front end searches name, display_name and search_aliases; ComfyUI sends aliases where its V3
    Schema has them (0.33.0; v0.8.0 has none, there the display names carry "multi-GPU" and "Parallel")."""
    has_aliases = "search_aliases" in (Path(COMFYUI_PATH) / "comfy_api" / "latest" / "_io.py").read_text()
    for node_id in ("PCPPKSampler", "PCPPParallelModel"):
        info = object_info[node_id]
        assert "multi-GPU" in info["display_name"]
        if has_aliases:
            assert {"multi-GPU", "parallel", "patch parallel", "DistriFusion"} <= set(info["search_aliases"])
        else:
            assert "search_aliases" not in info


def test_bad_fraction_is_rejected_naming_it_and_the_server_serves_the_next_prompt(server):
    graph = small(json.loads((WORKFLOWS / "api" / "sd15_txt2img_pcpp_ksampler.api.json").read_text()))
    bad = copy.deepcopy(graph)
    bad["3"]["inputs"]["neighbour_fraction"] = -1.0
    with pytest.raises(urllib.error.HTTPError) as err:
        server.call("/prompt", {"prompt": bad})
    assert err.value.code == 400
    errors = json.loads(err.value.read())["node_errors"]["3"]["errors"]
    assert [e["extra_info"]["input_name"] for e in errors] == ["neighbour_fraction"]
    assert "neighbour_fraction" in errors[0]["details"]
    bad["3"]["inputs"].update(neighbour_fraction=0.3, devices="gpu:7")  # unparseable devices: rejected too
    with pytest.raises(urllib.error.HTTPError) as err:
        server.call("/prompt", {"prompt": bad})
    assert "devices" in json.dumps(json.loads(err.value.read())["node_errors"]["3"])
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", why(entry)


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.name)
def test_api_workflow_runs_in_parallel(server, path):
    graph = json.loads(path.read_text())
    if server.flux_unloadable and any(node["class_type"] == "UNETLoader" for node in graph.values()):
        pytest.skip(server.flux_unloadable)
    entry = server.run(small(graph))
    assert entry["status"]["status_str"] == "success", f"{why(entry)}\n{server.tail()}"
    files, stats = outputs_of(server, entry)
    assert files and all(f.is_file() and f.stat().st_size > 0 for f in files)
    assert stats  # either node's UI output (PCPP Parallel Model's is filled after its sampler ran)
    for s in stats:
        assert s["fallback"] is None and s["devices"] == ["cpu", "cpu"] and s["calls"] > 0
        assert (s["height"], s["width"]) == (16, 16) and s["bands"] == (1 if "cfg_split" in path.name else 2)


def test_cancel_stops_the_run_and_the_next_prompt_starts_clean(server):
    graph = small(json.loads((WORKFLOWS / "api" / "sd15_txt2img_pcpp_ksampler.api.json").read_text()))
    graph["3"]["inputs"]["steps"] = 500  # far longer than the test waits
    prompt_id = server.call("/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.monotonic() + 120
    while not re.search(r"[1-9]\d*/500 \[", server.tail(5)):  # ComfyUI's progress bar: a step is done
        assert time.monotonic() < deadline, f"sampling never started:\n{server.tail()}"
        time.sleep(0.2)
    server.call("/interrupt", {})
    cancelled = time.monotonic()
    entry = server.run(graph, timeout=60, prompt_id=prompt_id)
    assert time.monotonic() - cancelled < 30
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    last_run = json.loads(server.log.read_text(errors="replace").split("PCPP run: ")[-1].splitlines()[0])
    assert 0 < last_run["calls"] < 500  # the hook saw the run stop part-way
    entry = server.run(small(json.loads((WORKFLOWS / "api" / "sd15_txt2img_pcpp_ksampler.api.json").read_text())))
    assert entry["status"]["status_str"] == "success", why(entry)
    [stats] = outputs_of(server, entry)[1]
    assert stats["fallback"] is None and stats["calls"] == 3  # one batched cond+uncond call per step, counted afresh


def test_devices_auto_without_gpus_runs_plain_and_says_so(server):
    graph = small(json.loads((WORKFLOWS / "api" / "sd15_txt2img_pcpp_ksampler.api.json").read_text()), devices=None)
    assert graph["3"]["inputs"]["devices"] == "auto"
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", why(entry)
    [stats] = outputs_of(server, entry)[1]
    assert "devices='auto' found 0 CUDA GPU" in stats["fallback"] and stats["bands"] == 1
    assert "running plain ComfyUI sampling" in server.tail(200)


@pytest.mark.parametrize("path", UI_WORKFLOWS + API_WORKFLOWS, ids=lambda p: p.name)
def test_workflow_file_parses_and_its_node_types_exist(object_info, path):
    data = json.loads(path.read_text())
    if path.name.endswith(".api.json"):
        for node_id, node in data.items():
            info = object_info.get(node["class_type"])
            assert info, f"{path.name} node {node_id}: unknown type {node['class_type']}"
            known = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            assert set(node["inputs"]) <= set(known), f"{node['class_type']}: {set(node['inputs']) - set(known)}"
        return
    link_ids = {link[0] for link in data["links"]}
    for node in data["nodes"]:
        info = object_info.get(node["type"])
        assert info, f"{path.name} node {node['id']}: unknown type {node['type']}"
        required = info["input"]["required"]
        widgets = [n for n, spec in required.items() if isinstance(spec[0], list) or spec[0] in
                   ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
        seeds = sum(1 for n in widgets if len(required[n]) > 1 and required[n][1].get("control_after_generate"))
        assert len(node["widgets_values"]) == len(widgets) + seeds, f"{node['type']} widgets"
        assert all(i["link"] in link_ids for i in node["inputs"]), f"{node['type']}: dangling input link"


def test_template_browser_lists_each_ui_workflow_once_with_its_thumbnail_and_no_api_file(server):
    """What the front end's template browser asks: the listing, each workflow, its <name>.jpg thumbnail."""
    listing = server.call("/api/workflow_templates")
    names = listing.get("ComfyUI-PCPP", [])
    assert sorted(names) == sorted(p.stem for p in UI_WORKFLOWS), listing
    assert not any("api" in n for n in names)
    for name in names:
        graph = server.call(f"/api/workflow_templates/ComfyUI-PCPP/{name}.json")
        assert graph["nodes"] and graph["links"], f"{name}.json is no UI-format graph"
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/ComfyUI-PCPP/{name}.jpg", timeout=30) as r:
            assert r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff", name


def test_help_pages_are_served_where_the_front_end_looks(server, object_info):
    """The front end (1.49.6) reads a custom node's help from /extensions/<pack>/docs/<node id>.md, <pack>
    from python_module "custom_nodes.<pack>", and resolves the page's relative images against that folder."""
    for node_id in ("PCPPKSampler", "PCPPParallelModel"):
        module = object_info[node_id]["python_module"]
        assert module.startswith("custom_nodes."), module
        base = f"{server.url}/extensions/{module.split('.')[1].split('@')[0]}/docs"
        with urllib.request.urlopen(f"{base}/{node_id}.md", timeout=30) as r:
            page = r.read().decode()
        assert page.startswith(f"# {object_info[node_id]['display_name']}\n"), page[:80]
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
        assert images, f"{node_id}.md shows no picture"
        for src in images:
            with urllib.request.urlopen(f"{base}/{src}", timeout=30) as r:
                assert r.headers["Content-Type"] == "image/png" and r.read(4) == b"\x89PNG", src


def test_workflow_files_match_their_generator():
    sys.path.insert(0, str(WORKFLOWS))
    try:
        import build_workflows
    finally:
        sys.path.remove(str(WORKFLOWS))
    for name, graph in build_workflows.WORKFLOWS.items():
        assert json.loads((WORKFLOWS / f"{name}.json").read_text()) == build_workflows.ui_format(graph)
        assert json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text()) == build_workflows.api_format(graph)


def _worker_pids(server: Server) -> list[int]:
    """The engine's worker processes: children of the server running pcpp_core.worker."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == server.proc.pid and b"pcpp_core.worker" in cmd:
            pids.append(int(pid))
    return sorted(pids)


def test_killed_worker_fails_the_prompt_naming_the_rank_and_the_next_prompt_succeeds(server):
    import signal

    graph = small(json.loads((WORKFLOWS / "api" / "sd15_txt2img_pcpp_ksampler.api.json").read_text()))
    graph["3"]["inputs"]["steps"] = 500
    prompt_id = server.call("/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.monotonic() + 120
    while not re.search(r"[1-9]\d*/500 \[", server.tail(5)):  # sampling is under way
        assert time.monotonic() < deadline, f"sampling never started:\n{server.tail()}"
        time.sleep(0.2)
    old = _worker_pids(server)
    assert len(old) == 2, old
    os.kill(old[1], signal.SIGKILL)
    killed = time.monotonic()
    entry = server.run(graph, timeout=60, prompt_id=prompt_id)
    assert time.monotonic() - killed < 10
    assert entry["status"]["status_str"] == "error"
    message = why(entry)
    assert "WorkerError" in message and re.search(r"worker rank \d: died", message), message
    assert server.call("/system_stats")  # the server keeps serving
    entry = server.run(small(json.loads((WORKFLOWS / "api" / "sd15_txt2img_pcpp_ksampler.api.json").read_text())))
    assert entry["status"]["status_str"] == "success", why(entry)
    [stats] = outputs_of(server, entry)[1]
    assert stats["fallback"] is None and stats["bands"] == 2
    new = _worker_pids(server)
    assert len(new) == 2 and not set(new) & set(old)


def _children(pid: int) -> set[int]:
    """Every child process of `pid`, whichever of its threads started it."""
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:  # the thread ended meanwhile
            pass
    return kids


def _refusal(server: Server, graph: dict) -> dict:
    """POST /prompt expecting HTTP 400; returns the errors of the KSampler node ("3")."""
    with pytest.raises(urllib.error.HTTPError) as err:
        server.call("/prompt", {"prompt": graph})
    assert err.value.code == 400
    return json.loads(err.value.read())["node_errors"]["3"]["errors"]


def test_more_cpu_workers_than_cores_is_refused_before_any_worker_starts(server):
    from pcpp_core.limits import usable_cores

    cores = usable_cores(os.sched_getaffinity(server.proc.pid))
    graph = json.loads((WORKFLOWS / "api" / "sd15_txt2img_pcpp_ksampler.api.json").read_text())
    before = _children(server.proc.pid)
    errors = _refusal(server, small(graph, devices=f"cpu:{cores + 1}"))
    assert [e["extra_info"]["input_name"] for e in errors] == ["devices"]
    details = errors[0]["details"]
    assert f"asks for {cores + 1} CPU worker" in details and f"at most {cores} " in details, details
    assert "PCPP_MAX_WORKERS" in details  # how the operator raises it
    assert _children(server.proc.pid) == before  # nothing was forked for the refused prompt
    entry = server.run(small(graph))
    assert entry["status"]["status_str"] == "success", why(entry)
    [stats] = outputs_of(server, entry)[1]
    assert stats["fallback"] is None and stats["bands"] == 2


RAISED_IDLE_S = 3


@pytest.fixture(scope="module")
def raised_server(tmp_path_factory):
    """A server kept to (at most) two cores, started with PCPP_MAX_WORKERS one above them and
    PCPP_POOL_IDLE_S short enough to watch its pool stop."""
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    env = {"PCPP_MAX_WORKERS": str(len(cpus) + 1), "PCPP_POOL_IDLE_S": str(RAISED_IDLE_S)}
    with comfy_server(tmp_path_factory.mktemp("comfy-raised"), env=env, cpus=cpus) as srv:
        yield srv


def test_pcpp_max_workers_raises_the_ceiling_for_the_server_it_started(raised_server):
    server = raised_server
    n = len(os.sched_getaffinity(server.proc.pid)) + 1  # the refused count on a server without the variable
    graph = small(json.loads((WORKFLOWS / "api" / "sd15_txt2img_pcpp_ksampler.api.json").read_text()), devices=f"cpu:{n}")
    entry = server.run(graph)  # 128 px: 16 latent rows, enough for 3 bands (the model does not downsample)
    assert entry["status"]["status_str"] == "success", f"{why(entry)}\n{server.tail()}"
    [stats] = outputs_of(server, entry)[1]
    assert stats["fallback"] is None and stats["devices"] == ["cpu"] * n and stats["bands"] == n
    assert f"pool started: {n} gloo worker(s)" in server.log.read_text(errors="replace"), server.tail()
    errors = _refusal(server, small(graph, devices=f"cpu:{n + 1}"))  # the variable is the new ceiling
    assert f"at most {n} (PCPP_MAX_WORKERS={n})" in errors[0]["details"], errors
    # the run ended (the nodes' end_run), so its pool is stopped once idle for PCPP_POOL_IDLE_S
    deadline = time.monotonic() + 60
    while _worker_pids(server):
        assert time.monotonic() < deadline, f"the idle pool was not stopped:\n{server.tail()}"
        time.sleep(0.25)
    assert f"idle for {RAISED_IDLE_S} s" in server.log.read_text(errors="replace"), server.tail()
