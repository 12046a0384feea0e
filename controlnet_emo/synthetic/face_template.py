"""A tiny 3D face model: a 68-point mean face on a head ellipsoid, deformed per expression,
posed (yaw, roll, scale, position) and given relief and creases for the render.

Why: the synthetic dataset needs a photo, a FLAME-like render, a depth map and 68 landmarks
that agree by construction. All of them are derived from the geometry built here, so a
landmark always lies on the feature drawn for it and the render shares the photo's shape.

Units: face half-width = 1. x points to the image right, y down, z towards the camera (for a
frontal head). Landmarks follow the iBUG-68 order (jaw 0-16, brows 17-26, nose 27-35, eyes
36-47, outer lip 48-59, inner lip 60-67); "left" below means the image's left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

HEAD_CENTER_Y = -0.2  # the ellipsoid centre sits above the nose; the chin is its bottom
HEAD_AXES = (1.0, 1.22, 0.95)  # semi-axes (x, y, z) before identity scaling
JAW_RADIUS = 0.97  # jaw landmarks sit just inside the silhouette, on the visible cheek
JAW_DROP = 0.25  # lower-lip travel per unit of the `jaw_drop` action unit
FOREHEAD_TOP = -0.95  # the rendered "FLAME face" region ends here (local y)
FACE_BACK = -0.55  # ... and here towards the back of the head (local z / az)
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel, anti-aliased drawing

# Mean face, image-left half plus the midline (x, y); the right half is mirrored.
_BROW = [(-0.80, -0.50), (-0.64, -0.59), (-0.47, -0.62), (-0.31, -0.60), (-0.17, -0.55)]
_NOSE = [(0.0, -0.33), (0.0, -0.19), (0.0, -0.05), (0.0, 0.09)]
_NOSTRILS = [(-0.17, 0.24), (-0.09, 0.27), (0.0, 0.29), (0.09, 0.27), (0.17, 0.24)]
_EYE = [(-0.58, -0.28), (-0.47, -0.345), (-0.33, -0.345), (-0.22, -0.27), (-0.33, -0.225),
        (-0.47, -0.225)]  # fmt: skip
_OUTER_LIP = [(-0.36, 0.60), (-0.22, 0.535), (-0.08, 0.505), (0.0, 0.515), (0.08, 0.505),
              (0.22, 0.535), (0.36, 0.60), (0.23, 0.67), (0.11, 0.70), (0.0, 0.705),
              (-0.11, 0.70), (-0.23, 0.67)]  # fmt: skip
_INNER_LIP = [(-0.30, 0.60), (-0.12, 0.585), (0.0, 0.59), (0.12, 0.585), (0.30, 0.60),
              (0.12, 0.59), (0.0, 0.595), (-0.12, 0.59)]  # fmt: skip

# iBUG-68 mirror partner of every index (left <-> right; midline points map to themselves).
MIRROR = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30, 35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60, 67, 66, 65]
)  # fmt: skip


def _mean_face() -> np.ndarray:
    """(68, 2) rest face; jaw rows are placeholders (the jaw follows the head ellipse)."""
    right_eye = [(-x, y) for x, y in (_EYE[3], _EYE[2], _EYE[1], _EYE[0], _EYE[5], _EYE[4])]
    right_brow = [(-x, y) for x, y in reversed(_BROW)]
    pts = [(0.0, 0.0)] * 17 + _BROW + right_brow + _NOSE + _NOSTRILS + _EYE + right_eye
    return np.array(pts + _OUTER_LIP + _INNER_LIP, dtype=np.float64)


MEAN_FACE = _mean_face()
# Relief above the ellipsoid surface (z): the nose sticks out, lips a little, brows a little.
Z_OFFSET = np.zeros(68)
Z_OFFSET[17:27] = 0.04
Z_OFFSET[27:31] = (0.05, 0.13, 0.22, 0.30)
Z_OFFSET[31:36] = (0.06, 0.12, 0.16, 0.12, 0.06)
Z_OFFSET[48:60] = 0.04
Z_OFFSET[60:68] = 0.03


def _au(left: dict[int, tuple[float, float]], symmetric: bool = True) -> np.ndarray:
    """(68, 2) displacement from the image-left half; mirrored (dx negated) when symmetric."""
    d = np.zeros((68, 2))
    for i, (dx, dy) in left.items():
        d[i] = (dx, dy)
        if symmetric and MIRROR[i] != i:
            d[MIRROR[i]] = (-dx, dy)
    return d


# Action units: displacement (face units) per unit weight. Names follow FACS loosely.
ACTION_UNITS: dict[str, np.ndarray] = {
    "smile": _au({48: (-0.05, -0.10), 60: (-0.04, -0.08), 49: (-0.02, -0.045),
                  59: (-0.02, -0.05), 61: (0.0, -0.02), 67: (-0.01, -0.03), 50: (0.0, -0.01)}),
    "cheek_raise": _au({40: (0.0, -0.035), 41: (0.0, -0.035), 36: (0.0, -0.01),
                        31: (-0.02, -0.01)}),
    "lip_corner_down": _au({48: (0.01, 0.12), 60: (0.01, 0.09), 49: (0.0, 0.035), 59: (0.0, 0.04),
                            57: (0.0, -0.03), 58: (0.0, -0.015), 66: (0.0, -0.01)}),
    "inner_brow_raise": _au({21: (0.01, -0.15), 20: (0.0, -0.10), 19: (0.0, -0.045),
                             17: (0.0, 0.02), 38: (0.0, -0.01)}),
    "brow_raise": _au({17: (0.0, -0.09), 18: (0.0, -0.12), 19: (0.0, -0.13), 20: (0.0, -0.12),
                       21: (0.0, -0.10)}),
    "brow_lower": _au({17: (0.0, 0.03), 18: (0.0, 0.06), 19: (0.0, 0.09), 20: (0.0, 0.12),
                       21: (0.0, 0.14)}),
    "brow_knit": _au({21: (0.08, 0.03), 20: (0.06, 0.025), 19: (0.035, 0.01), 18: (0.015, 0.0)}),
    "upper_lid_raise": _au({37: (0.0, -0.05), 38: (0.0, -0.05), 36: (0.0, -0.005),
                            39: (0.0, -0.005), 40: (0.0, 0.015), 41: (0.0, 0.015)}),
    "lid_tighten": _au({37: (0.0, 0.025), 38: (0.0, 0.025), 40: (0.0, -0.03), 41: (0.0, -0.03)}),
    "jaw_drop": _au({57: (0.0, 1.0), 58: (0.0, 0.92), 59: (0.0, 0.68), 66: (0.0, 1.0),
                     67: (0.0, 0.88), 61: (0.0, -0.06), 62: (0.0, -0.06), 48: (0.0, 0.2),
                     60: (0.0, 0.2)}) * JAW_DROP,
    "lip_round": _au({48: (0.09, 0.01), 60: (0.10, 0.0), 49: (0.05, 0.0), 59: (0.05, 0.0),
                      61: (0.03, 0.0), 67: (0.03, 0.0), 50: (0.02, 0.0), 58: (0.02, 0.0)}),
    "lip_stretch": _au({48: (-0.08, 0.03), 60: (-0.08, 0.03), 49: (-0.04, 0.01),
                        59: (-0.04, 0.01), 61: (-0.02, 0.0), 67: (-0.02, 0.0)}),
    "upper_lip_raise": _au({49: (0.0, -0.06), 50: (0.0, -0.08), 51: (0.0, -0.08),
                            61: (0.0, -0.07), 62: (0.0, -0.07), 48: (0.0, -0.02),
                            60: (0.0, -0.02)}),
    "nose_wrinkle": _au({31: (0.0, -0.04), 32: (0.0, -0.05), 33: (0.0, -0.04), 30: (0.0, -0.02),
                         29: (0.0, -0.01), 40: (0.0, -0.015), 41: (0.0, -0.015)}),
    "lip_press": _au({49: (0.0, 0.03), 50: (0.0, 0.04), 51: (0.0, 0.04), 56: (0.0, -0.05),
                      57: (0.0, -0.05), 58: (0.0, -0.05), 48: (0.04, 0.01), 60: (0.04, 0.01),
                      59: (0.02, -0.03)}),
    # Contempt is one-sided: only the image-right lip corner rises and pulls back.
    "smirk": _au({54: (0.12, -0.22), 64: (0.11, -0.2), 53: (0.05, -0.09), 55: (0.05, -0.11),
                  52: (0.015, -0.03), 63: (0.03, -0.07), 65: (0.04, -0.08), 56: (0.015, -0.03),
                  48: (0.02, 0.01), 60: (0.02, 0.01)}, symmetric=False),
}  # fmt: skip

# Which action units make each AffectNet class (0 neutral ... 7 contempt), at full strength.
EXPRESSION_AUS: tuple[dict[str, float], ...] = (
    {},
    {"smile": 1.0, "cheek_raise": 0.8, "jaw_drop": 0.3, "lid_tighten": 0.2},
    {"lip_corner_down": 1.0, "inner_brow_raise": 1.0, "lid_tighten": 0.4},
    {"brow_raise": 1.0, "upper_lid_raise": 1.0, "jaw_drop": 0.9, "lip_round": 0.7},
    {"brow_raise": 0.6, "inner_brow_raise": 0.6, "brow_knit": 0.7, "upper_lid_raise": 1.0,
     "lip_stretch": 1.0, "jaw_drop": 0.4, "lip_corner_down": 0.3},
    {"upper_lip_raise": 1.0, "nose_wrinkle": 1.0, "brow_lower": 0.6, "lid_tighten": 0.6,
     "lip_corner_down": 0.4, "brow_knit": 0.3},
    {"brow_lower": 1.0, "brow_knit": 1.0, "lid_tighten": 0.8, "lip_press": 1.0},
    {"smirk": 1.0, "lid_tighten": 0.5, "brow_lower": 0.2},
)  # fmt: skip
# How much arousal opens the mouth on top of the class shape (pressed or closed mouths: 0).
AROUSAL_MOUTH = (0.0, 0.5, 0.0, 0.8, 0.8, 0.0, 0.0, 0.0)

# Expression creases ("detail" geometry), image-left half, each with the AUs that deepen it.
_CREASES: tuple[tuple[tuple[tuple[float, float], ...], dict[str, float]], ...] = (
    (((-0.24, 0.14), (-0.35, 0.34), (-0.43, 0.60)), {"smile": 1.0, "upper_lip_raise": 0.7}),
    (((-0.42, -0.80), (-0.15, -0.84), (0.15, -0.84), (0.42, -0.80)), {"brow_raise": 1.0}),
    (((-0.40, -0.88), (-0.12, -0.92), (0.12, -0.92), (0.40, -0.88)), {"brow_raise": 0.8}),
    (((-0.07, -0.56), (-0.05, -0.40)), {"brow_knit": 1.0, "brow_lower": 0.5}),
    (((-0.22, -0.76), (0.0, -0.80), (0.22, -0.76)), {"inner_brow_raise": 1.0}),
    (((-0.08, -0.24), (0.0, -0.26), (0.08, -0.24)), {"nose_wrinkle": 1.0}),
    (((-0.64, -0.30), (-0.72, -0.34)), {"cheek_raise": 0.6}),
    (((-0.64, -0.24), (-0.71, -0.20)), {"cheek_raise": 0.6}),
)
# The smirk's dimple, on the image-right corner only.
_SMIRK_CREASE = ((0.44, 0.40), (0.52, 0.52), (0.50, 0.66))


def expression_weights(expression: int, valence: float, arousal: float) -> dict[str, float]:
    """Action-unit weights for a class at an intensity set by the labels.

    Why: the pictures must carry the labels, not only the class. Stronger |valence| or higher
    arousal deepens the class shape, and arousal by itself opens the eyes (and, for open-mouth
    classes, the mouth), so valence/arousal regressors have something to read.
    """
    strength = expression_strength(valence, arousal)
    weights = {name: w * strength for name, w in EXPRESSION_AUS[expression].items()}
    weights["upper_lid_raise"] = weights.get("upper_lid_raise", 0.0) + 0.4 * arousal
    extra_open = AROUSAL_MOUTH[expression] * max(arousal, 0.0)
    weights["jaw_drop"] = weights.get("jaw_drop", 0.0) + extra_open
    return weights


def expression_strength(valence: float, arousal: float) -> float:
    """Deformation scale in [0.55, 1.05], growing with |valence| and arousal."""
    return float(np.clip(0.55 + 0.5 * max(abs(valence), arousal), 0.55, 1.05))


@dataclass(frozen=True)
class Identity:
    """Per-person shape: proportions that vary between faces independently of expression."""

    face_width: float = 1.0
    face_length: float = 1.0
    eye_gap: float = 0.0
    mouth_width: float = 1.0
    nose_length: float = 1.0
    brow_height: float = 0.0


@dataclass
class FaceGeometry:
    """An unposed face: 68 landmarks and crease polylines in local 3D, plus head axes."""

    landmarks: np.ndarray  # (68, 3) local x, y, z
    creases: list[tuple[np.ndarray, float]]  # (K, 3) polyline and its depth in [0, 1]
    axes: tuple[float, float, float, float]  # ax, ay above the centre, ay below, az


def head_z(x: np.ndarray, y: np.ndarray, axes: tuple[float, float, float, float]) -> np.ndarray:
    """Front-surface z of the (piecewise) head ellipsoid at local (x, y); 0 outside."""
    ax, ay_up, ay_low, az = axes
    ay = np.where(y > HEAD_CENTER_Y, ay_low, ay_up)
    k = 1.0 - (x / ax) ** 2 - ((y - HEAD_CENTER_Y) / ay) ** 2
    return az * np.sqrt(np.clip(k, 0.0, None))


def build_face(expression: int, valence: float, arousal: float, ident: Identity) -> FaceGeometry:
    """Deform the mean face for one person and expression; lift it onto the head surface.

    Why: one function owns the shape, so the photo, render, depth and landmarks downstream
    cannot disagree. The open jaw stretches the lower head so the chin follows the lip.
    """
    weights = expression_weights(expression, valence, arousal)
    pts = MEAN_FACE.copy()
    pts[36:48, 0] += np.sign(pts[36:48, 0]) * ident.eye_gap
    pts[48:68, 0] *= ident.mouth_width
    pts[17:27, 1] -= ident.brow_height
    nose = slice(28, 36)
    pts[nose, 1] = _NOSE[0][1] + (pts[nose, 1] - _NOSE[0][1]) * ident.nose_length
    for name, w in weights.items():
        pts += w * ACTION_UNITS[name]
    pts[:, 0] *= ident.face_width

    ax, ay, az = HEAD_AXES[0] * ident.face_width, HEAD_AXES[1] * ident.face_length, HEAD_AXES[2]
    drop = weights.get("jaw_drop", 0.0) * JAW_DROP
    axes = (ax, ay, ay + 0.7 * drop, az)
    theta = np.deg2rad(np.linspace(-6.0, 186.0, 17))  # jaw: ear level, round the chin, back up
    ay_jaw = np.where(np.sin(theta) > 0, axes[2], ay)
    pts[:17, 0] = -np.cos(theta) * ax * JAW_RADIUS
    pts[:17, 1] = HEAD_CENTER_Y + np.sin(theta) * ay_jaw * JAW_RADIUS

    z = head_z(pts[:, 0], pts[:, 1], axes) + Z_OFFSET
    creases = []
    smirk = ((_SMIRK_CREASE, {"smirk": 1.0}, False),)
    for polyline, aus, symmetric in tuple((c, a, True) for c, a in _CREASES) + smirk:
        depth = 0.7 * sum(weights.get(name, 0.0) * w for name, w in aus.items())
        if depth < 0.05:
            continue
        left = np.array(polyline) * (ident.face_width, 1.0)
        for side in (left, left * (-1.0, 1.0)) if symmetric else (left,):
            sz = head_z(side[:, 0], side[:, 1], axes)[:, None]
            creases.append((np.hstack([side, sz]), float(min(depth, 1.0))))
    return FaceGeometry(np.column_stack([pts, z]), creases, axes)


@dataclass(frozen=True)
class Pose:
    """Where the head sits on the canvas: yaw, in-plane roll, pixels per unit, head centre.

    Projection is orthographic: yaw rotates about the vertical axis (+yaw brings the nose to
    the image right), then roll (clockwise on screen) and scale map to pixels around (cx, cy).
    """

    yaw: float  # degrees
    roll: float  # degrees
    scale: float  # pixels per face unit
    cx: float
    cy: float

    @property
    def matrix(self) -> np.ndarray:
        """(2, 2) yaw-frame (x, y) -> screen offset from (cx, cy)."""
        c, s = math.cos(math.radians(self.roll)), math.sin(math.radians(self.roll))
        return self.scale * np.array([[c, -s], [s, c]])

    def shifted(self, dx: float, dy: float) -> Pose:
        """The same pose in a pixel frame whose origin is at (dx, dy), e.g. a sub-window."""
        return replace(self, cx=self.cx - dx, cy=self.cy - dy)

    def rotate(self, pts: np.ndarray) -> np.ndarray:
        """Local (N, 3) points -> yaw frame (N, 3)."""
        c, s = math.cos(math.radians(self.yaw)), math.sin(math.radians(self.yaw))
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        return np.column_stack([x * c + z * s, y, -x * s + z * c])

    def to_screen(self, pts: np.ndarray) -> np.ndarray:
        """Yaw-frame (N, >=2) points -> (N, 2) float32 pixels."""
        return (pts[:, :2] @ self.matrix.T + (self.cx, self.cy)).astype(np.float32)

    def project(self, pts: np.ndarray) -> np.ndarray:
        """Local (N, 3) points -> (N, 2) pixels."""
        return self.to_screen(self.rotate(pts))

    def up(self, pts: np.ndarray, amount: float | np.ndarray) -> np.ndarray:
        """Move screen points by `amount` face units (scalar or one per point) towards the top
        of the head."""
        return pts + np.asarray(amount, np.float64)[..., None] * (self.matrix @ (0.0, -1.0))

    def cast(self, xp: np.ndarray, yp: np.ndarray, axes: tuple) -> tuple[np.ndarray, ...]:
        """Orthographic rays along z at yaw-frame (xp, yp) against the head ellipsoid.

        Returns (hit, z of the front surface in the yaw frame, local x, local z).
        """
        ax, ay_up, ay_low, az = axes
        c, s = math.cos(math.radians(self.yaw)), math.sin(math.radians(self.yaw))
        k = 1.0 - ((yp - HEAD_CENTER_Y) / np.where(yp > HEAD_CENTER_Y, ay_low, ay_up)) ** 2
        qa = s * s / ax**2 + c * c / az**2
        qb = 2.0 * xp * c * s * (1.0 / az**2 - 1.0 / ax**2)
        qc = xp * xp * (c * c / ax**2 + s * s / az**2) - k
        disc = qb * qb - 4.0 * qa * qc
        zp = (-qb + np.sqrt(np.clip(disc, 0, None))) / (2.0 * qa)
        return (disc > 0) & (k > 0), zp, xp * c - zp * s, xp * s + zp * c

    def silhouette_half_width(self, axes: tuple) -> float:
        """Half-width (face units) of the yawed head's outline at its widest."""
        c, s = math.cos(math.radians(self.yaw)), math.sin(math.radians(self.yaw))
        return math.hypot(axes[0] * c, axes[3] * s)

    def landmarks(self, geo: FaceGeometry) -> np.ndarray:
        """(68, 2) float32 pixels; a jaw point turned behind the cheek goes to the outline.

        Why: iBUG annotators mark the visible face contour, not the hidden jaw.
        """
        pts = self.rotate(geo.landmarks)
        jaw = pts[:17]
        _, z_front, _, _ = self.cast(jaw[:, 0], jaw[:, 1], geo.axes)
        ay = np.where(jaw[:, 1] > HEAD_CENTER_Y, geo.axes[2], geo.axes[1])
        k = np.clip(1.0 - ((jaw[:, 1] - HEAD_CENTER_Y) / ay) ** 2, 0, None)
        edge = 0.96 * self.silhouette_half_width(geo.axes) * np.sqrt(k)  # just inside
        hidden = jaw[:, 2] < z_front - 1e-3
        jaw[hidden, 0] = np.sign(jaw[hidden, 0]) * edge[hidden]
        jaw[:, 0] = np.clip(jaw[:, 0], -edge, edge)
        return self.to_screen(pts)

    def head_box(self, geo: FaceGeometry, resolution: int) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1) around the head outline, clipped to the canvas."""
        half = self.silhouette_half_width(geo.axes)
        top, bottom = HEAD_CENTER_Y - geo.axes[1], HEAD_CENTER_Y + geo.axes[2]
        corners = np.array([(-half, top), (half, top), (half, bottom), (-half, bottom)])
        pts = self.to_screen(corners)
        (x0, y0), (x1, y1) = np.floor(pts.min(0)) - 3, np.ceil(pts.max(0)) + 4
        x0, y0 = int(np.clip(x0, 0, resolution - 1)), int(np.clip(y0, 0, resolution - 1))
        return x0, y0, int(np.clip(x1, x0 + 1, resolution)), int(np.clip(y1, y0 + 1, resolution))


def _fix(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts) * (1 << _SHIFT)).astype(np.int32)


def coverage(shape, polys=(), lines=(), thickness: int = 1, ellipses=()) -> np.ndarray:
    """Anti-aliased float32 coverage in [0, 1] of filled polygons, polylines and ellipses."""
    m = np.zeros(shape, np.uint8)
    if len(polys):
        cv2.fillPoly(m, [_fix(q) for q in polys], 255, cv2.LINE_AA, _SHIFT)
    if len(lines):
        cv2.polylines(m, [_fix(q) for q in lines], False, 255, thickness, cv2.LINE_AA, _SHIFT)
    for centre, axes, angle in ellipses:
        c, a = tuple(_fix(centre)), tuple(_fix(axes))
        cv2.ellipse(m, c, a, angle, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
    return m.astype(np.float32) * (1.0 / 255.0)


def relief_maps(
    pose: Pose,
    lm: np.ndarray,
    geo: FaceGeometry,
    shape: tuple[int, int],
    weights: dict[str, float],
    mouth_open: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Feature relief (face units, added to the head's z) and crease darkness in [0, 1].

    Why: the render and depth need the nose, brows, sockets and lips as shape, and the
    expression creases as "detail", drawn where the landmarks (pixels, in `pose`'s frame) are.
    """
    s, aa = pose.scale, cv2.LINE_8  # float canvases: no AA in cv2; the blur smooths instead
    r = np.zeros(shape, np.float32)
    cheek = 0.08 * weights.get("cheek_raise", 0.0)
    for eye in (lm[36:42], lm[42:48]):
        centre = eye.mean(0)
        cv2.fillPoly(r, [_fix(centre + 1.7 * (eye - centre))], -0.06, aa, _SHIFT)  # socket
        below = _fix(pose.up(centre, -0.32))
        cv2.circle(r, tuple(below), int(0.2 * s * (1 << _SHIFT)), cheek, -1, aa, _SHIFT)
    for brow in (lm[17:22], lm[22:27]):
        cv2.polylines(r, [_fix(brow)], False, 0.06, max(1, int(0.14 * s)), aa, _SHIFT)
    for (i, j), h in zip(((27, 28), (28, 29), (29, 30)), (0.08, 0.16, 0.24), strict=True):
        cv2.line(r, tuple(_fix(lm[i])), tuple(_fix(lm[j])), h, max(1, int(0.14 * s)), aa, _SHIFT)
    cv2.circle(r, tuple(_fix(lm[30])), int(0.1 * s * (1 << _SHIFT)), 0.28, -1, aa, _SHIFT)
    for i in (31, 35):
        cv2.circle(r, tuple(_fix(lm[i])), int(0.065 * s * (1 << _SHIFT)), 0.12, -1, aa, _SHIFT)
    cv2.fillPoly(r, [_fix(lm[48:60])], 0.05, aa, _SHIFT)
    if mouth_open:
        cv2.fillPoly(r, [_fix(lm[60:68])], -0.2, aa, _SHIFT)
    r = cv2.GaussianBlur(r, (0, 0), max(0.8, 0.05 * s))

    thick = max(1, round(0.025 * s))
    crease = np.zeros(shape, np.float32)
    for poly, d in geo.creases:
        line = coverage(shape, lines=[pose.project(poly)], thickness=thick)
        crease = np.maximum(crease, d * line)
    eyes = [np.vstack([lm[36:42], lm[36:37]]), np.vstack([lm[42:48], lm[42:43]])]
    crease = np.maximum(crease, 0.45 * coverage(shape, lines=eyes))
    if mouth_open:
        crease = np.maximum(crease, 0.75 * coverage(shape, polys=[lm[60:68]]))
    else:
        crease = np.maximum(crease, 0.5 * coverage(shape, lines=[lm[60:65]], thickness=thick))
    crease = cv2.GaussianBlur(crease, (0, 0), max(0.6, 0.012 * s))
    return r - 0.02 * crease, crease
