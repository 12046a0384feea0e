"""Read a raw face dataset (AffectNet csv or per-image .npy annotations) into checked samples.

Annotations are validated here, once, so every later stage can trust a `RawSample`: a NaN
valence or a 67-point landmark row becomes a reported `Skip` instead of a crash (or worse, a
silently wrong label) three hours into a prepare run. Rows the AffectNet authors themselves
mark as unusable (expression 8-10, valence -2) are *filtered*, counted but not listed: they
are the dataset's design, not a defect of the copy on disk.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conditioners.io import is_image_file

NON_EMOTIONS = {8: "expression_none", 9: "expression_uncertain", 10: "expression_no_face"}
INVALID_VA = -2.0
NUM_LANDMARKS = 68
CSV_NAMES = ("annotations.csv", "training.csv", "validation.csv")


@dataclass
class RawSample:
    """One usable annotated original. ``key`` is its path relative to ``images/``."""

    key: str
    image_path: Path
    expression: int
    valence: float
    arousal: float
    box: tuple[float, float, float, float] | None = None
    """Face box as (x, y, width, height), AffectNet's convention."""
    landmarks: np.ndarray | None = None
    """(68, 2) x, y in original-image pixels."""

    @property
    def sub(self) -> str:
        return Path(self.key).parent.as_posix()

    @property
    def stem(self) -> str:
        return Path(self.key).stem

    def sibling(self, folder: str | Path, suffix: str = ".png") -> Path:
        """The file for this sample in a parallel raw folder (``inputs/<sub>/<stem>.png``)."""
        return Path(folder) / Path(self.key).with_suffix(suffix)


@dataclass
class Skip:
    key: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"file": self.key, "reason": self.reason, "detail": self.detail}


@dataclass
class RawIndex:
    """What the annotation reader found: samples to prepare, and everything it set aside."""

    layout: str
    rows: int = 0
    samples: list[RawSample] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)


class BadAnnotation(ValueError):
    """A malformed annotation value; becomes a ``bad_annotation`` skip."""


# ---------------------------------------------------------------------------------------------
# Entry point


def read_raw_dataset(raw_dir: str | Path) -> RawIndex:
    """Detect the layout of ``raw_dir`` and read every annotation in it."""
    raw_dir = Path(raw_dir)
    if not (raw_dir / "images").is_dir():
        raise FileNotFoundError(f"{raw_dir}: no images/ folder (expected the raw dataset layout)")
    for layout, (detect, read) in LAYOUTS.items():
        if detect(raw_dir):
            index = read(raw_dir)
            index.layout = layout
            index.skipped.extend(_stray_files(raw_dir / "images"))
            return index
    raise FileNotFoundError(
        f"{raw_dir}: no annotations found (expected one of {', '.join(CSV_NAMES)} "
        "or annotations/<id>_exp.npy files)"
    )


def _stray_files(images_dir: Path) -> list[Skip]:
    """Non-image files among the originals (notes, .DS_Store, archives): listed, not read."""
    stray = []
    for root, _, files in os.walk(images_dir):
        for name in files:
            path = Path(root) / name
            if not is_image_file(path):
                stray.append(Skip(path.relative_to(images_dir).as_posix(), "not_an_image"))
    return sorted(stray, key=lambda s: s.key)


# ---------------------------------------------------------------------------------------------
# AffectNet csv


def _has_csv(raw_dir: Path) -> bool:
    return any((raw_dir / name).is_file() for name in CSV_NAMES)


def read_csv_layout(raw_dir: Path) -> RawIndex:
    index = RawIndex("csv")
    for name in CSV_NAMES:
        path = raw_dir / name
        if not path.is_file():
            continue
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                index.rows += 1
                _add(
                    index,
                    raw_dir,
                    row.get("subDirectory_filePath") or "",
                    lambda r=row: _csv_fields(r),
                )
    return index


def _csv_fields(row: dict[str, str]) -> dict:
    box_values = [row.get(k, "") for k in ("face_x", "face_y", "face_width", "face_height")]
    box = (
        None if all(not (v or "").strip() for v in box_values) else _numbers(box_values, "face box")
    )
    marks = (row.get("facial_landmarks") or "").strip()
    landmarks = _numbers(marks.split(";"), "facial_landmarks") if marks else None
    return {
        "expression": row.get("expression"),
        "valence": row.get("valence"),
        "arousal": row.get("arousal"),
        "box": box,
        "landmarks": landmarks,
    }


# ---------------------------------------------------------------------------------------------
# Newer release: images/<id>.jpg + annotations/<id>_{exp,val,aro,lnd}.npy


def _has_npy(raw_dir: Path) -> bool:
    folder = raw_dir / "annotations"
    return folder.is_dir() and any(folder.glob("*_exp.npy"))


def read_npy_layout(raw_dir: Path) -> RawIndex:
    index = RawIndex("npy")
    folder = raw_dir / "annotations"
    for path in sorted((raw_dir / "images").rglob("*")):
        if not path.is_file() or not is_image_file(path):
            continue  # non-images are reported by _stray_files
        index.rows += 1
        key = path.relative_to(raw_dir / "images").as_posix()
        _add(index, raw_dir, key, lambda stem=path.stem: _npy_fields(folder, stem))
    return index


