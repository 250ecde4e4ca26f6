"""A worker process: `python -m pcpp_core.worker`, one per device.

Started by the host as its own program (never multiprocessing's spawn, which re-runs the
host's main module: inside ComfyUI that is main.py). It reads its bootstrap line from stdin
(including the pool's authentication key, which never appears in argv or the environment),
connects back to the host over an authenticated loopback channel, joins the process group
through a FileStore in a private directory, and serves requests until told to stop or until
the host goes away.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client
from typing import Any

import torch
import torch.distributed as dist

from .errors import PCPPError, WorkerError
from .exchange import torch_p2p
from .pool import no_delay
from .runner import BandRunner, CallRequest, map_tensors
from .weights import PatchedWeights

log = logging.getLogger("pcpp.worker")


def _watch_parent(parent: int) -> None:
    """Exit when the host dies, even while blocked in a collective."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


class Worker:
    def __init__(self, boot: dict[str, Any]):
        self.rank: int = boot["rank"]
        self.world: int = boot["world"]
        self.device = torch.device(boot["device"])
        self.runner: BandRunner | None = None
        self.version: str | None = None
        self.weights: PatchedWeights | None = None
        self.hang_on_call = os.environ.get("PCPP_TEST_HANG_RANK") == str(self.rank)  # test hook

    def init_distributed(self, boot: dict[str, Any]) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(boot["threads"])
        store = dist.FileStore(boot["store"], self.world)
        dist.init_process_group(boot["backend"], store=store, rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=boot["timeout_s"]))
        # every rank joins once here, so the first point-to-point batch (which NCCL requires all
        # ranks to enter) is never a partial one, e.g. two cfg_split groups
        dist.barrier(device_ids=[self.device.index or 0] if self.device.type == "cuda" else None)

    def op_load(self, payload: dict[str, Any]) -> dict[str, Any]:
        model = torch.load(payload["path"], mmap=True, weights_only=False, map_location=self.device)
        model.eval().requires_grad_(False)
        self.weights = PatchedWeights(model)  # by the host's names, before the plan wraps modules
        self.runner = BandRunner(model, self.rank)  # applies the plan
        self.version = payload["version"]
        return {"version": self.version, "levels": self.runner.levels}

    def op_patch(self, payload: dict[str, Any] | None) -> int:
        """Restore the base weights, then apply the host's patch set (None: stay on the base)."""
        if self.weights is None:
            raise RuntimeError("no model loaded")
        if payload is None:
            self.weights.restore()
            return 0
        return self.weights.apply(payload["key"], payload["applier"], payload["data"])

    def op_reset(self, payload: Any) -> bool:
        """Forget the run's state; payload {"timeout_s": s} bounds the wait for in-flight transfers
        (after an error). Returns whether the exchange state is clean."""
        timeout = (payload or {}).get("timeout_s")
        return self.runner.reset(timeout) if self.runner is not None else True

    def op_call(self, req: CallRequest):
        if self.runner is None:
            raise RuntimeError("no model loaded")
        if self.hang_on_call:
            time.sleep(3600)
        req.args = map_tensors(req.args, lambda t: t.to(self.device))
        req.kwargs = map_tensors(req.kwargs, lambda t: t.to(self.device))
        out, stats = self.runner.run(req, torch_p2p)
        return out.cpu(), stats

    def op_baselines(self, payload: Any) -> dict:
        """Debug/test view of the residual codecs' baselines (CPU copies)."""
        return {} if self.runner is None else self.runner.exchange.settled_baselines()

    def op_ping(self, payload: Any) -> int:
        return os.getpid()

    def op_p2p(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """The doctor's transfer test; every rank gets it at once (see exchange.measure_p2p)."""
        from .exchange import measure_p2p

        return measure_p2p(self.rank, self.world, self.device, payload["nbytes"], payload["repeats"])

    def serve(self, conn) -> None:
        handlers = {"load": self.op_load, "reset": self.op_reset, "call": self.op_call, "ping": self.op_ping,
                    "patch": self.op_patch,
                    "p2p": self.op_p2p,  # p2p: the doctor's transfer test
                    "baselines": self.op_baselines}  # tests: residual-codec baselines
        while True:
            try:
                op, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return  # host closed the channel
            if op == "shutdown":
                conn.send_bytes(pickle.dumps(("ok", None)))
                return
            try:
                reply = ("ok", handlers[op](payload))
            except PCPPError as e:  # a configuration problem found here (not a crash): the host falls back
                status = "error" if isinstance(e, WorkerError) else "config"
                reply = (status, f"{type(e).__name__}: {e}", traceback.format_exc())
            except BaseException as e:  # reported to the host, which decides what survives
                reply = ("error", f"{type(e).__name__}: {e}", traceback.format_exc())
            conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def main() -> int:
    boot = json.loads(sys.stdin.readline())
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(level=boot.get("log_level", logging.WARNING),
                        format=f"[pcpp worker {boot['rank']}] %(levelname)s %(name)s: %(message)s")
    conn = Client(tuple(boot["address"]), authkey=bytes.fromhex(boot["authkey"]))
    no_delay(conn)
    worker = Worker(boot)
    try:
        # a host adapter names modules that must run before any model is unpickled (e.g. a
        # framework's device flags); the engine itself stays framework-free
        for name in filter(None, os.environ.get("PCPP_WORKER_PRELOAD", "").split(",")):
            importlib.import_module(name)
        worker.init_distributed(boot)
        conn.send_bytes(pickle.dumps(("ok", os.getpid())))
    except BaseException as e:
        conn.send_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}", traceback.format_exc())))
        return 1
    worker.serve(conn)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
