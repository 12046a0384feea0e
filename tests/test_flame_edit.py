"""``render`` and ``edit``: FLAME codes -> maps -> faces, as a user runs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conditioners.codes import ExpressionMeans, blend_expression, read_codes
from conditioners.flame_model import FlameModel
from conditioners.posed import draw, pose_folder
from controlnet_emo.cli.main import main
from controlnet_emo.synthetic.flame import (
    class_codes,
    face_codes,
    write_codes,
    write_synthetic_flame,
)
from tests.runs import SIZE, make_run

CAM = np.array([7.0, 0.0, 0.01], np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic FLAME-format model, two code folders (one without a camera, with EMOCA's
    render beside it) and class means in which 'happy' smiles wide with the jaw open."""
    root = tmp_path_factory.mktemp("flame")
    model_path = write_synthetic_flame(root / "generic_model.npz")
    model = FlameModel.from_file(model_path)
    rng = np.random.default_rng(0)
    write_codes(root / "raw" / "codes" / "0" / "a", face_codes(0, 10.0, 0.0, rng), CAM)
    write_codes(root / "raw" / "codes" / "0" / "b", face_codes(2, -5.0, 3.0, rng), None)
    exp = np.zeros((8, 50), np.float32)
    jaw = np.zeros((8, 3), np.float32)
    for e in range(8):
        exp[e], jaw[e, 0] = class_codes(e)
    exp[1, 0], jaw[1, 0] = 4.0, 0.4
    means = ExpressionMeans(exp, jaw, np.full(8, 3))
    means.save(root / "expression_codes.npz")
    # EMOCA's crop-frame render of b, so its missing camera can be fitted
    posed = pose_folder(model, root / "raw" / "codes" / "0" / "b", cam=tuple(CAM))
    Image.fromarray(draw(model, posed).image_uint8()).save(
        _mkdir(root / "raw" / "geometry_detail" / "0") / "b.png"
    )
    return root, model_path, model, means


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_render_writes_one_png_or_a_folder_of_them(world, tmp_path, capsys):
    root, model_path, _, _ = world
    out = tmp_path / "a.png"
    args = ["render", "--flame-model", model_path, "--size", "96x80"]
    assert cli(*args, "--codes", root / "raw" / "codes" / "0" / "a", "--out", out, "--depth") == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (80, 96, 3) and 0.05 < (image.max(-1) > 0).mean() < 0.8
    assert np.asarray(Image.open(tmp_path / "a_depth.png")).dtype == np.uint16
    assert "cam.npy" in capsys.readouterr().out
    assert cli(*args, "--codes", root / "raw" / "codes", "--out", tmp_path / "all") == 0
    assert sorted(p.name for p in (tmp_path / "all" / "0").iterdir()) == ["a.png", "b.png"]
    assert "b.png  cam 7.0" in capsys.readouterr().out  # b's camera fitted: s = 7.0..


