"""EMOCA's FLAME codes -> a render on any canvas, with the camera EMOCA did not save.

EMOCA's ``--save_codes`` writes ``<name>/{shape,exp,pose,tex,detail}.npy`` but not the camera
its encoder predicted. Without ``cam.npy`` we recover it from EMOCA's own render of the same
codes (``geometry_detail/``, drawn in the crop's frame): an orthographic camera only scales
and shifts the mesh's silhouette, so its area and centroid give scale and translation in
closed form, refined by re-rendering. Given FLAME's landmark embedding and 68 landmarks, a
least-squares fit of the projected landmarks does the same. Either way the fit quality
(silhouette IoU, or landmark error) is reported, as the re-canvas reports its match score.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from conditioners.flame import EMOCA_CROP_SCALE, EMOCA_CROP_SIZE, emoca_crop_box
from conditioners.flame_model import FlameModel
from conditioners.io import ImageError, is_image_file, load_render, load_rgb
from conditioners.render import Render, crop_frame_box, render_mesh
from controlnet_emo.labels import EXPRESSION_WORDS, EXPRESSIONS

CODE_FILES = ("shape", "exp", "pose")  # what a code folder must hold; cam.npy is optional
MASK_LEVEL = 8  # an EMOCA render's face pixels are above this grey value, the background 0


class CodesError(ValueError):
    """A code folder that cannot be read or rendered (one line, names the folder)."""


@dataclass
class FlameCodes:
    """One face's EMOCA codes (float32, EMOCA's sizes)."""

    shape: np.ndarray  # (100,)
    exp: np.ndarray  # (50,)
    pose: np.ndarray  # (6,) global rotation then jaw, axis-angle
    cam: np.ndarray | None = None  # (3,) s, tx, ty; None when EMOCA did not save it
    source: str = ""

    def tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
        """(1, n) shape, expression and pose tensors for `FlameModel`."""
        return tuple(
            torch.from_numpy(a)[None].to(device) for a in (self.shape, self.exp, self.pose)
        )


def read_codes(folder: str | Path) -> FlameCodes:
    """Read an EMOCA code folder (``shape.npy``, ``exp.npy``, ``pose.npy``, optional ``cam.npy``)."""
    folder = Path(folder)
    arrays = {}
    for name in (*CODE_FILES, "cam"):
        path = folder / f"{name}.npy"
        if not path.is_file():
            if name == "cam":
                continue
            raise CodesError(f"{folder}: no {name}.npy (expected EMOCA's --save_codes layout)")
        try:
            arrays[name] = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
        except (OSError, ValueError) as err:
            raise CodesError(f"{path}: cannot read it: {err}") from None
    if arrays["pose"].size != 6 or arrays.get("cam", np.zeros(3)).size != 3:
        raise CodesError(f"{folder}: pose.npy needs 6 values and cam.npy 3")
    return FlameCodes(
        arrays["shape"], arrays["exp"], arrays["pose"], arrays.get("cam"), str(folder)
    )


def code_folders(root: str | Path) -> list[Path]:
    """``root`` itself when it is a code folder, else every code folder below it (sorted)."""
    root = Path(root)
    if (root / "shape.npy").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("shape.npy"))


def parse_numbers(text: str, n: int, what: str) -> tuple[float, ...]:
    """``"8.1,0.01,-0.02"`` -> (8.1, 0.01, -0.02); a wrong count or word is a `CodesError`."""
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise CodesError(f"{what} {text!r}: expected {n} numbers separated by commas")
    return values


# ---------------------------------------------------------------------------------------------
# Rendering codes


def mesh(model: FlameModel, codes: FlameCodes) -> torch.Tensor:
    """(1, V, 3) posed vertices of the codes."""
    with torch.no_grad():
        return model(*codes.tensors(model.v_template.device)).vertices


def render_codes(
    model: FlameModel,
    codes: FlameCodes,
    cam: np.ndarray,
    crop_box: tuple[float, float, float],
    size: tuple[int, int],
    supersample: int = 2,
) -> Render:
    """The codes' mesh through EMOCA's camera and crop box (left, top, side) on a (W, H) canvas."""
    device = model.v_template.device
    return render_mesh(
        mesh(model, codes),
        model.faces,
        torch.tensor(np.asarray(cam, np.float32)[None], device=device),
        torch.tensor([crop_box], dtype=torch.float32, device=device),
        size,
        supersample,
    )


def canvas_crop_box(
    face_box: tuple[float, float, float, float] | None, size: tuple[int, int], crop_scale: float
) -> tuple[float, float, float]:
    """Where EMOCA's crop sits on the canvas: from the face box when known (EMOCA's rule),
    else the canvas's centred square (a 224 x 224 canvas is the crop frame itself)."""
    if face_box is not None:
        return emoca_crop_box(face_box, crop_scale)
    width, height = size
    side = min(width, height) - 1
    return (width - 1 - side) / 2, (height - 1 - side) / 2, float(side)


