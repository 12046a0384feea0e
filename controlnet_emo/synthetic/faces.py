"""Procedural synthetic faces, written in the raw AffectNet + EMOCA layout.

Why: the demo and the tests need data shaped like the real thing (originals, an AffectNet csv
with boxes, 68 landmarks and labels, EMOCA crops and renders in the crop's frame, depth) with
nothing downloaded, and with the expression visible in the pixels so a model can learn it.
The shape and pose come from `face_template`; this module draws them and writes the files.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from controlnet_emo.labels import EXPRESSION_WORDS, EXPRESSIONS
from controlnet_emo.synthetic.face_template import (
    FACE_BACK,
    FOREHEAD_TOP,
    HEAD_CENTER_Y,
    FaceGeometry,
    Identity,
    Pose,
    build_face,
    coverage,
    expression_strength,
    expression_weights,
    relief_maps,
)
from controlnet_emo.synthetic.flame import SyntheticCodes

EMOCA_CROP_SIZE = 224
EMOCA_CROP_SCALE = 1.25  # crop side = scale * max(face w, h), centred on the face box
CSV_COLUMNS = (
    "subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
    "facial_landmarks", "expression", "valence", "arousal",
)  # fmt: skip
# (valence lo, hi, arousal lo, hi) per class, placed as on the AffectNet circumplex.
VA_RANGES = (
    (-0.15, 0.15, -0.3, 0.2), (0.3, 0.95, 0.0, 0.6), (-0.9, -0.3, -0.6, 0.1),
    (-0.2, 0.6, 0.5, 1.0), (-0.9, -0.3, 0.4, 1.0), (-0.9, -0.4, 0.0, 0.6),
    (-0.9, -0.4, 0.3, 0.9), (-0.6, -0.1, -0.1, 0.5),
)  # fmt: skip
SKIN_TONES = (
    (250, 222, 196), (238, 192, 158), (222, 170, 128), (196, 134, 94), (158, 104, 70),
    (112, 72, 50),
)  # fmt: skip
HAIR = {
    "black": (28, 24, 22), "dark brown": (62, 42, 30), "brown": (112, 74, 44),
    "blond": (204, 168, 110), "red": (150, 64, 34), "grey": (165, 162, 158),
}  # fmt: skip
IRISES = ((72, 46, 26), (104, 72, 40), (64, 104, 146), (74, 112, 72), (44, 32, 26))
_LOOK = (
    "with a calm, relaxed look",
    "smiling",
    "with downturned lips and raised inner brows",
    "with raised brows, wide eyes and an open mouth",
    "with wide eyes, raised drawn-together brows and a stretched mouth",
    "wrinkling the nose with a raised upper lip",
    "frowning with lowered brows and pressed lips",
    "with a one-sided smirk",
)


@dataclass(frozen=True)
class FaceParams:
    """Everything that defines one synthetic face (pixel values refer to `resolution`)."""

    expression: int
    valence: float
    arousal: float
    yaw: float  # degrees, > 0 turns the nose towards the image right
    roll: float  # degrees, in-plane tilt (clockwise on screen)
    scale: float  # pixels per face unit (half the jaw width)
    cx: float  # pixel position of the head centre
    cy: float
    skin: tuple[int, int, int]
    background: tuple[int, int, int]
    background2: tuple[int, int, int] = (0, 0, 0)
    hair: str = "brown"  # a key of HAIR
    hair_style: int = 0  # 0 short, 1 long, 2 cropped
    iris: tuple[int, int, int] = IRISES[0]
    lips: tuple[int, int, int] = (170, 90, 90)
    clothes: tuple[int, int, int] = (60, 60, 90)
    face_width: float = 1.0  # the Identity fields (face_template)
    face_length: float = 1.0
    eye_gap: float = 0.0
    mouth_width: float = 1.0
    nose_length: float = 1.0
    brow_height: float = 0.0
    brow_thickness: float = 0.07
    gaze: tuple[float, float] = (0.0, 0.0)
    light: tuple[float, float] = (-0.3, -0.4)  # x, y of the unit light direction
    resolution: int = 256
    texture_seed: int = 0  # background blotches, hair streaks, grain

    @classmethod
    def from_dict(cls, d: dict) -> FaceParams:
        """Rebuild from `asdict` output (a `synth_truth.jsonl` row): lists become tuples."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def pose(self) -> Pose:
        return Pose(self.yaw, self.roll, self.scale, self.cx, self.cy)


