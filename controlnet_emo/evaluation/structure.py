"""Structure measures that no critic gives: does a drawn face follow its own target, and is it
as sharp as the targets?

Why: every critic figure (top-1, CCC, landmark NME) can be raised by painting what the critic
keys on instead of a face (DESIGN.md, "Reward terms can be won by painting"). These measures
read only pixels against the targets, inside each target's face region:

- **identification**: for each generated face, the held-out target whose SSIM with it is
  highest inside that target's face region; the share of faces whose best match is their own
  target (chance is 1/N). A ControlNet that ignores its maps matches its own target by luck.
- **margin**: SSIM with the face's own target minus the mean SSIM with the other targets
  (each in that target's region).
- **sharpness**: mean Laplacian energy of the generated faces over that of the targets, both
  inside the targets' face regions; blurred masks score well below 1.

All at one grey 64 px frame (``STRUCTURE_SIZE``), whatever the run's resolution, so figures
compare across runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

STRUCTURE_SIZE = 64
REGION_THRESHOLD = 0.04
"""A render pixel brighter than this (of 1) is face: FLAME renders are drawn on black."""
REGION_DILATION = 5
"""Pixels (at 64 px) the face region grows by, so the jaw line and hair edge count."""


def to_grey(images: Tensor, size: int = STRUCTURE_SIZE) -> Tensor:
    """(B,3,H,W) in [0,1] -> (B,1,size,size) luma, antialiased."""
    grey = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
    if grey.shape[-1] != size or grey.shape[-2] != size:
        grey = F.interpolate(grey, size=(size, size), mode="bilinear", antialias=True)
    return grey.clamp(0, 1)


def face_regions(renders: Tensor, size: int = STRUCTURE_SIZE) -> Tensor:
    """(B,3,H,W) FLAME renders in [0,1] -> (B,1,size,size) bool: the face and a margin."""
    face = (to_grey(renders, size) > REGION_THRESHOLD).float()
    k = 2 * REGION_DILATION + 1
    return F.max_pool2d(face, k, stride=1, padding=REGION_DILATION) > 0


def ssim_maps(generated: Tensor, targets: Tensor) -> Tensor:
    """(B,1,S,S) x (B,1,S,S) grey -> (B,1,S,S) per-pixel SSIM (torchmetrics' Gaussian window)."""
    _, full = structural_similarity_index_measure(
        generated, targets, data_range=1.0, reduction="none", return_full_image=True
    )
    return full


def ssim_matrix(generated: Tensor, targets: Tensor, regions: Tensor) -> Tensor:
    """(N,N): [i, j] = mean SSIM of generated face i with target j inside target j's region."""
    n = generated.shape[0]
    out = torch.empty(n, n)
    for i in range(n):  # N SSIMs of one face against every target: (N,1,S,S)
        full = ssim_maps(generated[i : i + 1].expand_as(targets), targets)
        area = regions.float().sum(dim=(1, 2, 3)).clamp(min=1)
        out[i] = (full * regions).sum(dim=(1, 2, 3)) / area
    return out


def laplacian(x: Tensor) -> Tensor:
    """(B,C,H,W) -> the per-channel 4-neighbour Laplacian, same shape (zero-padded)."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=x.dtype)
    c = x.shape[1]
    return F.conv2d(x, k.to(x.device).view(1, 1, 3, 3).repeat(c, 1, 1, 1), padding=1, groups=c)


def laplacian_energy(images: Tensor, regions: Tensor) -> Tensor:
    """(B,1,S,S) grey -> (B,) mean squared Laplacian response inside each region (its border
    pixels left out, where the zero padding would invent an edge)."""
    lap = laplacian(images)
    inner = regions.clone()
    inner[..., 0, :] = inner[..., -1, :] = inner[..., :, 0] = inner[..., :, -1] = False
    return (lap.square() * inner).sum(dim=(1, 2, 3)) / inner.float().sum(dim=(1, 2, 3)).clamp(min=1)


def structure_scores(generated: Tensor, targets: Tensor, regions: Tensor) -> dict[str, Tensor]:
    """Per-sample structure of N generated faces against their N targets.

    ``generated``, ``targets``: (N,1,S,S) grey from `to_grey`; ``regions``: the targets' face
    regions from `face_regions` of their FLAME renders. Returns per-sample ``ssim_own``,
    ``ssim_margin``, ``own_is_best`` (bool), ``sharpness`` (generated), ``target_sharpness``.
    """
    sims = ssim_matrix(generated, targets, regions)  # (N,N)
    n = sims.shape[0]
    own = sims.diagonal()
    others = (sims.sum(1) - own) / max(n - 1, 1)
    return {
        "ssim_own": own,
        "ssim_margin": own - others if n > 1 else torch.full_like(own, float("nan")),
        "own_is_best": sims.argmax(1) == torch.arange(n),
        "sharpness": laplacian_energy(generated, regions),
        "target_sharpness": laplacian_energy(targets, regions),
    }


def summarize_structure(scores: dict[str, Tensor]) -> dict[str, float]:
    """The report's structure figures from ``structure_scores``."""
    n = int(scores["ssim_own"].numel())
    return {
        "n": n,
        "own_target_top1": float(scores["own_is_best"].float().mean()),
        "chance": 1.0 / n if n else float("nan"),
        "ssim_own": float(scores["ssim_own"].mean()),
        "ssim_margin": float(scores["ssim_margin"].mean()),
        "sharpness_ratio": float(
            scores["sharpness"].mean() / scores["target_sharpness"].mean().clamp(min=1e-12)
        ),
    }
