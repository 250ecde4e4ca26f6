"""Where the host puts files for its workers, and how they are removed however the host ends.

Two kinds of private (0700) directories, both named `pcpp-<host pid>-<host start time>-<kind>-*`:

    pool    the FileStore rendezvous of one pool (a few bytes), in the system temp dir
    stage   one model file while the workers load it (model-sized), in the staging root:
            $PCPP_STAGING_DIR, else PoolConfig.staging_dir, else the system temp dir

Nothing goes to /dev/shm: in Docker it is 64 MB by default, far less than a diffusion model.
The directories are removed when the pool stops, at normal exit, and on SIGTERM and SIGINT
(chained to the handler that was there before). A host killed with SIGKILL cannot clean up:
the next pool to start removes the directories of hosts that no longer exist; the start time
in the name tells a reused pid from the host that made the directory.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Any

from .errors import StagingError

log = logging.getLogger("pcpp.staging")

STAGING_ENV = "PCPP_STAGING_DIR"
_NAME = re.compile(r"^pcpp-(\d+)-(\d+)-")
_OWNED: set[str] = set()  # directories this process made and has not removed yet
_PREVIOUS: dict[int, Any] = {}  # signal -> the handler ours replaced
_LOCK = threading.Lock()


def staging_root(configured: str = "") -> str:
    """The directory model files are staged in: $PCPP_STAGING_DIR, else `configured`, else the temp dir."""
    return os.environ.get(STAGING_ENV) or configured or tempfile.gettempdir()


def process_start_time(pid: int) -> int | None:
    """Clock ticks after boot at which `pid` started (Linux /proc), or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        if not os.path.isdir("/proc/self"):  # no /proc (not Linux): a live pid is all we can tell
            try:
                os.kill(pid, 0)
                return 0
            except ProcessLookupError:
                return None
            except PermissionError:
                return 0
        return None


def host_tag(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"pcpp-{pid}-{process_start_time(pid) or 0}"


def make_private_dir(root: str, kind: str) -> str:
    """A new 0700 directory in `root` named after this host; removed by remove_dir or at exit."""
    if not os.path.isdir(root):
        raise StagingError(f"the staging directory {root} does not exist; create it or set {STAGING_ENV} "
                           "to an existing directory on a disk with room for the diffusion model")
    install_cleanup()
    path = tempfile.mkdtemp(prefix=f"{host_tag()}-{kind}-", dir=root)
    with _LOCK:
        _OWNED.add(path)
    return path


def remove_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
        with _LOCK:
            _OWNED.discard(path)


def check_space(directory: str, needed: int) -> None:
    """StagingError naming the directory, the bytes needed and PCPP_STAGING_DIR when `needed` does not fit."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise StagingError(
            f"the staging directory {directory} has {free} bytes free; sending the diffusion model to the "
            f"workers needs {needed} bytes there. Set {STAGING_ENV} to a directory on a disk with room "
            "(in Docker: a mounted volume; /dev/shm is RAM and small by default)")


def sweep_stale(roots: list[str]) -> list[str]:
    """Remove the pcpp-* directories (ours by uid) of hosts that no longer exist; returns what went."""
    removed = []
    for root in dict.fromkeys(roots):
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            m = _NAME.match(entry.name)
            if not m or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
            except OSError:
                continue
            pid, started = int(m.group(1)), int(m.group(2))
            alive = process_start_time(pid)
            if alive is None or (started and alive and alive != started):  # gone, or its pid reused
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    if removed:
        log.info("removed %d directories left by hosts that no longer exist: %s", len(removed), ", ".join(removed))
    return removed


def cleanup_all() -> None:
    """Remove every directory this process made (exit and signal handlers call this)."""
    with _LOCK:
        paths = list(_OWNED)
        _OWNED.clear()
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _on_signal(signum: int, frame: Any) -> None:
    cleanup_all()
    previous = _PREVIOUS.get(signum)
    if callable(previous):  # e.g. Python's SIGINT handler (KeyboardInterrupt), or the host's own
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # the default action: end the process as it would have ended
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install_cleanup() -> None:
    """Clean up at exit, and on SIGTERM/SIGINT before the previous handler runs.

    Signal handlers can only be set from the main thread: a host that starts pools from
    another thread (ComfyUI runs prompts in one) calls this at import, from its main thread.
    Re-installing is harmless: a handler already ours is kept, never chained to itself.
    """
    with _LOCK:
        if not _PREVIOUS.get("atexit"):
            atexit.register(cleanup_all)
            _PREVIOUS["atexit"] = True  # type: ignore[index]
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if current is not _on_signal:
            _PREVIOUS[signum] = current
            signal.signal(signum, _on_signal)
