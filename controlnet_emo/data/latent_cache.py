"""Encode every training image once: the frozen VAE encoder costs more than the UNet.

The cache keeps each image's posterior moments (mean, std), so the training step still draws
a fresh posterior sample per step exactly as on-the-fly encoding would. It holds the centre
crop twice, plain and mirrored (the VAE is not flip-equivariant, so the mirror is encoded, not
flipped), so horizontal flips stay on; random crops do not: with ``data.cache_latents`` every
sample (and its maps) is centre-cropped, which for square images at the training resolution
is no change at all.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from controlnet_emo.atomic import atomic_write
from controlnet_emo.data.dataset import PreparedDataset, collate

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_moments(
    dataset: PreparedDataset,
    vae,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = True,
    mirrored: bool = True,
) -> torch.Tensor:
    """(N, O, 2*C, h, w): posterior mean and std of every record, in dataset order, for O
    orientations: the image, then (``mirrored``) its horizontal mirror."""
    chunks = []
    for start in tqdm(
        range(0, len(dataset), batch_size), desc="cache latents", disable=not show_progress
    ):
        idx = range(start, min(start + batch_size, len(dataset)))
        pixels = collate([dataset[(i, i)] for i in idx]).pixel_values.to(device, dtype)
        views = [pixels, pixels.flip(-1)] if mirrored else [pixels]
        moments = [_moments(vae, v) for v in views]  # each (B,2C,h,w)
        chunks.append(torch.stack(moments, dim=1).float().cpu())  # (B,O,2C,h,w)
    return torch.cat(chunks)


def _moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    dist = vae.encode(pixels).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1)


def cache_path(folder: Path, split: str, resolution: int, mirrored: bool) -> Path:
    """One file per split, resolution and orientation set (the layout is in the name, so a
    cache written by an older build is never read as this one)."""
    return folder / f"{split}-{resolution}-{'mirrored' if mirrored else 'plain'}.safetensors"


def cache_key(vae_source: str, root: Path, file_names: list[str]) -> str:
    """What the cached moments were computed from: the VAE and every image, in order (name,
    size, modification time). Why: the file name alone says only split and resolution, so a
    run writing to the same output folder with other data (a regenerated dataset, another
    ``data.root``) would read another dataset's latents beside its own maps and labels."""
    digest = hashlib.sha256(vae_source.encode())
    for name in file_names:
        try:
            st = (root / name).stat()
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:  # unreadable: the dataset skips it, the key just records that
            stamp = "missing"
        digest.update(f"\0{name}\0{stamp}".encode())
    return digest.hexdigest()


def load_or_build(path: Path, build, key: str) -> torch.Tensor:
    """Reuse a cache file written by an earlier run (or by the main process) when it was built
    from the same data (``key``, see ``cache_key``); otherwise build it and write it
    atomically."""
    if path.is_file():
        with safe_open(path, "pt") as f:
            same = (f.metadata() or {}).get("key") == key
        if same:
            return load_file(path)["moments"]
        log.info("%s was built from other data or another VAE: encoding again", path)
    moments = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        save_file({"moments": moments.contiguous()}, tmp, metadata={"key": key})
    log.info("cached %d latents in %s", len(moments), path)
    return moments
