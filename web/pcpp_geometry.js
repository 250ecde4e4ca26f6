// Band geometry for the PCPP diagram: a line-for-line port of pcpp_core/geometry.py.
//
// Pure ES module (no DOM, no ComfyUI) so Node's test runner can check it against cases generated
// from the Python engine (tests/web/gen_cases.py -> tests/web/geometry_cases.json). Keep the two in
// step: same ceil with the same epsilon, same remainder rule, same error kinds.

export const EPS = 1e-9; // f*h in binary floating point: 0.3*10 must round up to 3, not 4

export class GeometryError extends Error {
  /** kind: "bands" | "not_multiple" | "too_small" | "devices" (what the user must change). */
  constructor(kind, message) {
    super(message);
    this.name = "GeometryError";
    this.kind = kind;
  }
}

/** ceil(fraction * bandHeight) neighbour rows, robust to float noise. */
export function windowRows(fraction, bandHeight) {
  return Math.max(0, Math.ceil(fraction * bandHeight - EPS));
}

/** Band boundaries (bands+1 values) on multiples of 2**levels; later bands take the remainder. */
export function splitRows(height, bands, levels) {
  const unit = 2 ** levels;
  if (bands < 1) throw new GeometryError("bands", `bands=${bands} must be >= 1`);
  if (height % unit) {
    throw new GeometryError(
      "not_multiple",
      `latent height ${height} rows is not a multiple of ${unit} (the model downsamples ${levels} times); ` +
        `use a multiple of ${unit} rows (${unit * 8} pixels)`,
    );
  }
  const units = height / unit;
  if (units < bands) {
    throw new GeometryError(
      "too_small",
      `latent height ${height} rows is too small for ${bands} devices: the smallest is ` +
        `${bands * unit} rows (${bands * unit * 8} pixels), or use fewer devices`,
    );
  }
  const base = Math.floor(units / bands);
  const extra = units % bands;
  const bounds = [0];
  for (let i = 0; i < bands; i++) {
    const size = base + (i >= bands - extra ? 1 : 0);
    bounds.push(bounds[i] + size * unit);
  }
  return bounds;
}

/** Horizontal bands of a latent [.., height, width], valid at every level down to `levels`. */
export class Bands {
  constructor(height, width, levels, bounds) {
    this.height = height;
    this.width = width;
    this.levels = levels;
    this.bounds = Object.freeze([...bounds]);
    Object.freeze(this);
  }

  static split(height, width, count, levels) {
    return new Bands(height, width, levels, splitRows(height, count, levels));
  }

  get count() {
    return this.bounds.length - 1;
  }

  /** [rows, cols] of the whole image at `level`; a stride-2 conv rounds odd widths up. */
  levelSize(level) {
    let w = this.width;
    for (let i = 0; i < level; i++) w = Math.floor((w + 1) / 2);
    return [this.height >> level, w];
  }

  rows(band, level = 0) {
    return [this.bounds[band] >> level, this.bounds[band + 1] >> level];
  }

  /** Rows of the image band `band`'s self-attention sees at `level` (null = whole image). */
  window(band, level, fraction) {
    const [start, stop] = this.rows(band, level);
    const height = this.levelSize(level)[0];
    if (fraction === null) return [0, height];
    const k = windowRows(fraction, stop - start);
    return [Math.max(0, start - k), Math.min(height, stop + k)];
  }

  /** Rows of band `src` that band `dst`'s window needs; [0, 0] when none. */
  needed(dst, src, level, fraction) {
    if (dst === src) return [0, 0];
    const [w0, w1] = this.window(dst, level, fraction);
    const [s0, s1] = this.rows(src, level);
    const lo = Math.max(w0, s0);
    const hi = Math.min(w1, s1);
    return lo < hi ? [lo, hi] : [0, 0];
  }
}

/** Rows [above, below] a band needs from its neighbours for a conv (see geometry.conv_halo). */
export function convHalo(kernel, stride, padding) {
  return [padding, Math.max(0, kernel - padding - stride)];
}

export const STAT_BYTES = 4; // GroupNorm statistics travel as float32

/**
 * Bytes band `band` sends in one call, as pcpp_core.geometry.bytes_sent.
 * specs: [{kind: "conv"|"groupnorm"|"attention"|"joint", level, channels, kernel=1, stride=1, padding=0,
 *          text=0, heads=0}]; joint (a DiT block): image K/V rows as attention, plus, with text > 0, the
 * text queries' partial attention [text, channels] in the model's dtype and its log-sum-exp
 * [heads, text] in float32, to every other band, every call.
 * fraction: attention window in band heights, null = whole image; exchange=false: naive mode.
 */
export function bytesSent(specs, bands, band, { batch, elementSize, fraction, exchange = true }) {
  if (!exchange || bands.count === 1) return 0;
  let total = 0;
  const others = [];
  for (let j = 0; j < bands.count; j++) if (j !== band) others.push(j);
  for (const spec of specs) {
    const { kind, level, channels, kernel = 1, stride = 1, padding = 0, text = 0, heads = 0 } = spec;
    const cols = bands.levelSize(level)[1];
    if (kind === "conv") {
      const [above, below] = convHalo(kernel, stride, padding);
      const rows = (band + 1 < bands.count ? above : 0) + (band > 0 ? below : 0);
      total += rows * batch * channels * cols * elementSize;
    } else if (kind === "groupnorm") {
      total += others.length * 2 * batch * channels * STAT_BYTES;
    } else if (kind === "attention" || kind === "joint") {
      let rows = 0;
      for (const dst of others) {
        const [lo, hi] = bands.needed(dst, band, level, fraction);
        rows += hi - lo;
      }
      total += 2 * rows * batch * channels * cols * elementSize;
      if (kind === "joint" && text) total += others.length * batch * text * (channels * elementSize + heads * STAT_BYTES);
    } else {
      throw new GeometryError("spec", `unknown layer kind ${JSON.stringify(kind)}`);
    }
  }
  return total;
}
