// What a user meets first, in a real browser against a real ComfyUI with the pack loaded (needs:
// see comfy_browser.mjs): the node search, the nodes' help pages, and the shipped UI workflows opened
// from ComfyUI's template browser.
//
//   COMFYUI_PATH=$HOME/.cache/pcpp-comfyui/ComfyUI node --test tests/browser/workflows.test.mjs
//
// For each workflow: it opens without errors, no two nodes overlap once the band diagrams have drawn,
// each diagram's content fits its box at the saved width and from the node's minimum width up, and a
// screenshot goes to docs/img/workflow-<name>.png (PCPP_SCREENSHOT_DIR overrides; PCPP_WORKFLOW=<name>
// runs one workflow only, for quick iterations).
import assert from "node:assert/strict";
import { mkdirSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { CHROMIUM, CHROMIUM_ARGS, ROOT, frontendVersion, missing, startComfy } from "./comfy_browser.mjs";

const PACK_NAME = "ComfyUI-PCPP"; // the folder startComfy links the pack as: the template module's name
const SHOTS = process.env.PCPP_SCREENSHOT_DIR ?? join(ROOT, "docs/img");
const UI_WORKFLOWS = readdirSync(join(ROOT, "workflows")).filter((f) => f.endsWith(".json"))
  .map((f) => f.slice(0, -".json".length)).sort();
const WORKFLOWS = process.env.PCPP_WORKFLOW ? [process.env.PCPP_WORKFLOW] : UI_WORKFLOWS;

// requests that fail without the pack being at fault: the optional core template index, the internet,
// and the help page's per-locale variant (docs/<node>/<locale>.md), which the front end tries first
const IGNORED = /\/templates\/index[.\w]*\.json|^https?:\/\/(?!127\.0\.0\.1)|\/docs\/PCPP\w+\/[\w-]+\.md$/;

const reason = await missing();
// The template browser's cards, the node library's Info panel and search aliases are what the main
// target's front end (1.49.6, ComfyUI 0.33.0) offers; v0.8.0's 1.35.9 has no Info panel and ranks search
// without aliases, so those checks run from 1.49 on (the template listing API is checked on both).
const version = reason ? null : frontendVersion();
const NEW_FRONTEND = version !== null && (version[0] > 1 || (version[0] === 1 && version[1] >= 49));
const newFrontendOnly = NEW_FRONTEND ? false : `front end ${version?.join(".") ?? "unknown"}: the template browser, Info panel and search alias checks need >= 1.49`;

/** In the page: every node's rectangle (title bar included) and every diagram's fit, in graph units. */
function measure() {
  const { app, LiteGraph } = window;
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const canvas = app.canvas.canvas.getBoundingClientRect();
  const scale = app.canvas.ds.scale;
  const toGraph = (r) => {
    const [x, y] = app.canvas.ds.convertCanvasToOffset([r.left - canvas.left, r.top - canvas.top]);
    return { x, y, w: r.width / scale, h: r.height / scale };
  };
  const nodes = app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, x: n.pos[0], y: n.pos[1] - title, w: n.size[0], h: n.size[1] + title,
    min: n.computeSize(),
  }));
  // the open workflow's diagrams (another tab's graph keeps its own, hidden)
  const shown = [...document.querySelectorAll(".pcpp-diagram")].filter((e) =>
    e.offsetParent !== null && app.graph.getNodeById(Number(e.dataset.pcppNode))?.pcppDiagram?.root === e);
  const diagrams = shown.map((e) => ({
    node: app.graph.getNodeById(Number(e.dataset.pcppNode)).id, box: toGraph(e.getBoundingClientRect()),
    clientHeight: e.clientHeight, scrollHeight: e.scrollHeight, clientWidth: e.clientWidth, scrollWidth: e.scrollWidth,
    error: e.dataset.pcppError,
  }));
  return { nodes, diagrams };
}

function overlaps(nodes) {
  const hit = (a, b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
  const found = [];
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      if (hit(nodes[i], nodes[j])) found.push(`${nodes[i].type}#${nodes[i].id} and ${nodes[j].type}#${nodes[j].id}`);
    }
  }
  return found;
}

/** Each diagram's content inside its element, and the element inside its node (1 px rounding). */
function misfits({ nodes, diagrams }) {
  const out = [];
  for (const d of diagrams) {
    const n = nodes.find((x) => x.id === d.node);
    if (!n) {
      out.push(`diagram of node ${d.node}: no such node`);
      continue;
    }
    const at = `#${d.node} at width ${n.w}`;
    if (d.scrollHeight > d.clientHeight + 1) out.push(`${at}: content ${d.scrollHeight} px tall in a ${d.clientHeight} px box`);
    if (d.scrollWidth > d.clientWidth + 1) out.push(`${at}: content ${d.scrollWidth} px wide in a ${d.clientWidth} px box`);
    const b = d.box;
    if (b.x < n.x - 1 || b.y < n.y - 1 || b.x + b.w > n.x + n.w + 1 || b.y + b.h > n.y + n.h + 1) {
      out.push(`#${d.node}: diagram box ${JSON.stringify(b)} outside its node ${JSON.stringify(n)}`);
    }
  }
  return out;
}

