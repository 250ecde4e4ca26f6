"""The engine's error hierarchy: every failure a caller can act on is one of these."""
from __future__ import annotations


class PCPPError(RuntimeError):
    """Base class of every error the engine raises on purpose."""


class ConfigError(PCPPError, ValueError):
    """An input the caller gave cannot be used; the message names it and what is valid."""


class UnsupportedModelError(ConfigError):
    """The model is not one of the families the engine can split into bands."""


class WorkerError(PCPPError):
    """A worker process died, raised, or stopped answering.

    ``rank`` is the worker's rank (``None`` when the failure is not tied to one worker),
    ``remote_traceback`` the traceback text from inside the worker when it raised.
    """

    def __init__(self, message: str, *, rank: int | None = None, remote_traceback: str | None = None):
        self.rank = rank
        self.remote_traceback = remote_traceback
        text = message if rank is None else f"worker rank {rank}: {message}"
        if remote_traceback:
            text = f"{text}\n--- remote traceback (rank {rank}) ---\n{remote_traceback.rstrip()}"
        super().__init__(text)


class StagingError(ConfigError):
    """The host cannot stage the model for its workers (no room, no such directory): a machine
    setting to change (PCPP_STAGING_DIR), not an input of this run, so hosts report it rather
    than falling back to plain sampling."""
