// What the band diagram shows, computed from the node's inputs: pure, no DOM, unit-tested.
//
// Everything geometric goes through pcpp_geometry.js (the port of pcpp_core/geometry.py); this
// module only decides which bands exist for the node's inputs and summarises them for display.

import { Bands, GeometryError, bytesSent } from "./pcpp_geometry.js";

export const MODES = ["pcpp", "distrifusion", "naive", "sync", "off"];
export const AUTO_GPUS = 2; // "auto" = every GPU of the server; the browser cannot count them
export const DEFAULT_LATENT = Object.freeze({ height: 64, width: 64 }); // 512x512 pixels

const attn = (level, channels, count) => Array.from({ length: count }, () => ({ kind: "attention", level, channels }));
const joint = (level, channels, heads, text, count) =>
  Array.from({ length: count }, () => ({ kind: "joint", level, channels, text, heads }));

const UNET_BASIS = Object.freeze({
  sent: "K/V",
  counted: "self-attention K/V",
  notCounted: "conv borders and GroupNorm stats not counted",
  levelsLabel: "deeper levels (rows at that level)",
});

// The layers that exchange, per model family, as the engine counts them (pcpp_core.geometry.bytes_sent):
// `levels` is the number of stride-2 downsamplings (a DiT's 2x2 patchify is one), which fixes the band
// unit (2**levels latent rows); `elementSize` the bytes of the model's dtype (it matters where float32
// statistics travel beside activations: a DiT's text partials).
export const PRESETS = Object.freeze({
  sd1: Object.freeze({
    label: "SD1.x",
    levels: 3,
    elementSize: 2,
    // self-attention (attn1) as pcpp_core.plans.profile_layers lists it: 2 input + 3 output transformers
    // at levels 0..2 (320/640/1280 channels), 1 in the middle block
    layers: Object.freeze([...attn(0, 320, 5), ...attn(1, 640, 5), ...attn(2, 1280, 5), ...attn(3, 1280, 1)]),
    ...UNET_BASIS,
  }),
  sdxl: Object.freeze({
    label: "SDXL",
    levels: 2,
    elementSize: 2,
    // depth 2 at level 1 (4 in, 6 out), depth 10 at level 2 (20 in, 10 middle, 30 out)
    layers: Object.freeze([...attn(1, 640, 10), ...attn(2, 1280, 60)]),
    ...UNET_BASIS,
  }),
  flux: Object.freeze({
    label: "Flux.1-dev",
    levels: 1,
    elementSize: 2, // bf16; the text partials' log-sum-exp travels as float32
    // pcpp_core.plans_dit.flux_spec_values with bench comm's DIT_GEOMETRY["flux-dev"]: 19 double + 38
    // single blocks, 3072 wide, 24 heads, at the patch level; 256 T5 tokens whose partial attention
    // every block but the last sends to every other band (the last block's text output is unused)
    layers: Object.freeze([...joint(1, 3072, 24, 256, 19 + 37), ...joint(1, 3072, 24, 0, 1)]),
    sent: "K/V + text partials",
    counted: "image K/V + text partials (256 tokens, to every other band)",
    notCounted: "text K/V stays local, nothing else travels",
    levelsLabel: "patch rows",
  }),
});

/** The basis line after the preset's label: what the byte share counts and what it leaves out. */
export function basisText(preset) {
  const unit = 2 ** preset.levels;
  const patches = preset.layers.some((s) => s.kind === "joint") ? " (2×2 patches)" : "";
  return ` ${preset.counted}, busiest band, bands on ${unit}-row steps${patches}; ${preset.notCounted}`;
}

const DEVICE_RE = /^(cpu|cuda)(?::(\d+))?$/;

/**
 * How many bands a `devices` string makes, as pcpp_core.config.parse_devices reads it.
 * "auto" cannot be counted in the browser: `autoCount` (e.g. from the last run) or AUTO_GPUS.
 * Returns {count, assumed, error}.
 */
export function parseDeviceCount(spec, autoCount = null) {
  const text = String(spec ?? "").trim().toLowerCase().replace(/ /g, "");
  if (text === "auto" || text === "cuda") {
    return autoCount ? { count: autoCount, assumed: false, error: null } : { count: AUTO_GPUS, assumed: true, error: null };
  }
  const m = DEVICE_RE.exec(text);
  if (m && m[1] === "cpu") {
    const n = Number(m[2] ?? 1);
    return n >= 1 ? { count: n, assumed: false, error: null } : { count: 0, assumed: false, error: "cpu:N needs N >= 1" };
  }
  const seen = new Set();
  for (const part of text.split(",").filter(Boolean)) {
    const p = DEVICE_RE.exec(part);
    if (!p || p[1] !== "cuda" || p[2] === undefined) {
      return { count: 0, assumed: false, error: `cannot parse "${part}": use auto, cpu:N or cuda:0,cuda:1` };
    }
    if (seen.has(p[2])) return { count: 0, assumed: false, error: `${part} is named twice` };
    seen.add(p[2]);
  }
  if (!seen.size) return { count: 0, assumed: false, error: "names no device: use auto, cpu:N or cuda:0,cuda:1" };
  return { count: seen.size, assumed: false, error: null };
}

/** Attention window after warm-up, in band heights: null = whole image (pcpp_core.config.window_fraction). */
export function windowFraction(mode, fraction) {
  return { pcpp: fraction, naive: 0 }[mode] ?? null;
}

/** Band groups: cfg_split with CFG and an even device count puts cond and uncond on n/2 bands each. */
export function bandLayout(count, cfgSplit, usesCfg = true) {
  const groups = cfgSplit && usesCfg && count >= 2 && count % 2 === 0 ? 2 : 1;
  return { groups, bands: count / groups };
}