def test_render_errors_are_one_line_and_exit_2(world, tmp_path, capsys):
    root, model_path, _, _ = world
    codes = str(root / "raw" / "codes" / "0" / "a")
    cases = [
        (["--flame-model", str(tmp_path / "none.pkl"), "--codes", codes], "registration required"),
        (["--flame-model", str(model_path), "--codes", str(tmp_path)], "no code folder"),
        (["--flame-model", str(model_path), "--codes", codes, "--cam", "7,0"], "3 numbers"),
    ]
    for extra, message in cases:
        assert main(["render", *extra, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    bare = tmp_path / "codes" / "c"
    write_codes(bare, face_codes(1, 0.0, 0.0, np.random.default_rng(1)), None)
    assert (
        cli("render", "--flame-model", model_path, "--codes", bare, "--out", tmp_path / "c.png")
        == 2
    )
    assert "no camera" in capsys.readouterr().err


def test_edit_at_strength_0_is_the_original_render_and_at_1_the_class_mean(world):
    root, _, model, means = world
    posed = pose_folder(model, root / "raw" / "codes" / "0" / "a")
    original = draw(model, posed)
    unchanged = draw(model, posed, blend_expression(posed.codes, means, 1, 0.0))
    torch.testing.assert_close(unchanged.image, original.image, rtol=0, atol=0)
    torch.testing.assert_close(unchanged.depth, original.depth, rtol=0, atol=0)
    full = blend_expression(posed.codes, means, 1, 1.0)
    np.testing.assert_array_equal(full.exp, means.exp[1])
    np.testing.assert_array_equal(full.pose[3:], means.jaw[1])
    np.testing.assert_array_equal(full.pose[:3], posed.codes.pose[:3])
    assert not torch.equal(draw(model, posed, full).image, original.image)  # the smile shows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("edit") / "run", conditions=["flame", "depth"])[0]


def test_edit_end_to_end_writes_the_sheet_and_the_sweep(world, run, tmp_path, capsys):
    root, model_path, _, _ = world
    common = ["edit", "--model", run, "--flame-model", model_path, "--codes",
              root / "raw" / "codes" / "0" / "b", "--expression", "happy", "--steps", "2",
              "--device", "cpu"]  # fmt: skip
    means = ["--expression-codes", root / "expression_codes.npz"]
    out = tmp_path / "edit.png"
    assert cli(*common, *means, "--strength", "0.8", "--out", out) == 0
    sheet = Image.open(out)
    tile = max(SIZE, 256)  # panels shown at a size a person can judge
    assert sheet.size == (4 * tile, tile)  # photo | original | edited | generated
    assert "happy" in sheet.text["controlnet_emo"] and (tmp_path / "edit_face.png").is_file()
    tiles = np.asarray(sheet.convert("RGB")).reshape(tile, 4, tile, 3).transpose(1, 0, 2, 3)
    assert tiles[1].max() > 0 and not np.array_equal(tiles[1][32:], tiles[2][32:])  # edited
    assert cli(*common, *means, "--sweep", "--out", tmp_path / "sweep.png") == 0
    assert Image.open(tmp_path / "sweep.png").size == (6 * tile, 2 * tile)
    capsys.readouterr()
    assert cli(*common, *means, "--expression", "joyful", "--out", out) == 2
    assert "choose one of neutral" in capsys.readouterr().err
    assert cli(*common, "--out", out) == 2  # the run's data.root holds no class means
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expression_codes.npz: no such file" in err


def test_edit_keeps_identity_and_pose_of_the_codes(world):
    root, _, model, means = world
    codes = read_codes(root / "raw" / "codes" / "0" / "b")
    edited = blend_expression(codes, means, 3, 0.5)
    np.testing.assert_array_equal(edited.shape, codes.shape)
    np.testing.assert_allclose(edited.exp, 0.5 * codes.exp + 0.5 * means.exp[3], rtol=1e-6)


def test_skeleton_is_drawn_from_the_projected_landmark_embedding(world, tmp_path):
    from conditioners.flame_model import LandmarkEmbedding
    from conditioners.render import project
    from controlnet_emo.inference.edit import landmark_skeleton

    root, _, model, _ = world
    rng = np.random.default_rng(3)
    front = torch.nonzero(model.v_template[model.faces].mean(1)[:, 2] > 0.05)[:, 0].numpy()
    np.savez(tmp_path / "emb.npz", lmk_faces_idx=rng.choice(front, 68),
             lmk_bary_coords=np.full((68, 3), 1 / 3))  # fmt: skip
    embedding = LandmarkEmbedding.from_file(tmp_path / "emb.npz")
    posed = pose_folder(model, root / "raw" / "codes" / "0" / "a", size=(96, 96))
    skeleton = landmark_skeleton(model, embedding, posed, posed.codes)
    assert skeleton.shape == (96, 96, 3) and skeleton.any()
    verts = model(*posed.codes.tensors()).vertices
    uv = project(embedding.points(verts, model.faces), torch.tensor(posed.fit.cam)[None],
                 torch.tensor([posed.canvas.crop_box]))[0, :, :2]  # fmt: skip
    ys, xs = np.nonzero(skeleton.max(-1))
    assert abs(xs.mean() - float(uv[:, 0].mean())) < 12  # drawn where the landmarks project
    assert abs(ys.mean() - float(uv[:, 1].mean())) < 12
