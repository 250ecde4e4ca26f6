"""Generate tests/web/geometry_cases.json from pcpp_core.geometry, the engine's own arithmetic.

    python tests/web/gen_cases.py           # rewrite the fixture
    python tests/web/gen_cases.py --check   # exit 1 when the committed fixture is stale

The JS port (web/pcpp_geometry.js) is tested against these cases by `node --test tests/web/`, and
tests/unit/test_web_fixture.py fails when this output and the committed file differ, so the engine
and the diagram cannot drift apart silently.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().with_name("geometry_cases.json")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pcpp_core.errors import ConfigError  # noqa: E402
from pcpp_core.bench.comm import DIT_GEOMETRY  # noqa: E402
from pcpp_core.geometry import Bands, LayerSpec, bytes_sent, split_rows, window_rows  # noqa: E402
from pcpp_core.plans_dit import flux_spec_values  # noqa: E402

# The neighbour_fraction widget steps by 0.05; the browser may hand over i*0.05 with float noise
# or the rounded decimal, so both spellings are cases.
SLIDER = sorted({i * 0.05 for i in range(41)} | {round(i * 0.05, 2) for i in range(41)})
ODD_FRACTIONS = [0.1, 0.3, 0.7, 1 / 3, 2 / 3, 0.15, 0.45, 0.55, 2.5, 7.0, 64.0]

# The exchanging layers of the presets in web/pcpp_diagram.js: the UNets' self-attention as
# (level, channels, count), Flux.1-dev from bench comm's geometry through plans_dit.flux_spec_values.
UNET_PRESETS = {
    "sd1": {"levels": 3, "attention": [(0, 320, 5), (1, 640, 5), (2, 1280, 5), (3, 1280, 1)]},
    "sdxl": {"levels": 2, "attention": [(1, 640, 10), (2, 1280, 60)]},
}
ELEMENT_SIZE = 2  # the presets' dtype (fp16/bf16): the text partials' float32 log-sum-exp makes it matter


def preset_specs() -> dict[str, tuple[int, list[LayerSpec]]]:
    """name -> (levels, specs) for every preset the diagram offers."""
    out = {name: (p["levels"], [LayerSpec("attention", lv, ch) for lv, ch, n in p["attention"] for _ in range(n)])
           for name, p in UNET_PRESETS.items()}
    out["flux"] = (1, flux_spec_values(**DIT_GEOMETRY["flux-dev"]))
    return out


def _error_kind(message: str) -> str:
    if "not a multiple" in message:
        return "not_multiple"
    if "too small" in message:
        return "too_small"
    return "bands"


def window_cases() -> list[list[float]]:
    heights = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 16, 20, 24, 30, 40, 48, 64, 100, 128]
    return [[f, h, window_rows(f, h)] for f in SLIDER + ODD_FRACTIONS for h in heights]


def split_cases() -> list[dict[str, Any]]:
    out = []
    for levels in range(4):
        for height in [0, 4, 8, 12, 16, 24, 40, 64, 72, 96, 100, 128, 136, 160, 256]:
            for bands in range(0, 9):
                case: dict[str, Any] = {"height": height, "bands": bands, "levels": levels}
                try:
                    case["bounds"] = list(split_rows(height, bands, levels))
                except ConfigError as e:
                    case["error"] = _error_kind(str(e))
                out.append(case)
    return out


def band_cases() -> list[dict[str, Any]]:
    """Every band, level and fraction of a spread of splits: rows, window and needed rows."""
    out = []
    shapes = [(64, 64, 2, 3), (128, 128, 3, 3), (96, 64, 4, 3), (128, 96, 2, 2), (72, 40, 3, 3),
              (136, 81, 5, 3), (160, 128, 8, 2), (16, 24, 2, 3), (48, 17, 3, 1)]
    for height, width, count, levels in shapes:
        bands = Bands.split(height, width, count, levels)
        for fraction in [None, 0.0, 0.05, 0.1, 0.15000000000000002, 0.3, 0.35000000000000003, 0.5, 1.0, 1.5, 2.0, 64.0]:
            windows, needed = [], []
            for level in range(levels + 1):
                windows.append([list(bands.window(b, level, fraction)) for b in range(count)])
                needed.append([[list(bands.needed(d, s, level, fraction)) for s in range(count)] for d in range(count)])
            out.append({"height": height, "width": width, "count": count, "levels": levels, "fraction": fraction,
                        "bounds": list(bands.bounds),
                        "level_size": [list(bands.level_size(lv)) for lv in range(levels + 1)],
                        "rows": [[list(bands.rows(b, lv)) for b in range(count)] for lv in range(levels + 1)],
                        "window": windows, "needed": needed})
    return out


def _spec_json(s: LayerSpec) -> dict[str, Any]:
    return {"kind": s.kind, "level": s.level, "channels": s.channels, "kernel": s.kernel,
            "stride": s.stride, "padding": s.padding, "text": s.text, "heads": s.heads}


def bytes_cases(seed: int = 4) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(60):
        levels = rng.randint(0, 3)
        unit = 1 << levels
        count = rng.randint(1, 6)
        height = unit * rng.randint(count, count + 12)
        width = rng.randint(1, 130)
        bands = Bands.split(height, width, count, levels)
        specs = []
        for _ in range(rng.randint(1, 8)):
            level = rng.randint(0, levels)
            kind = rng.choice(["conv", "groupnorm", "attention", "attention"])
            if kind == "conv":
                k = rng.choice([1, 3, 3, 5])
                specs.append(LayerSpec("conv", level, rng.choice([4, 320, 640]), k, rng.choice([1, 2]), k // 2))
            else:
                specs.append(LayerSpec(kind, level, rng.choice([8, 32, 320, 1280])))
        fraction = rng.choice([None, 0.0, 0.3, 0.35000000000000003, 0.5, 1.0, 2.0, rng.random() * 3])
        batch, element = rng.choice([1, 2, 4]), rng.choice([1, 2, 4])
        exchange = rng.random() > 0.1
        out.append({"height": height, "width": width, "count": count, "levels": levels,
                    "specs": [_spec_json(s) for s in specs], "batch": batch, "element_size": element,
                    "fraction": fraction, "exchange": exchange,
                    "sent": [bytes_sent(specs, bands, b, batch=batch, element_size=element, fraction=fraction,
                                        exchange=exchange) for b in range(count)]})
    return out + joint_cases(seed + 1)


def joint_cases(seed: int) -> list[dict[str, Any]]:
    """DiT blocks (joint specs, text partials or none) among attention layers, at the patch level."""
    rng = random.Random(seed)
    out = []
    for _ in range(30):
        count = rng.randint(1, 6)
        height = 2 * rng.randint(count, count + 12)
        width = rng.randint(1, 130)
        bands = Bands.split(height, width, count, 1)
        specs = []
        for _ in range(rng.randint(1, 6)):
            heads = rng.choice([1, 4, 24])
            if rng.random() < 0.2:
                specs.append(LayerSpec("attention", 1, heads * rng.choice([8, 64])))
            else:
                specs.append(LayerSpec("joint", 1, heads * rng.choice([8, 128]), text=rng.choice([0, 7, 77, 256]),
                                       heads=heads))
        fraction = rng.choice([None, 0.0, 0.3, 0.5, 1.0, rng.random() * 3])
        batch, element = rng.choice([1, 2]), rng.choice([1, 2, 4])
        exchange = rng.random() > 0.1
        out.append({"height": height, "width": width, "count": count, "levels": 1,
                    "specs": [_spec_json(s) for s in specs], "batch": batch, "element_size": element,
                    "fraction": fraction, "exchange": exchange,
                    "sent": [bytes_sent(specs, bands, b, batch=batch, element_size=element, fraction=fraction,
                                        exchange=exchange) for b in range(count)]})
    return out


def preset_cases() -> list[dict[str, Any]]:
    """bytes_sent over each preset's layers at its dtype, as the diagram's byte share uses them."""
    out = []
    for name, (levels, specs) in preset_specs().items():
        for height, width, count in [(64, 64, 2), (128, 64, 3), (128, 64, 4), (96, 64, 8), (128, 64, 8),
                                     (128, 128, 2), (128, 128, 4), (256, 256, 8)]:
            bands = Bands.split(height, width, count, levels)
            for fraction in [None, 0.0, 0.3, 0.35000000000000003, 1.0, 2.0]:
                out.append({"preset": name, "height": height, "width": width, "count": count, "fraction": fraction,
                            "element_size": ELEMENT_SIZE,
                            "sent": [bytes_sent(specs, bands, b, batch=1, element_size=ELEMENT_SIZE,
                                                fraction=fraction) for b in range(count)]})
    return out


def build() -> dict[str, Any]:
    return {
        "_generated_by": "tests/web/gen_cases.py from pcpp_core/geometry.py; do not edit by hand",
        "presets": {k: {"levels": levels, "element_size": ELEMENT_SIZE, "specs": [_spec_json(s) for s in specs]}
                    for k, (levels, specs) in preset_specs().items()},
        "window_rows": window_cases(),
        "split_rows": split_cases(),
        "bands": band_cases(),
        "bytes_sent": bytes_cases(),
        "preset_bytes": preset_cases(),
    }


def render() -> str:
    return json.dumps(build(), separators=(",", ":")) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not FIXTURE.exists() or FIXTURE.read_text() != text:
            print(f"{FIXTURE} is stale: run python tests/web/gen_cases.py", file=sys.stderr)
            return 1
        return 0
    FIXTURE.write_text(text)
    print(f"wrote {FIXTURE} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
