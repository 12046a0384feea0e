"""FLAME layer: the user's model file loads safely and the mesh moves as FLAME's does."""

from __future__ import annotations

import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from conditioners.flame_model import (
    FLAME_URL,
    FlameModel,
    FlameModelError,
    LandmarkEmbedding,
    axis_angle_to_matrix,
)
from controlnet_emo.synthetic.flame import build_synthetic_flame, write_synthetic_flame


@pytest.fixture(scope="module")
def arrays():
    return build_synthetic_flame()


def _hand_model() -> dict[str, np.ndarray]:
    """Six vertices, joints at vertices 1..5 (global, neck, jaw, eyes); vertex 0 on the jaw."""
    v = np.array([[0, -1, 1], [0, -2, 0], [0, -1.5, 0], [0, -1, 0], [1, 0, 0], [-1, 0, 0.0]])
    weights = np.zeros((6, 5))
    weights[0, 2] = 1.0
    weights[1:, 1] = 1.0
    shapedirs = np.zeros((6, 3, 102))
    shapedirs[0, 0, 0] = 0.5  # shape 0 moves vertex 0 right
    shapedirs[0, 2, 2] = 0.25  # expression 0 moves it forward
    posedirs = np.zeros((6, 3, 36))
    posedirs[0, 1, 9 + 4] = 0.5  # jaw's (R[1, 1] - 1) moves vertex 0 up
    regressor = np.zeros((5, 6))
    regressor[np.arange(5), np.arange(1, 6)] = 1.0
    kintree = np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    return dict(v_template=v, f=faces, shapedirs=shapedirs, posedirs=posedirs,
                J_regressor=regressor, weights=weights, kintree_table=kintree)  # fmt: skip


def test_blendshapes_add_shape_and_expression_components(arrays):
    model = FlameModel(arrays)
    rng = np.random.default_rng(1)
    shape, exp = rng.standard_normal((2, 100)), rng.standard_normal((2, 50))
    out = model(torch.tensor(shape), torch.tensor(exp), torch.zeros(2, 6))
    dirs = arrays["shapedirs"]
    expected = (
        arrays["v_template"][None]
        + np.einsum("vcs,bs->bvc", dirs[:, :, :100], shape)
        + np.einsum("vce,be->bvc", dirs[:, :, 100:150], exp)  # expression follows the shape
    )
    np.testing.assert_allclose(out.vertices.numpy(), expected, atol=1e-5)


def test_skinning_and_pose_correctives_match_hand_computation():
    model = FlameModel(_hand_model())
    jaw, glob = math.pi / 2, math.pi / 2
    pose = torch.tensor([[0.0, glob, 0.0, jaw, 0.0, 0.0]])  # global about y, jaw about x
    exp = torch.zeros(1, 50)
    exp[0, 0] = 2.0
    out = model(torch.tensor([[1.0]]), exp, pose)
    v0 = np.array([0.5, -1.0, 1.0 + 0.5])  # shape, expression
    v0[1] += 0.5 * (math.cos(jaw) - 1)  # the pose corrective of the jaw
    j_global, j_jaw = np.array([0, -2.0, 0]), np.array([0, -1.0, 0])
    rot_x = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0.0]])
    rot_y = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0.0]])
    expected = rot_y @ (rot_x @ (v0 - j_jaw) + j_jaw - j_global) + j_global
    np.testing.assert_allclose(out.vertices[0, 0].numpy(), expected, atol=1e-5)
    # the rest of the head follows the neck, i.e. only the global rotation
    v1 = np.array([1.0, 0, 0])
    np.testing.assert_allclose(
        out.vertices[0, 4].numpy(), rot_y @ (v1 - j_global) + j_global, atol=1e-5
    )
    np.testing.assert_allclose(
        out.joints[0, 2].numpy(), rot_y @ (j_jaw - j_global) + j_global, atol=1e-5
    )