# ---------------------------------------------------------------------------------------------
# Recovering the camera


@dataclass
class CameraFit:
    cam: np.ndarray  # (3,) s, tx, ty
    score: float  # silhouette IoU in [0, 1], or 1 - landmark error / crop size
    method: str  # "cam.npy" | "given" | "silhouette" | "landmarks"


def fit_camera_to_render(
    model: FlameModel, codes: FlameCodes, render_crop: np.ndarray, iterations: int = 3
) -> CameraFit:
    """Camera whose render of the codes covers EMOCA's crop-frame render (H, W, 3) best.

    Orthographic projection scales the silhouette by s and shifts it by s * t, so area and
    centroid of the render's mask give both in closed form; re-rendering corrects what the
    rasterization and the mask threshold bend.
    """
    target = render_crop.max(-1) > MASK_LEVEL if render_crop.ndim == 3 else render_crop > MASK_LEVEL
    if target.sum() < 16:
        raise CodesError(f"{codes.source}: the EMOCA render is empty; cannot fit a camera")
    size = target.shape[0]
    verts = mesh(model, codes)[0].cpu().numpy()
    lo, hi = verts[:, :2].min(0), verts[:, :2].max(0)
    cam = np.array([1.6 / float((hi - lo).max()), *(-(lo + hi) / 2)], np.float32)
    area_t, centre_t = _moments(target.astype(np.float32))
    half = (size - 1) / 2
    for _ in range(iterations):
        cover = _crop_coverage(model, codes, cam, size)
        area, centre = _moments(cover)
        if area <= 0:
            raise CodesError(f"{codes.source}: the mesh left the crop while fitting the camera")
        s = cam[0] * np.sqrt(area_t / area)
        # model-space silhouette centroid seen by the current camera, then the new translation
        m_x = (centre[0] / half - 1) / cam[0] - cam[1]
        m_y = (1 - centre[1] / half) / cam[0] - cam[2]
        cam = np.array([s, (centre_t[0] / half - 1) / s - m_x, (1 - centre_t[1] / half) / s - m_y])
        cam = cam.astype(np.float32)
    mask = _crop_coverage(model, codes, cam, size) > 0
    iou = float((mask & target).sum() / max(1, (mask | target).sum()))
    return CameraFit(cam, iou, "silhouette")


def fit_camera_to_landmarks(
    model_points: np.ndarray, landmarks_crop: np.ndarray, crop_size: int = EMOCA_CROP_SIZE
) -> CameraFit:
    """Least-squares (s, tx, ty) taking the mesh's (L, 2) landmark x, y to (L, 2) crop pixels.

    ``model_points`` come from `LandmarkEmbedding.points` on the codes' mesh.
    """
    half = (crop_size - 1) / 2
    target = np.column_stack([landmarks_crop[:, 0] / half - 1, 1 - landmarks_crop[:, 1] / half])
    n = len(model_points)
    design = np.zeros((2 * n, 3))
    design[:n, 0], design[:n, 1] = model_points[:, 0], 1.0  # x_ndc = s x + (s tx)
    design[n:, 0], design[n:, 2] = model_points[:, 1], 1.0  # y_ndc = s y + (s ty)
    (s, a, b), *_ = np.linalg.lstsq(
        design, np.concatenate([target[:, 0], target[:, 1]]), rcond=None
    )
    cam = np.array([s, a / s, b / s], np.float32)
    error = np.linalg.norm((design @ [s, a, b]).reshape(2, n).T - target, axis=1).mean() * half
    return CameraFit(cam, float(1 - error / crop_size), "landmarks")


def camera_for(
    model: FlameModel,
    codes: FlameCodes,
    cam: tuple[float, float, float] | None = None,
    render_crop: np.ndarray | None = None,
) -> CameraFit:
    """The camera to render with: given > cam.npy > fitted to EMOCA's render > an error."""
    if cam is not None:
        return CameraFit(np.asarray(cam, np.float32), 1.0, "given")
    if codes.cam is not None:
        return CameraFit(codes.cam, 1.0, "cam.npy")
    if render_crop is not None:
        return fit_camera_to_render(model, codes, render_crop)
    raise CodesError(
        f"{codes.source}: no camera (EMOCA does not save it): pass --cam s,tx,ty, add cam.npy, "
        "or give EMOCA's render (geometry_detail/) to fit it"
    )


