"""Image transforms shared by the target and every condition map.

One draw of the random parameters is applied to all of a sample's images, so the FLAME render,
depth and skeleton stay pixel-aligned with the face they describe. Inference resizes maps with
the same ``resize_center_crop`` that validation uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropParams:
    top: int
    left: int
    flip: bool


def resize_short_side(img: torch.Tensor, size: int) -> torch.Tensor:
    """(C,H,W) float -> shortest side == size, antialiased bilinear (as PIL would)."""
    _, h, w = img.shape
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) == (h, w):
        return img
    return F.interpolate(
        img[None], (new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )[0]


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """(C,H,W) float -> (C,size,size): shortest side to size, then the centre square."""
    img = resize_short_side(img, size)
    _, h, w = img.shape
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top : top + size, left : left + size]


def sample_crop(
    height: int, width: int, size: int, rng: np.random.Generator, hflip: bool
) -> CropParams:
    """Random square crop position (after the short-side resize) and flip."""
    return CropParams(
        top=int(rng.integers(0, height - size + 1)),
        left=int(rng.integers(0, width - size + 1)),
        flip=bool(hflip and rng.random() < 0.5),
    )


def apply_crop(img: torch.Tensor, size: int, p: CropParams) -> torch.Tensor:
    img = img[:, p.top : p.top + size, p.left : p.left + size]
    return img.flip(-1) if p.flip else img


def paired_transform(
    images: list[torch.Tensor], size: int, rng: np.random.Generator | None, hflip: bool = True
) -> list[torch.Tensor]:
    """Resize every image's short side to ``size`` and take one shared crop (+ flip).

    ``rng=None`` means evaluation: centre crop, no flip. All images must share a size.
    """
    return paired_transform_with_time_ids(images, size, rng, hflip)[0]


def paired_transform_with_time_ids(
    images: list[torch.Tensor], size: int, rng: np.random.Generator | None, hflip: bool = True
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``paired_transform``, plus the crop it took as SDXL's micro-conditioning ``time_ids``
    (6,): original height and width, crop top and left (in the resized image, as seen after
    the flip), target height and width. SDXL was trained told how its pictures were cropped;
    telling it the truth keeps cut-off faces out of what it draws (SD ignores them)."""
    shapes = {tuple(im.shape[1:]) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"target and condition maps differ in size: {sorted(shapes)}")
    _, h0, w0 = images[0].shape
    resized = [resize_short_side(im, size) for im in images]
    _, h, w = resized[0].shape
    if rng is None:
        p = CropParams(top=(h - size) // 2, left=(w - size) // 2, flip=False)
    else:
        p = sample_crop(h, w, size, rng, hflip)
    left = w - size - p.left if p.flip else p.left
    time_ids = torch.tensor([h0, w0, p.top, left, size, size], dtype=torch.float32)
    return [apply_crop(im, size, p) for im in resized], time_ids