def test_emoca_pose_is_global_then_jaw():
    model = FlameModel(_hand_model())
    six = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0, 0.0]])
    fifteen = torch.zeros(1, 15)
    fifteen[0, :3], fifteen[0, 6:9] = six[0, :3], six[0, 3:]
    shape, exp = torch.zeros(1, 1), torch.zeros(1, 1)
    torch.testing.assert_close(model(shape, exp, six).vertices, model(shape, exp, fifteen).vertices)
    r = axis_angle_to_matrix(torch.tensor([[0.0, 0.0, math.pi / 2]]))[0]
    torch.testing.assert_close(
        r @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("suffix", [".pkl", ".npz"])
def test_pkl_with_chumpy_arrays_and_npz_give_the_same_mesh(tmp_path, arrays, suffix):
    path = write_synthetic_flame(tmp_path / f"generic_model{suffix}")
    assert "chumpy" not in sys.modules  # read as plain arrays, chumpy never imported
    model = FlameModel.from_file(path)
    codes = (
        torch.ones(1, 100) * 0.3,
        torch.ones(1, 50) * 0.5,
        torch.tensor([[0.1, 0.2, 0, 0.2, 0, 0]]),
    )
    reference = FlameModel(arrays)(*codes).vertices
    torch.testing.assert_close(model(*codes).vertices, reference)


@pytest.mark.parametrize("protocol", [4, 5])
def test_flame_2023_style_plain_numpy_pkl_at_a_newer_protocol_reads(tmp_path, arrays, protocol):
    """FLAME 2023's .pkl: plain numpy arrays (no chumpy, no scipy) at pickle protocol 4 or 5."""
    pkl = write_synthetic_flame(tmp_path / "flame2023.pkl", chumpy=False, protocol=protocol)
    npz = write_synthetic_flame(tmp_path / "flame2023.npz")
    blob = pkl.read_bytes()
    assert blob[:2] == bytes([pickle.PROTO[0], protocol])  # written at the protocol asked for
    assert b"chumpy" not in blob and b"scipy" not in blob
    rng = np.random.default_rng(3)
    codes = (
        torch.tensor(rng.standard_normal((2, 100)) * 0.5),
        torch.tensor(rng.standard_normal((2, 50)) * 0.5),
        torch.tensor([[0.1, -0.2, 0.05, 0.25, 0, 0], [-0.05, 0.3, 0, 0.1, 0.02, 0]]),
    )
    expected = FlameModel.from_file(npz)(*codes).vertices
    assert expected.abs().max() > 0
    torch.testing.assert_close(FlameModel.from_file(pkl)(*codes).vertices, expected)


@pytest.mark.parametrize("protocol", [0, 2])
def test_chumpy_object_pickled_by_a_foreign_class_reads_as_a_plain_array(tmp_path, protocol):
    """Emulate chumpy: a class registered as chumpy.ch.Ch, its array in the pickled state."""
    module = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    module.Ch = Ch
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = types.ModuleType("chumpy"), module
    try:
        data = dict(_hand_model())
        data["shapedirs"] = Ch(data["shapedirs"])
        blob = pickle.dumps(data, protocol=protocol)
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    (tmp_path / "m.pkl").write_bytes(blob)
    model = FlameModel.from_file(tmp_path / "m.pkl")
    assert model.shapedirs.shape == (6, 3, 2) and float(model.shapedirs[0, 0, 0]) == 0.5


def test_scipy_sparse_regressor_is_read_without_running_scipy(tmp_path):
    sparse = pytest.importorskip("scipy.sparse")
    data = dict(_hand_model())
    data["J_regressor"] = sparse.csc_matrix(data["J_regressor"])
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(data, protocol=2))
    model = FlameModel.from_file(tmp_path / "m.pkl")
    np.testing.assert_array_equal(model.J_regressor.numpy(), _hand_model()["J_regressor"])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    data = dict(_hand_model(), extra=_Exploit(marker))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(FlameModelError) as err:
        FlameModel.from_file(tmp_path / "evil.pkl")
    message = str(err.value)
    assert "\n" not in message and "evil.pkl" in message and "system" in message
    assert FLAME_URL in message  # says where a genuine FLAME file comes from
    assert not marker.exists()


def test_a_missing_or_incomplete_file_says_where_flame_comes_from(tmp_path):
    with pytest.raises(FlameModelError, match="no_such.pkl.*registration required") as err:
        FlameModel.from_file(tmp_path / "no_such.pkl")
    assert FLAME_URL in str(err.value)
    data = _hand_model()
    del data["posedirs"]
    np.savez(tmp_path / "partial.npz", **data)
    with pytest.raises(FlameModelError, match="partial.npz.*missing posedirs"):
        FlameModel.from_file(tmp_path / "partial.npz")


def test_landmark_embedding_places_points_on_the_mesh(tmp_path):
    np.savez(tmp_path / "emb.npz", lmk_faces_idx=np.array([1]), lmk_bary_coords=[[0.2, 0.3, 0.5]])
    embedding = LandmarkEmbedding.from_file(tmp_path / "emb.npz")
    model = FlameModel(_hand_model())
    verts = model(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 6)).vertices
    expected = 0.2 * verts[0, 0] + 0.3 * verts[0, 2] + 0.5 * verts[0, 3]
    torch.testing.assert_close(embedding.points(verts, model.faces)[0, 0], expected)
