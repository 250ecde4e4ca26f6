// web/pcpp_diagram.js: what the widget shows for a node's inputs. Run: node --test tests/web/
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  AUTO_GPUS, bandLayout, basisText, diagramModel, formatBytes, formatPercent, kvRatio, parseDeviceCount, PRESETS, runRatio,
  statsLines, windowFraction,
} from "../../web/pcpp_diagram.js";
import { Bands } from "../../web/pcpp_geometry.js";

test("parseDeviceCount reads devices like parse_devices", () => {
  assert.deepEqual(parseDeviceCount("cpu:4"), { count: 4, assumed: false, error: null });
  assert.deepEqual(parseDeviceCount(" CPU "), { count: 1, assumed: false, error: null });
  assert.deepEqual(parseDeviceCount("cuda:0, cuda:1,cuda:3"), { count: 3, assumed: false, error: null });
  assert.deepEqual(parseDeviceCount("auto"), { count: AUTO_GPUS, assumed: true, error: null });
  assert.deepEqual(parseDeviceCount("auto", 4), { count: 4, assumed: false, error: null });
  assert.match(parseDeviceCount("cuda:0,cuda:0").error, /twice/);
  assert.match(parseDeviceCount("cpu:0").error, /N >= 1/);
  assert.match(parseDeviceCount("gpu").error, /cannot parse/);
  assert.match(parseDeviceCount("").error, /names no device/);
});

test("windowFraction and bandLayout follow the engine's modes and cfg_split rule", () => {
  assert.equal(windowFraction("pcpp", 0.3), 0.3);
  assert.equal(windowFraction("naive", 0.3), 0);
  assert.equal(windowFraction("distrifusion", 0.3), null);
  assert.equal(windowFraction("sync", 0.3), null);
  assert.deepEqual(bandLayout(4, true), { groups: 2, bands: 2 });
  assert.deepEqual(bandLayout(3, true), { groups: 1, bands: 3 }); // odd: no split
  assert.deepEqual(bandLayout(4, true, false), { groups: 1, bands: 4 }); // cfg 1: no uncond batch
  assert.deepEqual(bandLayout(4, false), { groups: 1, bands: 4 });
});

test("kvRatio: whole-image window is 1, naive 0, pcpp in between and growing with f", () => {
  const bands = Bands.split(128, 128, 4, 3);
  const specs = PRESETS.sd1.layers;
  assert.equal(kvRatio(bands, "distrifusion", 0.3, specs).ratio, 1);
  assert.equal(kvRatio(bands, "naive", 0.3, specs).ratio, 0);
  const small = kvRatio(bands, "pcpp", 0.3, specs).ratio;
  const large = kvRatio(bands, "pcpp", 1.0, specs).ratio;
  assert.ok(small > 0 && small < large && large < 1, `${small} < ${large}`);
  assert.equal(kvRatio(bands, "pcpp", 64, specs).ratio, 1); // a huge window is DistriFusion's
  assert.equal(kvRatio(Bands.split(64, 64, 1, 3), "pcpp", 0.3, specs).ratio, null);
  // 2 bands of 32 rows, f=0.3: ceil(0.3*h) rows at every level out of h (the neighbour's height)
  const two = Bands.split(64, 64, 2, 3);
  const r = kvRatio(two, "pcpp", 0.3, [{ kind: "attention", level: 0, channels: 1 }]).ratio;
  assert.equal(r, 10 / 32);
});

