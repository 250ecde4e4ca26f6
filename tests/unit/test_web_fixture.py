"""The web diagram's geometry cases must be what pcpp_core.geometry computes today.

tests/web/geometry_cases.json is generated from the engine and checked against web/pcpp_geometry.js
by `node --test tests/web/`; this test fails when the engine changed and the fixture was not
regenerated (python tests/web/gen_cases.py), so the two sides cannot drift apart unnoticed.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

GEN = Path(__file__).resolve().parents[1] / "web" / "gen_cases.py"


def _generator():
    spec = importlib.util.spec_from_file_location("pcpp_web_gen_cases", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_fixture_equals_regenerated_cases():
    gen = _generator()
    committed = gen.FIXTURE.read_text()
    assert committed == gen.render(), "tests/web/geometry_cases.json is stale: run python tests/web/gen_cases.py"


def test_fixture_pins_the_rounding_edge_cases():
    cases = json.loads(_generator().FIXTURE.read_text())
    rows = {(f, h): k for f, h, k in cases["window_rows"]}
    assert rows[(0.3, 10)] == 3  # 0.3*10 is 3.0000000000000004 in binary: the epsilon keeps it at 3
    assert rows[(0.1, 30)] == 3
    assert any(c.get("error") == "too_small" for c in cases["split_rows"])
    assert any(c.get("error") == "not_multiple" for c in cases["split_rows"])
