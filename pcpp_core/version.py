"""The pack's version: one place, read by the nodes' load log line and checked against pyproject.toml.

Kept free of imports so tools (the pyproject test, a release script) can read it without torch or ComfyUI.
"""
from __future__ import annotations

__version__ = "0.1.0"