test("flux preset: bands on 2-row steps, text partials counted and said so", () => {
  // Flux dev at 1024x1024: a 128x128 latent, 64x64 patches; 3 bands of whole patch rows
  const m = diagramModel({ devices: "cpu:3", fraction: 0.3, mode: "pcpp", height: 128, width: 128, preset: "flux" });
  assert.equal(m.error, null);
  assert.deepEqual([...m.bands.bounds], [0, 42, 84, 128]); // 21, 21, 22 patch rows
  assert.equal(m.perLevel.length, 2);
  assert.deepEqual(m.perLevel[1].window, [0, 28]); // band 0 at the patch level: 21 rows + ceil(0.3*21) = 7 below
  // the text partials travel in every mode that exchanges, window or not: pcpp f=0 still sends them
  const zero = diagramModel({ devices: "cpu:3", fraction: 0, mode: "pcpp", height: 128, width: 128, preset: "flux" });
  assert.ok(zero.kv.ratio > 0 && zero.kv.ratio < m.kv.ratio, `${zero.kv.ratio} < ${m.kv.ratio}`);
  const onlyKv = kvRatio(m.bands, "pcpp", 0, PRESETS.flux.layers.map((s) => ({ ...s, text: 0 })), 2);
  assert.equal(onlyKv.ratio, 0);
  assert.equal(diagramModel({ devices: "cpu:3", mode: "naive", height: 128, width: 128, preset: "flux" }).kv.ratio, 0);
  assert.match(basisText(PRESETS.flux), /image K\/V \+ text partials \(256 tokens.*2-row steps \(2×2 patches\); text K\/V stays local/);
  assert.match(basisText(PRESETS.sd1), /self-attention K\/V.*8-row steps; conv borders and GroupNorm stats not counted/);
  assert.doesNotMatch(basisText(PRESETS.sd1), /patches/);
});

test("runRatio counts warm-up calls as whole-image exchanges", () => {
  assert.equal(runRatio("pcpp", 0.25, 20, 4), (4 + 16 * 0.25) / 20);
  assert.equal(runRatio("pcpp", 0.25, 2, 4), 1);
  assert.equal(runRatio("naive", 0, 20, 4), 0);
  assert.equal(runRatio("sync", 1, 20, 4), 1);
  assert.equal(runRatio("pcpp", 0.25, undefined, 4), null);
});

test("diagramModel: bands, selected window and notes for the node's inputs", () => {
  const m = diagramModel({ devices: "cpu:3", fraction: 0.3, mode: "pcpp", height: 128, width: 128, band: 1 });
  assert.equal(m.error, null);
  assert.deepEqual([...m.bands.bounds], [0, 40, 80, 128]);
  assert.equal(m.selected, 1);
  assert.deepEqual(m.window, [28, 92]); // ceil(0.3*40) = 12 rows each side
  assert.equal(m.perLevel.length, 4);
  assert.deepEqual(m.perLevel[3].window, [3, 12]); // 5-row band at level 3: ceil(1.5) = 2 rows
  assert.ok(m.kv.ratio > 0 && m.kv.ratio < 1);

  const naive = diagramModel({ devices: "cpu:3", fraction: 0.3, mode: "naive", height: 128, width: 128, band: 1 });
  assert.deepEqual(naive.window, [40, 80]);
  assert.equal(naive.kv.ratio, 0);
  const df = diagramModel({ devices: "cpu:3", fraction: 0.3, mode: "distrifusion", height: 128, width: 128, band: 1 });
  assert.deepEqual(df.window, [0, 128]);
  assert.match(df.notes.join(), /unused in distrifusion/);

  const off = diagramModel({ devices: "cpu:3", fraction: 0.3, mode: "off" });
  assert.equal(off.bands.count, 1);
  assert.equal(off.kv, null);

  const auto = diagramModel({ devices: "auto", fraction: 0.3, mode: "pcpp", cfgSplit: true, band: 9 });
  assert.equal(auto.groups, 2);
  assert.equal(auto.bands.count, 1);
  assert.equal(auto.selected, 0); // clamped
  assert.match(auto.notes.join(), /"auto" drawn as 2 GPUs/);

  const xl = diagramModel({ devices: "cpu:3", fraction: 0.3, mode: "pcpp", height: 128, width: 128, preset: "sdxl" });
  assert.deepEqual([...xl.bands.bounds], [0, 40, 84, 128]); // unit of 4 rows with two downsamplings

  const tiny = diagramModel({ devices: "cpu:4", fraction: 0.3, mode: "pcpp", height: 24, width: 24 });
  assert.match(tiny.error, /too small for 4 devices.*32 rows \(256 pixels\)/);
  assert.match(diagramModel({ devices: "tpu", mode: "pcpp" }).error, /^devices: /);
});

test("formatting of bytes, percentages and run stats", () => {
  assert.equal(formatBytes(999), "999 B");
  assert.equal(formatBytes(1234567), "1.23 MB");
  assert.equal(formatBytes(45_600_000), "45.6 MB");
  assert.equal(formatPercent(0.3125), "31%");
  assert.equal(formatPercent(0.043), "4.3%");
  assert.equal(formatPercent(null), "–");
  const lines = statsLines({
    mode: "pcpp", fraction: 0.3, bands: 2, devices: ["cpu", "cpu"], calls: 20, seconds_per_call: 0.41234,
    bytes_per_call: 1_000_000, bytes_per_call_warmup: 4_000_000, height: 64, width: 64, fallback: null,
  });
  assert.deepEqual(lines, [
    "last run: pcpp f=0.3 · 2 band(s) on 2 device(s) · latent 64×64",
    "20 calls · 0.412 s/call",
    "sent per call (busiest device): 1.00 MB · warm-up 4.00 MB (25% of it)",
  ]);
  const sent = statsLines({
    mode: "sync", bands: 2, devices: ["cuda:0", "cuda:1"], calls: 3, bytes_per_call: 0,
    model_bytes_sent: 2_500_000, weights_on: ["cuda:0", "cuda:1", "cpu (host)"], fallback: null,
  });
  assert.deepEqual(sent.slice(-2), ["model sent to the workers: 2.50 MB", "weights on: cuda:0, cuda:1, cpu (host)"]);
  const fb = statsLines({ mode: "off", bands: 1, devices: [], calls: 0, bytes_per_call: 0, fallback: "no GPU" });
  assert.equal(fb.at(-1), "fell back: no GPU");
  const part = statsLines({ mode: "sync", bands: 2, devices: ["cpu", "cpu"], calls: 3, bytes_per_call: 0,
    fallback: null, partial: "3 of 6 model calls ran whole on the host: a 4x4 latent cannot be split" });
  assert.equal(part.at(-1), "partly on the host: 3 of 6 model calls ran whole on the host: a 4x4 latent cannot be split");
  assert.deepEqual(statsLines(null), []);
  assert.deepEqual(statsLines({}), []); // PCPP Parallel Model's UI dict before its sampler ran
});
