"""68 facial landmarks -> a drawn face skeleton, one colour per part.

The ControlNet reads the skeleton as an RGB hint, so each part (jaw, brows, nose, eyes, lips)
gets its own colour: the network can tell a raised brow from an open mouth without guessing
which line is which. Lines are anti-aliased and their width follows the image size, so a 512
px canvas and a 2048 px original give the same picture once resized. Landmarks come from the
annotation when there is one; otherwise from face-alignment's 2D FAN run on the given face
box (``face_detector='folder'``), which needs no detector weights.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import cv2
import numpy as np

logger = logging.getLogger(__name__)

# part name -> (first index, last index inclusive, closed outline?, RGB colour)
SKELETON_PARTS: dict[str, tuple[int, int, bool, tuple[int, int, int]]] = {
    "jaw": (0, 16, False, (255, 255, 255)),
    "right_brow": (17, 21, False, (255, 128, 0)),
    "left_brow": (22, 26, False, (255, 220, 0)),
    "nose_bridge": (27, 30, False, (0, 160, 255)),
    "nostrils": (31, 35, False, (0, 255, 255)),
    "right_eye": (36, 41, True, (0, 255, 0)),
    "left_eye": (42, 47, True, (160, 255, 0)),
    "outer_lip": (48, 59, True, (255, 0, 80)),
    "inner_lip": (60, 67, True, (255, 0, 255)),
}
SUBPIXEL_BITS = 4  # cv2 draws at 1/16 px so thin lines stay where the landmark is


class NoFaceError(ValueError):
    """face-alignment found no face in the given box (a reported skip in prepare)."""

    reason = "fan_no_face"


def line_width(height: int, width: int) -> int:
    """~2 px at 512, scaling with the shorter side, never below 1."""
    return max(1, round(min(height, width) / 256))


def draw_skeleton(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(68, 2) x, y pixels -> (height, width, 3) uint8 skeleton on black."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    points = np.round(np.asarray(landmarks, dtype=np.float64) * (1 << SUBPIXEL_BITS))
    points = points.astype(np.int32)
    thickness = line_width(height, width)
    for first, last, closed, colour in SKELETON_PARTS.values():
        part = points[first : last + 1].reshape(-1, 1, 2)
        cv2.polylines(canvas, [part], closed, colour, thickness, cv2.LINE_AA, SUBPIXEL_BITS)
    return canvas


class SkeletonConditioner:
    """Image (+ landmarks or a face box) -> skeleton map on the image's canvas.

    ``source``: ``auto`` draws given landmarks and falls back to FAN; ``annotations`` never
    runs FAN (missing landmarks are an error); ``fan`` always runs FAN. ``min_score``: mean
    FAN heatmap peak below which the result counts as "no face".
    """

    def __init__(
        self,
        source: str = "auto",
        device: str | None = None,
        min_score: float = 0.0,
        flip_input: bool = False,
        fan_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if source not in ("auto", "annotations", "fan"):
            raise ValueError(f"skeleton source {source!r} is not auto, annotations or fan")
        self.source = source
        self.device = device
        self.min_score = min_score
        self.flip_input = flip_input
        self.fan_kwargs = fan_kwargs or {}
        self._fan = None

    def __call__(
        self,
        image: np.ndarray,
        landmarks: np.ndarray | None = None,
        box: tuple[float, float, float, float] | None = None,
    ) -> np.ndarray:
        """``box`` is (x, y, width, height); without one FAN looks at the whole image."""
        height, width = image.shape[:2]
        return draw_skeleton(self.points(image, landmarks, box), height, width)

    def points(
        self,
        image: np.ndarray,
        landmarks: np.ndarray | None = None,
        box: tuple[float, float, float, float] | None = None,
    ) -> np.ndarray:
        """The (68, 2) points the skeleton is drawn from: the given landmarks, or FAN's when
        there are none or ``source`` is 'fan' (prepare records them for evaluation)."""
        if landmarks is None or self.source == "fan":
            return self.landmarks(image, box)
        return landmarks

    def landmarks(
        self, image: np.ndarray, box: tuple[float, float, float, float] | None = None
    ) -> np.ndarray:
        """(68, 2) landmarks from FAN for the face in ``box`` (created on first use)."""
        if self.source == "annotations":
            raise ValueError("skeleton.source is 'annotations' but this sample has no landmarks")
        height, width = image.shape[:2]
        x, y, w, h = box if box is not None else (0.0, 0.0, float(width), float(height))
        faces = [np.array([x, y, x + w, y + h], dtype=np.float64)] if w > 0 and h > 0 else []
        if not faces:
            raise NoFaceError("empty face box")
        result = self.fan.get_landmarks_from_image(
            np.ascontiguousarray(image), detected_faces=faces, return_landmark_score=True
        )
        points, scores, _ = result
        if not points:
            raise NoFaceError("face-alignment returned no face")
        score = float(np.mean(scores[0]))
        if score < self.min_score:
            raise NoFaceError(f"landmark confidence {score:.3f} < {self.min_score}")
        return np.asarray(points[0][:, :2], dtype=np.float32)

    @property
    def fan(self) -> Any:
        if self._fan is None:
            self._fan = load_fan(self.device, self.flip_input, **self.fan_kwargs)
        return self._fan


def load_fan(device: str | None = None, flip_input: bool = False, **kwargs: Any) -> Any:
    """face-alignment's 2D FAN, weights from ``$TORCH_HOME/hub/checkpoints`` (never downloaded).

    face-alignment would download a missing checkpoint silently; we check first and name the
    file, so an offline cluster job fails in its first second with the fix in the message.
    """
    import face_alignment
    import torch

    checkpoint, _ = fan_checkpoint()
    if not checkpoint.is_file():
        raise FileNotFoundError(missing_fan_message())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = {"face_detector": "folder", "flip_input": flip_input}
    if "compile" in inspect.signature(face_alignment.FaceAlignment).parameters:
        options["compile"] = False  # 1.5+: compiling costs minutes on the first image
    options.update(kwargs)
    return face_alignment.FaceAlignment(
        face_alignment.LandmarksType.TWO_D, device=device, **options
    )


def fan_checkpoint() -> tuple[Path, str]:
    """The 2D FAN file ``load_fan`` reads, and the URL it comes from."""
    import face_alignment
    from face_alignment.api import models_urls

    url = models_urls["2DFAN-" + str(int(face_alignment.NetworkSize.LARGE))]
    return fan_checkpoint_path(url), url


def missing_fan_message() -> str:
    """Where the FAN file goes (the loader and ``controlnet-emo doctor`` say the same)."""
    checkpoint, url = fan_checkpoint()
    return (
        f"face-alignment weights not found: {checkpoint}. Download {url} and place it "
        "there (the folder is $TORCH_HOME/hub/checkpoints), or give landmarks in the "
        "annotations and use skeleton.source=annotations."
    )


def fan_checkpoint_path(url: str) -> Path:
    """Where face-alignment's ``load_file_from_url`` keeps ``url``: torch.hub's checkpoints dir."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
