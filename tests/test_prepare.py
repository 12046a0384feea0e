"""`prepare`: raw dataset -> prepared dataset, with every kind of bad input and a resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conditioners.prepare import (
    PrepareError,
    PrepareJob,
    merge_shards,
    plan_samples,
    prepare_dataset,
    prepare_shard,
)
from conditioners.raw_data import read_raw_dataset, select_samples
from controlnet_emo.config import load_config
from controlnet_emo.synthetic.faces import CSV_COLUMNS, write_raw_dataset

N_SYNTH = 8
BASE = "0/synth_00000"  # the synthetic sample the bad inputs are made from


def config(*overrides: str):
    return load_config(None, ["depth.model=precomputed", "prepare.val_fraction=0.3", *overrides])


@pytest.fixture(scope="module")
def synth_raw(tmp_path_factory) -> Path:
    return write_raw_dataset(tmp_path_factory.mktemp("raw") / "raw", N_SYNTH, resolution=160)


def copy_raw(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def metadata(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The happy path


def test_prepare_writes_the_documented_layout(synth_raw, tmp_path):
    out = tmp_path / "out"
    report = prepare_dataset(synth_raw, out, config("depth.model=tiny", "depth.batch_size=3"))
    rows = metadata(out)
    assert report["prepared"] == len(rows) == N_SYNTH and report["skipped"] == 0
    assert report == json.loads((out / "prepare_report.json").read_text())
    assert set(report["per_class"].values()) == {1}
    captions = {json.loads(line)["file"]: json.loads(line)["text"]
                for line in (synth_raw / "captions.jsonl").read_text().splitlines()}  # fmt: skip
    for row in rows:
        assert row["file_name"] == f"images/{Path(row['source']).with_suffix('.png').as_posix()}"
        assert row["text"] == captions[row["source"]]
        assert row["split"] in ("train", "val") and 0 <= row["expression"] <= 7
        assert -1 <= row["valence"] <= 1 and -1 <= row["arousal"] <= 1
        image = cv2.imread(str(out / row["file_name"]), cv2.IMREAD_UNCHANGED)
        assert image.shape == (160, 160, 3) and image.dtype == np.uint8
        for key in ("flame_file_name", "skeleton_file_name"):
            assert cv2.imread(str(out / row[key]), cv2.IMREAD_UNCHANGED).shape == image.shape
        depth = cv2.imread(str(out / row["depth_file_name"]), cv2.IMREAD_UNCHANGED)
        assert depth.shape == image.shape[:2] and depth.dtype == np.uint16
    assert report["flame_method"] == {"box": N_SYNTH} and report["flame_match"]["min"] > 0.95
    assert not list(out.rglob("*.tmp"))


def test_captions_fall_back_to_the_template_and_images_downscale(synth_raw, tmp_path):
    raw = copy_raw(synth_raw, tmp_path / "raw")
    (raw / "captions.jsonl").unlink()
    out = tmp_path / "out"
    prepare_dataset(raw, out, config("prepare.max_size=128", "depth.bits=8"))
    rows = metadata(out)
    assert {r["text"] for r in rows if r["expression"] == 1} == {"a photo of a happy face"}
    for row in rows:
        assert cv2.imread(str(out / row["file_name"])).shape == (128, 128, 3)
        depth = cv2.imread(str(out / row["depth_file_name"]), cv2.IMREAD_UNCHANGED)
        assert depth.shape == (128, 128) and depth.dtype == np.uint8


def test_split_is_a_fixed_function_of_the_source(synth_raw, tmp_path):
    a = prepare_dataset(synth_raw, tmp_path / "a", config())
    b = prepare_dataset(synth_raw, tmp_path / "b", config("prepare.val_fraction=0.0"))
    assert a["per_split"].get("val", 0) > 0 and b["per_split"] == {"train": N_SYNTH}
    again = prepare_dataset(synth_raw, tmp_path / "c", config())
    assert (
        metadata(tmp_path / "a") == metadata(tmp_path / "c")
        and again["per_split"] == a["per_split"]
    )


def test_balancing_and_subset_size(synth_raw, tmp_path):
    index = read_raw_dataset(synth_raw)
    extra = [s for s in index.samples if s.expression in (1, 2)]  # classes 1 and 2 twice
    for s in extra:
        s2 = type(s)(**{**s.__dict__, "key": s.key.replace("synth", "dup")})
        index.samples.append(s2)
    balanced = select_samples(index.samples, balance=True, max_samples=None)
    assert sorted(s.expression for s in balanced) == list(range(8))
    subset = select_samples(index.samples, balance=True, max_samples=4)
    assert len({s.expression for s in subset}) == 4
    report = prepare_dataset(synth_raw, tmp_path / "out", config("prepare.max_samples=3"))
    assert report["prepared"] == 3 and report["not_selected"] == N_SYNTH - 3


# ---------------------------------------------------------------------------------------------
# Bad inputs


class BadRaw:
    """Adds broken and odd variants of one synthetic sample to a raw folder."""

    def __init__(self, raw: Path) -> None:
        self.raw = raw
        with open(raw / "annotations.csv", newline="") as handle:
            self.base_row = next(
                r for r in csv.DictReader(handle) if r[CSV_COLUMNS[0]].startswith(BASE)
            )
        self.image = np.asarray(Image.open(raw / "images" / f"{BASE}.jpg").convert("RGB"))
        self.rows: list[dict] = []

    def add(self, name: str, image=None, siblings=("inputs", "geometry_detail", "depth"), **row):
        """Write images/bad/<name> (a PIL image, bytes or None) plus copies of BASE's maps."""
        key = f"bad/{name}"
        path = self.raw / "images" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, bytes):
            path.write_bytes(image)
        elif image is not None:
            image.save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
        for folder in siblings:
            dst = self.raw / folder / Path(key).with_suffix(".png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.raw / folder / f"{BASE}.png", dst)
        self.rows.append({**self.base_row, CSV_COLUMNS[0]: key, **row})

    def write_csv(self) -> None:
        with open(self.raw / "annotations.csv", "a", newline="") as handle:
            writer = csv.DictWriter(handle, CSV_COLUMNS, lineterminator="\n")
            writer.writerows(self.rows)


def make_bad_raw(raw: Path) -> BadRaw:
    bad = BadRaw(raw)
    photo = Image.fromarray(bad.image)
    jpeg = (raw / "images" / f"{BASE}.jpg").read_bytes()
    # converted, then prepared
    bad.add("cmyk.jpg", photo.convert("CMYK"))
    bad.add("gray.png", photo.convert("L"))
    bad.add("alpha.png", photo.convert("RGBA"))
    cv2.imwrite(
        str(raw / "images" / "bad" / "deep.png"), bad.image[:, :, ::-1].astype(np.uint16) * 257
    )
    bad.add("deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(bad.image, 1)))
    (raw / "images" / "bad").mkdir(exist_ok=True)
    rotated.save(raw / "images" / "bad" / "rotated.jpg", exif=exif, quality=95)
    bad.add("rotated.jpg")
    bad.add("nolandmarks.jpg", photo, facial_landmarks="")  # skeleton from FAN
    # skipped, each with its reason
    bad.add("truncated.jpg", jpeg[: len(jpeg) // 2])
    bad.add("garbage.jpg", bytes(range(256)) * 8)
    bad.add("text.jpg", b"this is a text file with a .jpg name\n")
    bad.add("tiny.jpg", photo.resize((40, 40)))
    bad.add("nocrop.jpg", photo, siblings=("geometry_detail", "depth"))
    bad.add("norender.jpg", photo, siblings=("inputs", "depth"))
    bad.add("nodepth.jpg", photo, siblings=("inputs", "geometry_detail"))
    bad.add("ghost.jpg", None)
    bad.add("nan.jpg", photo, valence="nan")
    bad.add("range.jpg", photo, arousal="1.7")
    lms = bad.base_row["facial_landmarks"].split(";")
    bad.add("badlandmarks.jpg", photo, facial_landmarks=";".join(["nan", *lms[1:]]))
    bad.add("wrongface.jpg", Image.fromarray(np.ascontiguousarray(bad.image[::-1])))
    # filtered, as AffectNet intends
    bad.add("none.jpg", photo, expression="8")
    bad.add("invalid.jpg", photo, valence="-2", arousal="-2")
    (raw / "images" / "bad" / "notes.txt").write_text("not a picture")
    (raw / "images" / ".DS_Store").write_bytes(b"\0\0")
    bad.write_csv()
    return bad


EXPECTED_SKIPS = {
    "bad/truncated.jpg": "corrupt_image",
    "bad/garbage.jpg": "not_an_image",
    "bad/text.jpg": "not_an_image",
    "bad/tiny.jpg": "too_small",
    "bad/nocrop.jpg": "missing_emoca_crop",
    "bad/norender.jpg": "missing_flame_render",
    "bad/nodepth.jpg": "missing_depth",
    "bad/ghost.jpg": "missing_file",
    "bad/nan.jpg": "bad_annotation",
    "bad/range.jpg": "bad_annotation",
    "bad/badlandmarks.jpg": "bad_annotation",
    "bad/wrongface.jpg": "flame_low_match",
    "bad/notes.txt": "not_an_image",
    ".DS_Store": "not_an_image",
}
CONVERTED = ["cmyk.jpg", "gray.png", "alpha.png", "deep.png", "rotated.jpg", "nolandmarks.jpg"]


def test_every_bad_input_is_a_reported_skip_and_valid_ones_come_out(
    synth_raw, tmp_path, random_fan_home, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(random_fan_home))
    raw = copy_raw(synth_raw, tmp_path / "raw")
    make_bad_raw(raw)
    out = tmp_path / "out"
    report = prepare_dataset(raw, out, config("flame.min_match=0.8"))

    skipped = {s["file"]: s["reason"] for s in report["skipped_files"]}
    assert skipped == EXPECTED_SKIPS
    assert report["filtered"] == {"expression_none": 1, "invalid_valence_arousal": 1}
    assert report["converted"] == {
        "16bit": 1,
        "cmyk": 1,
        "exif_rotated": 1,
        "grayscale": 1,
        "rgba": 1,
    }
    assert report["landmarks"] == {"annotations": N_SYNTH + len(CONVERTED) - 1, "fan": 1}
    sources = {row["source"] for row in metadata(out)}
    assert sources == {f"0/synth_{i:05d}.jpg" for i in range(4)} | {
        f"1/synth_{i:05d}.jpg" for i in range(4, 8)
    } | {f"bad/{name}" for name in CONVERTED}
    base = cv2.imread(str(out / "images" / f"{BASE}.png"))
    for name in ("cmyk", "alpha", "deep", "rotated"):  # same picture as BASE once converted
        converted = cv2.imread(str(out / "images" / "bad" / f"{name}.png"))
        assert converted.shape == base.shape and np.abs(converted.astype(int) - base).mean() < 4


def test_nothing_prepared_is_an_error(synth_raw, tmp_path):
    raw = tmp_path / "raw"
    (raw / "images" / "0").mkdir(parents=True)
    (raw / "images" / "0" / "a.jpg").write_bytes(b"garbage")
    row = {c: "" for c in CSV_COLUMNS} | {CSV_COLUMNS[0]: "0/a.jpg", "expression": "1",
                                           "valence": "0.5", "arousal": "0.1"}  # fmt: skip
    with open(raw / "annotations.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    with pytest.raises(PrepareError, match="nothing could be prepared"):
        prepare_dataset(raw, tmp_path / "out", config())
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["skipped_files"] == [
        {"file": "0/a.jpg", "reason": "not_an_image", "detail": "a.jpg"}
    ]


# ---------------------------------------------------------------------------------------------
# The newer AffectNet release: images/<id>.jpg + annotations/<id>_{exp,val,aro,lnd}.npy


def test_npy_annotation_layout(synth_raw, tmp_path):
    raw = tmp_path / "raw"
    with open(synth_raw / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:4]
    (raw / "annotations").mkdir(parents=True)
    for i, row in enumerate(rows):
        key = Path(row[CSV_COLUMNS[0]])
        for folder in ("images", "inputs", "geometry_detail", "depth"):
            src = synth_raw / folder / (key if folder == "images" else key.with_suffix(".png"))
            (raw / folder).mkdir(exist_ok=True)
            shutil.copy(src, raw / folder / f"{i}{src.suffix}")
        # the release stores scalars as numpy strings
        np.save(raw / "annotations" / f"{i}_exp.npy", np.array(row["expression"]))
        np.save(raw / "annotations" / f"{i}_val.npy", np.array("nan" if i == 3 else row["valence"]))
        np.save(raw / "annotations" / f"{i}_aro.npy", np.array(row["arousal"]))
        lnd = np.array([float(v) for v in row["facial_landmarks"].split(";")])
        np.save(raw / "annotations" / f"{i}_lnd.npy", lnd)
    (raw / "annotations" / "2_exp.npy").unlink()
    report = prepare_dataset(raw, tmp_path / "out", config())
    assert report["layout"] == "npy" and report["prepared"] == 2
    assert {s["file"]: s["reason"] for s in report["skipped_files"]} == {
        "2.jpg": "no_annotation",
        "3.jpg": "bad_annotation",
    }
    assert [r["file_name"] for r in metadata(tmp_path / "out")] == ["images/0.png", "images/1.png"]
    assert report["flame_match"]["min"] > 0.9  # no face box here: landmark rule or registration


# ---------------------------------------------------------------------------------------------
# Resume and shards


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for folder in ("images", "flame", "depth", "skeleton")
        for p in sorted((out / folder).rglob("*.png"))
    }


def test_a_killed_run_resumes_where_it_stopped(synth_raw, tmp_path, monkeypatch):
    cfg = config("depth.model=tiny", "depth.batch_size=2")
    clean = tmp_path / "clean"
    prepare_dataset(synth_raw, clean, cfg)

    out = tmp_path / "out"
    write, calls = PrepareJob._write, []

    def dies_on_fourth(self, maps, depth):
        calls.append(maps.sample.key)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the kill arrives while sample 4 is being written
        return write(self, maps, depth)

    with monkeypatch.context() as patch:
        patch.setattr(PrepareJob, "_write", dies_on_fourth)
        with pytest.raises(KeyboardInterrupt):
            prepare_dataset(synth_raw, out, cfg)
    with open(out / ".progress" / "shard-00000.jsonl", "a") as handle:
        handle.write('{"file_name": "images/0/syn')  # a line torn by the kill

    report = prepare_dataset(synth_raw, out, cfg)
    assert report["resumed"] == 3 and report["prepared"] == N_SYNTH
    assert metadata(out) == metadata(clean)
    first = _snapshot(out)
    assert {k: v[0] for k, v in first.items()} == {k: v[0] for k, v in _snapshot(clean).items()}

    (out / metadata(out)[0]["depth_file_name"]).unlink()  # a lost file is redone, nothing else
    report = prepare_dataset(synth_raw, out, cfg)
    assert report["resumed"] == N_SYNTH - 1 and report["prepared"] == N_SYNTH
    second = _snapshot(out)
    changed = {k for k in first if first[k][1] != second[k][1]}
    assert changed == {v for k, v in metadata(out)[0].items() if k.endswith("file_name")}


def test_shards_split_the_work_and_merge_to_the_single_process_result(synth_raw, tmp_path):
    cfg = config()
    prepare_dataset(synth_raw, tmp_path / "single", cfg)
    out = tmp_path / "sharded"
    plan = plan_samples(synth_raw, cfg)
    for rank in (1, 0):
        prepare_shard(plan, out, cfg, rank=rank, world=2, show_progress=False)
    report = merge_shards(plan, out, cfg, world=2)
    shards = [
        {json.loads(line)["source"] for line in (out / ".progress" / f"shard-0000{r}.jsonl").open()}
        for r in (0, 1)
    ]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == N_SYNTH // 2
    assert report["processes"] == 2 and report["prepared"] == N_SYNTH
    assert metadata(out) == metadata(tmp_path / "single")


# ---------------------------------------------------------------------------------------------
# FLAME codes: rendered on the original canvas, class means for `edit`


def test_prepare_from_codes_renders_the_maps_and_writes_class_means(tmp_path):
    from conditioners.codes import ExpressionMeans, read_codes

    raw = write_raw_dataset(tmp_path / "raw", 8, resolution=96, codes=True)  # no cam.npy
    out = tmp_path / "out"
    report = prepare_dataset(raw, out, config("depth.model=flame"))  # flame.source: auto
    assert report["prepared"] == 8 and report["flame_source"] == "codes"
    assert report["flame_method"] == {"codes:silhouette": 8}  # the camera was fitted
    assert report["flame_match"]["min"] > 0.95 and report["depth_source"] == "flame"
    rows = metadata(out)
    for row in rows:
        flame = cv2.imread(str(out / row["flame_file_name"]), cv2.IMREAD_UNCHANGED)
        depth = cv2.imread(str(out / row["depth_file_name"]), cv2.IMREAD_UNCHANGED)
        assert flame.shape == (96, 96, 3) and depth.dtype == np.uint16
        face = flame.max(-1) > 0
        assert 0.05 < face.mean() < 0.6  # a face-sized render, not the crop's
        assert ((depth > 0) == face).mean() > 0.98  # depth from the same mesh
    means = ExpressionMeans.load(out / "expression_codes.npz")
    train = [r for r in rows if r["split"] == "train"]
    assert report["expression_codes"]["faces"] == len(train) == int(means.count.sum())
    first = train[0]
    codes = read_codes(raw / "codes" / Path(first["source"]).with_suffix(""))
    assert means.count[first["expression"]] == 1  # 8 faces, one per class
    np.testing.assert_allclose(means.exp[first["expression"]], codes.exp, rtol=1e-6)
    np.testing.assert_allclose(means.jaw[first["expression"]], codes.pose[3:], rtol=1e-6)


def test_codes_without_a_flame_model_fall_back_to_the_render_or_stop(tmp_path):
    raw = write_raw_dataset(tmp_path / "raw", 2, resolution=96, codes=True)
    (raw / "flame_model.npz").unlink()
    plan = plan_samples(raw, config())
    assert plan.flame_source == "render"
    with pytest.raises(PrepareError, match="flame.source=codes needs a FLAME model"):
        plan_samples(raw, config("flame.source=codes"))
    with pytest.raises(PrepareError, match="depth.model=flame"):
        plan_samples(raw, config("depth.model=flame"))


# ---------------------------------------------------------------------------------------------
# depth.model: auto and rows that cannot be prepared anyway


def test_auto_depth_is_not_turned_by_rows_whose_original_is_missing(tmp_path, monkeypatch):
    from controlnet_emo.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = write_raw_dataset(tmp_path / "raw", 4, resolution=64)
    rows = list(csv.DictReader(open(raw / "annotations.csv", newline="")))
    ghosts = [f"0/ghost_{i}.jpg" for i in range(5)]  # annotated, no original, no depth map
    with open(raw / "annotations.csv", "a", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS, lineterminator="\n")
        writer.writerows({**rows[0], CSV_COLUMNS[0]: key} for key in ghosts)
    out = tmp_path / "out"
    assert main(["prepare", str(raw), str(out), "--set", "prepare.balance_classes=false"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["depth_model"] == "auto" and report["depth_source"] == "precomputed"
    assert report["prepared"] == 4 and report["skip_reasons"] == {"missing_file": 5}
    assert {s["file"] for s in report["skipped_files"]} == set(ghosts)
    # an original that is there but has no map still asks for a depth network
    (raw / "depth" / Path(rows[1][CSV_COLUMNS[0]]).with_suffix(".png")).unlink()
    assert plan_samples(raw, load_config(None, [])).depth_source == "Intel/zoedepth-nyu-kitti"
