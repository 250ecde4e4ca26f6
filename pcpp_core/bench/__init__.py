"""`python -m pcpp_core bench {comm,speed,quality,model,plot}`: the numbers users choose modes by.

Each part prints a readable table, or with `--json` one JSON object per line (fields `bench,
mode, fraction, bands, height, width` plus the part's figures); `--save FILE` appends the JSON
lines to a file as well, which `bench plot` turns into PNG charts. Benchmarks are not tests: the
smoke tests only run each part at a tiny size.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import time

log = logging.getLogger("pcpp.bench")

PARTS: dict[str, str] = {
    "comm": "bytes sent per device per step, per mode (analytic, cross-checked on real gloo workers)",
    "speed": "seconds per step: one process vs CPU workers, side by side, and the engine's overhead",
    "quality": "final sample of a full sampling run per mode/fraction vs one process (PSNR, max abs)",
    "model": "MODELLED multi-GPU speed-up (compute and bytes -> time; a model, not a measurement)",
    "plot": "PNG charts from the JSON lines the other parts --save",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pcpp_core bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    for name, help_text in PARTS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="one JSON object per line instead of tables")
        p.add_argument("--save", metavar="FILE", help="also append the JSON lines to FILE (for bench plot)")
        p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
        importlib.import_module(f"{__name__}.{name}").add_arguments(p)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose and not logging.getLogger().handlers:
        # a CLI run is the top-level program: a stderr handler on our own logger only
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger = logging.getLogger("pcpp")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    start = time.perf_counter()
    code = importlib.import_module(f"{__name__}.{args.part}").run(args)
    log.info("bench %s finished in %.1f s", args.part, time.perf_counter() - start)
    if not args.json:
        print(f"\n(bench {args.part}: {time.perf_counter() - start:.0f} s wall)")
    return code
