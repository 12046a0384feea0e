"""Put EMOCA's FLAME render, drawn in its 224x224 face-crop frame, back on the original canvas.

EMOCA crops a square around the face (side 1.25 x the longer side of the face box, centred on
it), resizes it to 224 and renders the fitted FLAME geometry in that frame. To condition a
ControlNet on the *original* image, the render must return to where the face sits there. The
crop rule gives that transform for free when we know the face box; we still verify it,
because a crop made with another detector or scale would otherwise put the render beside the
face without a word. When the check fails we register the crop against the original by
multi-scale template matching. The match score (zero-mean normalised correlation of the crop
with the original seen through the transform) is returned so the caller can skip a sample
whose render would be misplaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

EMOCA_CROP_SCALE = 1.25
EMOCA_CROP_SIZE = 224


def emoca_crop_box(
    face_box: tuple[float, float, float, float], scale: float = EMOCA_CROP_SCALE
) -> tuple[float, float, float]:
    """(x, y, w, h) face box -> (left, top, side) of EMOCA's square crop in original pixels."""
    x, y, w, h = face_box
    side = scale * max(w, h)
    return x + w / 2 - side / 2, y + h / 2 - side / 2, side


def emoca_landmark_box(landmarks: np.ndarray, scale: float = EMOCA_CROP_SCALE) -> tuple:
    """EMOCA's own rule on 68 landmarks: 1.1 x the mean box side, times ``scale``, truncated.

    EMOCA crops around FAN landmarks, not AffectNet's face box; annotated landmarks are close
    to FAN's, so this often reproduces a real EMOCA crop when the box rule does not.
    """
    (left, top), (right, bottom) = landmarks.min(0), landmarks.max(0)
    side = float(int((right - left + bottom - top) / 2 * 1.1 * scale))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return cx - side / 2, cy - side / 2, side


def crop_to_canvas(left: float, top: float, side: float, crop_size: int) -> np.ndarray:
    """2x3 similarity taking crop pixels to original pixels.

    EMOCA maps the box corners onto pixels 0 and size-1, so one crop pixel spans
    side / (size - 1) original pixels.
    """
    s = side / (crop_size - 1)
    return np.array([[s, 0.0, left], [0.0, s, top]], dtype=np.float64)


@dataclass
class Placement:
    """A render on the original canvas and how much we trust where it landed."""

    canvas: np.ndarray  # (H, W, 3) uint8, black background
    score: float  # normalised correlation of the crop with the original through `matrix`
    method: str  # "box" | "landmarks" (a crop rule, verified) | "registered" (template match)
    matrix: np.ndarray  # 2x3, crop pixels -> original pixels


class FlameConditioner:
    """EMOCA crop + render (crop frame) + original -> render on the original canvas.

    ``box_threshold``: a crop-rule transform scoring at least this is accepted without
    searching. ``scales``: how many candidate crop sizes the registration tries.
    """

    def __init__(
        self,
        crop_scale: float = EMOCA_CROP_SCALE,
        box_threshold: float = 0.8,
        scales: int = 40,
        coarse_size: int = 64,
    ) -> None:
        self.crop_scale = crop_scale
        self.box_threshold = box_threshold
        self.scales = scales
        self.coarse_size = coarse_size

    def __call__(
        self,
        render_crop: np.ndarray,
        crop: np.ndarray,
        original: np.ndarray,
        box: tuple[float, float, float, float] | None = None,
        landmarks: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float]:
        """(H, W, 3) render on ``original``'s canvas and its match score in [-1, 1]."""
        placement = self.place(render_crop, crop, original, box, landmarks)
        return placement.canvas, placement.score

    def place(
        self,
        render_crop: np.ndarray,
        crop: np.ndarray,
        original: np.ndarray,
        box: tuple[float, float, float, float] | None = None,
        landmarks: np.ndarray | None = None,
    ) -> Placement:
        """Find the crop's transform: crop rules first, registration if none holds.

        ``box`` is (x, y, width, height) and ``landmarks`` (68, 2), both in ``original``'s
        pixels; either may be missing.
        """
        crop_gray = _gray(crop)
        original_gray = _gray(original)
        size = crop_gray.shape[0]
        squares = {}  # crop rule -> (left, top, side) it predicts
        if box is not None:
            squares["box"] = emoca_crop_box(box, self.crop_scale)
        if landmarks is not None:
            squares["landmarks"] = emoca_landmark_box(landmarks, self.crop_scale)
        candidates = []
        for method, square in squares.items():
            matrix = crop_to_canvas(*square, size)
            candidates.append((method, matrix, match_score(crop_gray, original_gray, matrix)))
        if max((c[2] for c in candidates), default=-1.0) < self.box_threshold:
            matrix = register(crop_gray, original_gray, self.scales, self.coarse_size)
            if matrix is not None:
                score = match_score(crop_gray, original_gray, matrix)
                candidates.append(("registered", matrix, score))
        if not candidates:
            return Placement(np.zeros_like(original), 0.0, "none", np.eye(2, 3))
        method, matrix, score = max(candidates, key=lambda c: c[2])
        canvas = warp_to_canvas(render_crop, matrix, crop_gray.shape, original.shape[:2])
        return Placement(canvas, float(score), method, matrix)


