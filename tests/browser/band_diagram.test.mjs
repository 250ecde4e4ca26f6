// The band diagram in a real browser against a real ComfyUI with the pack loaded.
//
//   COMFYUI_PATH=$HOME/.cache/pcpp-comfyui/ComfyUI node --test tests/browser/
//
// Needs: COMFYUI_PATH (ComfyUI source), a Python that runs it with comfyui-frontend-package
// installed (COMFYUI_PYTHON, default $COMFYUI_PATH/../venv/bin/python), Debian's chromium
// (PCPP_CHROMIUM, default /usr/bin/chromium) and `npm ci` (playwright-core). Skips, saying which is
// missing, otherwise. Saves a screenshot to docs/img/web-diagram.png (PCPP_SCREENSHOT overrides).
// The second test runs a real workflow (random-weight tiny SD1.5 checkpoint, 2 CPU workers) so the
// node's real `pcpp_stats` reach the widget; it needs checkpoints/tiny_sd15_random.safetensors under
// PCPP_COMFYUI_MODELS (default $COMFYUI_PATH/../models, as /work/shared/comfyui/setup.sh builds it).
// The third switches the front end to Nodes 2.0 (DOM nodes instead of the canvas) and drives the
// widgets there. Tested with front ends 1.49.6 (ComfyUI 0.33.0) and 1.35.9 (ComfyUI v0.8.0).
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";

import { CHECKPOINT, CHROMIUM, CHROMIUM_ARGS, MODELS, ROOT, missing, startComfy } from "./comfy_browser.mjs";

const SHOT = process.env.PCPP_SCREENSHOT ?? join(ROOT, "docs/img/web-diagram.png");

const widgetValue = (page, id, name) => page.evaluate(({ id, name }) =>
  window.app.graph.getNodeById(id).widgets.find((w) => w.name === name).value, { id, name });

/** Who draws the node: "vue" for Nodes 2.0 (DOM nodes, front end >= 1.27), else the LiteGraph "canvas". */
const renderer = (page, id) => page.evaluate((id) => (document.querySelector(`[data-node-id="${id}"]`) ? "vue" : "canvas"), id);

/** A widget's row in a Nodes 2.0 node: its label and its control. */
const vueRow = (page, id, name) =>
  page.locator(`[data-node-id="${id}"]`).getByText(name, { exact: true }).locator("xpath=..");

/**
 * Drag a number widget `px` pixels to the right with the mouse, as a user does, in the renderer
 * that shows the node: on the canvas, the widget's middle (its arrows sit at the ends); in Nodes 2.0,
 * the field's scrub area (front end 1.4x; 1.3x's fields have none, see the Nodes 2.0 test).
 */
async function dragNumber(page, id, name, px) {
  let at;
  if (await renderer(page, id) === "vue") {
    const box = await vueRow(page, id, name).locator(".cursor-ew-resize").boundingBox();
    at = { x: box.x + box.width / 2, y: box.y + box.height / 2 };
  } else {
    // widget rows move when the node grows (its diagram, new stats lines): read them after the
    // canvas has drawn the current layout, as what a user aims at is what is on screen
    await page.evaluate(() => new Promise((ok) => {
      window.app.canvas.setDirty(true, true);
      requestAnimationFrame(() => requestAnimationFrame(ok));
    }));
    at = await page.evaluate(({ id, name }) => {
      const { app } = window;
      const node = app.graph.getNodeById(id);
      const w = node.widgets.find((x) => x.name === name);
      const rect = app.canvas.canvas.getBoundingClientRect();
      const y = (w.last_y ?? w.y) + (w.computedHeight ?? window.LiteGraph.NODE_WIDGET_HEIGHT) / 2;
      const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + y]);
      return { x: rect.left + x0, y: rect.top + y0 };
    }, { id, name });
  }
  await page.mouse.move(at.x, at.y);
  await page.mouse.down();
  for (let dx = 2; dx <= px; dx += 2) await page.mouse.move(at.x + dx, at.y);
  await page.mouse.up();
  await page.keyboard.press("Escape"); // in case the front end took it for a click and asks for a value
}

/**
 * Raise a number widget in a Nodes 2.0 node as a user does: front end 1.4x scrubs its fields by
 * dragging; 1.3x's fields (PrimeVue InputNumber) have none, their + steps the value on press.
 */
async function raiseNumber(page, id, name) {
  const row = vueRow(page, id, name);
  if (await row.locator(".cursor-ew-resize").count()) await dragNumber(page, id, name, 20); // a step per 10 px
  else await row.locator(".p-inputnumber-increment-button").click();
}