/**
 * Bytes the busiest band sends per step after warm-up, over those of DistriFusion (whole-image
 * window) on the same bands: bytes_sent over the preset's layers (batch 1: a ratio).
 * null when nothing would be sent either way (one band).
 */
export function kvRatio(bands, mode, fraction, specs, elementSize = 1) {
  const busiest = (fr, exchange) => {
    let most = 0;
    for (let b = 0; b < bands.count; b++) {
      most = Math.max(most, bytesSent(specs, bands, b, { batch: 1, elementSize, fraction: fr, exchange }));
    }
    return most;
  };
  const full = busiest(null, true);
  if (full === 0) return { ratio: null, bytes: 0, full: 0 };
  const bytes = busiest(windowFraction(mode, fraction), mode !== "naive");
  return { ratio: bytes / full, bytes, full };
}

/** Share of DistriFusion's K/V bytes over a whole run of `steps` calls with `warmup` synchronous ones. */
export function runRatio(mode, steadyRatio, steps, warmup) {
  if (steadyRatio === null || !(steps > 0)) return null;
  if (mode === "naive") return 0; // naive never exchanges, not even while warming up
  if (mode === "sync") return 1;
  const w = Math.min(Math.max(0, warmup), steps);
  return (w + (steps - w) * steadyRatio) / steps;
}

/**
 * Everything the widget draws for one state of the node's inputs.
 * input: {devices, fraction, mode, cfgSplit, usesCfg, height, width, preset, band, autoCount, steps, warmup}
 */
export function diagramModel(input) {
  const preset = PRESETS[input.preset] ?? PRESETS.sd1;
  const mode = MODES.includes(input.mode) ? input.mode : "pcpp";
  const fraction = Number(input.fraction) || 0;
  const height = input.height ?? DEFAULT_LATENT.height;
  const width = input.width ?? DEFAULT_LATENT.width;
  const base = { mode, fraction, preset, height, width, levels: preset.levels, notes: [], error: null };

  if (mode === "off") {
    return { ...base, devices: 1, groups: 1, bands: new Bands(height, width, preset.levels, [0, height]),
             selected: 0, window: [0, height], perLevel: [], kv: null, run: null,
             notes: ["off: the model runs unsplit on one device"] };
  }
  const dev = parseDeviceCount(input.devices, input.autoCount);
  if (dev.error) return { ...base, error: `devices: ${dev.error}` };
  const { groups, bands: count } = bandLayout(dev.count, !!input.cfgSplit, input.usesCfg ?? true);
  let bands;
  try {
    bands = Bands.split(height, width, count, preset.levels);
  } catch (e) {
    if (e instanceof GeometryError) return { ...base, devices: dev.count, groups, error: e.message };
    throw e;
  }
  const selected = Math.min(Math.max(0, input.band | 0), count - 1);
  const wf = windowFraction(mode, fraction);
  const perLevel = [];
  for (let level = 0; level <= preset.levels; level++) {
    perLevel.push({ level, rows: bands.rows(selected, level), window: bands.window(selected, level, wf) });
  }
  const kv = kvRatio(bands, mode, fraction, preset.layers, preset.elementSize);
  const notes = [];
  if (dev.assumed) notes.push(`"auto" drawn as ${AUTO_GPUS} GPUs (the count is known after a run)`);
  if (groups === 2) notes.push(`cfg_split: cond and uncond each on ${count} bands`);
  if (fraction > 0 && mode !== "pcpp") notes.push(`neighbour_fraction is unused in ${mode} mode`);
  return {
    ...base, devices: dev.count, groups, bands, selected, window: perLevel[0].window, perLevel, kv,
    run: kv ? runRatio(mode, kv.ratio, input.steps, input.warmup ?? 0) : null, notes,
  };
}

/** 1234567 -> "1.23 MB" (decimal units, as byte counts of a network are usually given). */
export function formatBytes(n) {
  if (!Number.isFinite(n)) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)} ${units[i]}`;
}

export function formatPercent(r) {
  if (r === null || r === undefined) return "–";
  const p = r * 100;
  return `${p < 10 && p > 0 ? p.toFixed(1) : Math.round(p)}%`;
}

/** The lines the node shows after a run, from the `pcpp_stats` UI output. */
export function statsLines(s) {
  if (!s || typeof s !== "object" || !s.mode) return []; // {}: PCPP Parallel Model before its sampler ran
  const devices = Array.isArray(s.devices) ? s.devices : [];
  const fr = s.mode === "pcpp" ? ` f=${s.fraction}` : "";
  const lines = [
    `last run: ${s.mode}${fr} · ${s.bands} band(s) on ${devices.length} device(s)` +
      (s.height && s.width ? ` · latent ${s.height}×${s.width}` : ""),
    `${s.calls} calls · ${Number(s.seconds_per_call ?? 0).toFixed(3)} s/call`,
  ];
  const steady = s.bytes_per_call;
  const warm = s.bytes_per_call_warmup;
  let sent = `sent per call (busiest device): ${formatBytes(steady)}`;
  if (warm > 0) sent += ` · warm-up ${formatBytes(warm)} (${formatPercent(steady / warm)} of it)`;
  lines.push(sent);
  if (s.model_bytes_sent > 0) lines.push(`model sent to the workers: ${formatBytes(s.model_bytes_sent)}`);
  if (Array.isArray(s.weights_on) && s.weights_on.length) lines.push(`weights on: ${s.weights_on.join(", ")}`);
  if (s.fallback) lines.push(`fell back: ${s.fallback}`);
  if (s.partial) lines.push(`partly on the host: ${s.partial}`);
  return lines;
}
