"""Train the tiny Flux-layout DiT (pcpp_core/tiny_dit.py) on 12 bundled images, on CPU.

    nice -n 10 python pcpp_core/assets/pcpp-tiny-dit/train.py --out out/tiny-dit --minutes 30

Needs scikit-image and matplotlib (their bundled sample images; no downloads). Each image id
gets a learned 4-token condition [4, 64]; row 12 is a learned null condition used for 10% of the
samples (classifier-free guidance). Data as for the tiny UNet: the centre square of each image at
256 px, a random crop covering 85-100% of it, resized to 64x64, values in [-1, 1].
Objective: rectified flow (Flux/SD3): x_s = (1 - s) x0 + s n, target n - x0, s ~ logit-normal; the
network predicts x0 and the model returns (x_s - x0) / s (see tiny_dit.py), so the loss is the
velocity MSE of an x0 prediction.
Every --ckpt-every steps the EMA weights are written in the shipped format (fp16 safetensors,
config.json, embeddings) plus a resumable checkpoint, so a run can be cut at any time.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for pcpp_core
from pcpp_core.tiny_dit import LATENT_FACTOR, TinyDiT, config_dict, to_image, to_latent, velocity  # noqa: E402

NAMES = ("astronaut", "chelsea", "chessboard", "coffee", "color", "grace_hopper",
         "ihc", "logo", "motorcycle", "present", "retina", "rocket")


def image_paths() -> dict[str, str]:
    import matplotlib
    import skimage.data

    d = os.path.dirname(skimage.data.__file__)
    s = os.path.join(matplotlib.get_data_path(), "sample_data")
    files = {"astronaut": f"{d}/astronaut.png", "chelsea": f"{d}/chelsea.png",
             "chessboard": f"{d}/chessboard_RGB.png", "coffee": f"{d}/coffee.png", "color": f"{d}/color.png",
             "grace_hopper": f"{s}/grace_hopper.jpg", "ihc": f"{d}/ihc.png", "logo": f"{d}/logo.png",
             "motorcycle": f"{d}/motorcycle_left.png", "present": f"{s}/Minduka_Present_Blue_Pack.png",
             "retina": f"{d}/retina.jpg", "rocket": f"{d}/rocket.jpg"}
    return {n: files[n] for n in NAMES}


def load_images(base: int = 256) -> torch.Tensor:
    """[12, 3, base, base] in [-1, 1]: centre squares, transparent parts on white."""
    from PIL import Image

    out = []
    for path in image_paths().values():
        im = Image.open(path)
        if im.mode in ("RGBA", "LA", "P"):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((base, base), Image.LANCZOS)
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def resize(x: torch.Tensor, size: int = 64) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def make_batch(imgs: torch.Tensor, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch, 3, 64, 64] random 85-100% crops, ids [batch])."""
    n, _, s, _ = imgs.shape
    ids = torch.randint(0, n, (batch,), generator=g)
    out = []
    for i in ids.tolist():
        c = int(round(s * (0.85 + 0.15 * torch.rand(1, generator=g).item())))
        y0, x0 = (torch.randint(0, s - c + 1, (2,), generator=g)).tolist()
        out.append(resize(imgs[i:i + 1, :, y0:y0 + c, x0:x0 + c]))
    return torch.cat(out), ids


