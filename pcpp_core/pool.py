"""Host side of the worker processes: start, talk, detect failure, stop. Knows nothing of models.

Each worker is `python -m pcpp_core.worker` started through subprocess and connected back over
a multiprocessing Listener on 127.0.0.1 with a per-pool random authkey (sent on the worker's
stdin), so no one else on the machine can talk to a worker or feed it a pickle. The process
group meets through a FileStore in a 0700 temporary directory (staging.py): no rendezvous socket at all.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import Any

from .config import PoolConfig
from .errors import ConfigError, WorkerError
from .staging import make_private_dir, remove_dir, staging_root, sweep_stale

log = logging.getLogger("pcpp.pool")

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_LIVE_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()
CONFIG_ERROR_GRACE_S = 5.0  # after a worker's ConfigError, how long the other ranks may take to answer
# glibc malloc in the workers: keep freed activation memory (blocks up to 32 MiB from the heap,
# up to 64 MiB of free heap top kept) instead of handing it back to the kernel after every
# forward pass and page-faulting it in again on the next (measured: ~2 000 minor faults and
# ~3% slower per tiny-model call). A host process gets there by itself (glibc raises both
# thresholds once it frees a large block, e.g. while loading weights); a worker maps its
# weights and never does. These are glibc's own ceilings; the environment may override them.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def _shutdown_all() -> None:
    for pool in list(_LIVE_POOLS):
        pool.shutdown()


atexit.register(_shutdown_all)


def control_listener(authkey: bytes) -> Listener:
    """The host end of the control channels: loopback only, a free port, key required before
    any message is read (multiprocessing's HMAC challenge in both directions)."""
    return Listener(("127.0.0.1", 0), authkey=authkey)


def no_delay(conn: Connection) -> None:
    """Send every message at once (TCP_NODELAY) on one end of a control channel.

    A message over 16 KB leaves as a 4-byte length header and then the payload: Nagle's
    algorithm holds the payload until the header is acknowledged, and the receiver delays that
    acknowledgement by up to 40 ms. Every call paid it (a band's output is such a message).
    """
    sock = socket.socket(fileno=os.dup(conn.fileno()))  # a second handle on the same socket
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.close()


class WorkerPool:
    """One worker process per device, started on demand, stopped by shutdown() or at exit."""

    def __init__(self, config: PoolConfig):
        self.config = config
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._dir: str | None = None
        self.workdir: str | None = None  # the pool's private directory (rendezvous); model files go to the staging dir

    @property
    def size(self) -> int:
        return self.config.world_size

    @property
    def started(self) -> bool:
        """Started and not shut down; a worker may still have died since (requests report it)."""
        return bool(self._procs)

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> None:
        if self._procs:
            return
        cfg = self.config
        sweep_stale([tempfile.gettempdir(), staging_root(cfg.staging_dir)])  # left by hosts killed outright
        self._dir = make_private_dir(tempfile.gettempdir(), "pool")  # the rendezvous only: a few bytes
        self.workdir = self._dir
        authkey = secrets.token_bytes(32)
        listener = control_listener(authkey)
        env = dict(os.environ)
        env.update(dict(cfg.env))
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *[p for p in sys.path if p and os.path.isdir(p)]])
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pair sockets on loopback only
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        for name, value in WORKER_MALLOC.items():
            env.setdefault(name, value)
        _LIVE_POOLS.add(self)
        try:
            for rank, device in enumerate(cfg.devices):
                boot = {
                    "rank": rank, "world": cfg.world_size, "device": device, "backend": cfg.backend,
                    "address": listener.address, "authkey": authkey.hex(),
                    "store": os.path.join(self._dir, "store"), "threads": cfg.worker_threads(),
                    "timeout_s": cfg.call_timeout_s, "log_level": logging.getLogger("pcpp").getEffectiveLevel(),
                }
                proc = subprocess.Popen([sys.executable, "-m", "pcpp_core.worker"], stdin=subprocess.PIPE,
                                        env=env, cwd=self._dir)
                proc.stdin.write((json.dumps(boot) + "\n").encode())
                proc.stdin.close()
                self._procs.append(proc)
            self._conns = self._accept(listener, cfg.start_timeout_s)
        except BaseException:
            self.kill()
            raise
        finally:
            listener.close()
        log.info("pool started: %d %s worker(s) (%s), pids %s", self.size, cfg.backend, ",".join(cfg.devices), self.pids)

    def _accept(self, listener: Listener, timeout: float) -> list[Connection]:
        """Accept one authenticated connection per worker; the first message names its rank."""
        listener._listener._socket.settimeout(timeout)  # accept() must not outlive a dead worker
        conns: dict[int, Connection] = {}
        deadline = time.monotonic() + timeout
        while len(conns) < self.size:
            self._check_exits(f"starting ({len(conns)}/{self.size} connected)")
            if time.monotonic() > deadline:
                raise WorkerError(f"workers did not connect within {timeout:.0f} s")
            try:
                conn = listener.accept()
            except (OSError, AuthenticationError) as e:  # timeout, or a client without the key
                log.warning("rejected a connection while starting the pool: %s", e)
                continue
            no_delay(conn)
            conns[len(conns)] = conn
        # ranks come back in any order; each worker's first message carries its pid
        by_pid = {p.pid: r for r, p in enumerate(self._procs)}
        ordered: list[Connection | None] = [None] * self.size
        for conn in conns.values():
            if not conn.poll(timeout):
                raise WorkerError("a worker connected but never said who it is")
            status, *rest = pickle.loads(conn.recv_bytes())
            pid = rest[0] if status == "ok" else None
            if status != "ok":
                raise WorkerError(rest[0], remote_traceback=rest[1])
            ordered[by_pid[pid]] = conn
        return ordered  # type: ignore[return-value]

    def _check_exits(self, doing: str) -> None:
        for rank, p in enumerate(self._procs):
            code = p.poll()
            if code is not None:
                raise WorkerError(f"exited with code {code} while {doing}", rank=rank)

    def request(self, messages: dict[int, tuple[str, Any]], timeout: float | None = None) -> dict[int, Any]:
        """Send `messages[rank]` to each rank and wait for every answer.

        A worker that exits, raises, or is silent past the timeout fails the whole request with
        WorkerError; the pool is then shut down (the others may be stuck waiting for it). A
        configuration problem a worker finds (its ConfigError) is raised here as ConfigError
        naming the rank; the pool survives when every rank answers within CONFIG_ERROR_GRACE_S
        and is stopped otherwise.
        """
        if not self._procs:
            raise WorkerError("the pool is not running")
        try:
            self._check_exits("idle")
            blobs: dict[int, bytes] = {}  # a group's workers share one request object: pickle it once
            for rank, msg in messages.items():
                blob = blobs.get(id(msg)) or blobs.setdefault(id(msg), pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
                try:
                    self._conns[rank].send_bytes(blob)
                except OSError as e:
                    raise WorkerError(f"cannot be reached ({e})", rank=rank) from e
            return self._gather(list(messages), timeout or self.config.call_timeout_s, messages[next(iter(messages))][0])
        except ConfigError:
            raise  # every rank answered (else _gather stopped the pool)
        except BaseException:
            self.kill()  # the others may be blocked on the failed one: no polite shutdown
            raise

    def _gather(self, ranks: list[int], timeout: float, doing: str) -> dict[int, Any]:
        results: dict[int, Any] = {}
        config: dict[int, tuple[str, str]] = {}  # rank -> (message, remote traceback)
        pending = {self._conns[r]: r for r in ranks}
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0 and config:
                self.kill()  # the silent ranks are blocked on the failed one
                self._raise_config(config, f"rank(s) {sorted(pending.values())} did not answer; the pool "
                                           "was stopped and restarts on the next call")
            if left <= 0:
                raise WorkerError(f"no answer to '{doing}' within {timeout:g} s (call_timeout_s); "
                                  "the worker is hung", rank=min(pending.values()))
            for conn in wait(list(pending), timeout=min(left, 0.25)):
                rank = pending.pop(conn)
                try:
                    status, *rest = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    code = self._procs[rank].wait(timeout=5)
                    raise WorkerError(f"died during '{doing}' (exit code {code})", rank=rank) from None
                if status == "config":  # the others may wait for this rank: give them a short while
                    config[rank] = (rest[0], rest[1])
                    deadline = min(deadline, time.monotonic() + CONFIG_ERROR_GRACE_S)
                    continue
                if status != "ok":
                    raise WorkerError(f"raised during '{doing}': {rest[0]}", rank=rank, remote_traceback=rest[1])
                results[rank] = rest[0]
            for conn, rank in pending.items():
                code = self._procs[rank].poll()
                if code is not None and not conn.poll():
                    raise WorkerError(f"died during '{doing}' (exit code {code})", rank=rank)
        if config:
            self._raise_config(config, "the pool is intact")
        return results

    @staticmethod
    def _raise_config(config: dict[int, tuple[str, str]], state: str) -> None:
        rank = min(config)
        message, remote = config[rank]
        log.debug("worker rank %d configuration error; remote traceback:\n%s", rank, remote)
        raise ConfigError(f"worker rank {rank}: {message} ({state})")

    def kill(self) -> None:
        """Stop every worker at once (after a failure: the others may be stuck in a collective)."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        self.shutdown()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker (politely, then by force) and remove the private directory."""
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(("shutdown", None)))
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for conn in self._conns:
            conn.close()
        if self._procs:
            log.info("pool stopped (pids %s)", self.pids)
        self._procs, self._conns = [], []
        if self._dir:
            remove_dir(self._dir)
            self._dir = self.workdir = None
        _LIVE_POOLS.discard(self)
