"""Rebuild samples.png of the tiny DiT and print how many samples are nearest their own image.

    python pcpp_core/assets/pcpp-tiny-dit/sample.py [--model DIR] [--steps 30] [--cfg 3]

Row 1: the training images (centre square at 64x64); rows 2 and 3: samples with noise seeds 0
and 1, one batch for ids 0..11 in order. Needs scikit-image and matplotlib (the images).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train import NAMES, load_images, resize, sample, to_grid  # noqa: E402

from pcpp_core.tiny_dit import load_tiny_dit  # noqa: E402  (train put the repo root on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(HERE), help="folder with config.json and the weights")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--out", default=None, help="PNG path (default: MODEL/samples.png)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, emb = load_tiny_dit(asset=Path(a.model))
    real = resize(load_images())
    rows = [real]
    for seed in (0, 1):
        s = sample(model, emb[:-1], emb[-1], steps=a.steps, cfg=a.cfg, seed=seed)
        mse = ((s[:, None] - real[None]) ** 2).mean(dim=(2, 3, 4))  # [sample, image]
        own = mse.argmin(1) == torch.arange(len(NAMES))
        print(f"seed {seed}: {int(own.sum())}/{len(NAMES)} samples nearest their own image; "
              f"misses: {[NAMES[i] for i in range(len(NAMES)) if not own[i]]}; "
              f"mean MSE to own image {mse.diag().mean():.4f}, to the others {mse[~torch.eye(12, dtype=bool)].mean():.4f}")
        rows.append(s)
    out = a.out or str(Path(a.model) / "samples.png")
    to_grid(rows, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