@torch.no_grad()
def sample(model: TinyDiT, cond: torch.Tensor, null: torch.Tensor, steps: int = 20, cfg: float = 3.0,
           size: int = 64, seed: int = 0) -> torch.Tensor:
    """Images [B, 3, size, size] in [-1, 1] for condition tokens cond [B, 4, 64] (null [4, 64])."""
    from pcpp_core.sampling import cfg_eps, flow_sample

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(cond.shape[0], 3 * LATENT_FACTOR ** 2, size // LATENT_FACTOR, size // LATENT_FACTOR, generator=g)
    v = cfg_eps(lambda x, t, c, **_: model(x, t, c), cond, null.expand_as(cond), cfg)
    return to_image(flow_sample(v, noise, steps)).clamp(-1, 1)


def to_grid(rows: list[torch.Tensor], path: str) -> None:
    from PIL import Image

    arr = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    Image.fromarray(((arr + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(path)


def save(out: Path, ema: TinyDiT, ema_emb: torch.Tensor, stats: dict) -> None:
    """The shipped files: fp16 EMA weights, config, condition table, stats."""
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in ema.state_dict().items()}, str(out / "dit.fp16.safetensors"))
    save_file({"embeddings": ema_emb.half().contiguous()}, str(out / "embeddings.safetensors"))
    (out / "config.json").write_text(json.dumps(config_dict(ema), indent=1) + "\n")
    (out / "embeddings.json").write_text(json.dumps(
        {"ids": {str(i): n for i, n in enumerate(NAMES)}, "null_id": len(NAMES), "tensor": "embeddings",
         "shape": list(ema_emb.shape), "latent": f"pixel_unshuffle({LATENT_FACTOR})"}, indent=1) + "\n")
    (out / "train_stats.json").write_text(json.dumps(stats, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/tiny-dit")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads; on a busy machine 2 threads ran 20x slower than 1 (spinning)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--preview-every", type=int, default=400)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    imgs = load_images()
    model = TinyDiT().zero_init_()
    emb = torch.nn.Parameter(torch.randn(len(NAMES) + 1, 4, 64))  # last row: the null condition
    opt = torch.optim.AdamW(list(model.parameters()) + [emb], lr=a.lr, weight_decay=0.01)
    ema, ema_emb = copy.deepcopy(model).requires_grad_(False), emb.detach().clone()
    step, seconds, run_loss = 0, 0.0, None
    if a.resume:
        ck = torch.load(out / "ckpt.pt")
        model.load_state_dict(ck["model"]); ema.load_state_dict(ck["ema"]); opt.load_state_dict(ck["opt"])
        emb.data.copy_(ck["emb"]); ema_emb.copy_(ck["ema_emb"]); g.set_state(ck["rng"])
        step, seconds, run_loss = ck["step"], ck["seconds"], ck["run_loss"]
    nparams = sum(p.numel() for p in model.parameters())
    print(f"params={nparams} condition_table={tuple(emb.shape)} threads={a.threads}", flush=True)
    log = open(out / "loss.log", "a")
    t_start = time.time() - seconds
    while step < a.max_steps and time.time() - t_start < a.minutes * 60:
        x0, ids = make_batch(imgs, a.batch, g)
        ids = torch.where(torch.rand(a.batch, generator=g) < 0.1, torch.full_like(ids, len(NAMES)), ids)
        x0 = to_latent(x0)
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(a.batch, generator=g))  # logit-normal(0, 1) noise levels
        xs = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        loss = F.mse_loss(model(xs, s, emb[ids]), velocity(xs, x0, s))  # = noise - x0 where s >= SIGMA_MIN
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + [emb], 1.0)
        for pg in opt.param_groups:
            pg["lr"] = a.lr * min(1.0, (step + 1) / 100)
        opt.step()
        step += 1
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - d)
            ema_emb.lerp_(emb.detach(), 1 - d)
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        if step % 25 == 0:
            msg = f"step {step} t={time.time() - t_start:.0f}s loss={loss.item():.4f} loss_ema={run_loss:.4f}"
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()
        if step % a.ckpt_every == 0:
            stats = {"steps": step, "seconds": round(time.time() - t_start, 1), "loss_ema": run_loss,
                     "params": nparams, "batch": a.batch, "lr": a.lr, "threads": a.threads}
            save(out, ema, ema_emb, stats)
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "emb": emb.detach(), "ema_emb": ema_emb, "rng": g.get_state(), "step": step,
                        "seconds": time.time() - t_start, "run_loss": run_loss}, out / "ckpt.pt")
        if a.preview_every and step % a.preview_every == 0:
            to_grid([resize(imgs), sample(ema.eval(), ema_emb[:-1], ema_emb[-1])], str(out / f"preview_{step}.png"))
    stats = {"steps": step, "seconds": round(time.time() - t_start, 1), "loss_ema": run_loss,
             "params": nparams, "batch": a.batch, "lr": a.lr, "threads": a.threads}
    save(out, ema, ema_emb, stats)
    print(f"done {json.dumps(stats)}", flush=True)


if __name__ == "__main__":
    main()