const reason = await missing();
const STATS_KEYS = ["bands", "bytes_per_call", "bytes_per_call_warmup", "calls", "devices", "exchange", "fallback",
  "far_pool", "far_refresh", "fraction", "height", "mode", "model_bytes_sent", "partial", "seconds_per_call",
  "weights_on", "width"];

describe("PCPP band diagram in ComfyUI's front end", { skip: reason ?? false }, () => {
  let comfy;
  let browser;
  let page;
  let ids;
  const problems = [];

  before(async () => {
    const { chromium } = await import("playwright-core");
    comfy = await startComfy();
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
    const info = await (await fetch(`${comfy.url}/object_info/PCPPKSampler`)).json();
    assert.ok(info.PCPPKSampler, `PCPPKSampler is not registered:\n${comfy.log.join("").slice(-3000)}`);
    page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    page.on("pageerror", (e) => problems.push(e.message));
    page.on("console", (m) => { if (m.text().includes("[pcpp]")) problems.push(m.text()); });
    await page.goto(comfy.url, { waitUntil: "domcontentloaded" });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.PCPPKSampler,
      null, { timeout: 120_000 });
  });

  after(async () => {
    await browser?.close();
    await comfy?.stop();
  });

  const screenshot = async () => {
    const box = await page.evaluate((id) => {
      const { app } = window;
      app.canvas.deselectAll();
      app.canvas.setDirty(true, true);
      const node = app.graph.getNodeById(id);
      const rect = app.canvas.canvas.getBoundingClientRect();
      const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
      return { x: rect.left, y: rect.top, width: x1 + 30, height: y1 + 20 };
    }, ids.node);
    await page.waitForTimeout(200); // one canvas frame
    mkdirSync(dirname(SHOT), { recursive: true });
    await page.screenshot({ path: SHOT, clip: box });
  };

  test("the diagram follows the fraction, devices, mode and band clicks; stats show", { timeout: 120_000 }, async () => {
    // an EmptyLatentImage of 1024x768 pixels feeding a PCPP KSampler on 4 CPU workers
    ids = await page.evaluate(() => {
      const { app, LiteGraph } = window;
      app.graph.clear();
      const latent = LiteGraph.createNode("EmptyLatentImage");
      latent.pos = [90, 260];
      app.graph.add(latent);
      latent.widgets.find((w) => w.name === "width").value = 1024;
      latent.widgets.find((w) => w.name === "height").value = 768;
      const node = LiteGraph.createNode("PCPPKSampler");
      node.pos = [400, 130];
      app.graph.add(node);
      latent.connect(0, node, node.inputs.findIndex((i) => i.name === "latent_image"));
      // PCPPParallelModel feeding a plain KSampler: its diagram finds the latent through the sampler
      const model = LiteGraph.createNode("PCPPParallelModel");
      model.pos = [900, 60];
      app.graph.add(model);
      const plain = LiteGraph.createNode("KSampler");
      plain.pos = [900, 420];
      app.graph.add(plain);
      model.connect(0, plain, plain.inputs.findIndex((i) => i.name === "model"));
      const latent2 = LiteGraph.createNode("EmptyLatentImage");
      latent2.pos = [1000, 740];
      app.graph.add(latent2);
      latent2.widgets.find((w) => w.name === "height").value = 768;
      latent2.connect(0, plain, plain.inputs.findIndex((i) => i.name === "latent_image"));
      app.canvas.ds.offset = [0, 0];
      app.canvas.ds.scale = 1;
      app.canvas.setDirty(true, true);
      return { node: node.id, model: model.id, plain: plain.id };
    });
    const diagram = page.locator(`.pcpp-diagram[data-pcpp-node="${ids.node}"]`);
    await diagram.waitFor({ state: "visible" });
    const bandsOf = (id) => page.evaluate((id) => document.querySelector(`.pcpp-diagram[data-pcpp-node="${id}"]`)?.dataset.pcppBands, id);
    // PCPPParallelModel reads the latent of the sampler it feeds (picked up on the next canvas frame)
    await page.waitForFunction((id) =>
      document.querySelector(`.pcpp-diagram[data-pcpp-node="${id}"]`)?.dataset.pcppBands === "0,48,96", ids.model,
      { timeout: 10_000 }).catch(async () => assert.fail(`PCPPParallelModel drew bands ${await bandsOf(ids.model)}`));
    const data = () => diagram.evaluate((e) => ({ ...e.dataset, svg: e.querySelector("svg").outerHTML }));

    // the latent size comes from the connected EmptyLatentImage: 768/8 = 96 rows, "auto" drawn as 2 GPUs
    await page.waitForFunction((id) =>
      document.querySelector(`.pcpp-diagram[data-pcpp-node="${id}"]`)?.dataset.pcppBands === "0,48,96", ids.node,
      { timeout: 10_000 }).catch(async () => assert.fail(`PCPPKSampler drew bands ${await bandsOf(ids.node)}`));

    // devices as the text widget sets it: value, then its callback
    await page.evaluate((id) => {
      const w = window.app.graph.getNodeById(id).widgets.find((x) => x.name === "devices");
      w.value = "cpu:4";
      w.callback?.(w.value);
    }, ids.node);
    const initial = await data();
    assert.equal(initial.pcppBands, "0,24,48,72,96");
    assert.equal(initial.pcppWindow, "0,32"); // band 0: 24 rows + ceil(0.3*24) = 8 below

    // drag the neighbour_fraction widget to the right with the mouse, as a user does
    assert.equal(await widgetValue(page, ids.node, "neighbour_fraction"), 0.3);
    await dragNumber(page, ids.node, "neighbour_fraction", 10); // 0.05 a pixel, past the click drift
    const fraction = await widgetValue(page, ids.node, "neighbour_fraction");
    assert.ok(fraction > 0.3, `dragging raised the fraction (now ${fraction})`);
    const dragged = await data();
    assert.equal(Number(dragged.pcppFraction), fraction, "the diagram shows the widget's value");
    assert.notEqual(dragged.pcppWindow, initial.pcppWindow, "the attention window grew");
    assert.notEqual(dragged.svg, initial.svg, "the drawing changed");
    assert.ok(Number(dragged.pcppRatio) > Number(initial.pcppRatio), "more K/V is sent with a larger fraction");

    // click band 2: its window is drawn (rows 48-72 plus neighbours)
    await diagram.locator('[data-band="2"]').click();
    const clicked = await data();
    assert.equal(clicked.pcppSelected, "2");
    const [w0, w1] = clicked.pcppWindow.split(",").map(Number);
    assert.ok(w0 < 48 && w1 > 72, `band 2's window ${w0}-${w1} covers its rows and some neighbours`);

    // the model family behind the byte estimate: SDXL's attention layers give another share
    await diagram.locator(".pcpp-preset").click();
    const xl = await data();
    assert.equal(await diagram.locator(".pcpp-preset").innerText(), "SDXL");
    assert.notEqual(xl.pcppRatio, clicked.pcppRatio);
    assert.equal(await page.evaluate((id) => window.app.graph.getNodeById(id).properties.pcpp_model, ids.node), "sdxl");
    // then Flux.1-dev: another share (its text partials count), its basis says so; then back to SD1.x
    await diagram.locator(".pcpp-preset").click();
    const flux = await data();
    assert.equal(await diagram.locator(".pcpp-preset").innerText(), "Flux.1-dev");
    assert.notEqual(flux.pcppRatio, clicked.pcppRatio);
    assert.match(await diagram.innerText(), /text partials/);
    await diagram.locator(".pcpp-preset").click();
    assert.equal((await data()).pcppRatio, clicked.pcppRatio);

    // mode naive: own band only
    await page.evaluate((id) => {
      const w = window.app.graph.getNodeById(id).widgets.find((x) => x.name === "mode");
      w.value = "naive";
      w.callback?.(w.value);
    }, ids.node);
    assert.equal((await data()).pcppWindow, "48,72");
    await page.evaluate((id) => {
      const w = window.app.graph.getNodeById(id).widgets.find((x) => x.name === "mode");
      w.value = "pcpp";
      w.callback?.(w.value);
    }, ids.node);

    // run stats arrive the way the server sends them: an `executed` message for the node
    await page.evaluate((id) => window.comfyAPI.api.api.dispatchCustomEvent("executed", {
      node: String(id), display_node: String(id), prompt_id: "browser-test",
      output: { pcpp_stats: [{ mode: "pcpp", fraction: 0.3, bands: 4, devices: ["cpu", "cpu", "cpu", "cpu"],
        calls: 20, seconds_per_call: 0.84, bytes_per_call: 1_572_864, bytes_per_call_warmup: 5_242_880,
        height: 96, width: 128, fallback: null }] },
    }), ids.node);
    await diagram.locator(".pcpp-stats").waitFor();
    const stats = await diagram.locator(".pcpp-stats").innerText();
    assert.match(stats, /last run: pcpp f=0\.3 · 4 band\(s\) on 4 device\(s\)/);
    assert.match(stats, /0\.840 s\/call/);
    assert.match(stats, /1\.57 MB · warm-up 5\.24 MB \(30% of it\)/);

    // the drawing is no input: not in the prompt, not in widgets_values; a plain KSampler has none
    const wire = await page.evaluate(async (ids) => {
      const { app } = window;
      const prompt = await app.graphToPrompt();
      const node = app.graph.getNodeById(ids.node);
      return {
        inputs: Object.keys(prompt.output[String(ids.node)].inputs),
        values: node.serialize().widgets_values.length,
        widgets: node.widgets.length,
        plain: app.graph.getNodeById(ids.plain).widgets.some((w) => w.name === "pcpp_diagram"),
      };
    }, ids);
    assert.ok(!wire.inputs.includes("pcpp_diagram"), wire.inputs.join());
    assert.ok(wire.inputs.includes("neighbour_fraction"));
    assert.equal(wire.values, wire.widgets - 1);
    assert.equal(wire.plain, false);
    assert.deepEqual(problems, []);
    await screenshot();
  });

  test("a real run's pcpp_stats reach the node", {
    timeout: 240_000,
    skip: existsSync(join(MODELS, "checkpoints", CHECKPOINT)) ? false : `no ${CHECKPOINT} under ${MODELS}/checkpoints`,
  }, async () => {
    assert.ok(ids, "the first test built the graph");
    // checkpoint -> prompts -> the PCPP KSampler of the first test (2 CPU workers, 3 steps, a 256x256
    // image: the tiny model attends over every latent pixel, so larger ones cost minutes on a CPU) ->
    // SaveLatent (an output node, so the prompt runs). The new nodes sit left and right of the view.
    await page.evaluate(({ node: id, ckpt }) => {
      const { app, LiteGraph } = window;
      const add = (type, pos) => {
        const n = LiteGraph.createNode(type);
        n.pos = pos;
        app.graph.add(n);
        return n;
      };
      const slot = (n, name) => n.inputs.findIndex((i) => i.name === name);
      const set = (n, name, value) => { n.widgets.find((w) => w.name === name).value = value; };
      const node = app.graph.getNodeById(id);
      const latent = node.getInputNode(slot(node, "latent_image"));
      set(latent, "width", 256);
      set(latent, "height", 256);
      const loader = add("CheckpointLoaderSimple", [-800, 40]);
      set(loader, "ckpt_name", ckpt);
      const pos = add("CLIPTextEncode", [-420, 0]);
      const neg = add("CLIPTextEncode", [-420, 140]);
      set(pos, "text", "a lighthouse");
      const save = add("SaveLatent", [1000, 130]);
      loader.connect(0, node, slot(node, "model"));
      loader.connect(1, pos, slot(pos, "clip"));
      loader.connect(1, neg, slot(neg, "clip"));
      pos.connect(0, node, slot(node, "positive"));
      neg.connect(0, node, slot(node, "negative"));
      node.connect(0, save, slot(save, "samples"));
      for (const [name, value] of [["devices", "cpu:2"], ["steps", 3], ["warmup_steps", 1], ["cfg", 5],
        ["neighbour_fraction", 0.3], ["mode", "pcpp"]]) {
        const w = node.widgets.find((x) => x.name === name);
        w.value = value;
        w.callback?.(w.value);
      }
      // the removed graph (PCPPParallelModel -> KSampler) would be queued too: drop it
      for (const n of [...app.graph.nodes]) if (n.type === "PCPPParallelModel" || n.type === "KSampler") app.graph.remove(n);
      for (const n of [...app.graph.nodes]) if (n.type === "EmptyLatentImage" && !n.outputs[0].links?.length) app.graph.remove(n);
    }, { node: ids.node, ckpt: CHECKPOINT });
    // queued as the Run button does, with this page's client id so the `executed` message comes back here
    const queued = await page.evaluate(async (id) => {
      const { app } = window;
      const api = window.comfyAPI.api.api;
      window.pcppTestRun = {};
      api.addEventListener("executed", ({ detail }) => {
        if (String(detail.node) === String(id)) window.pcppTestRun.output = detail.output;
      });
      api.addEventListener("execution_error", ({ detail }) => { window.pcppTestRun.error = detail; });
      const { output, workflow } = await app.graphToPrompt();
      const r = await fetch("/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt: output, client_id: api.clientId, extra_data: { extra_pnginfo: { workflow } } }) });
      return { status: r.status, body: await r.text() };
    }, ids.node);
    assert.equal(queued.status, 200, `the prompt was refused: ${queued.body}`);
    const diagram = page.locator(`.pcpp-diagram[data-pcpp-node="${ids.node}"]`);
    await page.waitForFunction(() => window.pcppTestRun.output || window.pcppTestRun.error, null, { timeout: 220_000 })
      .catch(() => assert.fail(`the run did not finish:\n${comfy.log.join("").slice(-3000)}`));
    const run = await page.evaluate(() => window.pcppTestRun);
    if (run.error) {
      const { node_type: type, exception_type: kind, exception_message: msg, traceback = [] } = run.error;
      assert.fail(`the run failed in ${type}: ${kind}: ${msg.trim()}\n${traceback.slice(-3).join("")}`);
    }
    const stats = run.output.pcpp_stats[0];
    assert.deepEqual(Object.keys(stats).sort(), STATS_KEYS, "the stats keys of the node contract");
    assert.equal(stats.fallback, null, `the run fell back: ${stats.fallback}`);
    assert.equal(stats.bands, 2);
    assert.equal(stats.height, 32);
    await page.waitForFunction((id) => /on 2 device/.test(
      document.querySelector(`.pcpp-diagram[data-pcpp-node="${id}"] .pcpp-stats`)?.textContent ?? ""), ids.node);
    const text = await diagram.locator(".pcpp-stats").innerText();
    assert.match(text, /last run: pcpp f=0\.3 · 2 band\(s\) on 2 device\(s\) · latent 32×32/);
    assert.ok(stats.calls >= 3, `${stats.calls} calls for 3 steps`);
    assert.ok(text.includes(`${stats.calls} calls · ${stats.seconds_per_call.toFixed(3)} s/call`), text);
    // after warm-up a band sends only its neighbours' window rows: less than the whole-image warm-up
    assert.ok(stats.bytes_per_call > 0 && stats.bytes_per_call < stats.bytes_per_call_warmup,
      `${stats.bytes_per_call} B per call after warm-up, ${stats.bytes_per_call_warmup} B during it`);
    assert.deepEqual(problems, []);
    await screenshot();
  });
  test("Nodes 2.0 (DOM nodes): the diagram follows a dragged fraction and the latent's size", { timeout: 60_000 }, async () => {
    assert.ok(ids, "the first test built the graph");
    const latent = await page.evaluate((id) => {
      const node = window.app.graph.getNodeById(id);
      return node.getInputNode(node.inputs.findIndex((i) => i.name === "latent_image")).id;
    }, ids.node);
    // the user's switch (Settings > Nodes 2.0, or the menu's toggle) through the settings API
    await page.evaluate(() => window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", true));
    await page.locator(`[data-node-id="${ids.node}"] .pcpp-diagram`).waitFor({ state: "visible" });
    assert.equal(await renderer(page, ids.node), "vue");
    const diagram = page.locator(`.pcpp-diagram[data-pcpp-node="${ids.node}"]`);
    const data = () => diagram.evaluate((e) => ({ ...e.dataset }));

    const before = await widgetValue(page, ids.node, "neighbour_fraction");
    await raiseNumber(page, ids.node, "neighbour_fraction");
    const fraction = await widgetValue(page, ids.node, "neighbour_fraction");
    assert.ok(fraction > before, `the fraction rose from ${before} (now ${fraction})`);
    assert.equal(Number((await data()).pcppFraction), fraction, "the diagram shows the widget's value");

    // a widget on another node: no canvas frame draws this node now; the front end's graphChanged
    // (sent when the gesture ends) redraws it
    const was = await data();
    await raiseNumber(page, latent, "height");
    const height = await widgetValue(page, latent, "height");
    const rows = Math.floor(height / 8); // the diagram draws the bands, or says why rows this many cannot be split
    await page.waitForFunction(({ id, rows }) => {
      const d = document.querySelector(`.pcpp-diagram[data-pcpp-node="${id}"]`)?.dataset ?? {};
      return d.pcppBands?.endsWith(`,${rows}`) || d.pcppError?.includes(`${rows} rows`);
    }, { id: ids.node, rows }, { timeout: 10_000 })
      .catch(async () => assert.fail(`height ${height}: the diagram shows ${JSON.stringify(await data())}, was ${JSON.stringify(was)}`));
    assert.deepEqual(problems, []);
  });
});
