"""How faithful can any ControlNet on a base be? Its autoencoder's reconstructions of the
held-out targets, graded like generated faces.

Why: a latent diffusion model draws through its VAE's decoder, so a face it draws is at best
the decode of the target's own latents. This grades those decodes with `evaluate`'s structure
measures (own target found by SSIM, SSIM margin, sharpness inside the face region) and with
the evaluation critic's landmark error over its error on the real targets: issue 30's
targets (margin 0.35, sharpness 0.8, NME at most 2x) are out of reach of a base whose
reconstructions miss them.

On synthetic data it also grades a perfect map-follower: each held-out face drawn again by the
synthetic generator with the same geometry, pose, light and hair colour (all that the maps and
the caption fix) and the rest of its appearance redrawn (skin tone, lips, hair style, irises,
background, clothes, texture), alone and through each base's autoencoder. No model can know
what the maps and caption leave open, so this is what a model that samples faces and follows
its maps perfectly scores (one that painted the average unknowns could score more, as a blur
wins on MSE).

    python benchmarks/autoencoder_ceiling.py --base demo-face-base --data runs/demo/data

Prints one table row per base (several ``--base`` compare in one run).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

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
from controlnet_emo.synthetic.faces import FaceParams, render_face, sample_face_params

OPEN_APPEARANCE = (
    "skin", "lips", "hair_style", "iris", "background", "background2", "clothes", "texture_seed",
)  # fmt: skip
"""What neither the maps nor the caption (which names the hair colour) says of a synthetic face."""


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


def read_truth(raw: Path) -> dict[str, FaceParams]:
    """Each synthetic face's params by file stem, from the raw folder's ``synth_truth.jsonl``."""
    truth = {}
    with open(raw / "synth_truth.jsonl") as f:
        for line in f:
            row = json.loads(line)
            truth[Path(row["file"]).stem] = FaceParams.from_dict(row["params"])
    return truth


def redrawn_faces(truth: dict, records: list, size: int, draw: int) -> torch.Tensor:
    """Each record's synthetic face with its open appearance taken from another random face
    (``draw`` picks which), (N,3,size,size) in [0,1]."""
    faces = []
    for i, record in enumerate(records):
        p = truth[Path(record.file_name).stem]
        other = sample_face_params(np.random.default_rng([draw, i]), p.resolution)
        face = render_face(
            replace(p, **{k: getattr(other, k) for k in OPEN_APPEARANCE}), p.resolution
        )
        image = Image.fromarray(face.image).resize((size, size), Image.BICUBIC)
        faces.append(np.asarray(image))
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2) / 255.0


def load_vae(base: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(
        f"{resolve_pretrained(base)}/vae", torch_dtype=torch.float32
    )


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """decode(encode(x).mode) of each image in [0,1]."""
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
    parser.add_argument(
        "--raw", help="the synthetic raw folder (synth_truth.jsonl; default: DATA/../raw)"
    )
    parser.add_argument("--draws", type=int, default=3, help="appearance redraws, averaged")
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

    def row(name: str, faces: list[torch.Tensor]) -> None:
        graded = [grade(f, targets, renders, landmarks, critic) for f in faces]
        r = {k: float(np.mean([g[k] for g in graded])) for k in graded[0]}
        print(
            f"| {name} | {r['psnr_db']:.1f} dB | {r['own_target_top1']:.0%} | "
            f"{r['ssim_margin']:.3f} | {r['sharpness_ratio']:.2f} | {r['nme']:.3f} | "
            f"{r['nme'] / real['nme']:.1f}x |"
        )

    raw = Path(args.raw) if args.raw else Path(args.data).parent / "raw"
    redrawn = []
    if (raw / "synth_truth.jsonl").is_file():
        size = targets.shape[-1]
        truth = read_truth(raw)
        redrawn = [redrawn_faces(truth, records, size, 1000 + d) for d in range(args.draws)]
        row(f"perfect map-follower, appearance redrawn ({args.draws} draws)", redrawn)
    for base in args.base:
        vae = load_vae(base)
        row(base, [reconstruct(vae, targets)])
        if redrawn:
            row(f"perfect map-follower through {base}", [reconstruct(vae, f) for f in redrawn])


if __name__ == "__main__":
    main()
