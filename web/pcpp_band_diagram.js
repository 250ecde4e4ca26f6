// pcpp.BandDiagram: on the PCPP nodes, a live drawing of the latent's bands and of the rows the
// selected band's self-attention sees, plus the last run's stats from the `pcpp_stats` UI output.
//
// The maths is in pcpp_diagram.js / pcpp_geometry.js (pure, tested against the Python engine);
// this file only reads the node's widgets, draws, and chains the node's callbacks.

import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { basisText, DEFAULT_LATENT, diagramModel, formatPercent, PRESETS, statsLines } from "./pcpp_diagram.js";

const NODE_IDS = new Set(["PCPPKSampler", "PCPPParallelModel"]);
const LIVE = new Set(); // the nodes that have a diagram, so a change elsewhere in the graph redraws them
const WATCHED = ["devices", "neighbour_fraction", "mode", "cfg_split", "warmup_steps", "steps", "cfg"];
const SVG_NS = "http://www.w3.org/2000/svg";
const PIC = 120; // the latent's longer side in the picture, px
const MIN_WIDTH = 460; // room for the picture and its text beside it
const MIN_HEIGHT = 200; // until the content is measured
const TEXT_MIN = 150; // narrower than this beside the picture, the text goes under it
const SLACK = 4; // px below the content: the front end's rounding of widget heights
const STYLE = `
.pcpp-diagram { position: relative; display: flex; flex-direction: column; gap: 4px; font: 11px/1.35 sans-serif;
  color: var(--fg-color, #ddd); overflow: hidden; box-sizing: border-box; padding: 2px 0; }
.pcpp-diagram > * { flex: none; }
.pcpp-diagram .pcpp-row { display: flex; flex-wrap: wrap; gap: 4px 8px; align-items: flex-start; }
.pcpp-diagram svg { flex: none; cursor: pointer; max-width: 100%; height: auto; }
.pcpp-diagram .pcpp-lines { flex: 1 1 ${TEXT_MIN}px; min-width: 0; }
.pcpp-diagram .pcpp-lines div, .pcpp-diagram .pcpp-stats div { margin-bottom: 1px; overflow-wrap: anywhere; }
.pcpp-diagram .pcpp-dim { color: var(--descrip-text, #999); }
.pcpp-diagram .pcpp-big { font-size: 12px; font-weight: 600; }
.pcpp-diagram .pcpp-error { color: #f87171; }
.pcpp-diagram .pcpp-preset { text-decoration: underline dotted; cursor: pointer; }
.pcpp-diagram .pcpp-stats { border-top: 1px solid var(--border-color, #444); padding-top: 3px; }
`;

const el = (tag, attrs = {}, text = null) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
};
const svg = (tag, attrs = {}, text = null) => {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== null) e.textContent = text;
  return e;
};

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

/** The node itself when it samples, else the first sampler its MODEL output feeds (2 hops). */
function samplerOf(node, depth = 2) {
  if (node.inputs?.some((i) => i.name === "latent_image")) return node;
  if (depth === 0) return null;
  for (let slot = 0; slot < (node.outputs?.length ?? 0); slot++) {
    for (const next of node.getOutputNodes(slot) ?? []) {
      const found = samplerOf(next, depth - 1);
      if (found) return found;
    }
  }
  return null;
}

/** Latent rows/cols from the node that makes the sampler's latent (width/height widgets, /8). */
function latentOf(sampler, depth = 4) {
  const slot = sampler?.inputs?.findIndex((i) => i.name === "latent_image" || i.type === "LATENT") ?? -1;
  if (slot < 0 || depth === 0) return null;
  const src = sampler.getInputNode(slot);
  if (!src) return null;
  const w = Number(widgetValue(src, "width"));
  const h = Number(widgetValue(src, "height"));
  if (w > 0 && h > 0) return { height: Math.floor(h / 8), width: Math.floor(w / 8), source: src.title || src.type };
  return latentOf(src, depth - 1);
}

