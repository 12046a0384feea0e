"""EMOCA codes: the folder layout reads, and a camera EMOCA did not save is recovered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conditioners.codes import (
    CodesError,
    ExpressionMeans,
    FlameCodes,
    blend_expression,
    camera_for,
    canvas_for,
    class_means,
    code_folders,
    expression_index,
    fit_camera_to_landmarks,
    fit_camera_to_render,
    mesh,
    parse_numbers,
    read_codes,
    render_codes,
    sibling_render,
)
from conditioners.flame_model import FlameModel
from conditioners.render import crop_frame_box, project
from controlnet_emo.synthetic.flame import build_synthetic_flame, face_codes

TRUE_CAM = np.array([7.0, 0.01, -0.012], np.float32)


@pytest.fixture(scope="module")
def model() -> FlameModel:
    return FlameModel(build_synthetic_flame(n_lat=12, n_lon=16))


def write_folder(folder, expression=1, cam=None, seed=0):
    folder.mkdir(parents=True)
    arrays = face_codes(expression, 15.0, 5.0, np.random.default_rng(seed))
    for name, value in arrays.items():
        np.save(folder / f"{name}.npy", value[None])  # EMOCA saves (1, n) arrays
    if cam is not None:
        np.save(folder / "cam.npy", np.asarray(cam, np.float32))
    return arrays


def test_emoca_layout_reads_with_and_without_a_camera(tmp_path):
    arrays = write_folder(tmp_path / "codes" / "0" / "a", cam=TRUE_CAM)
    write_folder(tmp_path / "codes" / "1" / "b")
    with_cam = read_codes(tmp_path / "codes" / "0" / "a")
    assert with_cam.shape.shape == (100,) and with_cam.exp.shape == (50,)
    np.testing.assert_array_equal(with_cam.pose, arrays["pose"])
    np.testing.assert_array_equal(with_cam.cam, TRUE_CAM)
    assert read_codes(tmp_path / "codes" / "1" / "b").cam is None
    folders = code_folders(tmp_path / "codes")
    assert [f.relative_to(tmp_path / "codes").as_posix() for f in folders] == ["0/a", "1/b"]
    assert code_folders(tmp_path / "codes" / "0" / "a") == [tmp_path / "codes" / "0" / "a"]


def test_bad_code_folders_are_one_line_errors_naming_the_folder(tmp_path):
    write_folder(tmp_path / "x")
    (tmp_path / "x" / "exp.npy").unlink()
    with pytest.raises(CodesError, match=r"x: no exp\.npy"):
        read_codes(tmp_path / "x")
    write_folder(tmp_path / "y")
    np.save(tmp_path / "y" / "pose.npy", np.zeros(5))
    with pytest.raises(CodesError, match="pose.npy needs 6 values"):
        read_codes(tmp_path / "y")
    with pytest.raises(CodesError, match="expected 3 numbers"):
        parse_numbers("7,0", 3, "--cam")
    assert parse_numbers("96x80", 2, "--size") == (96.0, 80.0)


def test_a_missing_camera_is_recovered_from_emocas_render(tmp_path, model):
    folder = tmp_path / "codes" / "0" / "face"
    write_folder(folder)
    codes = read_codes(folder)
    size = 112
    target = render_codes(model, codes, TRUE_CAM, crop_frame_box(size), (size, size))
    fit = fit_camera_to_render(model, codes, target.image_uint8())
    assert fit.method == "silhouette" and fit.score > 0.97  # the quality is reported
    assert fit.cam[0] == pytest.approx(TRUE_CAM[0], rel=0.01)
    np.testing.assert_allclose(fit.cam[1:], TRUE_CAM[1:], atol=0.001)  # 0.001 ~ 0.4 px here


def test_camera_comes_from_the_user_then_cam_npy_then_the_fit(tmp_path, model):
    codes = read_codes(_folder_with(tmp_path / "a", cam=TRUE_CAM))
    assert camera_for(model, codes, (6.0, 0.0, 0.0)).method == "given"
    assert camera_for(model, codes).method == "cam.npy"
    bare = read_codes(_folder_with(tmp_path / "b"))
    with pytest.raises(CodesError, match="no camera.*--cam"):
        camera_for(model, bare)
    crop = render_codes(model, bare, TRUE_CAM, crop_frame_box(64), (64, 64)).image_uint8()
    assert camera_for(model, bare, render_crop=crop).method == "silhouette"
    with pytest.raises(CodesError, match="render is empty"):
        fit_camera_to_render(model, bare, np.zeros_like(crop))


def _folder_with(folder, cam=None):
    write_folder(folder, cam=cam)
    return folder


def test_a_camera_is_recovered_from_landmarks(model):
    codes = FlameCodes(**{k: v for k, v in face_codes(3, -10.0, 0.0, np.random.default_rng(2)).items()
                          if k in ("shape", "exp", "pose")})  # fmt: skip
    verts = mesh(model, codes)
    points = verts[0, torch.arange(0, verts.shape[1], 7)]  # stand-ins for 68 landmarks
    pixels = project(
        points[None], torch.tensor(TRUE_CAM)[None], torch.tensor([crop_frame_box(224)])
    )
    fit = fit_camera_to_landmarks(points[:, :2].numpy(), pixels[0, :, :2].numpy())
    np.testing.assert_allclose(fit.cam, TRUE_CAM, rtol=1e-4, atol=1e-6)
    assert fit.method == "landmarks" and fit.score == pytest.approx(1.0, abs=1e-4)


def test_raw_siblings_give_the_render_and_the_original_canvas(tmp_path):
    from PIL import Image

    raw = tmp_path / "raw"
    folder = raw / "codes" / "0" / "face"
    write_folder(folder)
    assert sibling_render(folder) is None
    assert canvas_for(folder).kind == "crop" and canvas_for(folder).photo is None
    (raw / "geometry_detail" / "0").mkdir(parents=True)
    (raw / "images" / "0").mkdir(parents=True)
    Image.new("RGB", (224, 224)).save(raw / "geometry_detail" / "0" / "face.png")
    Image.new("RGB", (160, 120), (9, 9, 9)).save(raw / "images" / "0" / "face.jpg")
    (raw / "annotations.csv").write_text(
        "subDirectory_filePath,face_x,face_y,face_width,face_height\n0/face.jpg,40,20,60,80\n"
    )
    assert sibling_render(folder) == (raw / "geometry_detail" / "0" / "face.png").resolve()
    canvas = canvas_for(folder)
    assert canvas.kind == "original" and canvas.size == (160, 120)
    assert canvas.crop_box == pytest.approx((20.0, 10.0, 100.0))  # 1.25 x 80, centred
    assert canvas_for(folder, size=(96, 80)).crop_box == pytest.approx((8.0, 0.0, 79.0))


def test_class_means_and_blending_hit_both_ends_exactly():
    rng = np.random.default_rng(0)
    codes = [FlameCodes(**{k: v for k, v in face_codes(e, 0.0, 0.0, rng).items()
                           if k in ("shape", "exp", "pose")}) for e in (1, 1, 2)]  # fmt: skip
    means = class_means(codes, [1, 1, 2])
    np.testing.assert_allclose(means.exp[1], (codes[0].exp + codes[1].exp) / 2, rtol=1e-6)
    assert list(means.count) == [0, 2, 1, 0, 0, 0, 0, 0]
    face = codes[2]
    same = blend_expression(face, means, 1, 0.0)
    np.testing.assert_array_equal(same.exp, face.exp)
    np.testing.assert_array_equal(same.pose, face.pose)
    full = blend_expression(face, means, 1, 1.0)
    np.testing.assert_array_equal(full.exp, means.exp[1])
    np.testing.assert_array_equal(full.pose[3:], means.jaw[1])
    np.testing.assert_array_equal(full.pose[:3], face.pose[:3])  # the head does not turn
    np.testing.assert_array_equal(full.shape, face.shape)  # the same person
    with pytest.raises(CodesError, match="no mean codes for 'anger'"):
        blend_expression(face, means, expression_index("angry"), 0.5)
    assert expression_index("Happy") == expression_index("1") == 1
    with pytest.raises(CodesError, match="choose one of neutral"):
        expression_index("joyful")


def test_expression_means_round_trip_through_npz(tmp_path):
    means = ExpressionMeans(np.ones((8, 50), np.float32), np.zeros((8, 3), np.float32),
                            np.arange(8))  # fmt: skip
    loaded = ExpressionMeans.load(means.save(tmp_path / "expression_codes.npz"))
    np.testing.assert_array_equal(loaded.exp, means.exp)
    assert list(loaded.count) == list(range(8))
    with pytest.raises(CodesError, match="no such file.*prepare writes"):
        ExpressionMeans.load(tmp_path / "none.npz")
