"""EMOCA's FLAME codes -> the render they describe, on the canvas of the photo they came from.

Why here: rendering codes is prepare-side work (the ``render`` command, and the maps the
``edit`` command draws again), so it sits with the other condition makers and imports only
them and the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conditioners.codes import (
    CameraFit,
    Canvas,
    CodesError,
    FlameCodes,
    camera_for,
    canvas_for,
    code_folders,
    parse_numbers,
    read_codes,
    render_codes,
    sibling_render_crop,
)
from conditioners.depth import to_png_values
from conditioners.flame_model import FlameModel
from conditioners.io import write_png
from conditioners.render import Render


@dataclass
class Posed:
    """One face's codes with everything needed to draw it again: camera and canvas."""

    codes: FlameCodes
    fit: CameraFit
    canvas: Canvas


def pose_folder(
    flame: FlameModel,
    folder: str | Path,
    cam: tuple[float, float, float] | None = None,
    size: tuple[int, int] | None = None,
) -> Posed:
    """Read a code folder and settle its camera (given > cam.npy > fit to EMOCA's render)."""
    codes = read_codes(folder)
    crop = sibling_render_crop(folder) if cam is None and codes.cam is None else None
    return Posed(codes, camera_for(flame, codes, cam, crop), canvas_for(folder, size))


def draw(flame: FlameModel, posed: Posed, codes: FlameCodes | None = None) -> Render:
    """``codes`` (default the folder's own) through the folder's camera onto its canvas."""
    c = posed.canvas
    return render_codes(flame, codes or posed.codes, posed.fit.cam, c.crop_box, c.size)


def render_folders(
    flame_model: str | Path,
    codes: str | Path,
    out: str | Path,
    cam: tuple[float, float, float] | None = None,
    size: tuple[int, int] | None = None,
    depth: bool = False,
) -> list[tuple[Path, CameraFit]]:
    """One code folder -> one PNG, or a folder of code folders -> a folder of PNGs
    (``<sub>/<stem>.png``); ``depth`` also writes ``<name>_depth.png`` (16-bit, near bright)."""
    flame = FlameModel.from_file(flame_model)
    codes, out = Path(codes), Path(out)
    folders = code_folders(codes) if codes.is_dir() else []
    if not folders:
        raise CodesError(f"{codes}: no code folder (shape.npy, exp.npy, pose.npy) here or below")
    single = folders == [codes]
    if not single and out.suffix.lower() == ".png":
        raise CodesError(f"{out}: --codes holds several code folders, so --out must be a folder")
    written = []
    for folder in folders:
        posed = pose_folder(flame, folder, cam, size)
        render = draw(flame, posed)
        dst = out if single else out / folder.relative_to(codes).with_suffix(".png")
        if single and out.suffix.lower() != ".png":
            dst = out / f"{folder.name}.png"
        write_png(dst, render.image_uint8())
        if depth:
            write_png(
                dst.with_name(f"{dst.stem}_depth.png"), to_png_values(render.depth_float(), 16)
            )
        written.append((dst, posed.fit))
    return written


def parse_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    w, h = parse_numbers(text, 2, "--size")
    if w < 8 or h < 8 or w != int(w) or h != int(h):
        raise CodesError(f"--size {text!r}: expected whole pixels, at least 8x8")
    return int(w), int(h)
