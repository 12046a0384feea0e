"""Encode every training image once: the frozen VAE encoder costs more than the UNet.

The cache keeps each image's posterior moments (mean, std), so the training step still draws
a fresh posterior sample per step exactly as on-the-fly encoding would. Cached latents fix the
crop, so ``data.cache_latents`` turns random crops and flips off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .dataset import PreparedDataset, collate

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_moments(
    dataset: PreparedDataset,
    vae,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = True,
) -> torch.Tensor:
    """(N, 2*C, h, w): posterior mean and std of every record, in dataset order."""
    chunks = []
    for start in tqdm(
        range(0, len(dataset), batch_size), desc="cache latents", disable=not show_progress
    ):
        idx = range(start, min(start + batch_size, len(dataset)))
        pixels = collate([dataset[(i, i)] for i in idx]).pixel_values.to(device, dtype)
        dist = vae.encode(pixels).latent_dist
        chunks.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
    return torch.cat(chunks)


def load_or_build(path: Path, build) -> torch.Tensor:
    """Reuse a cache file written by an earlier run (or by the main process) when present."""
    if path.is_file():
        return load_file(path)["moments"]
    moments = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"moments": moments.contiguous()}, tmp)
    tmp.replace(path)
    log.info("cached %d latents in %s", len(moments), path)
    return moments
