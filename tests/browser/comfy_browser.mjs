// A real ComfyUI with this pack as its only custom node pack, and Debian's chromium, for the browser tests.
//
// Needs: COMFYUI_PATH (ComfyUI source), a Python that runs it with comfyui-frontend-package
// installed (COMFYUI_PYTHON, default $COMFYUI_PATH/../venv/bin/python), Debian's chromium
// (PCPP_CHROMIUM, default /usr/bin/chromium) and `npm ci` (playwright-core); missing() says which is
// missing. Models: PCPP_COMFYUI_MODELS (default $COMFYUI_PATH/../models) when it has CHECKPOINT.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const COMFY = process.env.COMFYUI_PATH;
export const PYTHON = process.env.COMFYUI_PYTHON ?? (COMFY ? resolve(COMFY, "../venv/bin/python") : "python3");
export const MODELS = process.env.PCPP_COMFYUI_MODELS ?? (COMFY ? resolve(COMFY, "../models") : "");
export const CHECKPOINT = "tiny_sd15_random.safetensors";
export const CHROMIUM = process.env.PCPP_CHROMIUM ?? "/usr/bin/chromium";
export const PACK = process.env.PCPP_PACK_DIR ?? ROOT; // the pack ComfyUI loads (a stand-in while developing)
export const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

export async function missing() {
  if (!COMFY) return "COMFYUI_PATH is not set (point it at a ComfyUI source tree)";
  if (!existsSync(join(COMFY, "main.py"))) return `COMFYUI_PATH=${COMFY} has no main.py`;
  if (!existsSync(CHROMIUM)) return `no chromium at ${CHROMIUM} (apt-get install chromium, or set PCPP_CHROMIUM)`;
  try {
    await import("playwright-core");
  } catch {
    return "playwright-core is not installed (run npm ci at the repo root)";
  }
  const probe = spawnSync(PYTHON, ["-c", "import comfyui_frontend_package"], { encoding: "utf8" });
  if (probe.status !== 0) {
    return `${PYTHON} cannot import comfyui_frontend_package (pip install the version ComfyUI's requirements.txt pins)`;
  }
  return null;
}

/** The installed comfyui-frontend-package as [major, minor, patch], or null. */
export function frontendVersion() {
  const probe = spawnSync(PYTHON, ["-c", "import importlib.metadata as m; print(m.version('comfyui-frontend-package'))"],
    { encoding: "utf8" });
  return probe.status === 0 ? probe.stdout.trim().split(".").map(Number) : null;
}

const freePort = () => new Promise((ok, fail) => {
  const s = createServer().listen(0, "127.0.0.1", () => {
    const { port } = s.address();
    s.close(() => ok(port));
  }).on("error", fail);
});

/**
 * A ComfyUI whose only custom node pack is this repository, with a quiet first start. `checkpoints`:
 * file names under which the random-weight CHECKPOINT is linked (the names workflows refer to).
 */
export async function startComfy({ checkpoints = [] } = {}) {
  const base = mkdtempSync(join(tmpdir(), "pcpp-browser-"));
  mkdirSync(join(base, "custom_nodes"));
  symlinkSync(PACK, join(base, "custom_nodes", "ComfyUI-PCPP"));
  const checkpoint = join(MODELS, "checkpoints", CHECKPOINT);
  if (checkpoints.length && existsSync(checkpoint)) {
    mkdirSync(join(base, "models", "checkpoints"), { recursive: true });
    for (const name of [CHECKPOINT, ...checkpoints]) symlinkSync(checkpoint, join(base, "models", "checkpoints", name));
  } else if (existsSync(checkpoint)) symlinkSync(MODELS, join(base, "models"));
  else mkdirSync(join(base, "models"));
  mkdirSync(join(base, "user", "default"), { recursive: true });
  writeFileSync(join(base, "user", "default", "comfy.settings.json"),
    JSON.stringify({ "Comfy.TutorialCompleted": true, "Comfy.Minimap.Visible": false }));
  const port = await freePort();
  const log = [];
  const proc = spawn(PYTHON, [join(COMFY, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", String(port),
    "--base-directory", base], { cwd: base, stdio: ["ignore", "pipe", "pipe"], detached: true });
  for (const s of [proc.stdout, proc.stderr]) s.on("data", (d) => log.push(String(d)));
  const url = `http://127.0.0.1:${port}`;
  // the server and the engine's worker processes it started form one process group: end them all
  const signal = (sig) => {
    try {
      process.kill(-proc.pid, sig);
    } catch { /* already gone */ }
  };
  const stop = async () => {
    if (proc.exitCode === null) {
      const exited = new Promise((ok) => proc.once("exit", ok));
      signal("SIGTERM");
      await Promise.race([exited, new Promise((ok) => setTimeout(ok, 10_000))]);
    }
    signal("SIGKILL");
    rmSync(base, { recursive: true, force: true });
  };
  const deadline = Date.now() + 180_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) break;
    try {
      if ((await fetch(`${url}/system_stats`)).ok) return { url, stop, log };
    } catch { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 500));
  }
  await stop();
  throw new Error(`ComfyUI did not start:\n${log.join("").slice(-3000)}`);
}

