"""`python -m pcpp_core doctor --devices LIST [--json]`: check a machine before trusting the pack.

    python -m pcpp_core doctor --devices cuda:0,cuda:1      # a user's GPUs
    python -m pcpp_core doctor --devices cpu:3 --json       # CI: the same code on gloo/CPU

Runs the built-in model on the devices and checks, in order: discovery (torch build, backends,
devices, free memory, peer access, /dev/shm), workers (pool start, model load), p2p (every
direction, bandwidth, every byte), sync (= one process), stale (= the stale reference), bytes
(measured = analytic) and overhead (host vs worker time). The CUDA path is the CPU path with
device, backend and dtype chosen at start: float16 on GPUs, float32 on CPUs, tolerances to match.
Exit code 0 when every check passed, 1 when one failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import Mode, PatchConfig, PoolConfig, parse_devices
from .doctor_discovery import gather, judge
from .engine import Engine
from .errors import ConfigError, WorkerError

log = logging.getLogger("pcpp.doctor")

CHECKS = ("discovery", "workers", "p2p", "sync", "stale", "bytes", "overhead")
# max abs diff per unit of output scale; CUDA's float32 convolutions use TF32 unless switched off
TOLERANCE = {("cpu", torch.float32): 1e-4, ("cuda", torch.float32): 5e-3, ("cpu", torch.float16): 3e-2,
             ("cuda", torch.float16): 3e-2}
OVERHEAD_LIMIT_S = 0.5  # per call, on top of the slowest band's compute: generous, diagnostic only
BUG_REPORT = "send the --json output (and -v's log) in a bug report"


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    hint: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # figures for the --json progress lines
    skipped: bool = False  # not run because a check it needs failed (counts as not passed)

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail, "hint": self.hint}


def skipped(name: str, why: str) -> Check:
    return Check(name, False, f"skipped: {why}", "fix the first failed check above, then run again", skipped=True)


@dataclass
class Setup:
    """What the engine checks share: one pool, the built-in model and its inputs on one device."""

    engine: Engine
    device: torch.device  # where the one-process comparisons run (the first listed device)
    dtype: torch.dtype
    size: int
    calls: int  # model calls per check
    unet: torch.nn.Module = None  # type: ignore[assignment]
    emb: torch.Tensor = None  # type: ignore[assignment]

    @property
    def bands(self) -> int:
        return self.engine.pool_config.world_size

    def inputs(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [2, 3, size, size], t [2], ctx [2, 4, 64]) of call k: a CFG batch, new noise each call."""
        g = torch.Generator().manual_seed(k)
        x = torch.randn(1, 3, self.size, self.size, generator=g).repeat(2, 1, 1, 1)
        t = torch.full((2,), 900.0 - 150.0 * (k % 6))
        ctx = torch.stack([self.emb[k % 12], self.emb[12]])
        return x.to(self.device, self.dtype), t.to(self.device), ctx.to(self.device, self.dtype)

    def direct(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.unet(x, t, encoder_hidden_states=ctx).sample
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def parallel(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.engine(self.unet, x, t, encoder_hidden_states=ctx, slot="doctor", batch_chunks=2)

    def tolerance(self, ref: torch.Tensor) -> float:
        return TOLERANCE[(self.device.type, self.dtype)] * max(1.0, ref.abs().max().item())


# ---- the checks that run on workers --------------------------------------------------------

def check_workers(s: Setup) -> Check:
    from .tiny_model import load_tiny_unet

    unet, s.emb, _ = load_tiny_unet(s.dtype)
    s.unet = torch.nn.Module.to(unet, s.device)
    mb = sum(p.numel() * p.element_size() for p in s.unet.parameters()) / 1e6
    t0 = time.perf_counter()
    s.engine.start()
    t1 = time.perf_counter()
    s.engine.load(s.unet)
    t2 = time.perf_counter()
    cfg = s.engine.pool_config
    threads = "" if s.device.type == "cuda" else f" x {cfg.worker_threads()} thread(s)"
    return Check("workers", True, f"{s.bands} {cfg.backend} worker(s){threads} started in {t1 - t0:.1f} s, built-in model "
                 f"({mb:.1f} MB {str(s.dtype).removeprefix('torch.')}) loaded in {t2 - t1:.1f} s",
                 data={"start_s": t1 - t0, "load_s": t2 - t1, "pids": s.engine.pool.pids})


def check_p2p(s: Setup) -> Check:
    if s.bands == 1:
        return Check("p2p", True, "one device: nothing to exchange")
    cuda = s.device.type == "cuda"
    nbytes, repeats = (64 << 20, 5) if cuda else (4 << 20, 3)
    replies = s.engine.pool.request({r: ("p2p", {"nbytes": nbytes, "repeats": repeats}) for r in range(s.bands)})
    rows = sorted((row for rank_rows in replies.values() for row in rank_rows), key=lambda r: (r["src"], r["dst"]))
    devs = s.engine.pool_config.devices
    name = (lambda r: devs[r]) if cuda else str  # CPU workers: ranks
    pair = lambda r: f"{name(r['src'])}->{name(r['dst'])}"  # noqa: E731
    bad = [pair(r) for r in rows if not r["correct"]]
    slow = min(rows, key=lambda r: r["gbps"])
    fast = max(r["gbps"] for r in rows)
    speed = (", ".join(f"{pair(r)} {r['gbps']:.2f}" for r in rows) if len(rows) <= 12 else
             f"min {slow['gbps']:.2f} ({pair(slow)}), median {statistics.median(r['gbps'] for r in rows):.2f}, "
             f"max {fast:.2f}")
    detail = (f"{len(rows)} directions x {repeats} x {nbytes / 1e6:.1f} MB, GB/s{'' if cuda else ' between ranks'}: "
              f"{speed}; "
              + (f"WRONG BYTES from {', '.join(bad)}" if bad else "every byte correct"))
    hint = None
    if bad:
        hint = ("received bytes differ from those sent: a driver/NCCL fault; update the driver and run again "
                "with NCCL_P2P_DISABLE=1 in the environment to see whether GPU peer-to-peer is the cause")
    elif cuda and slow["gbps"] < fast / 4:
        hint = (f"{pair(slow)} is {fast / slow['gbps']:.0f}x slower than the fastest "
                "direction: see `nvidia-smi topo -m` (PCIe through the CPU socket, no NVLink)")
    return Check("p2p", not bad, detail, hint, data={"transfers": rows})


def check_sync(s: Setup) -> Check:
    s.engine.new_run(PatchConfig(mode=Mode.SYNC))
    diffs, tols = [], []
    for k in range(s.calls):
        x, t, ctx = s.inputs(k)
        ref = s.direct(x, t, ctx)
        diffs.append((s.parallel(x, t, ctx).float() - ref.float()).abs().max().item())
        tols.append(s.tolerance(ref))
    ok = all(d <= tol for d, tol in zip(diffs, tols))
    return Check("sync", ok, f"max abs diff {max(diffs):.2g} vs one process on {s.device} over {s.calls} calls "
                 f"(tolerance {min(tols):.2g}, {str(s.dtype).removeprefix('torch.')})",
                 None if ok else "sync mode must equal one device: a bug in the pack or in the devices' maths; "
                 + BUG_REPORT, data={"max_abs": diffs, "tolerance": tols})


def check_stale(s: Setup) -> Check:
    from .reference import StaleReference

    patch = PatchConfig(mode=Mode.PCPP, fraction=0.3, warmup_steps=1)
    s.engine.new_run(patch)
    reference = StaleReference(s.unet, s.bands, patch)
    to_ref, to_fresh, tols, stale_calls = [], [], [], 0
    for k in range(s.calls + 1):  # the first call is the warm-up
        x, t, ctx = s.inputs(k)
        out = s.parallel(x, t, ctx).float()
        sync = s.engine.stats.calls[-1].synchronous
        stale_calls += not sync
        ref = reference(x, t, encoder_hidden_states=ctx, slot="doctor", synchronous=sync).float()
        to_ref.append((out - ref).abs().max().item())
        to_fresh.append((out - s.direct(x, t, ctx).float()).abs().max().item())
        tols.append(s.tolerance(ref))
    exact = all(d <= tol for d, tol in zip(to_ref, tols))
    used = s.bands == 1 or max(to_fresh[1:], default=0.0) > max(tols)  # stale data really in use
    detail = (f"pcpp f=0.3, {stale_calls} stale call(s) after 1 warm-up: max abs diff {max(to_ref):.2g} vs the "
              f"stale reference (tolerance {min(tols):.2g}); {max(to_fresh[1:], default=0.0):.2g} vs a fresh "
              "evaluation" + (" (one band: nothing is stale)" if s.bands == 1 else ""))
    hint = None
    if not exact:
        hint = "the stale steps differ from the reference simulation: a bug in the pack; " + BUG_REPORT
    elif not used:
        hint = "the stale steps equal a fresh evaluation: the workers did not use stale data; " + BUG_REPORT
    return Check("stale", exact and used, detail, hint, data={"max_abs": to_ref, "vs_fresh": to_fresh})


def check_bytes(s: Setup) -> Check:
    from .bench.comm import engine_bytes_rows

    rows = engine_bytes_rows(s.engine, s.unet, *s.inputs(0), fractions=[0.3])
    bad = [r for r in rows if not r["match"]]
    steady = {r["_label"]: r["bytes_measured"] for r in rows if r["call"] == "steady"}
    detail = (f"measured = analytic on every rank, {len(rows)} calls ({', '.join(dict.fromkeys(r['_label'] for r in rows))}; "
              "warm-up and steady); steady bytes per call: " + ", ".join(f"{k} {v:,}" for k, v in steady.items()))
    if bad:
        detail = "measured != analytic: " + "; ".join(
            f"{r['_label']} {r['call']}: analytic {r['per_rank_analytic']} measured {r['per_rank_measured']}" for r in bad)
    return Check("bytes", not bad, detail, None if not bad else "the byte accounting is wrong: " + BUG_REPORT,
                 data={"rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]})


def check_overhead(s: Setup) -> Check:
    """Naive mode exchanges nothing: what the host spends beyond the slowest band is the engine's cost."""
    s.engine.new_run(PatchConfig(mode=Mode.NAIVE))
    direct, engine, compute = [], [], []
    for k in range(s.calls + 1):  # round 0 is untimed (first call of a slot, caches)
        x, t, ctx = s.inputs(k)
        t0 = time.perf_counter()
        s.direct(x, t, ctx)
        t1 = time.perf_counter()
        s.parallel(x, t, ctx)
        t2 = time.perf_counter()
        if k:
            direct.append(t1 - t0)
            engine.append(t2 - t1)
            compute.append(max(s.engine.stats.calls[-1].compute_seconds.values()))
    eng, comp, one = (statistics.median(v) for v in (engine, compute, direct))
    overhead = eng - comp
    limit = OVERHEAD_LIMIT_S + comp
    ok = overhead <= limit
    detail = (f"host {eng * 1e3:.0f} ms/call vs slowest worker compute {comp * 1e3:.0f} ms: overhead "
              f"{overhead * 1e3:.0f} ms (limit {limit * 1e3:.0f} ms); one process ({torch.get_num_threads()} thread(s)) "
              f"{one * 1e3:.0f} ms/call, "
              f"engine on {s.bands} band(s) {one / eng:.2f}x of it (naive mode, median of {len(engine)})")
    hint = None if ok else ("each call costs far more on the host than on the workers: a loaded machine, swapping, "
                            "or slow pipes; run again on an idle machine, then " + BUG_REPORT)
    return Check("overhead", ok, detail, hint, data={"engine_s": eng, "compute_s": comp, "direct_s": one})


ENGINE_CHECKS: dict[str, Callable[[Setup], Check]] = {
    "workers": check_workers, "p2p": check_p2p, "sync": check_sync, "stale": check_stale,
    "bytes": check_bytes, "overhead": check_overhead,
}


def hint_for(error: BaseException) -> str:
    """What to try when a check raised, from what the error says."""
    text = str(error).lower()
    if "out of memory" in text:
        return "a device ran out of memory: close what else runs on it (nvidia-smi) and run again"
    if "no space left" in text or "shm" in text:
        return "shared memory is full: in Docker start the container with --shm-size=16g (or --ipc=host)"
    if isinstance(error, WorkerError) and "no answer" in text:
        return ("a worker hung (often a GPU peer-to-peer problem): run again with NCCL_P2P_DISABLE=1 in the "
                "environment; if that passes, check IOMMU/ACS settings; NCCL_DEBUG=INFO shows more")
    if "nccl" in text:
        return "NCCL failed: run again with NCCL_DEBUG=INFO in the environment and " + BUG_REPORT
    if isinstance(error, ImportError) and error.name in ("diffusers", "safetensors"):
        return "the built-in model needs diffusers and safetensors: pip install -r requirements-dev.txt"
    return BUG_REPORT


def _guarded(name: str, fn: Callable[[Setup], Check], setup: Setup) -> Check:
    try:
        return fn(setup)
    except Exception as e:  # the doctor reports every failure as a check, never a traceback
        log.info("check %s raised", name, exc_info=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Check(name, False, f"{type(e).__name__}: {first}", hint_for(e),
                     data={"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def run_checks(devices: tuple[str, ...], size: int, calls: int, dtype: torch.dtype | None,
               report: Callable[[Check], None]) -> list[Check]:
    """Every check in order, each passed to `report` as it finishes; later checks are skipped
    after discovery or the worker start fails (they need both)."""
    done: list[Check] = []

    clock = [time.perf_counter()]

    def add(check: Check) -> None:
        now = time.perf_counter()
        check.data.setdefault("seconds", round(now - clock[0], 2))
        clock[0] = now
        done.append(check)
        report(check)

    facts = gather(devices)
    verdict = judge(facts, devices)
    add(Check("discovery", verdict.passed, verdict.detail, verdict.hint, data={"facts": facts.as_dict()}))
    if not verdict.passed:
        for name in CHECKS[1:]:
            add(skipped(name, "discovery failed"))
        return done
    cuda = devices[0].startswith("cuda")
    dtype = dtype or (torch.float16 if cuda else torch.float32)
    threads = max(1, facts.cpu_count // len(devices))
    setup = Setup(Engine(PoolConfig(devices=devices, call_timeout_s=120, start_timeout_s=120,
                                    threads_per_worker=None if cuda else threads)),
                  torch.device(devices[0]), dtype, size, calls)
    host_threads = torch.get_num_threads()
    if not cuda:  # one process computes with what one worker has: on a busy machine more threads only wait
        torch.set_num_threads(threads)
    try:
        for name, fn in ENGINE_CHECKS.items():
            if name != "workers" and not done[1].passed:
                add(skipped(name, "the workers did not start"))
                continue
            add(_guarded(name, fn, setup))
    finally:
        setup.engine.shutdown()
        torch.set_num_threads(host_threads)
    return done


# ---- command line (the only part that prints) ----------------------------------------------

def resolve_devices(spec: str) -> tuple[str, ...]:
    """The devices to check; unparseable text is a ConfigError naming --devices. A GPU that does
    not exist is not an argument error: discovery reports it with a hint."""
    text = spec.strip().lower()
    try:
        if text in ("auto", "cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return tuple(f"cuda:{i}" for i in range(count))  # none: discovery says so
        return parse_devices(text, cuda_count=1 << 16)
    except ConfigError as e:
        raise ConfigError(f"--devices: {e}") from e


def summary(checks: list[Check]) -> dict[str, Any]:
    """The last line of --json: the whole verdict."""
    return {"ok": bool(checks) and all(c.passed for c in checks), "checks": [c.public() for c in checks]}


def _marks(stream: Any) -> tuple[str, str]:
    try:
        "✓✗".encode(getattr(stream, "encoding", None) or "ascii")
        return "✓", "✗"
    except (UnicodeEncodeError, LookupError):
        return "ok", "FAIL"


def format_check(check: Check, marks: tuple[str, str] = ("✓", "✗")) -> str:
    """One row of the human-readable table; a skipped check shows '-' and no hint of its own."""
    mark = "-" if check.skipped else marks[0] if check.passed else marks[1]
    line = f"  {mark} {check.name:<9} {check.detail}"
    if check.hint and not check.skipped:
        line += f"\n      {'note' if check.passed else 'hint'}: {check.hint}"
    return line


def verdict_line(checks: list[Check], seconds: float) -> str:
    failed = [c.name for c in checks if not c.passed and not c.skipped]
    skipped = sum(c.skipped for c in checks)
    if not failed and not skipped:
        return f"verdict: OK, all {len(checks)} checks passed in {seconds:.0f} s"
    return (f"verdict: FAILED ({', '.join(failed)}"
            + (f"; {skipped} check(s) skipped" if skipped else "") + f") in {seconds:.0f} s; follow the hint "
            "of the first failed check, then run again; for a bug report send the output of --json")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pcpp_core doctor",
                                description="Check devices before trusting the pack: exit 0 when every check "
                                            "passed, 1 when one failed, 2 for bad arguments.")
    p.add_argument("--devices", default="auto", help="cuda:0,cuda:1 | auto (every visible GPU) | cpu:N")
    p.add_argument("--json", action="store_true", help="JSON lines as checks finish; the last line is the verdict")
    p.add_argument("--size", type=int, default=64, help="image rows and columns of the built-in model's test calls")
    p.add_argument("--calls", type=int, default=2, help="model calls per check")
    p.add_argument("--dtype", choices=("auto", "fp16", "fp32"), default="auto",
                   help="auto = fp16 on GPUs, fp32 on CPUs; fp32 on GPUs tells precision from a bug")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and tracebacks to stderr")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger("pcpp").addHandler(handler)
        logging.getLogger("pcpp").setLevel(logging.INFO)
    try:
        devices = resolve_devices(a.devices)
        if a.size < 8 * max(1, len(devices)) or a.size % 8:
            raise ConfigError(f"--size {a.size}: use a multiple of 8, at least 8 per device")
        if a.calls < 1:
            raise ConfigError(f"--calls {a.calls}: use 1 or more")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = {"auto": None, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    marks = _marks(sys.stdout)
    if a.json:
        report = lambda c: print(json.dumps({"check": c.name, **c.public(), **c.data}, default=str), flush=True)  # noqa: E731
    else:
        print(f"PCPP doctor: --devices {a.devices} = {', '.join(devices) or 'no GPU'}, built-in model at "
              f"{a.size}x{a.size}", flush=True)
        report = lambda c: print(format_check(c, marks), flush=True)  # noqa: E731
    start = time.perf_counter()
    checks = run_checks(devices, a.size, a.calls, dtype, report)
    result = summary(checks)
    if a.json:
        print(json.dumps(result), flush=True)
    else:
        print(verdict_line(checks, time.perf_counter() - start), flush=True)
    return 0 if result["ok"] else 1