/** Everything the drawing depends on, read from the node and the graph around it. */
function readInputs(node, state) {
  const sampler = samplerOf(node);
  const stats = state.stats;
  const latent = latentOf(sampler) ??
    (stats?.height ? { height: stats.height, width: stats.width, source: "last run" } :
      { ...DEFAULT_LATENT, source: "assumed, no latent connected" });
  const cfg = Number(widgetValue(sampler, "cfg"));
  return {
    devices: widgetValue(node, "devices") ?? "auto",
    fraction: Number(widgetValue(node, "neighbour_fraction") ?? 0.3),
    mode: widgetValue(node, "mode") ?? "pcpp",
    cfgSplit: !!widgetValue(node, "cfg_split"),
    usesCfg: Number.isFinite(cfg) ? cfg !== 1 : true,
    warmup: Number(widgetValue(node, "warmup_steps") ?? 0),
    steps: Number(widgetValue(sampler, "steps")) || undefined,
    height: latent.height,
    width: latent.width,
    latentSource: latent.source,
    preset: node.properties?.pcpp_model ?? "sd1",
    band: state.band,
    autoCount: stats?.devices?.length || null,
  };
}

function drawPicture(m) {
  const h = m.height;
  const w = m.width;
  const scale = PIC / Math.max(h, w, 1);
  const [pw, ph] = [Math.max(24, w * scale), Math.max(24, h * scale)];
  const pad = 2;
  const root = svg("svg", { width: pw + 2 * pad, height: ph + 2 * pad, viewBox: `${-pad} ${-pad} ${pw + 2 * pad} ${ph + 2 * pad}` });
  root.append(svg("title", {}, "click a band to see its attention window"));
  if (m.error) {
    root.append(svg("rect", { x: 0, y: 0, width: pw, height: ph, fill: "none", stroke: "#f87171", "stroke-dasharray": 4 }));
    return root;
  }
  const y = (row) => (row * ph) / h;
  const b = m.bands;
  for (let i = 0; i < b.count; i++) {
    const [r0, r1] = b.rows(i);
    const sel = i === m.selected;
    const rect = svg("rect", {
      x: 0, y: y(r0), width: pw, height: y(r1) - y(r0), "data-band": i,
      fill: sel ? "#2563eb" : i % 2 ? "#3f4654" : "#535b6b", stroke: "#1b1e24", "stroke-width": 1,
    });
    rect.append(svg("title", {}, `band ${i}: rows ${r0}–${r1}`));
    root.append(rect);
    if (y(r1) - y(r0) >= 11) {
      root.append(svg("text", { x: 4, y: (y(r0) + y(r1)) / 2 + 4, fill: "#fff", "font-size": 10, "pointer-events": "none" }, String(i)));
    }
  }
  const [w0, w1] = m.window;
  // what the selected band's attention sees at full resolution: rows outside it dimmed, a frame around it
  for (const [a, z] of [[0, w0], [w1, h]]) {
    if (z > a) root.append(svg("rect", { x: 0, y: y(a), width: pw, height: y(z) - y(a), fill: "rgba(0,0,0,0.55)", "pointer-events": "none" }));
  }
  root.append(svg("rect", {
    x: 1, y: y(w0) + 1, width: pw - 2, height: Math.max(0, y(w1) - y(w0) - 2), fill: "none",
    stroke: "#facc15", "stroke-width": 2, "stroke-dasharray": "5 3", "pointer-events": "none", "data-window": `${w0},${w1}`,
  }));
  return root;
}

function describe(m, inputs) {
  const lines = []; // [text, className]
  if (m.error) return [[m.error, "pcpp-error"]];
  const [r0, r1] = m.bands.rows(m.selected);
  const [w0, w1] = m.window;
  const latent = `latent ${m.height}×${m.width} (${inputs.latentSource})`;
  if (m.mode === "off") {
    lines.push(["off: the model runs unsplit on one device", "pcpp-big"], [latent, "pcpp-dim"]);
    return lines;
  }
  lines.push([`band ${m.selected} of ${m.bands.count}: rows ${r0}–${r1}`, "pcpp-big"], [latent, "pcpp-dim"]);
  const sees = {
    pcpp: `attention sees rows ${w0}–${w1}: own band + ${r0 - w0} above, ${w1 - r1} below (f=${m.fraction.toFixed(2)})`,
    naive: "attention sees its own band only: no exchange",
    distrifusion: `attention sees the whole image (rows 0–${m.height}), stale after warm-up`,
    sync: `attention sees the whole image (rows 0–${m.height}), fresh every step`,
  }[m.mode];
  lines.push([sees, ""]);
  if (m.mode === "pcpp" && m.perLevel.length > 1) {
    const deeper = m.perLevel.slice(1).map((p) => `L${p.level} ${p.window[0]}–${p.window[1]}`).join(" · ");
    lines.push([`${m.preset.levelsLabel}: ${deeper}`, "pcpp-dim"]);
  }
  if (m.kv) {
    const what = m.preset.sent;
    let kv = m.kv.ratio === null ? `${what} sent per step: none (one band)` :
      `${what} sent per step after warm-up: ${formatPercent(m.kv.ratio)} of DistriFusion`;
    if (m.run !== null && inputs.steps) kv += ` · ${formatPercent(m.run)} over ${inputs.steps} steps`;
    lines.push([kv, "pcpp-big"]);
  }
  for (const note of m.notes) lines.push([note, "pcpp-dim"]);
  return lines;
}

