"""FLAME codes -> condition maps -> faces: the ``render`` and ``edit`` commands.

Why: what users of a FLAME-driven ControlNet want most is to *change* a face, the same person
with another emotion. EMOCA's codes separate who (shape), where (pose, camera) and what the
face does (expression, jaw), so an edit moves only the last two towards the mean of the target
class (``expression_codes.npz``, written by prepare from the training split) and renders
again, on the same canvas and through the same camera as the original. The maps then go
through exactly the pipeline ``infer`` uses (`controlnet_emo.inference`): same loading, same
generation, same seed, so the original and edited faces differ by the edit alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from conditioners.codes import (
    CameraFit,
    Canvas,
    CodesError,
    ExpressionMeans,
    FlameCodes,
    blend_expression,
    camera_for,
    canvas_for,
    code_folders,
    expression_index,
    parse_numbers,
    read_codes,
    render_codes,
    sibling_render_crop,
)
from conditioners.depth import to_png_values
from conditioners.flame_model import FlameModel, FlameModelError, LandmarkEmbedding
from conditioners.io import write_png
from conditioners.render import Render, project

from .data.transforms import resize_center_crop
from .labels import EXPRESSION_WORDS, EXPRESSIONS

log = logging.getLogger(__name__)

EXPRESSION_CODES = "expression_codes.npz"
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)


class EditError(ValueError):
    """A bad input to ``render`` / ``edit``, one line naming the file."""


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


# ---------------------------------------------------------------------------------------------
# render


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
        raise EditError(f"{codes}: no code folder (shape.npy, exp.npy, pose.npy) here or below")
    single = folders == [codes]
    if not single and out.suffix.lower() == ".png":
        raise EditError(f"{out}: --codes holds several code folders, so --out must be a folder")
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


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``controlnet-emo render``."""
    p.add_argument("--flame-model", required=True, type=Path, help="FLAME .pkl / .npz (yours)")
    p.add_argument(
        "--codes", required=True, type=Path, help="EMOCA code folder, or a folder of them"
    )
    p.add_argument("--cam", help="orthographic camera s,tx,ty (default: cam.npy, else fitted)")
    p.add_argument(
        "--size",
        help="canvas WxH, the crop its centred square (default: the original photo in a raw "
        "folder, else EMOCA's 224 px crop frame)",
    )
    p.add_argument("--depth", action="store_true", help="also write <out>_depth.png (z-buffer)")
    p.add_argument("--out", required=True, type=Path, help="PNG (or a folder)")


