"""Labelled picture sheets: the one grid builder behind infer's sheet, edit's sweep, the
validation grids and evaluate's grid.

Why one, and why upscaled: the demo draws 64 px faces, and a 64 px tile in a sheet is a
thumbnail nobody can judge. Every sheet a person opens shows each panel at least
``min_tile`` pixels wide (nearest-neighbour, so no detail is invented), with its label drawn
on it. The layout itself is diffusers' ``make_image_grid``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont

from controlnet_emo.atomic import atomic_write


@dataclass
class Panel:
    """One tile: an image, text lines drawn on it, and optional (68,2) landmarks in pixels."""

    image: Image.Image | torch.Tensor
    lines: Sequence[str] = ()
    points: torch.Tensor | None = field(default=None, repr=False)


def to_pil(img: Image.Image | torch.Tensor) -> Image.Image:
    """(3,H,W) in [0,1] (or a PIL image) -> RGB image."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def labelled_grid(rows: Sequence[Sequence[Panel]], min_tile: int = 256) -> Image.Image:
    """Rows of panels, each tile square-resized to max(its size, ``min_tile``); a short row is
    padded with black tiles."""
    images = [[to_pil(p.image) for p in row] for row in rows]
    t = max(min_tile, *(im.height for row in images for im in row))
    cols = max(len(row) for row in rows)
    tiles = []
    for row in images:
        tiles += [im.resize((t, t), Image.Resampling.NEAREST) for im in row]
        tiles += [Image.new("RGB", (t, t))] * (cols - len(row))
    sheet = make_image_grid(tiles, rows=len(rows), cols=cols)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=max(10, t // 20))
    for y, row in enumerate(rows):
        for x, p in enumerate(row):
            src = images[y][x].height
            if p.points is not None:
                for px, py in ((p.points + 0.5) * t / src - 0.5).tolist():
                    cx, cy = x * t + px, y * t + py
                    draw.ellipse((cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5), fill=(0, 255, 255))
            if p.lines:
                draw.multiline_text(
                    (x * t + 3, y * t + 2),
                    "\n".join(p.lines),
                    font=font,
                    fill=(255, 255, 0),
                    stroke_width=1,
                    stroke_fill=(0, 0, 0),
                )
    return sheet


def save_sheet(sheet: Image.Image, path: str | Path) -> Path:
    """Write a sheet as PNG atomically: a run killed mid-write never leaves half a picture."""
    path = Path(path)
    with atomic_write(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