function render(node, state, then = null) {
  try {
    draw(node, state);
    then?.(node, state);
  } catch (e) {
    // never let the drawing break the canvas's draw loop; say once what went wrong, keep trying
    if (!state.failed) console.warn("[pcpp] band diagram:", e);
    state.failed = true;
  }
}

function draw(node, state) {
  const root = state.root;
  root.dataset.pcppNode = String(node.id); // first drawn before the graph gave the node its id
  const inputs = readInputs(node, state);
  const key = JSON.stringify(inputs);
  if (key === state.key) return;
  state.key = key;
  const m = diagramModel(inputs);
  Object.assign(root.dataset, {
    pcppMode: m.mode,
    pcppFraction: String(m.fraction),
    pcppBands: m.bands ? m.bands.bounds.join(",") : "",
    pcppSelected: String(m.selected ?? ""),
    pcppWindow: m.window ? m.window.join(",") : "",
    pcppRatio: m.kv?.ratio === null || !m.kv ? "" : String(m.kv.ratio),
    pcppError: m.error ?? "",
    pcppRenders: String(Number(root.dataset.pcppRenders ?? 0) + 1),
  });
  const text = el("div", { class: "pcpp-lines" });
  for (const [t, cls] of describe(m, inputs)) text.append(el("div", cls ? { class: cls } : {}, t));
  const basis = el("div", { class: "pcpp-dim" });
  const families = Object.values(PRESETS).map((p) => p.label).join(" / ");
  const preset = el("span", { class: "pcpp-preset", title: `click: switch the model family (${families}): band unit and exchanging layers` }, m.preset.label);
  basis.append("basis: ", preset, basisText(m.preset));
  if (m.mode !== "off" && !m.error) text.append(basis);
  const row = el("div", { class: "pcpp-row" });
  row.append(drawPicture(m), text);
  const children = [row];
  const stats = statsLines(state.stats);
  if (stats.length) {
    const box = el("div", { class: "pcpp-stats" });
    const warn = (t) => t.startsWith("fell back") || t.startsWith("partly on the host");
    stats.forEach((t) => box.append(el("div", warn(t) ? { class: "pcpp-error" } : {}, t)));
    children.push(box);
  }
  root.replaceChildren(...children);
  state.measure = true; // measured on the next canvas frame, once laid out (fitHeight)
  node.setDirtyCanvas?.(true, false);
}

/**
 * Keep the node's room for the diagram equal to its content at the node's current width. The text
 * wraps (CSS), so its height depends on the width: measured after each redraw and whenever the
 * width changes, it becomes the DOM widget's minimum height (getMinHeight), from which the front end
 * computes the node's size and grows the node; a node is never shrunk under the user.
 */
function fitHeight(node, state) {
  const { root } = state;
  if (!root.isConnected || root.clientWidth === 0) return; // not laid out yet
  if (!state.measure && root.clientWidth === state.width) return;
  state.measure = false;
  state.width = root.clientWidth;
  const last = root.lastElementChild; // content height, not the element's (which fills the widget)
  const content = last ? last.offsetTop + last.offsetHeight : 0;
  const need = Math.ceil(content) + SLACK + 2 * (state.widget?.margin ?? 10); // the DOM widget's margins
  if (need === state.minHeight) return;
  state.minHeight = need;
  const size = node.computeSize?.();
  if (size && size[1] > node.size[1]) node.setSize([node.size[0], size[1]]);
  node.setDirtyCanvas?.(true, true);
}

