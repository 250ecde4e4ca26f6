"""Command line: `python -m pcpp_core demo ...`, `... bench ...` and `... doctor ...`."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "pcpp_core.demo", "bench": "pcpp_core.bench", "doctor": "pcpp_core.doctor"}
    if not argv or argv[0] not in commands:
        print("usage: python -m pcpp_core {demo|bench|doctor} [options]   (add -h after a command for its options)")
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
