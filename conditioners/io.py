"""Image reading that never lies about its input, and writes that never leave half a file.

Raw face datasets are scraped from the web: CMYK JPEGs, grayscale scans, 16-bit PNGs,
transparent PNGs, phone photos that are upright only after their EXIF orientation, and the
odd truncated download. `load_rgb` turns every decodable one into upright 8-bit RGB and says
what it converted; anything it cannot decode is an `ImageError` whose `reason` goes into the
prepare report. Writes go to ``name.tmp`` then ``os.replace`` so a killed job leaves either
the old file or the new one, never a torn PNG that a later resume would trust.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An input image that cannot be used; ``reason`` is a short report key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_rgb(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read any image as upright HxWx3 uint8 RGB; return it with the conversions applied.

    Conversions are named ``cmyk``, ``grayscale``, ``16bit``, ``rgba`` (alpha composited on
    white, the usual background of a cut-out portrait), ``palette`` and ``exif_rotated``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError("missing_file", str(path))
    try:
        with Image.open(path) as img:
            bits16 = any("16" in str(tile.args) for tile in img.tile) or img.mode.startswith("I")
            img.load()
            return _to_rgb(img, bits16)
    except UnidentifiedImageError:
        raise ImageError("not_an_image", path.name) from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncation as OSError
        raise ImageError("corrupt_image", f"{path.name}: {err}") from None


def _to_rgb(img: Image.Image, bits16: bool) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    if _orientation(img) not in (None, 1):
        notes.append("exif_rotated")
        img = ImageOps.exif_transpose(img)
    if bits16:
        notes.append("16bit")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode))
    if img.mode == "P":
        notes.append("palette")
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        notes.append("rgba")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode == "CMYK":
        notes.append("cmyk")
    elif img.mode in ("L", "1"):
        notes.append("grayscale")
    rgb = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
    return rgb, notes


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # a malformed EXIF block is not worth losing the image over
        return None


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit (or 32-bit int / float) single-channel pixels -> uint8 over the full range."""
    values = values.astype(np.float64)
    peak = float(values.max(initial=0.0))
    top = 65535.0 if peak <= 65535 else peak
    if mode == "F" and peak <= 1.0:
        top = 1.0
    return np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def resize_longest(image: np.ndarray, max_size: int) -> tuple[np.ndarray, float]:
    """Downscale so the longest side is at most ``max_size``; return the image and the scale."""
    height, width = image.shape[:2]
    scale = min(1.0, max_size / max(height, width))
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def read_map(path: str | Path) -> np.ndarray:
    """Read a PNG map as stored (8- or 16-bit, 1 or 3 channels; colour returned as RGB)."""
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ImageError("corrupt_image", str(path))
    if data.ndim == 3 and data.shape[2] == 4:
        data = data[:, :, :3]
    return data[:, :, ::-1].copy() if data.ndim == 3 else data


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write RGB (HxWx3) or single-channel uint8/uint16 as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image[:, :, ::-1] if image.ndim == 3 else image  # OpenCV wants BGR
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(data))
    if not ok:
        raise OSError(f"could not encode {path}")
    write_bytes(path, encoded.tobytes())


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one line and fsync it: the line is the proof a sample finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row) + "\n").encode()
    with open(path, "ab+") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a line torn by a kill: start on a fresh one
                line = b"\n" + line
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON lines, dropping a torn last line left by a kill mid-append."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_render(path: str | Path) -> np.ndarray:
    """Read a render (RGB/RGBA/gray, 8/16-bit) as uint8 RGB with transparency made *black*.

    Unlike photos, a render's empty background must stay black: that is the "no face here"
    signal the ControlNet learns from.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError("missing_file", str(path))
    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None:
        raise ImageError("corrupt_image", path.name)
    if data.dtype == np.uint16:
        data = (data.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif data.dtype != np.uint8:
        raise ImageError("corrupt_image", f"{path.name}: unsupported pixel type {data.dtype}")
    if data.ndim == 2:
        data = np.repeat(data[:, :, None], 3, axis=2)
    if data.shape[2] == 4:
        alpha = data[:, :, 3:4].astype(np.uint16)
        data = (data[:, :, :3].astype(np.uint16) * alpha // 255).astype(np.uint8)
    return np.ascontiguousarray(data[:, :, 2::-1])