function onClick(node, state, event) {
  const band = event.target?.closest?.("[data-band]")?.getAttribute("data-band");
  if (band !== null && band !== undefined) {
    state.band = Number(band);
  } else if (event.target?.classList?.contains("pcpp-preset")) {
    const names = Object.keys(PRESETS);
    const now = node.properties?.pcpp_model ?? "sd1";
    node.properties ??= {};
    node.properties.pcpp_model = names[(names.indexOf(now) + 1) % names.length]; // saved with the workflow
  } else {
    return;
  }
  render(node, state);
}

function addDiagram(node) {
  const root = el("div", { class: "pcpp-diagram", title: "PCPP bands: click a band to see what its attention sees" });
  const state = { root, band: 0, key: null, stats: null, minHeight: MIN_HEIGHT };
  node.pcppDiagram = state;
  LIVE.add(node);
  const widget = node.addDOMWidget("pcpp_diagram", "pcpp_diagram", root, {
    serialize: false, // a drawing, not an input: keep it out of the prompt and widgets_values
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => state.minHeight,
    // the canvas redraws the node after a change anywhere (e.g. the latent's size): re-read the
    // inputs then; render() does nothing unless they changed
    onDraw: () => render(node, state, fitHeight),
  });
  widget.serialize = false;
  state.widget = widget;
  // the front end sets the element's width (node resized, side panel opened) without always redrawing
  // the canvas: a redraw lets fitHeight measure the content at the new width
  state.resized = new ResizeObserver(() => {
    if (root.clientWidth !== state.width) node.setDirtyCanvas?.(true, true);
  });
  state.resized.observe(root);
  root.addEventListener("click", (e) => onClick(node, state, e));
  for (const name of WATCHED) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      const r = callback?.apply(this, args);
      render(node, state);
      return r;
    };
  }
  if (node.size[0] < MIN_WIDTH) node.setSize([MIN_WIDTH, node.size[1]]);
  render(node, state);
}

function showStats(node, stats) {
  if (!stats || !node?.pcppDiagram) return;
  node.pcppDiagram.stats = stats;
  node.pcppDiagram.key = null;
  render(node, node.pcppDiagram);
}

function chain(proto, name, after) {
  const original = proto[name];
  proto[name] = function (...args) {
    const r = original?.apply(this, args);
    after.apply(this, args);
    return r;
  };
}

app.registerExtension({
  name: "pcpp.BandDiagram",
  init() {
    if (!document.getElementById("pcpp-band-diagram-style")) {
      document.head.append(el("style", { id: "pcpp-band-diagram-style" }, STYLE));
    }
  },
  setup() {
    // A widget on another node (the latent's width/height, the sampler's steps) changed. The canvas
    // renderer redraws our node then (onDraw above), but Nodes 2.0 (front end >= 1.27, Vue DOM
    // nodes; tested on 1.35.9 and 1.49.6) draws no node on the canvas: the front end's change
    // tracker announces every edit with `graphChanged`, in both renderers. render() only redraws
    // what changed.
    api.addEventListener("graphChanged", () => {
      for (const node of LIVE) if (node.pcppDiagram) render(node, node.pcppDiagram);
    });
    // PCPP Parallel Model runs before the sampler: the server sends its run's stats afterwards,
    // keyed by the node's id (nodes/hook.py publish)
    api.addEventListener("pcpp.stats", (e) => {
      const id = e.detail?.node;
      for (const node of LIVE) if (String(node.id) === String(id)) showStats(node, e.detail.stats);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_IDS.has(nodeData?.name)) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      addDiagram(this);
    });
    chain(nodeType.prototype, "onExecuted", function (message) {
      showStats(this, message?.pcpp_stats?.[0]);
    });
    chain(nodeType.prototype, "onConnectionsChange", function () {
      if (this.pcppDiagram) render(this, this.pcppDiagram);
    });
    chain(nodeType.prototype, "onRemoved", function () {
      this.pcppDiagram?.resized?.disconnect();
      this.pcppDiagram = null; // the DOM widget removes its element; drop our references
      LIVE.delete(this);
    });
  },
});
