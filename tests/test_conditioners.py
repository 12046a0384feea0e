"""Conditioners on their own: image loading, FLAME re-canvasing, depth, skeleton (incl. real FAN)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conditioners.depth import (
    DepthConditioner,
    DepthModelError,
    PrecomputedDepth,
    normalise_depth,
    to_png_values,
)
from conditioners.flame import FlameConditioner
from conditioners.io import ImageError, load_render, load_rgb
from conditioners.skeleton import (
    SKELETON_PARTS,
    NoFaceError,
    SkeletonConditioner,
    draw_skeleton,
)
from controlnet_emo.synthetic.faces import crop_to_emoca, render_face, sample_face_params


def face(i: int, resolution: int = 256):
    return render_face(
        sample_face_params(np.random.default_rng([7, i]), resolution, i % 8), resolution
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ---------------------------------------------------------------------------------------------
# Loading odd images


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.fixture
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((40, 60, 3)) * 255).astype(np.uint8)


def test_plain_rgb_loads_unchanged(tmp_path, photo):
    rgb, notes = load_rgb(_save(Image.fromarray(photo), tmp_path / "a.png"))
    assert notes == [] and np.array_equal(rgb, photo)


@pytest.mark.parametrize(
    "mode, note",
    [("CMYK", "cmyk"), ("L", "grayscale"), ("RGBA", "rgba"), ("P", "palette")],
)
def test_converted_modes_become_rgb_uint8(tmp_path, photo, mode, note):
    img = Image.fromarray(photo).convert(mode)
    rgb, notes = load_rgb(_save(img, tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")))
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 60, 3)
    assert note in notes


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half transparent
    rgb, _ = load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert (rgb[0, 0] == (255, 0, 0)).all() and (rgb[7, 7] == 255).all()


def test_16bit_gray_and_rgb_keep_their_range(tmp_path, photo):
    import cv2

    gray16 = photo[:, :, 0].astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "g.png"), gray16)
    rgb, notes = load_rgb(tmp_path / "g.png")
    assert "16bit" in notes and np.abs(rgb[:, :, 0].astype(int) - photo[:, :, 0]).max() <= 1
    cv2.imwrite(str(tmp_path / "c.png"), (photo[:, :, ::-1].astype(np.uint16) * 257))
    rgb, notes = load_rgb(tmp_path / "c.png")
    assert "16bit" in notes and np.abs(rgb.astype(int) - photo).max() <= 1


def test_exif_rotated_photo_comes_out_upright(tmp_path):
    yy, xx = np.mgrid[0:40, 0:60]
    photo = np.stack([xx * 4, yy * 6, np.full_like(xx, 128)], axis=2).astype(np.uint8)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(photo, 1)))  # camera held sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rgb, notes = load_rgb(_save(stored, tmp_path / "a.jpg", exif=exif, quality=100))
    assert "exif_rotated" in notes and rgb.shape == photo.shape
    assert np.abs(rgb.astype(int) - photo).mean() < 3  # JPEG noise only


@pytest.mark.parametrize(
    "content, reason",
    [(b"not an image at all", "not_an_image"), (None, "corrupt_image")],
)
def test_undecodable_files_are_image_errors(tmp_path, photo, content, reason):
    if content is None:  # a download cut off half way
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, "JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path = tmp_path / "a.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        load_rgb(path)
    assert err.value.reason == reason


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="missing_file"):
        load_rgb(tmp_path / "nope.jpg")


def test_render_transparency_becomes_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255
    render = load_render(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "r.png"))
    assert (render[0, 0] == 200).all() and (render[7, 7] == 0).all()


# ---------------------------------------------------------------------------------------------
# FLAME render back on the original canvas


def test_flame_render_lands_on_the_face():
    """Box rule and registration both put the crop-frame render over the true face region."""
    flame = FlameConditioner()
    box_ious, reg_ious = [], []
    for i in range(4):
        f = face(i)
        crop, render = crop_to_emoca(f.image, f.face_box), crop_to_emoca(f.render, f.face_box)
        truth = f.render.max(2) > 0
        by_box = flame.place(render, crop, f.image, f.face_box)
        by_search = flame.place(render, crop, f.image, None)
        assert by_box.method == "box" and by_search.method == "registered"
        assert min(by_box.score, by_search.score) > 0.95
        box_ious.append(iou(by_box.canvas.max(2) > 0, truth))
        reg_ious.append(iou(by_search.canvas.max(2) > 0, truth))
    print(f"flame IoU box rule: {np.mean(box_ious):.3f}, registered: {np.mean(reg_ious):.3f}")
    assert min(box_ious) > 0.9 and min(reg_ious) > 0.9


def test_flame_wrong_box_is_caught_and_registered():
    f = face(3)
    crop, render = crop_to_emoca(f.image, f.face_box), crop_to_emoca(f.render, f.face_box)
    x, y, w, h = f.face_box
    placement = FlameConditioner().place(render, crop, f.image, (x + 0.3 * w, y, 0.7 * w, 0.7 * h))
    assert placement.method == "registered"
    assert iou(placement.canvas.max(2) > 0, f.render.max(2) > 0) > 0.9


def test_flame_crop_made_by_emocas_landmark_rule_is_found_without_search():
    import cv2

    from conditioners.flame import crop_to_canvas, emoca_landmark_box

    f = face(2)
    matrix = crop_to_canvas(*emoca_landmark_box(f.landmarks), 224)  # crop -> original
    crop, render = (
        cv2.warpAffine(img, matrix, (224, 224), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        for img in (f.image, f.render)
    )
    placement = FlameConditioner().place(render, crop, f.image, f.face_box, f.landmarks)
    assert placement.method == "landmarks" and placement.score > 0.99
    assert iou(placement.canvas.max(2) > 0, f.render.max(2) > 0) > 0.9


def test_flame_background_stays_black_and_shape_matches():
    f = face(1)
    crop, render = crop_to_emoca(f.image, f.face_box), crop_to_emoca(f.render, f.face_box)
    canvas, score = FlameConditioner()(render, crop, f.image, f.face_box)
    assert canvas.shape == f.image.shape and canvas.dtype == np.uint8
    assert (canvas[f.render.max(2) == 0].max(1) <= 40).mean() > 0.99
    assert score > 0.95


def test_flame_crop_of_another_image_scores_low():
    import cv2

    f = face(0)
    blobs = np.random.default_rng(0).integers(0, 255, (14, 14, 3), dtype=np.uint8)
    crop = cv2.resize(blobs, (224, 224), interpolation=cv2.INTER_CUBIC)  # some other scene
    score = FlameConditioner().place(crop, crop, f.image, f.face_box).score
    assert score < 0.6


# ---------------------------------------------------------------------------------------------
# Depth


def test_normalised_depth_is_near_bright():
    depth = np.array([[1.0, 2.0], [3.0, 5.0]])  # metric: 1 m is nearest
    disparity = 1.0 / depth
    for pred, kind in ((depth, "depth"), (disparity, "disparity")):
        out = normalise_depth(pred, kind)
        assert out.dtype == np.float32 and out[0, 0] == 1.0 and out[1, 1] == 0.0
    assert (normalise_depth(np.full((3, 3), 4.0), "depth") == 0).all()


def test_png_values_8_and_16_bit():
    ramp = np.linspace(0, 1, 5, dtype=np.float32)[None]
    assert to_png_values(ramp, 8).dtype == np.uint8 and to_png_values(ramp, 8)[0, -1] == 255
    assert to_png_values(ramp, 16).dtype == np.uint16 and to_png_values(ramp, 16)[0, -1] == 65535


@pytest.fixture(scope="module")
def tiny_depth() -> DepthConditioner:
    return DepthConditioner("tiny", device="cpu", batch_size=3, input_size=64)


def test_tiny_zoedepth_loads_through_from_pretrained(tiny_depth):
    assert type(tiny_depth.model).__name__ == "ZoeDepthForDepthEstimation"
    assert tiny_depth.kind == "depth"


def test_depth_batches_images_of_any_shape(tiny_depth, monkeypatch):
    calls = []
    forward = tiny_depth.model.forward
    monkeypatch.setattr(tiny_depth.model, "forward", lambda **kw: calls.append(1) or forward(**kw))
    rng = np.random.default_rng(0)
    shapes = [(50, 70), (90, 40), (64, 64), (33, 100)]
    images = [(rng.random((*s, 3)) * 255).astype(np.uint8) for s in shapes]
    maps = tiny_depth(images)
    assert len(calls) == 2  # batch size 3: [3 images] + [1 image]
    for depth, shape in zip(maps, shapes, strict=True):
        assert depth.shape == shape and depth.dtype == np.float32
        assert 0.0 <= depth.min() and depth.max() <= 1.0


def test_missing_hub_model_names_id_cache_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DepthModelError) as err:
        DepthConditioner("Intel/zoedepth-nyu-kitti", device="cpu")
    message = str(err.value)
    assert "Intel/zoedepth-nyu-kitti" in message and "download" in message
    from huggingface_hub import constants

    assert str(constants.HF_HUB_CACHE) in message


def test_precomputed_depth_reads_16_bit_near_bright(tmp_path):
    import cv2

    (tmp_path / "depth" / "0").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "depth" / "0" / "a.png"), np.full((10, 20), 65535, np.uint16))
    depth = PrecomputedDepth(tmp_path).load("0/a.jpg", 5, 10)
    assert depth.shape == (5, 10) and np.allclose(depth, 1.0)
    with pytest.raises(FileNotFoundError):
        PrecomputedDepth(tmp_path).load("0/b.jpg", 5, 10)


def test_depth_auto_uses_stored_maps_only_when_every_sample_has_one(tmp_path):
    """auto: RAW/depth/ when complete, else the default network (never a mix of the two)."""
    from conditioners.depth import DEFAULT_MODEL, network_name
    from conditioners.prepare import plan_samples
    from controlnet_emo.config import load_config
    from controlnet_emo.synthetic.faces import write_raw_dataset

    raw = write_raw_dataset(tmp_path / "raw", 4, resolution=96)
    cfg = load_config(None)
    assert cfg.depth.model == "auto"
    plan = plan_samples(raw, cfg)
    assert plan.depth_source == "precomputed"
    (raw / "depth" / Path(plan.selected[0].key).with_suffix(".png")).unlink()
    assert plan_samples(raw, cfg).depth_source == DEFAULT_MODEL
    strict = load_config(None, ["depth.model=precomputed"])
    assert plan_samples(raw, strict).depth_source == "precomputed"  # explicit: a skip each
    assert network_name("auto") == network_name("precomputed") == DEFAULT_MODEL  # --reference


# ---------------------------------------------------------------------------------------------
# Skeleton


def test_skeleton_lies_on_the_face_with_one_colour_per_part():
    f = face(2)
    skeleton = draw_skeleton(f.landmarks, 256, 256)
    drawn = skeleton.max(2) > 0
    x, y, w, h = f.face_box
    inside = np.zeros_like(drawn)
    inside[max(0, y - 3) : y + h + 3, max(0, x - 3) : x + w + 3] = True
    assert drawn.sum() > 500 and (drawn & ~inside).sum() == 0
    for name, (first, last, _, colour) in SKELETON_PARTS.items():
        points = np.round(f.landmarks[first + 1 : last]).astype(int)  # skip shared end points
        pixels = skeleton[points[:, 1], points[:, 0]].astype(float)
        expected = np.asarray(colour, float) / np.linalg.norm(colour)
        cosine = pixels @ expected / np.maximum(np.linalg.norm(pixels, axis=1), 1e-6)
        assert np.median(cosine) > 0.97, name
    assert len({p[3] for p in SKELETON_PARTS.values()}) == len(SKELETON_PARTS)


def test_skeleton_line_width_follows_image_size():
    f = face(0)
    small = draw_skeleton(f.landmarks, 256, 256)
    large = draw_skeleton(f.landmarks * 4, 1024, 1024)
    ratio = (large.max(2) > 0).sum() / (small.max(2) > 0).sum()
    assert 8 < ratio < 24  # lines 4x longer and ~4x wider, not just 4x longer


def test_skeleton_conditioner_uses_given_landmarks_without_fan():
    f = face(4)
    conditioner = SkeletonConditioner("auto")
    assert np.array_equal(conditioner(f.image, f.landmarks), draw_skeleton(f.landmarks, 256, 256))
    assert conditioner._fan is None


def test_annotations_only_source_refuses_to_guess():
    with pytest.raises(ValueError, match="annotations"):
        SkeletonConditioner("annotations")(np.zeros((64, 64, 3), np.uint8))


@pytest.fixture(scope="module")
def random_fan(random_fan_home):
    """The FAN conditioner loaded from the random-weight file face-alignment looks for."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(random_fan_home))
        conditioner = SkeletonConditioner("fan", device="cpu")
        conditioner.fan  # noqa: B018 - load now, while TORCH_HOME points at the random weights
    return conditioner


def test_fan_landmarks_through_face_alignment(random_fan):
    f = face(6)
    x, y, w, h = f.face_box
    landmarks = random_fan.landmarks(f.image, f.face_box)
    assert landmarks.shape == (68, 2)
    # random weights put points anywhere in FAN's crop around the box (about the box's
    # width + height across), never elsewhere in the image
    offset = np.abs(landmarks - (x + w / 2, y + h / 2))
    assert (offset <= 0.65 * (w + h)).all()


def test_fan_without_confidence_is_no_face(random_fan, monkeypatch):
    monkeypatch.setattr(random_fan, "min_score", 1.01)  # heatmap peaks never exceed 1
    with pytest.raises(NoFaceError):
        random_fan(face(6).image, box=face(6).face_box)
    with pytest.raises(NoFaceError):
        random_fan(face(6).image, box=(10, 10, 0, 0))


def test_missing_fan_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        SkeletonConditioner("fan", device="cpu").landmarks(np.zeros((64, 64, 3), np.uint8))
    assert "2DFAN4-11f355bf06.pth.tar" in str(err.value) and str(tmp_path) in str(err.value)
