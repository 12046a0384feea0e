"""FLAME codes -> condition maps -> faces: the ``edit`` command's work.

Why: what users of a FLAME-driven ControlNet want most is to *change* a face, the same person
with another emotion. EMOCA's codes separate who (shape), where (pose, camera) and what the
face does (expression, jaw), so an edit moves only the last two towards the mean of the target
class (``expression_codes.npz``, written by prepare from the training split) and renders
again, on the same canvas and through the same camera as the original. The maps then go
through exactly the pipeline ``infer`` uses (`controlnet_emo.inference`): same loading, same
generation, same seed, so the original and edited faces differ by the edit alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conditioners.codes import (
    ExpressionMeans,
    FlameCodes,
    blend_expression,
    expression_index,
)
from conditioners.flame_model import FlameModel, LandmarkEmbedding
from conditioners.posed import Posed, draw, pose_folder
from conditioners.render import Render, project
from controlnet_emo.data.transforms import resize_center_crop
from controlnet_emo.labels import EXPRESSION_WORDS, EXPRESSIONS
from controlnet_emo.models.sampling import Sampling
from controlnet_emo.pictures import Panel, labelled_grid

log = logging.getLogger(__name__)

EXPRESSION_CODES = "expression_codes.npz"
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)


class EditError(ValueError):
    """A bad input to ``render`` / ``edit``, one line naming the file."""


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
    sampling: Sampling | None = None,
    *,
    strength: float = 0.8,
    sweep: bool = False,
    prompt: str | None = None,
    expression_codes: str | Path | None = None,
    landmark_embedding: str | Path | None = None,
    cam: tuple[float, float, float] | None = None,
    base: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Edit one face's expression and draw it: the sheet photo | original render | edited
    render | generated at ``out`` and the generated face beside it (``<out>_face.png``);
    ``sweep``: one column per strength in `SWEEP` (renders above, faces below).

    Every input is read and rendered before the diffusion model loads.
    """
    from controlnet_emo.inference.infer import generate, load_pipeline, model_info, save_png

    s = sampling or Sampling()
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
    pipe, info = load_pipeline(model, s, base, device, dtype)
    faces = [generate(pipe, info, m, prompt, s) for m in maps]
    settings = {
        "prompt": prompt, **s.record(),
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
        sheet = labelled_grid(
            [[Panel(photo, ["photo"])] + [Panel(e, [f"{v:g}"]) for v, e in zip(strengths, edited_tiles, strict=True)],
             [Panel(original_tile, ["original"])] + [Panel(f, [EXPRESSIONS[target]]) for f in faces]]
        )  # fmt: skip
    else:
        sheet = labelled_grid([[Panel(photo, ["photo"]), Panel(original_tile, ["original"]),
                                Panel(edited_tiles[0], [f"{EXPRESSIONS[target]} {strengths[0]:g}"]),
                                Panel(faces[0], ["generated"])]])  # fmt: skip
    written = [save_png(sheet, out, settings)]
    for value, face in zip(strengths, faces, strict=True):
        name = f"{out.stem}_face.png" if not sweep else f"{out.stem}_face_{value:g}.png"
        written.append(save_png(face, out.with_name(name), {**settings, "strength": value}))
    return written


def _tile(image: np.ndarray | None, size: int) -> Image.Image:
    """(H, W, 3) uint8 -> the size x size centre crop the model sees; None -> a black tile."""
    if image is None:
        return Image.new("RGB", (size, size))
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    t = resize_center_crop(t, size)
    return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