@dataclass
class SyntheticFace:
    image: np.ndarray  # (H, W, 3) uint8 RGB photo
    render: np.ndarray  # (H, W, 3) uint8 grey shaded face geometry, black background
    depth: np.ndarray  # (H, W) float32 in [0, 1], near = 1, background 0
    landmarks: np.ndarray  # (68, 2) float32 pixel coords, iBUG-68 order
    face_box: tuple[int, int, int, int]  # x, y, w, h
    face_mask: np.ndarray  # (H, W) bool, the rendered face region


def sample_face_params(
    rng: np.random.Generator, resolution: int, expression: int | None = None
) -> FaceParams:
    """Draw a face: labels consistent with the class, a random pose, person and scene."""
    e = int(rng.integers(len(EXPRESSIONS))) if expression is None else int(expression)
    v_lo, v_hi, a_lo, a_hi = VA_RANGES[e]
    tone = rng.uniform(0, len(SKIN_TONES) - 1)
    lo, t = int(tone), tone - int(tone)
    skin = np.array(SKIN_TONES[lo]) * (1 - t) + np.array(SKIN_TONES[min(lo + 1, 5)]) * t
    skin = np.clip(skin + rng.uniform(-10, 10, 3), 0, 255)
    lips = np.clip(skin * np.array([0.8, 0.48, 0.52]) + rng.uniform(-12, 12, 3), 0, 255)

    def rgb(c) -> tuple[int, int, int]:
        return tuple(int(v) for v in c)

    def u(lo: float, hi: float) -> float:
        return round(float(rng.uniform(lo, hi)), 4)

    return FaceParams(
        expression=e,
        valence=u(v_lo, v_hi),
        arousal=u(a_lo, a_hi),
        yaw=u(-30, 30),
        roll=u(-12, 12),
        scale=u(0.19, 0.245) * resolution,
        cx=u(0.44, 0.56) * resolution,
        cy=u(0.42, 0.5) * resolution,
        skin=rgb(skin),
        background=rgb(rng.integers(0, 256, 3)),
        background2=rgb(rng.integers(0, 256, 3)),
        hair=list(HAIR)[int(rng.integers(len(HAIR)))],
        hair_style=int(rng.integers(3)),
        iris=IRISES[int(rng.integers(len(IRISES)))],
        lips=rgb(lips),
        clothes=rgb(rng.integers(20, 230, 3)),
        face_width=u(0.92, 1.06),
        face_length=u(0.95, 1.06),
        eye_gap=u(-0.03, 0.03),
        mouth_width=u(0.9, 1.1),
        nose_length=u(0.9, 1.12),
        brow_height=u(-0.03, 0.03),
        brow_thickness=u(0.05, 0.085),
        gaze=(u(-1, 1), u(-1, 1)),
        light=(u(-0.55, 0.55), u(-0.6, 0.1)),
        resolution=int(resolution),
        texture_seed=int(rng.integers(2**31)),
    )


def _geometry(p: FaceParams) -> FaceGeometry:
    names = {f.name for f in fields(Identity)}
    ident = Identity(**{k: v for k, v in asdict(p).items() if k in names})
    return build_face(p.expression, p.valence, p.arousal, ident)


def face_landmarks(p: FaceParams) -> np.ndarray:
    """(68, 2) float32 pixel coords on the original canvas, iBUG-68 order."""
    return p.pose.landmarks(_geometry(p))