def run_render(args: argparse.Namespace) -> int:
    """The ``render`` subcommand: one line per PNG with its camera; bad input: one line, exit 2."""
    try:
        written = render_folders(
            args.flame_model,
            args.codes,
            args.out,
            cam=parse_numbers(args.cam, 3, "--cam") if args.cam else None,
            size=_size(args.size),
            depth=args.depth,
        )
    except (EditError, CodesError, FlameModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, fit in written:
        cam = ",".join(f"{v:.5g}" for v in fit.cam)
        print(f"{path}  cam {cam} ({fit.method}, quality {fit.score:.3f})")
    return 0


def _size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    w, h = parse_numbers(text, 2, "--size")
    if w < 8 or h < 8 or w != int(w) or h != int(h):
        raise CodesError(f"--size {text!r}: expected whole pixels, at least 8x8")
    return int(w), int(h)


# ---------------------------------------------------------------------------------------------
# edit


def find_expression_codes(model: str | Path, given: str | Path | None = None) -> Path:
    """``given``, else ``expression_codes.npz`` in the prepared dataset the run trained on."""
    if given is not None:
        return Path(given)
    import yaml

    config = Path(model) / "config.yaml"
    if Path(model).name == "controlnet" and not config.is_file():
        config = Path(model).parent / "config.yaml"
    root = None
    if config.is_file():
        root = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("root")
    if root is None:
        raise EditError(
            f"{model}: no run config.yaml to find {EXPRESSION_CODES}; pass --expression-codes"
        )
    return Path(root) / EXPRESSION_CODES


def condition_maps(
    render: Render,
    conditions: list[str],
    size: int,
    skeleton: np.ndarray | None = None,
) -> torch.Tensor:
    """(3N, size, size) in [0, 1] in the model's order: the render, its z-buffer as depth,
    the projected landmarks' skeleton when given; what is missing is zeros (as in dropout)."""
    maps = {
        "flame": torch.from_numpy(render.image_uint8()).permute(2, 0, 1).float() / 255.0,
        "depth": torch.from_numpy(render.depth_float())[None].repeat(3, 1, 1),
    }
    if skeleton is not None:
        maps["skeleton"] = torch.from_numpy(skeleton).permute(2, 0, 1).float() / 255.0
    zeros = torch.zeros(3, size, size)
    resized = {k: resize_center_crop(v, size) for k, v in maps.items()}
    return torch.cat([resized.get(name, zeros) for name in conditions])  # (3N, H, W)


def landmark_skeleton(
    flame: FlameModel, embedding: LandmarkEmbedding, posed: Posed, codes: FlameCodes
) -> np.ndarray | None:
    """The 68 FLAME landmarks projected through the camera, drawn as training's skeleton."""
    from conditioners.skeleton import draw_skeleton

    with torch.no_grad():
        verts = flame(*codes.tensors(flame.v_template.device)).vertices
        points = embedding.points(verts, flame.faces)  # (1, L, 3)
    if points.shape[1] != 68:
        log.warning("landmark embedding has %d points, not 68: skeleton left out", points.shape[1])
        return None
    cam = torch.tensor(posed.fit.cam, dtype=torch.float32)[None]
    box = torch.tensor([posed.canvas.crop_box], dtype=torch.float32)
    uv = project(points.float().cpu(), cam, box)[0, :, :2].numpy()  # (68, 2) canvas pixels
    width, height = posed.canvas.size
    return draw_skeleton(uv, height, width)


def edit(
    model: str | Path,
    flame_model: str | Path,
    codes: str | Path,
    expression: str,
    out: str | Path,
    strength: float = 0.8,
    sweep: bool = False,
    prompt: str | None = None,
    expression_codes: str | Path | None = None,
    landmark_embedding: str | Path | None = None,
    cam: tuple[float, float, float] | None = None,
    seed: int = 0,
    steps: int = 30,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    scheduler: str = "unipc",
    base: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    map_guidance: bool = True,
) -> list[Path]:
    """Edit one face's expression and draw it: the sheet photo | original render | edited
    render | generated at ``out`` and the generated face beside it (``<out>_face.png``);
    ``sweep``: one column per strength in `SWEEP` (renders above, faces below).

    Every input is read and rendered before the diffusion model loads.
    """
    from .inference import generate, load_pipeline, model_info, save_png

    target = expression_index(expression)
    strengths = SWEEP if sweep else (float(strength),)
    if any(not 0.0 <= s <= 1.0 for s in strengths):
        raise EditError(f"--strength {strength}: must be in [0, 1] (0 = unchanged, 1 = class mean)")
    info = model_info(model)
    means = ExpressionMeans.load(find_expression_codes(model, expression_codes))
    flame = FlameModel.from_file(flame_model)
    embedding = LandmarkEmbedding.from_file(landmark_embedding) if landmark_embedding else None
    posed = pose_folder(flame, codes, cam)
    edited = [blend_expression(posed.codes, means, target, s) for s in strengths]
    original = draw(flame, posed)
    renders = [draw(flame, posed, c) for c in edited]
    size = info.resolution
    maps = []
    for render, c in zip(renders, edited, strict=True):
        skeleton = None
        if embedding is not None and "skeleton" in info.conditions:
            skeleton = landmark_skeleton(flame, embedding, posed, c)
        maps.append(condition_maps(render, info.conditions, size, skeleton))
    prompt = prompt or f"a photo of a {EXPRESSION_WORDS[target]} face"
    pipe, info = load_pipeline(model, base, device, dtype, scheduler, map_guidance)
    faces = [
        generate(pipe, info, m, prompt, negative_prompt, seed, steps, guidance_scale) for m in maps
    ]
    settings = {
        "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
        "guidance_scale": guidance_scale, "map_guidance": map_guidance, "scheduler": scheduler,
        "model": str(model), "base": base or info.base_model, "codes": str(codes),
        "expression": EXPRESSIONS[target],
        "strengths": list(strengths), "camera": [round(float(v), 6) for v in posed.fit.cam],
        "camera_method": posed.fit.method, "software": "controlnet-emo",
    }  # fmt: skip
    out = Path(out)
    photo = _tile(posed.canvas.photo, size)
    original_tile = _tile(original.image_uint8(), size)
    edited_tiles = [_tile(r.image_uint8(), size) for r in renders]
    if sweep:
        sheet = _grid(
            [[("photo", photo)] + [(f"{s:g}", t) for s, t in zip(strengths, edited_tiles, strict=True)],
             [("original", original_tile)] + [(EXPRESSIONS[target], f) for f in faces]]
        )  # fmt: skip
    else:
        sheet = _grid([[("photo", photo), ("original", original_tile),
                        (f"{EXPRESSIONS[target]} {strengths[0]:g}", edited_tiles[0]),
                        ("generated", faces[0])]])  # fmt: skip
    written = [save_png(sheet, out, settings)]
    for s, face in zip(strengths, faces, strict=True):
        name = f"{out.stem}_face.png" if not sweep else f"{out.stem}_face_{s:g}.png"
        written.append(save_png(face, out.with_name(name), {**settings, "strength": s}))
    return written


def _tile(image: np.ndarray | None, size: int) -> Image.Image:
    """(H, W, 3) uint8 -> the size x size centre crop the model sees; None -> a black tile."""
    if image is None:
        return Image.new("RGB", (size, size))
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    t = resize_center_crop(t, size)
    return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _grid(rows: list[list[tuple[str, Image.Image]]]) -> Image.Image:
    """Labelled tiles in rows (all tiles one size)."""
    w, h = rows[0][0][1].size
    sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)))
    pen = ImageDraw.Draw(sheet)
    for y, row in enumerate(rows):
        for x, (label, tile) in enumerate(row):
            sheet.paste(tile.convert("RGB").resize((w, h)), (x * w, y * h))
            pen.text((x * w + 3, y * h + 2), label, fill=(255, 255, 0))
    return sheet


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``controlnet-emo edit``."""
    from .inference import SCHEDULERS, add_map_guidance_argument

    p.add_argument("--model", required=True, type=Path, help="training run folder")
    p.add_argument("--flame-model", required=True, type=Path, help="FLAME .pkl / .npz (yours)")
    p.add_argument("--codes", required=True, type=Path, help="one EMOCA code folder")
    p.add_argument("--expression", required=True, help=f"target class: {', '.join(EXPRESSIONS)}")
    p.add_argument("--strength", type=float, default=0.8, help="0 = unchanged, 1 = class mean")
    p.add_argument("--sweep", action="store_true", help=f"a row over strengths {SWEEP}")
    p.add_argument("--prompt", help="default: 'a photo of a <expression> face'")
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--expression-codes",
        type=Path,
        help=f"class means (default: {EXPRESSION_CODES} in the run's prepared dataset)",
    )
    p.add_argument(
        "--landmark-embedding",
        type=Path,
        help="FLAME's 68-landmark embedding: draws the skeleton map (else it is left out)",
    )
    p.add_argument("--cam", help="orthographic camera s,tx,ty (default: cam.npy, else fitted)")
    p.add_argument("--out", required=True, type=Path, help="sheet PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    add_map_guidance_argument(p)
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="unipc")
    p.add_argument("--base", help="base SD model (default: the run's)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def run_edit(args: argparse.Namespace) -> int:
    """The ``edit`` subcommand: prints each written PNG; a bad input is one line, exit 2."""
    from .inference import InferenceError

    try:
        written = edit(
            args.model,
            args.flame_model,
            args.codes,
            args.expression,
            args.out,
            strength=args.strength,
            sweep=args.sweep,
            prompt=args.prompt,
            expression_codes=args.expression_codes,
            landmark_embedding=args.landmark_embedding,
            cam=parse_numbers(args.cam, 3, "--cam") if args.cam else None,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            scheduler=args.scheduler,
            base=args.base,
            device=args.device,
            map_guidance=args.map_guidance,
        )
    except (EditError, CodesError, FlameModelError, InferenceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