describe("search, help pages and the shipped workflows in ComfyUI's front end", { skip: reason ?? false }, () => {
  let comfy;
  let browser;
  let page;
  const problems = [];

  before(async () => {
    const { chromium } = await import("playwright-core");
    // the model files the workflows name, as random-weight stand-ins: no "missing model" notice
    const names = UI_WORKFLOWS.flatMap((w) => JSON.parse(readFileSync(join(ROOT, "workflows", `${w}.json`), "utf8"))
      .nodes.filter((n) => n.type === "CheckpointLoaderSimple").map((n) => n.widgets_values[0]));
    comfy = await startComfy({ checkpoints: [...new Set(names)] });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
    page = await browser.newPage({ viewport: { width: 2200, height: 1100 } }); // the widest workflow at a zoom with text
    page.on("pageerror", (e) => problems.push(e.message));
    page.on("console", (m) => {
      const text = `${m.type()}: ${m.text()} (${m.location().url})`;
      // not ours: core templates (the comfyui-workflow-templates package is optional) and outside addresses
      if (/core workflow templates|^https?:\/\/(?!127\.0\.0\.1)/.test(m.text()) || IGNORED.test(m.location().url)) return;
      if (m.type() === "error" || /\[pcpp\]|workflow/i.test(m.text())) problems.push(text);
    });
    await page.goto(comfy.url, { waitUntil: "domcontentloaded" });
    await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.PCPPKSampler,
      null, { timeout: 120_000 });
  });

  after(async () => {
    await browser?.close();
    await comfy?.stop();
  });

  test("the template listing names each UI workflow once and no API file", async () => {
    const listing = await (await fetch(`${comfy.url}/api/workflow_templates`)).json();
    assert.deepEqual([...listing[PACK_NAME]].sort(), UI_WORKFLOWS);
  });

  test("the node search finds both nodes by what users type", { skip: newFrontendOnly }, async () => {
    for (const query of ["multi-GPU", "parallel", "patch parallel", "DistriFusion"]) {
      await page.evaluate(() => window.app.extensionManager.command.execute("Workspace.SearchBox.Toggle"));
      const box = page.locator("input:focus");
      await box.waitFor();
      await box.fill(query);
      // the first two results, by display name
      // the list updates after the box's debounce: wait for this query's results, not the last ones
      await page.waitForFunction(() => [...document.querySelectorAll('[role="option"]')]
        .filter((e) => e.innerText.startsWith("PCPP")).length >= 2, null, { timeout: 10_000 }).catch(() => {});
      const top = await page.evaluate(() => [...document.querySelectorAll('[role="option"]')].slice(0, 2)
        .map((e) => e.innerText.split("\n")[0].trim()).sort());
      assert.deepEqual(top, ["PCPP KSampler (multi-GPU)", "PCPP Parallel Model (multi-GPU)"], `searching "${query}"`);
      await page.keyboard.press("Escape");
    }
  });

  test("each node's help page opens in the node's Info panel, with its picture", { skip: newFrontendOnly }, async () => {
    problems.length = 0; // from here on: what opening the help does
    for (const type of ["PCPPKSampler", "PCPPParallelModel"]) {
      const at = await page.evaluate((type) => {
        const { app, LiteGraph } = window;
        app.graph.clear();
        const node = LiteGraph.createNode(type);
        node.pos = [100, 100];
        app.graph.add(node);
        app.canvas.setDirty(true, true);
        const rect = app.canvas.canvas.getBoundingClientRect();
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
        return [rect.left + x, rect.top + y]; // on its title bar
      }, type);
      await page.waitForTimeout(300); // drawn once
      await page.mouse.click(at[0], at[1]); // select it, as a user does
      const panel = page.getByRole("button", { name: "Toggle properties panel" });
      if (!(await page.getByText("Info", { exact: true }).isVisible())) await panel.click();
      await page.getByText("Info", { exact: true }).click();
      const title = await page.evaluate((type) => window.LiteGraph.registered_node_types[type].title, type);
      const help = page.locator(".node-help-content");
      await help.locator("h1").filter({ hasText: title }).waitFor({ timeout: 15_000 });
      const img = help.locator('img[src*="/docs/img/"]').first();
      await img.waitFor();
      await page.waitForFunction((e) => e.complete, await img.elementHandle());
      assert.ok(await img.evaluate((e) => e.naturalWidth > 100), `${type}: the picture did not load`);
    }
    await page.getByRole("button", { name: "Toggle properties panel" }).click();
    assert.deepEqual(problems, []);
  });

  for (const name of WORKFLOWS) {
    test(`${name}: opens from the template browser, nothing overlaps, the diagrams fit`, { timeout: 180_000, skip: newFrontendOnly }, async (t) => {
      problems.length = 0;
      await page.evaluate(() => window.app.graph.clear());
      // the template browser, as a user opens it: the dialog, then the pack's card
      await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
      const card = page.locator(`[data-testid="template-workflow-${name}"]`);
      await card.waitFor({ state: "visible", timeout: 60_000 });
      // its thumbnail, <name>.jpg beside the workflow, loads (the browser shows a placeholder otherwise)
      // its thumbnail (fetched, shown as a blob: URL) is <name>.jpg, 256 px square, not a placeholder
      const thumb = card.locator('[data-testid="thumbnail-content"] img').first();
      await thumb.waitFor({ timeout: 15_000 });
      await page.waitForFunction((e) => e.complete && e.naturalWidth > 0, await thumb.elementHandle(), { timeout: 15_000 });
      assert.deepEqual(await thumb.evaluate((e) => [e.naturalWidth, e.naturalHeight]), [256, 256]);
      await card.click();
      const expected = await (await fetch(`${comfy.url}/api/workflow_templates/${PACK_NAME}/${name}.json`)).json();
      await page.waitForFunction((n) => window.app.graph.nodes.length === n, expected.nodes.length, { timeout: 30_000 });
      await page.keyboard.press("Escape"); // the dialog, if it stayed open
      await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
      // the diagrams draw and measure themselves over a few canvas frames: wait until sizes settle
      await page.waitForFunction(() => {
        const sizes = JSON.stringify(window.app.graph.nodes.map((n) => [n.size[0], n.size[1]]));
        const settled = sizes === window.pcppLastSizes;
        window.pcppLastSizes = sizes;
        window.app.canvas.setDirty(true, true);
        return settled && document.querySelectorAll(".pcpp-diagram[data-pcpp-renders]").length > 0;
      }, null, { timeout: 30_000, polling: 300 });
      const seen = await page.evaluate(measure);
      // the sizes the front end gave the nodes: what build_workflows.py's SIZES must cover
      t.diagnostic(seen.nodes.map((n) => `${n.type} ${n.w}x${n.h - 30} (min ${n.min.map(Math.ceil).join("x")})`).join("; "));
      const types = seen.nodes.map((n) => n.type).sort();
      assert.deepEqual(types, expected.nodes.map((n) => n.type).sort(), "every node of the file is on the canvas");
      assert.deepEqual(overlaps(seen.nodes), [], `nodes overlap: ${JSON.stringify(seen.nodes)}`);
      assert.deepEqual(misfits(seen), []);
      assert.ok(seen.diagrams.every((d) => !d.error), JSON.stringify(seen.diagrams));
      mkdirSync(SHOTS, { recursive: true });
      await page.waitForTimeout(300); // one more frame
      const clip = await page.evaluate(() => { // the graph's bounding box on screen, 20 px around it
        const { app, LiteGraph } = window;
        const rect = app.canvas.canvas.getBoundingClientRect();
        const corners = app.graph.nodes.flatMap((n) => [
          app.canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]),
          app.canvas.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]])]);
        const x = Math.max(rect.left, rect.left + Math.min(...corners.map((c) => c[0])) - 20);
        const y = Math.max(rect.top, rect.top + Math.min(...corners.map((c) => c[1])) - 20);
        const x1 = Math.min(rect.right, rect.left + Math.max(...corners.map((c) => c[0])) + 20);
        const y1 = Math.min(rect.bottom, rect.top + Math.max(...corners.map((c) => c[1])) + 20);
        return { x, y, width: x1 - x, height: y1 - y };
      });
      await page.screenshot({ path: join(SHOTS, `workflow-${name}.png`), clip });

      // any width from the node's minimum up: the content fits, the node grew instead
      for (const d of seen.diagrams) {
        const node = seen.nodes.find((n) => n.id === d.node);
        for (const width of [node.min[0], Math.round((node.min[0] + node.w) / 2), node.w + 200]) {
          await page.evaluate(([id, w]) => {
            const n = window.app.graph.getNodeById(id);
            n.setSize([w, n.size[1]]);
            window.app.canvas.setDirty(true, true);
          }, [d.node, width]);
          // the DOM widget follows the node on the next frames, the diagram measures itself, the node grows
          await page.waitForFunction(([id, w]) => {
            const n = window.app.graph.getNodeById(id);
            const e = n.pcppDiagram.root;
            window.app.canvas.setDirty(true, true);
            const key = `${e.clientWidth}x${e.clientHeight}x${n.size}`;
            const settled = key === window.pcppLastKey && Math.abs(e.clientWidth - (w - 20)) <= 1;
            window.pcppLastKey = key;
            return settled;
          }, [d.node, width], { timeout: 10_000, polling: 300 });
          const now = await page.evaluate(measure);
          assert.deepEqual(misfits({ nodes: now.nodes, diagrams: now.diagrams.filter((x) => x.node === d.node) }), []);
        }
      }
      assert.deepEqual(problems, []);
    });
  }
});