def _npy_fields(folder: Path, stem: str) -> dict:
    def load(tag: str) -> np.ndarray | None:
        path = folder / f"{stem}_{tag}.npy"
        if not path.is_file():
            return None
        try:  # the release stores scalars as numpy strings ('1', '0.25'): convert here
            return np.asarray(np.load(path, allow_pickle=False)).reshape(-1)
        except (ValueError, OSError) as err:
            raise BadAnnotation(f"{path.name}: {err}") from None

    exp = load("exp")
    if exp is None:
        raise FileNotFoundError(f"annotations/{stem}_exp.npy")
    lnd = load("lnd")
    return {
        "expression": _first(exp),
        "valence": _first(load("val")),
        "arousal": _first(load("aro")),
        "box": None,  # the newer release ships face crops: the face is the image
        "landmarks": _numbers(list(lnd), "lnd") if lnd is not None else None,
    }


def _first(values: np.ndarray | None) -> str | None:
    return None if values is None or values.size == 0 else str(values[0])


# ---------------------------------------------------------------------------------------------
# Shared row checking


def _add(index: RawIndex, raw_dir: Path, key: str, fields: Callable[[], dict]) -> None:
    key = key.strip().replace("\\", "/")
    if not key:
        index.skipped.append(Skip(f"row {index.rows}", "bad_annotation", "empty file path"))
        return
    try:
        sample = _check(raw_dir, key, fields())
    except FileNotFoundError as err:
        index.skipped.append(Skip(key, "no_annotation", str(err)))
        return
    except BadAnnotation as err:
        index.skipped.append(Skip(key, "bad_annotation", str(err)))
        return
    if isinstance(sample, str):
        index.filtered[sample] += 1
    else:
        index.samples.append(sample)


def _check(raw_dir: Path, key: str, fields: dict) -> RawSample | str:
    """A valid sample, or the name of the AffectNet filter that drops it."""
    expression = _number(fields["expression"], "expression")
    if expression != int(expression) or not 0 <= expression <= 10:
        raise BadAnnotation(f"expression {fields['expression']!r} is not an integer in 0..10")
    if expression > 7:
        return NON_EMOTIONS[int(expression)]
    valence = _number(fields["valence"], "valence")
    arousal = _number(fields["arousal"], "arousal")
    if INVALID_VA in (valence, arousal):
        return "invalid_valence_arousal"
    for name, value in (("valence", valence), ("arousal", arousal)):
        if not -1.0 <= value <= 1.0:
            raise BadAnnotation(f"{name} {value} is outside [-1, 1]")
    return RawSample(
        key=key,
        image_path=raw_dir / "images" / key,
        expression=int(expression),
        valence=valence,
        arousal=arousal,
        box=_box(fields["box"]),
        landmarks=_landmarks(fields["landmarks"]),
    )


def _box(values: list[float] | None) -> tuple[float, float, float, float] | None:
    if values is None:
        return None
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise BadAnnotation(f"face box {values} needs 4 values with positive width and height")
    x, y, w, h = values
    return (x, y, w, h)


def _landmarks(values: list[float] | None) -> np.ndarray | None:
    if values is None:
        return None
    if len(values) != 2 * NUM_LANDMARKS:
        raise BadAnnotation(f"{len(values)} landmark values, expected {2 * NUM_LANDMARKS}")
    return np.asarray(values, dtype=np.float32).reshape(NUM_LANDMARKS, 2)


def _numbers(values: list, what: str) -> list[float]:
    return [_number(v, what) for v in values]


def _number(value: object, what: str) -> float:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        raise BadAnnotation(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise BadAnnotation(f"{what} is {number}")
    return number


LAYOUTS = {"csv": (_has_csv, read_csv_layout), "npy": (_has_npy, read_npy_layout)}


# ---------------------------------------------------------------------------------------------
# Captions, selection, splits


def load_captions(path: str | Path | None) -> dict[str, str]:
    """Image path -> caption from a .json mapping/list or a .jsonl file; keys relative to images/."""
    if path is None:
        return {}
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        data = json.loads(path.read_text())
        rows = [{"file": k, "text": v} for k, v in data.items()] if isinstance(data, dict) else data
    captions = {}
    for row in rows:
        file = next((row[k] for k in ("file", "file_name", "image", "path") if k in row), None)
        text = next((row[k] for k in ("text", "caption", "description") if k in row), None)
        if file is not None and text is not None:
            captions[caption_key(file)] = str(text)
    return captions


def caption_key(path: str) -> str:
    key = Path(str(path).replace("\\", "/")).as_posix()
    return key[len("images/") :] if key.startswith("images/") else key


def find_captions(raw_dir: Path, configured: str | None) -> Path | None:
    if configured:
        return Path(configured)
    return next(
        (raw_dir / n for n in ("captions.jsonl", "captions.json") if (raw_dir / n).is_file()), None
    )


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by the key alone: same split on every machine and rerun."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / 16**12


def split_of(key: str, val_fraction: float) -> str:
    return "val" if stable_fraction(key) < val_fraction else "train"


def select_samples(
    samples: list[RawSample], balance: bool, max_samples: int | None, seed: int = 0
) -> list[RawSample]:
    """Optionally undersample every class to the rarest one, then cap the total.

    With balancing on, the cap takes classes in turn so a small subset stays balanced.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[RawSample]] = {}
    for sample in sorted(samples, key=lambda s: s.key):
        by_class.setdefault(sample.expression, []).append(sample)
    for members in by_class.values():
        rng.shuffle(members)
    if not balance:
        chosen = [s for members in by_class.values() for s in members]
        rng.shuffle(chosen)
        return chosen[:max_samples] if max_samples is not None else chosen
    per_class = min((len(m) for m in by_class.values()), default=0)
    rounds = [[m[i] for _, m in sorted(by_class.items())] for i in range(per_class)]
    chosen = [s for round_ in rounds for s in round_]
    return chosen[:max_samples] if max_samples is not None else chosen
