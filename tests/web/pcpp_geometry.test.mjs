// web/pcpp_geometry.js against cases generated from pcpp_core/geometry.py (tests/web/gen_cases.py).
// Run: node --test tests/web/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { Bands, GeometryError, bytesSent, splitRows, windowRows } from "../../web/pcpp_geometry.js";
import { PRESETS } from "../../web/pcpp_diagram.js";

const cases = JSON.parse(readFileSync(new URL("./geometry_cases.json", import.meta.url), "utf8"));

test("windowRows rounds like window_rows, float noise included", () => {
  assert.ok(cases.window_rows.length > 1000);
  for (const [f, h, want] of cases.window_rows) {
    assert.equal(windowRows(f, h), want, `windowRows(${f}, ${h})`);
  }
  // the cases the epsilon exists for
  assert.equal(windowRows(0.3, 10), 3);
  assert.equal(windowRows(0.1, 30), 3);
});

test("splitRows gives the same bounds and refuses the same sizes", () => {
  let refused = 0;
  for (const c of cases.split_rows) {
    const where = `splitRows(${c.height}, ${c.bands}, ${c.levels})`;
    if (c.error) {
      refused++;
      assert.throws(() => splitRows(c.height, c.bands, c.levels),
        (e) => e instanceof GeometryError && e.kind === c.error, where);
    } else {
      assert.deepEqual(splitRows(c.height, c.bands, c.levels), c.bounds, where);
    }
  }
  assert.ok(refused > 50 && refused < cases.split_rows.length - 50, "both outcomes are exercised");
  assert.deepEqual(splitRows(128, 3, 3), [0, 40, 80, 128]); // the docstring's example
});

test("Bands rows, level sizes, windows and needed rows match per band, level and fraction", () => {
  for (const c of cases.bands) {
    const bands = Bands.split(c.height, c.width, c.count, c.levels);
    const where = `${c.height}x${c.width}/${c.count} L${c.levels} f=${c.fraction}`;
    assert.deepEqual([...bands.bounds], c.bounds, where);
    for (let lv = 0; lv <= c.levels; lv++) {
      assert.deepEqual(bands.levelSize(lv), c.level_size[lv], `${where} levelSize(${lv})`);
      for (let b = 0; b < c.count; b++) {
        assert.deepEqual(bands.rows(b, lv), c.rows[lv][b], `${where} rows(${b}, ${lv})`);
        assert.deepEqual(bands.window(b, lv, c.fraction), c.window[lv][b], `${where} window(${b}, ${lv})`);
        for (let s = 0; s < c.count; s++) {
          assert.deepEqual(bands.needed(b, s, lv, c.fraction), c.needed[lv][b][s], `${where} needed(${b}, ${s}, ${lv})`);
        }
      }
    }
  }
});

test("bytesSent equals bytes_sent for conv, GroupNorm, attention and joint (DiT) layers", () => {
  let nonzero = 0;
  let text = 0;
  for (const c of cases.bytes_sent) {
    const bands = Bands.split(c.height, c.width, c.count, c.levels);
    const opts = { batch: c.batch, elementSize: c.element_size, fraction: c.fraction, exchange: c.exchange };
    const got = c.sent.map((_, b) => bytesSent(c.specs, bands, b, opts));
    assert.deepEqual(got, c.sent, JSON.stringify({ ...c, sent: undefined }));
    nonzero += c.sent.some((v) => v > 0);
    text += c.exchange && c.count > 1 && c.specs.some((s) => s.kind === "joint" && s.text > 0);
  }
  assert.ok(nonzero > 50, "most cases send something");
  assert.ok(text > 10, "text partials are exercised");
});

// a spec with the generator's defaults spelled out (the presets leave them implicit)
const full = ({ kind, level, channels, kernel = 1, stride = 1, padding = 0, text = 0, heads = 0 }) =>
  ({ kind, level, channels, kernel, stride, padding, text, heads });

test("the diagram's presets are the generator's (Flux from flux_spec_values), and their byte counts match", () => {
  assert.deepEqual(Object.keys(PRESETS).sort(), Object.keys(cases.presets).sort());
  for (const [name, p] of Object.entries(cases.presets)) {
    assert.equal(PRESETS[name].levels, p.levels, name);
    assert.equal(PRESETS[name].elementSize, p.element_size, name);
    assert.deepEqual(PRESETS[name].layers.map(full), p.specs, name);
  }
  assert.equal(cases.presets.flux.specs.length, 19 + 38);
  for (const c of cases.preset_bytes) {
    const preset = PRESETS[c.preset];
    const bands = Bands.split(c.height, c.width, c.count, preset.levels);
    const opts = { batch: 1, elementSize: preset.elementSize, fraction: c.fraction };
    const got = c.sent.map((_, b) => bytesSent(preset.layers, bands, b, opts));
    assert.deepEqual(got, c.sent, `${c.preset} ${c.height}x${c.width}/${c.count} f=${c.fraction}`);
  }
});
