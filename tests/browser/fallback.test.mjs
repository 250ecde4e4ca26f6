// A run that falls back shows it on the canvas, on PCPP Parallel Model too (needs: see comfy_browser.mjs).
//
//   COMFYUI_PATH=$HOME/.cache/pcpp-comfyui/ComfyUI node --test tests/browser/fallback.test.mjs
//
// checkpoint -> PCPP Parallel Model (devices=cpu:1: one device, so plain sampling) -> KSampler. The
// Parallel Model runs before the sampler, so its stats arrive afterwards as the server's `pcpp.stats`
// event keyed by its node id; the node then shows the reason in a red line. Screenshot:
// docs/img/web-fallback.png (PCPP_SCREENSHOT_FALLBACK overrides).
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { CHECKPOINT, CHROMIUM, CHROMIUM_ARGS, MODELS, ROOT, missing, startComfy } from "./comfy_browser.mjs";

const SHOT = process.env.PCPP_SCREENSHOT_FALLBACK ?? join(ROOT, "docs/img/web-fallback.png");
const reason = (await missing()) ??
  (existsSync(join(MODELS, "checkpoints", CHECKPOINT)) ? null : `no ${CHECKPOINT} under ${MODELS}/checkpoints`);

describe("fallbacks are visible on the node", { skip: reason ?? false }, () => {
  let comfy;
  let browser;
  let page;
  const problems = [];

  before(async () => {
    const { chromium } = await import("playwright-core");
    comfy = await startComfy();
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
    page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    page.on("pageerror", (e) => problems.push(e.message));
    page.on("console", (m) => { if (m.text().includes("[pcpp]")) problems.push(m.text()); });
    await page.goto(comfy.url, { waitUntil: "domcontentloaded" });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.PCPPParallelModel,
      null, { timeout: 120_000 });
  });

  after(async () => {
    await browser?.close();
    await comfy?.stop();
  });

  test("PCPP Parallel Model shows why the run fell back", { timeout: 240_000 }, async () => {
    const id = await page.evaluate((ckpt) => {
      const { app, LiteGraph } = window;
      app.graph.clear();
      const add = (type, pos) => {
        const n = LiteGraph.createNode(type);
        n.pos = pos;
        app.graph.add(n);
        return n;
      };
      const slot = (n, name) => n.inputs.findIndex((i) => i.name === name);
      const set = (n, name, value) => { n.widgets.find((w) => w.name === name).value = value; };
      const loader = add("CheckpointLoaderSimple", [20, 20]);
      set(loader, "ckpt_name", ckpt);
      const parallel = add("PCPPParallelModel", [380, 20]);
      set(parallel, "devices", "cpu:1");
      const pos = add("CLIPTextEncode", [380, 520]);
      const neg = add("CLIPTextEncode", [380, 700]);
      const latent = add("EmptyLatentImage", [20, 300]);
      set(latent, "width", 64);
      set(latent, "height", 64);
      const sampler = add("KSampler", [820, 20]);
      set(sampler, "steps", 1);
      const save = add("SaveLatent", [1160, 20]);
      loader.connect(0, parallel, slot(parallel, "model"));
      loader.connect(1, pos, slot(pos, "clip"));
      loader.connect(1, neg, slot(neg, "clip"));
      parallel.connect(0, sampler, slot(sampler, "model"));
      pos.connect(0, sampler, slot(sampler, "positive"));
      neg.connect(0, sampler, slot(sampler, "negative"));
      latent.connect(0, sampler, slot(sampler, "latent_image"));
      sampler.connect(0, save, slot(save, "samples"));
      return parallel.id;
    }, CHECKPOINT);
    const queued = await page.evaluate(async (id) => {
      const { app } = window;
      const api = window.comfyAPI.api.api;
      window.pcppTestRun = {};
      api.addEventListener("pcpp.stats", ({ detail }) => {
        if (String(detail.node) === String(id)) window.pcppTestRun.stats = detail.stats;
      });
      api.addEventListener("execution_error", ({ detail }) => { window.pcppTestRun.error = detail; });
      const { output, workflow } = await app.graphToPrompt();
      const r = await fetch("/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt: output, client_id: api.clientId, extra_data: { extra_pnginfo: { workflow } } }) });
      return { status: r.status, body: await r.text() };
    }, id);
    assert.equal(queued.status, 200, `the prompt was refused: ${queued.body}`);
    await page.waitForFunction(() => window.pcppTestRun.stats || window.pcppTestRun.error, null, { timeout: 220_000 })
      .catch(() => assert.fail(`no pcpp.stats event:\n${comfy.log.join("").slice(-3000)}`));
    const run = await page.evaluate(() => window.pcppTestRun);
    assert.equal(run.error, undefined, `the run failed: ${JSON.stringify(run.error)}`);
    assert.match(run.stats.fallback, /devices='cpu:1' is one device only/);
    const line = page.locator(`.pcpp-diagram[data-pcpp-node="${id}"] .pcpp-stats .pcpp-error`);
    await line.waitFor({ timeout: 10_000 });
    assert.match(await line.innerText(), /^fell back: devices='cpu:1' is one device only/);
    const colour = await line.evaluate((e) => getComputedStyle(e).color);
    assert.notEqual(colour, await page.locator(`.pcpp-diagram[data-pcpp-node="${id}"] .pcpp-stats div`).first()
      .evaluate((e) => getComputedStyle(e).color), "the warning line has its own colour");
    assert.deepEqual(problems, []);
    const box = await page.evaluate((nid) => {
      const { app } = window;
      app.canvas.deselectAll();
      app.canvas.setDirty(true, true);
      const node = app.graph.getNodeById(nid);
      const rect = app.canvas.canvas.getBoundingClientRect();
      const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - 40]);
      const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
      return { x: rect.left + Math.max(0, x0 - 10), y: rect.top + Math.max(0, y0), width: x1 - x0 + 20, height: y1 - y0 + 20 };
    }, id);
    await page.waitForTimeout(200);
    mkdirSync(dirname(SHOT), { recursive: true });
    await page.screenshot({ path: SHOT, clip: box });
  });
});
