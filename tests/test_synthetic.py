"""Synthetic faces: the raw AffectNet + EMOCA layout, determinism, and labels in the pixels."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from controlnet_emo.synthetic.faces import (
    CSV_COLUMNS,
    EMOCA_CROP_SIZE,
    EXPRESSIONS,
    FaceParams,
    crop_to_emoca,
    emoca_crop_box,
    emoca_crop_matrix,
    face_landmarks,
    render_face,
    sample_face_params,
    write_raw_dataset,
)

RES = 128
N = 16
HAPPY, SAD, SURPRISE, FEAR, ANGER, NEUTRAL = 1, 2, 3, 4, 6, 0


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return write_raw_dataset(tmp_path_factory.mktemp("raw"), n=N, resolution=RES, seed=0)


def _rows(root: Path) -> list[dict]:
    with open(root / "annotations.csv", newline="") as f:
        return list(csv.DictReader(f))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_another_seed_differs(raw, tmp_path):
    again = _files(write_raw_dataset(tmp_path / "a", n=N, resolution=RES, seed=0))
    assert again == _files(raw)
    other = _files(write_raw_dataset(tmp_path / "b", n=N, resolution=RES, seed=1))
    assert other.keys() == again.keys()
    assert other["annotations.csv"] != again["annotations.csv"]
    assert other["images/0/synth_00000.jpg"] != again["images/0/synth_00000.jpg"]


def test_csv_has_affectnet_columns_and_values_in_range(raw):
    with open(raw / "annotations.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == CSV_COLUMNS
    rows = _rows(raw)
    assert len(rows) == N
    counts = np.bincount([int(r["expression"]) for r in rows], minlength=8)
    assert counts.min() == counts.max() == N // 8  # balanced classes
    for r in rows:
        x, y, w, h = (int(r[k]) for k in ("face_x", "face_y", "face_width", "face_height"))
        assert 0 <= x and 0 <= y and w > 10 and h > 10 and x + w <= RES and y + h <= RES
        lm = np.array([float(v) for v in r["facial_landmarks"].split(";")]).reshape(-1, 2)
        assert lm.shape == (68, 2)
        inside = (lm[:, 0] >= x) & (lm[:, 0] <= x + w) & (lm[:, 1] >= y) & (lm[:, 1] <= y + h)
        assert inside.mean() >= 0.95
        assert -1 <= float(r["valence"]) <= 1 and -1 <= float(r["arousal"]) <= 1
        assert 0 <= int(r["expression"]) <= 7


def test_every_row_has_its_layout_files(raw):
    rows = _rows(raw)
    captions = {c["file"]: c["text"] for c in _jsonl(raw / "captions.jsonl")}
    truth = {t["file"]: t for t in _jsonl(raw / "synth_truth.jsonl")}
    assert len({r["subDirectory_filePath"].split("/")[0] for r in rows}) == 2
    for r in rows:
        rel = r["subDirectory_filePath"]
        sub, stem = rel.split("/")[0], Path(rel).stem
        assert Image.open(raw / "images" / rel).size == (RES, RES)
        for d in ("inputs", "geometry_detail"):
            im = Image.open(raw / d / sub / f"{stem}.png")
            assert im.size == (EMOCA_CROP_SIZE, EMOCA_CROP_SIZE) and im.mode == "RGB"
        depth = np.array(Image.open(raw / "depth" / sub / f"{stem}.png"))
        assert depth.dtype == np.uint16 and depth.shape == (RES, RES) and depth.max() > 30000
        assert EXPRESSIONS[int(r["expression"])][:3] in captions[rel]
        assert truth[rel]["params"]["expression"] == int(r["expression"])


def _face_frame(lm: np.ndarray) -> np.ndarray:
    """Landmarks rotated so the eye line is horizontal, in units of the inter-eye distance."""
    left, right = lm[36:42].mean(0), lm[42:48].mean(0)
    d = right - left
    c, s = d / np.linalg.norm(d)
    return (lm - left) @ np.array([[c, -s], [s, c]]) / np.linalg.norm(d)


def _features(expression: int, n: int = 24) -> dict[str, float]:
    feats = []
    for i in range(n):
        p = sample_face_params(np.random.default_rng([7, expression, i]), 256, expression)
        f = _face_frame(face_landmarks(p))
        centre = (f[51] + f[57]) / 2
        feats.append((p.valence, (f[[48, 54], 1] - centre[1]).mean(), f[66, 1] - f[62, 1],
                      f[41, 1] - f[37, 1], f[17:27, 1].mean() - f[36:48, 1].mean()))  # fmt: skip
    keys = ("valence", "corner_drop", "mouth_open", "eye_open", "brow_lift")
    return {k: float(v) for k, v in zip(keys, np.mean(feats, 0), strict=True)}


def test_labels_are_consistent_with_class_and_geometry():
    feats = {e: _features(e) for e in range(8)}
    for e in (HAPPY,):
        assert feats[e]["valence"] > 0.3
    for e in (SAD, FEAR, 5, ANGER, 7):
        assert feats[e]["valence"] < 0
    assert feats[HAPPY]["corner_drop"] < feats[NEUTRAL]["corner_drop"] < feats[SAD]["corner_drop"]
    assert feats[SURPRISE]["mouth_open"] > feats[NEUTRAL]["mouth_open"] + 0.2
    assert feats[FEAR]["eye_open"] > feats[ANGER]["eye_open"]
    assert feats[SURPRISE]["brow_lift"] < feats[ANGER]["brow_lift"]  # y is down: higher brows


def test_geometry_detail_is_the_render_crop_and_maps_back_onto_the_face(raw):
    for t in _jsonl(raw / "synth_truth.jsonl")[:6]:
        face = render_face(FaceParams.from_dict(t["params"]), RES)
        assert list(face.face_box) == t["face_box"]
        assert np.allclose(emoca_crop_box(face.face_box), t["crop_box"])
        sub, stem = t["file"].split("/")[0], Path(t["file"]).stem
        stored = np.array(Image.open(raw / "geometry_detail" / sub / f"{stem}.png"))
        assert np.array_equal(stored, crop_to_emoca(face.render, face.face_box))
        back = cv2.warpAffine(stored, emoca_crop_matrix(face.face_box), (RES, RES),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)  # fmt: skip
        placed = back[..., 0] > 30
        iou = (placed & face.face_mask).sum() / (placed | face.face_mask).sum()
        assert iou > 0.9
        lm = np.round(face.landmarks).astype(int)
        assert face.face_mask[lm[:, 1], lm[:, 0]].mean() >= 0.94


def test_crop_is_black_outside_the_canvas():
    img = np.full((64, 64, 3), 200, np.uint8)
    crop = crop_to_emoca(img, (0, 0, 20, 20))  # square reaches past the top-left corner
    assert crop.shape == (EMOCA_CROP_SIZE, EMOCA_CROP_SIZE, 3)
    assert crop[0, 0].max() == 0 and crop[-1, -1].min() == 200


def test_depth_is_near_bright_and_background_zero():
    p = replace(sample_face_params(np.random.default_rng(1), RES, NEUTRAL), yaw=0.0, roll=0.0)
    face = render_face(p, RES)
    lm = np.round(face.landmarks).astype(int)
    assert face.depth[0, 0] == 0 and face.depth.max() <= 1
    assert face.depth[lm[30, 1], lm[30, 0]] > face.depth[lm[2, 1], lm[2, 0]] + 0.1  # nose > jaw
    assert face.render[0, 0].max() == 0 and face.render[face.face_mask].min() > 0


def test_expressions_are_visibly_different_at_the_same_pose():
    base = sample_face_params(np.random.default_rng(3), RES, NEUTRAL)
    ref = render_face(base, RES)
    x, y, w, h = ref.face_box
    for e in range(1, 8):
        p = sample_face_params(np.random.default_rng(3), RES, e)
        p = replace(base, expression=e, valence=p.valence, arousal=p.arousal)
        img = render_face(p, RES).image
        diff = np.abs(img.astype(float) - ref.image.astype(float))[y : y + h, x : x + w]
        changed = (diff.max(-1) > 20).mean()  # share of face-box pixels that visibly change
        assert changed > (0.08 if e in (SURPRISE, FEAR) else 0.008), EXPRESSIONS[e]