def raw_location(folder: str | Path) -> tuple[Path, Path] | None:
    """``RAW/codes/<sub>/<stem>/`` -> (RAW, ``<sub>/<stem>``); None outside a raw folder."""
    folder = Path(folder).resolve()
    for root in folder.parents:
        if root.name == "codes":
            return root.parent, folder.relative_to(root)
    return None


def sibling_render(folder: str | Path) -> Path | None:
    """``RAW/codes/<sub>/<stem>/`` -> ``RAW/geometry_detail/<sub>/<stem>.png`` when it exists."""
    found = raw_location(folder)
    if found is None:
        return None
    path = found[0] / "geometry_detail" / found[1].with_name(found[1].name + ".png")
    return path if path.is_file() else None


def sibling_render_crop(folder: str | Path) -> np.ndarray | None:
    """EMOCA's crop-frame render of the codes (to fit a missing camera), or None."""
    path = sibling_render(folder)
    if path is None:
        return None
    try:
        return load_render(path)
    except ImageError as err:
        raise CodesError(f"{path}: cannot read EMOCA's render ({err})") from None


@dataclass
class Canvas:
    """Where a render goes: canvas size, EMOCA's crop square on it, the photo underneath."""

    size: tuple[int, int]  # (W, H)
    crop_box: tuple[float, float, float]  # left, top, side in canvas pixels
    photo: np.ndarray | None  # (H, W, 3) uint8, or None when no photo was found
    kind: str  # "original" | "crop" | "size"


def canvas_for(
    folder: str | Path,
    size: tuple[int, int] | None = None,
    crop_scale: float = EMOCA_CROP_SCALE,
) -> Canvas:
    """The canvas a code folder renders onto.

    ``size`` given: that canvas, EMOCA's crop its centred square. Else, in a raw folder, the
    original photo (``images/``) with the crop placed by its face box from ``annotations.csv``,
    as prepare renders it; else EMOCA's crop (``inputs/``) in its own frame; else a bare
    224 px crop frame.
    """
    if size is not None:
        return Canvas(size, canvas_crop_box(None, size, crop_scale), None, "size")
    found = raw_location(folder)
    if found is not None:
        raw, rel = found
        original = _original_photo(raw, rel)
        boxes = _face_boxes(raw)
        if original is not None and original[0] in boxes:
            photo = load_rgb(original[1])[0]
            h, w = photo.shape[:2]
            return Canvas((w, h), emoca_crop_box(boxes[original[0]], crop_scale), photo, "original")
        crop = raw / "inputs" / rel.with_name(rel.name + ".png")
        if crop.is_file():
            photo = load_rgb(crop)[0]
            side = photo.shape[0]
            return Canvas((photo.shape[1], side), crop_frame_box(side), photo, "crop")
    return Canvas((EMOCA_CROP_SIZE,) * 2, crop_frame_box(EMOCA_CROP_SIZE), None, "crop")


def _original_photo(raw: Path, rel: Path) -> tuple[str, Path] | None:
    """(annotation key, path) of ``RAW/images/<sub>/<stem>.*``."""
    folder = raw / "images" / rel.parent
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob(f"{rel.name}.*")):
        if is_image_file(path):
            return path.relative_to(raw / "images").as_posix(), path
    return None


def _face_boxes(raw: Path) -> dict[str, tuple[float, float, float, float]]:
    """Annotation key -> face box (x, y, w, h) from ``RAW/annotations.csv``."""
    path = raw / "annotations.csv"
    return _read_boxes(path, path.stat().st_mtime_ns) if path.is_file() else {}


@functools.lru_cache(maxsize=4)
def _read_boxes(path: Path, mtime: int) -> dict[str, tuple[float, float, float, float]]:
    """Read once per file version: a folder of code folders looks up every face in it."""
    boxes = {}
    columns = ("face_x", "face_y", "face_width", "face_height")
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                box = tuple(float(row[c]) for c in columns)
            except (KeyError, TypeError, ValueError):
                continue
            key = (row.get("subDirectory_filePath") or "").strip().replace("\\", "/")
            if box[2] > 0 and box[3] > 0:
                boxes[key] = box
    return boxes


# ---------------------------------------------------------------------------------------------
# Mean expression codes per class (what `edit` moves a face towards)