# ---------------------------------------------------------------------------------------------
# Geometry


def warp_to_canvas(
    render: np.ndarray, matrix: np.ndarray, crop_shape: tuple[int, ...], canvas_hw: tuple[int, int]
) -> np.ndarray:
    """Warp the crop-frame render onto the canvas; outside the crop stays black.

    When the crop shrinks on the way back (a small face), the render is first area-resized so
    the warp does not alias its thin shading lines.
    """
    crop_h, crop_w = crop_shape[:2]
    if render.shape[:2] != (crop_h, crop_w):
        render = cv2.resize(render, (crop_w, crop_h), interpolation=cv2.INTER_AREA)
    matrix = matrix.copy()
    scale = matrix[0, 0]
    if scale < 0.8:
        size = max(2, round(crop_w * scale))
        render = cv2.resize(render, (size, size), interpolation=cv2.INTER_AREA)
        matrix[:, :2] *= (crop_w - 1) / (size - 1)
    height, width = canvas_hw
    return cv2.warpAffine(
        render,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def match_score(crop_gray: np.ndarray, original_gray: np.ndarray, matrix: np.ndarray) -> float:
    """Zero-mean normalised correlation of the crop with the original re-cropped by ``matrix``.

    Out-of-image parts re-crop as black, as EMOCA pads them, so a crop at the border scores
    as well as one in the middle.
    """
    h, w = crop_gray.shape
    recrop = cv2.warpAffine(
        original_gray,
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    a = crop_gray - crop_gray.mean()
    b = recrop - recrop.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 1e-6 else 0.0


def register(
    crop_gray: np.ndarray, original_gray: np.ndarray, scales: int = 40, coarse_size: int = 64
) -> np.ndarray | None:
    """Locate the crop in the original by template matching over crop sizes, coarse to fine.

    The crop is axis-aligned and square (EMOCA never rotates it), so position and size are
    the only unknowns. Coarse: a ``coarse_size`` template against the original resized so the
    candidate crop side becomes ``coarse_size``. Fine: the full-resolution crop over a few
    sizes around the best coarse one, searched only near the coarse position. The original is
    zero-padded by half a crop so crops that ran over the border still match.
    """
    height, width = original_gray.shape
    crop_size = crop_gray.shape[0]
    low, high = max(16.0, 0.1 * min(height, width)), 1.6 * max(height, width)
    sides = np.geomspace(low, high, scales)
    coarse = cv2.resize(crop_gray, (coarse_size, coarse_size), interpolation=cv2.INTER_AREA)
    best = _best_match(coarse, original_gray, sides)
    if best is None:
        return None
    step = (high / low) ** (1.0 / max(1, scales - 1))
    fine_sides = best[0] * np.geomspace(1 / step, step, 7)
    if crop_size != coarse_size:
        radius = 2 * crop_size // coarse_size + 8  # a few coarse pixels, in fine pixels
        near = (best[1], best[2])
        best = _best_match(crop_gray, original_gray, fine_sides, near, radius) or best
    side, left, top, _ = best
    return crop_to_canvas(left, top, side, crop_size)


def _best_match(
    template: np.ndarray,
    original: np.ndarray,
    sides: np.ndarray,
    near: tuple[float, float] | None = None,
    radius: int = 0,
) -> tuple[float, float, float, float] | None:
    """(side, left, top, score) of the best template position over candidate crop sides.

    With ``near`` (an expected left, top in original pixels) only positions within ``radius``
    template pixels of it are tried.
    """
    size = template.shape[0]
    height, width = original.shape
    best = None
    for side in sides:
        factor = (size - 1) / side  # original pixels -> template pixels
        scaled_w, scaled_h = round(width * factor), round(height * factor)
        if min(scaled_w, scaled_h) < 4 or max(scaled_w, scaled_h) > 4096:
            continue
        interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
        scaled = cv2.resize(original, (scaled_w, scaled_h), interpolation=interp)
        pad = size // 2
        padded = cv2.copyMakeBorder(scaled, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        x0 = y0 = 0
        if near is not None:
            x0 = max(0, round(near[0] * factor) + pad - radius)
            y0 = max(0, round(near[1] * factor) + pad - radius)
            padded = padded[y0 : y0 + size + 2 * radius, x0 : x0 + size + 2 * radius]
        if padded.shape[0] < size or padded.shape[1] < size:
            continue
        scores = cv2.matchTemplate(padded, template, cv2.TM_CCOEFF_NORMED)
        _, score, _, (x, y) = cv2.minMaxLoc(scores)
        x, y = x + x0, y + y0
        if best is None or score > best[3]:
            best = (float(side), (x - pad) / factor, (y - pad) / factor, float(score))
    return best


def _gray(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return gray.astype(np.float32)