def face_box_from_landmarks(lm: np.ndarray, resolution: int) -> tuple[int, int, int, int]:
    """AffectNet-like detector box: landmark extent plus the forehead, clipped to the canvas."""
    (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
    w, h = x1 - x0, y1 - y0
    left, top = max(0.0, x0 - 0.04 * w), max(0.0, y0 - 0.25 * h)
    right, bottom = min(resolution, x1 + 0.04 * w), min(resolution, y1 + 0.03 * h)
    x, y = int(math.floor(left)), int(math.floor(top))
    return x, y, int(math.ceil(right)) - x, int(math.ceil(bottom)) - y


def _blend(img: np.ndarray, colour, alpha: np.ndarray) -> None:
    """In place: img = lerp(img, colour / 255, alpha), only over alpha's bounding box (speed)."""
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if rows.size == 0:
        return
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    a, sub, colour = alpha[box][..., None], img[box], np.asarray(colour, np.float32) / 255.0
    sub *= 1.0 - a
    sub += a * (colour[box] if colour.ndim == 3 else colour)


def render_face(p: FaceParams, resolution: int) -> SyntheticFace:
    """Draw the photo, render, depth and mask of one face from its params (deterministic).

    Per-pixel work runs in the head's bounding box only; that keeps a 256 px face at a few ms.
    """
    if resolution != p.resolution:
        f = resolution / p.resolution
        p = replace(p, scale=p.scale * f, cx=p.cx * f, cy=p.cy * f, resolution=resolution)
    rng = np.random.default_rng(p.texture_seed)
    geo = _geometry(p)
    lm = p.pose.landmarks(geo)
    x0, y0, x1, y1 = p.pose.head_box(geo, resolution)
    box = np.s_[y0:y1, x0:x1]
    pose = p.pose.shifted(x0, y0)  # head-box pixel frame from here on
    lm_box = lm - np.array([x0, y0], np.float32)
    v, u = np.mgrid[y0:y1, x0:x1].astype(np.float32) - np.array([y0, x0], np.float32)[:, None, None]
    inv = np.linalg.inv(pose.matrix)
    xp = inv[0, 0] * (u - pose.cx) + inv[0, 1] * (v - pose.cy)  # (h, w) yaw-frame x
    yp = inv[1, 0] * (u - pose.cx) + inv[1, 1] * (v - pose.cy)
    hit, zp, lx, lz = pose.cast(xp, yp, geo.axes)
    face = hit & (yp > FOREHEAD_TOP) & (lz > FACE_BACK * geo.axes[3])

    weights = expression_weights(p.expression, p.valence, p.arousal)
    mouth_open = _mouth_gap(lm, p.scale) > 0.03
    relief, crease = relief_maps(pose, lm_box, geo, hit.shape, weights, mouth_open)
    z = np.where(hit, zp + relief, 0.0).astype(np.float32)  # face units, towards the camera
    gy, gx = np.gradient(z * p.scale)  # (h, w) depth slopes, pixels per pixel
    lx_, ly_ = p.light
    light = (lx_, ly_, math.sqrt(max(0.05, 1 - lx_ * lx_ - ly_ * ly_)))
    lambert = (light[2] - gx * light[0] - gy * light[1]) / np.sqrt(gx * gx + gy * gy + 1)
    diffuse = np.clip(lambert, 0, 1)

    grey = (0.28 + 0.62 * diffuse) * (1.0 - 0.45 * crease)
    render = np.zeros((resolution, resolution, 3), np.uint8)
    render[box] = np.where(face, np.clip(grey * 255, 1, 255), 0).astype(np.uint8)[..., None]
    face_mask = np.zeros((resolution, resolution), bool)
    face_mask[box] = face

    body = _body_polys(p)
    canvas = (resolution, resolution)
    depth = np.maximum(
        0.22 * coverage(canvas, polys=[body["shoulders"]]),
        0.3 * coverage(canvas, polys=[body["neck"]]),
    )
    depth[box] = np.where(hit, np.clip((z + 1.3) / 2.7, 0.02, 1.0), depth[box])

    head = (box, pose, lm_box, hit, lx, yp, lz)
    image = _paint(p, head, body, geo, diffuse, crease, mouth_open, rng)
    face_box = face_box_from_landmarks(lm, resolution)
    return SyntheticFace(image, render, depth, lm, face_box, face_mask)


def _mouth_gap(lm: np.ndarray, scale: float) -> float:
    """Inner-lip opening in face units (mean of the three upper/lower inner pairs)."""
    return float(np.linalg.norm(lm[[67, 66, 65]] - lm[[61, 62, 63]], axis=1).mean() / scale)


def _body_polys(p: FaceParams) -> dict[str, np.ndarray]:
    """Neck, shoulders and long back hair as screen polygons (the shoulders do not roll)."""
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    centre = np.array([p.cx, p.cy])
    neck = np.array([(-0.42, 0.4), (0.42, 0.4), (0.5, 1.9), (-0.5, 1.9)])
    shoulders = np.column_stack([2.4 * np.cos(t), 2.5 + 1.0 * np.sin(t)])
    back_hair = np.column_stack([1.2 * np.cos(t), HEAD_CENTER_Y + 0.25 + 1.6 * np.sin(t)])
    return {
        "neck": neck @ p.pose.matrix.T + centre,
        "shoulders": shoulders * p.scale + centre,
        "back_hair": back_hair @ p.pose.matrix.T + centre,
    }


def _paint(p, head, body, geo, diffuse, crease, mouth_open, rng) -> np.ndarray:
    """The 'photo': background, body, hair and a skin-shaded head with the features drawn on.

    `head` = (box, pose, landmarks, hit, local x, y, z): the head box and everything in its
    pixel frame. The features are drawn on the albedo, so the lighting shades them too.
    """
    box, pose, lm, hit, lx, ly, lz = head
    h = w = p.resolution
    # Background: a two-colour gradient with soft blotches, built on a coarse grid (cheap).
    ang = rng.uniform(0, 2 * np.pi)
    gv, gu = np.mgrid[0:8, 0:8] / 7.0 - 0.5
    t = np.clip(0.5 + gu * math.cos(ang) + gv * math.sin(ang), 0, 1)[..., None]
    bg1, bg2 = (np.array(c) / 255 for c in (p.background, p.background2))
    coarse = bg1 * (1 - t) + bg2 * t + 0.06 * rng.standard_normal((8, 8, 1))
    img = cv2.resize(coarse.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    skin, hair = np.array(p.skin, np.float32), np.array(HAIR[p.hair], np.float32)
    if p.hair_style == 1:
        _blend(img, hair * 0.85, coverage((h, w), polys=[body["back_hair"]]))
    _blend(img, skin * 0.7, coverage((h, w), polys=[body["neck"]]))
    _blend(img, p.clothes, coverage((h, w), polys=[body["shoulders"]]))

    shape = hit.shape
    albedo = np.empty((*shape, 3), np.float32)
    albedo[:] = skin / 255
    hairline = (-0.78, -0.86, -1.02)[p.hair_style] + 0.3 * (lx / geo.axes[0]) ** 2
    hair_a = np.clip((hairline - ly) * p.scale / 2, 0, 1)
    hair_a = np.maximum(hair_a, np.clip((FACE_BACK * geo.axes[3] + 0.1 - lz) * p.scale / 2, 0, 1))
    streaks = cv2.resize(rng.standard_normal((4, 24)).astype(np.float32), shape[::-1])
    _blend(albedo, np.clip(hair * (1 + 0.12 * streaks[..., None]), 0, 255), hair_a)

    s = p.scale
    profile = np.array([0.55, 0.85, 1.0, 1.0, 0.95])  # brow thickness, outer -> inner
    for brow, prof in ((lm[17:22], profile), (lm[22:27], profile[::-1])):
        half = prof * p.brow_thickness / 2
        poly = np.vstack([pose.up(brow, half), pose.up(brow, -half)[::-1]])
        _blend(albedo, np.minimum(hair * 0.8, skin * 0.5), 0.9 * coverage(shape, polys=[poly]))
    eyes = [lm[36:42], lm[42:48]]
    m_eye = coverage(shape, polys=eyes)
    _blend(albedo, (236, 232, 226), m_eye)
    gaze = pose.matrix @ (np.array(p.gaze) * (0.05, 0.02))
    centres = [e[[0, 3]].mean(0) + gaze for e in eyes]  # iris between the corners
    r = (0.085 * s * max(0.6, math.cos(math.radians(p.yaw))), 0.085 * s)
    m_iris = coverage(shape, ellipses=[(c, r, p.roll) for c in centres])
    _blend(albedo, p.iris, m_iris * m_eye)
    m_pupil = coverage(shape, ellipses=[(c, (r[0] * 0.45, r[1] * 0.45), p.roll) for c in centres])
    _blend(albedo, (12, 10, 10), m_pupil * m_eye)
    lids, lid_w = [lm[36:40], lm[42:46]], max(1, round(0.03 * s))
    _blend(albedo, (35, 25, 25), 0.85 * coverage(shape, lines=lids, thickness=lid_w))
    _blend(albedo, skin * 0.6, 0.5 * coverage(shape, lines=[pose.up(lid, 0.06) for lid in lids]))
    nostrils = [(lm[i], (0.04 * s, 0.022 * s), p.roll) for i in (32, 34)]
    _blend(albedo, skin * 0.3, 0.8 * coverage(shape, ellipses=nostrils))
    _blend(albedo, skin * 0.55, 0.4 * coverage(shape, lines=[lm[31:36]]))
    _blend(albedo, p.lips, coverage(shape, polys=[lm[48:60]]))
    outline = np.vstack([lm[48:60], lm[48:49]])
    _blend(albedo, np.array(p.lips) * 0.6, 0.6 * coverage(shape, lines=[outline]))
    if mouth_open:
        m_in = coverage(shape, polys=[lm[60:68]])
        _blend(albedo, (70, 22, 28), m_in)
        teeth = np.vstack([lm[60:65], pose.up(lm[60:65], -0.07)[::-1]])
        _blend(albedo, (238, 234, 222), m_in * coverage(shape, polys=[teeth]))
    else:
        _blend(albedo, np.array(p.lips) * 0.45, coverage(shape, lines=[lm[60:65]], thickness=lid_w))

    lit = albedo * ((0.42 + 0.7 * diffuse) * (1 - 0.3 * crease))[..., None]
    head_a = cv2.GaussianBlur(hit.astype(np.float32), (3, 3), 0.7)[..., None]
    img[box] = img[box] * (1 - head_a) + lit * head_a
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    grain = np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape)  # fast, seeded
    img = img * 255 + (grain.astype(np.float32) * (8 / 255) - 4.0)  # +-4 levels of grain
    return np.clip(img, 0, 255).astype(np.uint8)


def emoca_crop_box(face_box) -> tuple[float, float, float]:
    """(cx, cy, side) of EMOCA's crop square in original pixel coords."""
    x, y, w, h = face_box
    return x + w / 2.0, y + h / 2.0, EMOCA_CROP_SCALE * max(w, h)


def emoca_crop_matrix(face_box, size: int = EMOCA_CROP_SIZE) -> np.ndarray:
    """(2, 3) affine original -> crop pixels (pixel centres at integers, as cv2 samples).

    Why public: placing an EMOCA render back on the canvas is `cv2.warpAffine(crop, M, (W, H),
    flags=cv2.WARP_INVERSE_MAP)` with this M, the inverse of the crop rule.
    """
    cx, cy, side = emoca_crop_box(face_box)
    k = size / side
    tx, ty = k * (side / 2 - cx) + 0.5 * k - 0.5, k * (side / 2 - cy) + 0.5 * k - 0.5
    return np.array([[k, 0.0, tx], [0.0, k, ty]])


def crop_to_emoca(img: np.ndarray, face_box) -> np.ndarray:
    """The 224 x 224 EMOCA input crop of `img`; black where the square leaves the canvas."""
    size = (EMOCA_CROP_SIZE, EMOCA_CROP_SIZE)
    m = emoca_crop_matrix(face_box)
    return cv2.warpAffine(img, m, size, flags=cv2.INTER_LINEAR, borderValue=0)


def caption(p: FaceParams) -> str:
    """A prompt that says what the picture shows: expression, its strength, pose and hair."""
    strength = expression_strength(p.valence, p.arousal)
    degree = "" if p.expression == 0 else "very " if strength > 0.9 else ""
    degree = "slightly " if p.expression and strength < 0.7 else degree
    side = "right" if p.yaw > 0 else "left"
    turn = "facing the camera" if abs(p.yaw) < 8 else f"looking slightly {side}"
    turn = f"looking {side}" if abs(p.yaw) >= 18 else turn
    tilt = ", head tilted" if abs(p.roll) > 8 else ""
    face = f"a close-up photo of a {degree}{EXPRESSION_WORDS[p.expression]} face"
    return f"{face}, {_LOOK[p.expression]}, {turn}{tilt}, {p.hair} hair"


def write_raw_dataset(
    out_dir: str | Path,
    n: int,
    resolution: int = 256,
    seed: int = 0,
    sub_dirs: int = 2,
    codes: bool = False,
    codes_camera: bool = False,
) -> Path:
    """Write `n` synthetic faces in the raw AffectNet + EMOCA layout (see DESIGN.md).

    Classes cycle 0..7 so the set is balanced; face i draws from `default_rng([seed, i])`, so
    the same seed gives byte-identical files and any face can be regenerated on its own.
    `synth_truth.jsonl` keeps the params and boxes so tests can check alignment against truth.
    ``codes``: also EMOCA-style FLAME codes (``codes/<sub>/<stem>/``) of a synthetic
    FLAME-format model (``flame_model.npz``), with ``geometry_detail/`` their render, as
    EMOCA's is; ``codes_camera`` adds ``cam.npy`` (EMOCA itself does not save it).
    """
    out = Path(out_dir)
    per_sub = max(1, math.ceil(n / max(1, sub_dirs)))
    out.mkdir(parents=True, exist_ok=True)
    flame = SyntheticCodes(out, camera=codes_camera) if codes else None
    with (
        open(out / "annotations.csv", "w", newline="") as f_csv,
        open(out / "captions.jsonl", "w") as f_cap,
        open(out / "synth_truth.jsonl", "w") as f_truth,
    ):
        writer = csv.writer(f_csv, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for i in tqdm(range(n), desc="synth faces", unit="img"):
            p = sample_face_params(np.random.default_rng([seed, i]), resolution, i % 8)
            face = render_face(p, resolution)
            sub, stem = str(i // per_sub), f"synth_{i:05d}"
            rel = f"{sub}/{stem}.jpg"
            for d in ("images", "inputs", "geometry_detail", "depth"):  # PNGs: fast zlib level
                (out / d / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(face.image).save(out / "images" / rel, quality=95)
            crop = crop_to_emoca(face.image, face.face_box)
            Image.fromarray(crop).save(out / "inputs" / sub / f"{stem}.png", compress_level=1)
            geometry = crop_to_emoca(face.render, face.face_box)
            if flame is not None:
                geometry = flame.write(out / "codes" / sub / stem, p.expression, p.yaw, p.roll,
                                       face.face_box, np.random.default_rng([seed, i, 1]))  # fmt: skip
            Image.fromarray(geometry).save(
                out / "geometry_detail" / sub / f"{stem}.png", compress_level=1
            )
            depth16 = np.round(face.depth * 65535).astype(np.uint16)
            Image.fromarray(depth16).save(out / "depth" / sub / f"{stem}.png", compress_level=1)
            landmarks = ";".join(f"{c:.2f}" for c in face.landmarks.ravel())
            va = f"{p.valence:.4f}", f"{p.arousal:.4f}"
            writer.writerow([rel, *face.face_box, landmarks, p.expression, *va])
            f_cap.write(json.dumps({"file": rel, "text": caption(p)}) + "\n")
            truth = {
                "file": rel,
                "params": asdict(p),
                "face_box": list(face.face_box),
                "crop_box": list(emoca_crop_box(face.face_box)),
                "crop_size": EMOCA_CROP_SIZE,
            }
            f_truth.write(json.dumps(truth) + "\n")
    return out