@dataclass
class ExpressionMeans:
    """Per expression class: the mean expression codes and jaw rotation, and how many faces."""

    exp: np.ndarray  # (8, E)
    jaw: np.ndarray  # (8, 3) axis-angle
    count: np.ndarray  # (8,) faces averaged; 0 = no mean for that class

    def target(self, expression: int) -> tuple[np.ndarray, np.ndarray]:
        if self.count[expression] == 0:
            raise CodesError(
                f"no mean codes for {EXPRESSIONS[expression]!r}: the training split had no "
                "face of that class with codes"
            )
        return self.exp[expression], self.jaw[expression]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp, exp=self.exp, jaw=self.jaw, count=self.count, expressions=np.array(EXPRESSIONS)
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExpressionMeans:
        path = Path(path)
        if not path.is_file():
            raise CodesError(
                f"{path}: no such file (prepare writes expression_codes.npz from RAW/codes/)"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                means = cls(data["exp"].astype(np.float32), data["jaw"].astype(np.float32),
                            data["count"].astype(np.int64))  # fmt: skip
        except (OSError, ValueError, KeyError) as err:
            raise CodesError(f"{path}: not an expression_codes.npz ({err})") from None
        if means.exp.shape[0] != len(EXPRESSIONS) or means.jaw.shape != (len(EXPRESSIONS), 3):
            raise CodesError(f"{path}: expected 8 classes of exp and jaw (3) codes")
        return means


def class_means(codes: list[FlameCodes], labels: list[int]) -> ExpressionMeans:
    """Mean expression (``exp``) and jaw (``pose[3:6]``) codes of each expression class."""
    n_exp = max((c.exp.size for c in codes), default=50)
    exp = np.zeros((len(EXPRESSIONS), n_exp), np.float64)
    jaw = np.zeros((len(EXPRESSIONS), 3), np.float64)
    count = np.zeros(len(EXPRESSIONS), np.int64)
    for c, label in zip(codes, labels, strict=True):
        exp[label, : c.exp.size] += c.exp
        jaw[label] += c.pose[3:6]
        count[label] += 1
    scale = np.maximum(count, 1)[:, None]
    return ExpressionMeans(
        (exp / scale).astype(np.float32), (jaw / scale).astype(np.float32), count
    )


def expression_index(name: str) -> int:
    """``happy`` / ``Happy`` / ``surprised`` / ``1`` -> the AffectNet class index."""
    key = str(name).strip().lower()
    for names in (EXPRESSIONS, EXPRESSION_WORDS):
        if key in names:
            return names.index(key)
    if key.isdigit() and int(key) < len(EXPRESSIONS):
        return int(key)
    raise CodesError(f"expression {name!r}: choose one of {', '.join(EXPRESSIONS)}")


def blend_expression(
    codes: FlameCodes, means: ExpressionMeans, expression: int, strength: float
) -> FlameCodes:
    """The codes with expression and jaw moved ``strength`` of the way to the class mean.

    (1 - s) a + s b: exactly the codes at s = 0 and exactly the mean at s = 1. Identity
    (shape), head rotation and camera are kept, so the edited face is the same person in the
    same place.
    """
    target_exp, target_jaw = means.target(expression)
    mean_exp = np.zeros_like(codes.exp)
    n = min(mean_exp.size, target_exp.size)
    mean_exp[:n] = target_exp[:n]
    s = np.float32(strength)
    pose = codes.pose.copy()
    pose[3:6] = (1 - s) * codes.pose[3:6] + s * target_jaw
    exp = (1 - s) * codes.exp + s * mean_exp
    return FlameCodes(codes.shape, exp.astype(np.float32), pose, codes.cam, codes.source)


def _crop_coverage(model: FlameModel, codes: FlameCodes, cam: np.ndarray, size: int) -> np.ndarray:
    """The codes' crop-frame render through ``cam``, masked as the target is (an edge pixel
    counts when its anti-aliased grey passes `MASK_LEVEL`), so the two areas compare alike."""
    render = render_codes(model, codes, cam, crop_frame_box(size), (size, size))
    return (render.image_uint8()[..., 0] > MASK_LEVEL).astype(np.float32)


def _moments(mask: np.ndarray) -> tuple[float, np.ndarray]:
    """Area and (x, y) centroid of a soft mask, in pixels."""
    area = float(mask.sum())
    if area <= 0:
        return 0.0, np.zeros(2)
    ys, xs = np.indices(mask.shape)
    return area, np.array([(xs * mask).sum(), (ys * mask).sum()]) / area
