"""How faithful can any ControlNet on a base be? Its autoencoder's reconstructions of the
held-out targets, graded like generated faces.

Why: a latent diffusion model draws through its VAE's decoder, so a face it draws is at best
the decode of the target's own latents. This grades those decodes with `evaluate`'s structure
measures (own target found by SSIM, SSIM margin, sharpness inside the face region) and with
the evaluation critic's landmark error over its error on the real targets: issue 30's
targets (margin 0.35, sharpness 0.8, NME at most 2x) are out of reach of a base whose
reconstructions miss them.

    python benchmarks/autoencoder_ceiling.py --base demo-face-base --data runs/demo/data

Prints one table row per base (several ``--base`` compare in one run).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from PIL import Image

from controlnet_emo.data.dataset import read_metadata
from controlnet_emo.evaluation.evaluate import read_faces, target_landmarks
from controlnet_emo.evaluation.metrics import nme
from controlnet_emo.evaluation.structure import (
    face_regions,
    structure_scores,
    summarize_structure,
    to_grey,
)
from controlnet_emo.models.emonet import build_emonet
from controlnet_emo.models.sd import resolve_pretrained


def load_split(data: str, n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The val split's first ``n`` targets and FLAME renders, (N,3,R,R) in [0,1]."""
    records = read_metadata(data, "val", ["flame"])[:n]

    def read(path: str) -> np.ndarray:
        with Image.open(f"{data}/{path}") as im:
            return np.asarray(im.convert("RGB"))

    def stack(paths: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([read(p) for p in paths])).permute(0, 3, 1, 2) / 255.0

    targets = stack([r.file_name for r in records])
    renders = stack([r.maps["flame"] for r in records])
    return targets, renders, records


@torch.no_grad()
def reconstruct(base: str, images: torch.Tensor) -> torch.Tensor:
    """decode(encode(x).mode) of each image in [0,1]."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        f"{resolve_pretrained(base)}/vae", torch_dtype=torch.float32
    )
    recon = vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample
    return (recon.clamp(-1, 1) + 1) / 2


def grade(faces: torch.Tensor, targets: torch.Tensor, renders, landmarks, critic) -> dict:
    scores = summarize_structure(
        structure_scores(to_grey(faces), to_grey(targets), face_regions(renders))
    )
    mse = float((faces - targets).square().mean())
    read = read_faces(critic, faces)["landmarks"]
    return scores | {
        "psnr_db": 10 * math.log10(1 / max(mse, 1e-12)),
        "nme": float(nme(read, landmarks).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", action="append", required=True, help="repeatable")
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--emonet", default="demo-critic-eval")
    args = parser.parse_args()
    targets, renders, records = load_split(args.data, args.n)
    landmarks = target_landmarks(args.data, records, targets.shape[-1])
    critic = build_emonet(args.emonet)
    real = grade(targets, targets, renders, landmarks, critic)
    print(f"{len(records)} held-out targets of {args.data}, critic {args.emonet}")
    print("| base | PSNR | own | margin | sharp | NME | NME / critic on targets |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| the targets themselves | - | {real['own_target_top1']:.0%} | "
        f"{real['ssim_margin']:.3f} | 1 | {real['nme']:.3f} | 1 |"
    )
    for base in args.base:
        recon = reconstruct(base, targets)
        r = grade(recon, targets, renders, landmarks, critic)
        print(
            f"| {base} | {r['psnr_db']:.1f} dB | {r['own_target_top1']:.0%} | "
            f"{r['ssim_margin']:.3f} | {r['sharpness_ratio']:.2f} | {r['nme']:.3f} | "
            f"{r['nme'] / real['nme']:.1f}x |"
        )


if __name__ == "__main__":
    main()
