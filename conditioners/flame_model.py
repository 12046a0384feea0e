"""FLAME as a batched torch layer, loaded from the user's own model file without running it.

Why our own: FLAME's model files are licence-gated (https://flame.is.tue.mpg.de, registration
required), so nothing of FLAME ships with us, and the reference code is not ours to copy. The
layer follows the published model: template + shape and expression blendshapes, pose
correctives driven by the rotations of the four non-global joints, joints regressed from the
shaped mesh, linear blend skinning along the kinematic tree (global, neck, jaw, left eye,
right eye).

Why a restricted unpickler: ``generic_model.pkl`` is a Python-2 pickle, and a pickle can run
any code it names. We admit only what a FLAME file holds (numpy arrays, scipy sparse matrices,
chumpy arrays) and rebuild the last two as plain numpy arrays, so neither scipy nor chumpy is
imported; any other global is refused before it is called.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FLAME_URL = "https://flame.is.tue.mpg.de"
FLAME_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")
N_EXPRESSION_BASIS = 100  # FLAME's shapedirs end with its 100 expression components
N_JOINTS = 5  # global, neck, jaw, left eye, right eye
JAW = 2


class FlameModelError(ValueError):
    """A FLAME file that is missing, refused or malformed (one line, names the file)."""


def where_from(path: str | Path) -> str:
    return f"{path}: FLAME models come from {FLAME_URL} (registration required)"


# ---------------------------------------------------------------------------------------------
# Loading


class _Stub:
    """Stands in for a pickled chumpy or scipy class: keeps the pickled state, runs nothing."""

    kind = ""  # "chumpy" | "csc" | "csr" | "coo"
    qualified = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) form
        self.state = state if isinstance(state, dict) else {"x": state}

    def to_array(self) -> np.ndarray:
        s = self.state
        if self.kind == "chumpy":
            if "x" not in s:
                raise ValueError(f"{self.qualified} holds no stored array (a chumpy expression)")
            return np.asarray(s["x"])
        shape = tuple(int(v) for v in s.get("_shape", s.get("shape", ())))
        dense = np.zeros(shape, dtype=np.asarray(s["data"]).dtype)
        data = np.asarray(s["data"])
        if self.kind == "coo":
            rows, cols = (np.asarray(c) for c in s.get("coords", (s.get("row"), s.get("col"))))
        else:
            indptr, indices = np.asarray(s["indptr"]), np.asarray(s["indices"])
            major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
            rows, cols = (major, indices) if self.kind == "csr" else (indices, major)
        np.add.at(dense, (rows, cols), data)
        return dense


_STUBS: dict[tuple[str, str], type] = {}
_SPARSE = {"csc_matrix": "csc", "csr_matrix": "csr", "coo_matrix": "coo",
           "csc_array": "csc", "csr_array": "csr", "coo_array": "coo"}  # fmt: skip


def _stub(module: str, name: str, kind: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (_Stub,), {"kind": kind, "qualified": f"{module}.{name}"})
    return _STUBS[key]


def _reconstructor(cls, base, state):
    """copyreg._reconstructor, admitted only for our stubs (py2 pickles of chumpy objects)."""
    if not (isinstance(cls, type) and issubclass(cls, _Stub)):
        raise pickle.UnpicklingError(f"refused copyreg._reconstructor of {cls!r}")
    return cls.__new__(cls)


def _numpy_globals() -> dict[tuple[str, str], object]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own array rebuilder
    scalar = np.float64(0).__reduce__()[0]
    core = getattr(np, "_core", None) or np.core
    found = {"_reconstruct": reconstruct, "scalar": scalar, "ndarray": np.ndarray,
             "dtype": np.dtype, "_frombuffer": getattr(core.numeric, "_frombuffer", None)}  # fmt: skip
    admitted = {}
    for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                   "numpy.core.numeric", "numpy._core.numeric"):  # fmt: skip
        for name, obj in found.items():
            if obj is not None:
                admitted[(module, name)] = obj
    return admitted


_ADMITTED = {
    **_numpy_globals(),
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("_codecs", "encode"): __import__("codecs").encode,  # py3 protocol-2 bytes
}


class SafeUnpickler(pickle.Unpickler):
    """Admits numpy arrays, scipy sparse matrices and chumpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ADMITTED:
            return _ADMITTED[(module, name)]
        if module == "chumpy" or module.startswith("chumpy."):
            return _stub(module, name, "chumpy")
        if module.startswith("scipy.sparse") and name in _SPARSE:
            return _stub(module, name, _SPARSE[name])
        raise pickle.UnpicklingError(
            f"refused {module}.{name} (only numpy arrays, scipy sparse and chumpy arrays are read)"
        )


def safe_unpickle(stream) -> object:
    """Unpickle a FLAME-style file (py2 pickles need latin1) with `SafeUnpickler`."""
    return _plain(SafeUnpickler(stream, encoding="latin1").load())


def _plain(obj):
    if isinstance(obj, _Stub):
        return obj.to_array()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        return np.array([_plain(v) for v in obj.ravel()], dtype=object).reshape(obj.shape)
    return obj


def load_arrays(path: str | Path) -> dict[str, object]:
    """A .pkl (restricted unpickle), .npz (no pickles) or object .npy file -> dict of arrays."""
    path = Path(path)
    if not path.is_file():
        raise FlameModelError(f"{where_from(path)}; no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        with open(path, "rb") as f:
            if path.suffix == ".npy":  # e.g. DECA's landmark_embedding.npy: a pickled dict
                version = np.lib.format.read_magic(f)
                _, _, dtype = np.lib.format._read_array_header(f, version)
                if not dtype.hasobject:
                    raise ValueError("expected a saved dict, found a plain array")
            loaded = safe_unpickle(f)
    except pickle.UnpicklingError as err:
        raise FlameModelError(f"{where_from(path)}; {err}") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise FlameModelError(f"{where_from(path)}; cannot read it: {err}") from None
    if isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.shape == ():
        loaded = loaded.item()
    if not isinstance(loaded, dict):
        raise FlameModelError(f"{where_from(path)}; expected a dict, found {type(loaded).__name__}")
    return loaded


# ---------------------------------------------------------------------------------------------
# The layer


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) rotation (Rodrigues), smooth through zero."""
    angle = aa.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (..., 1)
    axis = aa / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*aa.shape[:-1], 3, 3)
    sin, cos = angle.sin()[..., None], angle.cos()[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(k)
    return eye + sin * k + (1 - cos) * (k @ k)


def full_pose(pose: torch.Tensor) -> torch.Tensor:
    """EMOCA's (B, 6) global + jaw, or FLAME's (B, 15) -> (B, 5, 3); neck and eyes at rest."""
    if pose.shape[-1] == 3 * N_JOINTS:
        return pose.reshape(-1, N_JOINTS, 3)
    if pose.shape[-1] != 6:
        raise ValueError(f"pose has {pose.shape[-1]} values; expected 6 (EMOCA) or 15 (FLAME)")
    out = pose.new_zeros(pose.shape[0], N_JOINTS, 3)
    out[:, 0], out[:, JAW] = pose[:, :3], pose[:, 3:6]
    return out


@dataclass
class FlameOutput:
    vertices: torch.Tensor  # (B, V, 3) posed mesh, FLAME units (metres)
    joints: torch.Tensor  # (B, 5, 3) posed joint positions


class FlameModel(torch.nn.Module):
    """FLAME forward pass: ``model(shape, exp, pose)`` -> posed vertices and joints."""

    def __init__(self, arrays: dict, source: str = "arrays") -> None:
        super().__init__()
        missing = [k for k in FLAME_KEYS if k not in arrays]
        if missing:
            raise FlameModelError(f"{where_from(source)}; missing {', '.join(missing)}")
        try:
            dirs = np.asarray(arrays["shapedirs"], np.float32)  # (V, 3, S + 100)
            verts = np.asarray(arrays["v_template"], np.float32)
            n_v = verts.shape[0]
            if dirs.shape[:2] != (n_v, 3) or dirs.shape[2] <= N_EXPRESSION_BASIS:
                raise ValueError(f"shapedirs {dirs.shape} does not fit v_template {verts.shape}")
            self.n_shape = dirs.shape[2] - N_EXPRESSION_BASIS
            regressor = np.asarray(arrays["J_regressor"], np.float32)
            kintree = np.asarray(arrays["kintree_table"]).astype(np.int64)
            parents = kintree[0].copy()
            parents[0] = -1  # FLAME stores 2**32 - 1 for the root
            self.parents = [int(p) for p in parents]
            tensors = {
                "v_template": verts,
                "shapedirs": dirs[:, :, : self.n_shape],
                "exprdirs": dirs[:, :, self.n_shape :],
                "posedirs": np.asarray(arrays["posedirs"], np.float32).reshape(n_v * 3, -1),
                "J_regressor": regressor.reshape(-1, n_v),
                "lbs_weights": np.asarray(arrays["weights"], np.float32).reshape(n_v, -1),
            }
            n_joints = tensors["J_regressor"].shape[0]
            if tensors["posedirs"].shape[1] != 9 * (n_joints - 1) or len(parents) != n_joints:
                raise ValueError("posedirs, J_regressor and kintree_table disagree on the joints")
        except (ValueError, TypeError) as err:
            raise FlameModelError(f"{where_from(source)}; malformed: {err}") from None
        for name, value in tensors.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value)))
        faces = np.asarray(arrays["f"]).astype(np.int64)
        self.register_buffer("faces", torch.from_numpy(faces))  # (F, 3)

    @classmethod
    def from_file(cls, path: str | Path) -> FlameModel:
        """Load FLAME 2020/2023 ``.pkl`` (restricted unpickle) or ``.npz`` with the same keys."""
        return cls(load_arrays(path), str(path))

    def forward(self, shape: torch.Tensor, exp: torch.Tensor, pose: torch.Tensor) -> FlameOutput:
        """(B, <=S) shape, (B, <=100) expression, (B, 6 | 15) axis-angle pose -> posed mesh.

        Shorter code vectors (EMOCA's 100 shape, 50 expression) use the leading components.
        """
        dtype = self.v_template.dtype
        shape, exp, pose = (t.to(self.v_template.device, dtype) for t in (shape, exp, pose))
        batch = shape.shape[0]
        v_shaped = (
            self.v_template
            + torch.einsum("vcs,bs->bvc", self.shapedirs[:, :, : shape.shape[1]], shape)
            + torch.einsum("vce,be->bvc", self.exprdirs[:, :, : exp.shape[1]], exp)
        )  # (B, V, 3)
        joints = torch.einsum("jv,bvc->bjc", self.J_regressor, v_shaped)  # (B, J, 3)
        rot = axis_angle_to_matrix(full_pose(pose))  # (B, J, 3, 3)
        eye = torch.eye(3, dtype=dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(batch, -1)  # (B, 9 * (J - 1))
        v_posed = v_shaped + (pose_feature @ self.posedirs.T).reshape(batch, -1, 3)
        transforms, posed_joints = self._chain(rot, joints)  # (B, J, 4, 4), (B, J, 3)
        per_vertex = torch.einsum("vj,bjxy->bvxy", self.lbs_weights, transforms)  # (B, V, 4, 4)
        verts = (per_vertex[..., :3, :3] @ v_posed[..., None])[..., 0] + per_vertex[..., :3, 3]
        return FlameOutput(verts, posed_joints)

    def _chain(self, rot: torch.Tensor, joints: torch.Tensor):
        """World transforms of each joint, relative to the rest pose (what LBS applies)."""
        batch, n_joints = rot.shape[:2]
        world: list[torch.Tensor] = []
        for j in range(n_joints):
            parent = self.parents[j]
            offset = joints[:, j] - (joints[:, parent] if parent >= 0 else 0)
            local = _rigid(rot[:, j], offset)  # (B, 4, 4)
            world.append(local if parent < 0 else world[parent] @ local)
        g = torch.stack(world, 1)  # (B, J, 4, 4)
        posed_joints = g[..., :3, 3]
        rest = (g[..., :3, :3] @ joints[..., None])[..., 0]  # move each joint's rest position
        g = torch.cat([g[..., :3, :3], (posed_joints - rest)[..., None]], -1)
        bottom = g.new_tensor([0, 0, 0, 1]).expand(batch, n_joints, 1, 4)
        return torch.cat([g, bottom], -2), posed_joints


def _rigid(rot: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    top = torch.cat([rot, t[..., None]], -1)  # (B, 3, 4)
    bottom = top.new_tensor([0, 0, 0, 1]).expand(top.shape[0], 1, 4)
    return torch.cat([top, bottom], -2)


# ---------------------------------------------------------------------------------------------
# Landmarks (optional: the user's landmark embedding file)

_EMBEDDING_KEYS = (
    ("lmk_faces_idx", "lmk_bary_coords"),
    ("full_lmk_faces_idx", "full_lmk_bary_coords"),  # DECA's landmark_embedding.npy
    ("lmk_face_idx", "lmk_b_coords"),  # FLAME's static embedding
)


@dataclass
class LandmarkEmbedding:
    """Each landmark as a point on a mesh face: which face, and its barycentric weights."""

    faces_idx: torch.Tensor  # (L,) face indices
    bary: torch.Tensor  # (L, 3)

    @classmethod
    def from_file(cls, path: str | Path) -> LandmarkEmbedding:
        arrays = load_arrays(path)
        for idx_key, bary_key in _EMBEDDING_KEYS:
            if idx_key in arrays and bary_key in arrays:
                idx = np.asarray(arrays[idx_key]).astype(np.int64).reshape(-1)
                bary = np.asarray(arrays[bary_key], np.float32).reshape(-1, 3)
                return cls(torch.from_numpy(idx), torch.from_numpy(bary))
        raise FlameModelError(f"{path}: no landmark embedding (lmk_faces_idx, lmk_bary_coords)")

    def points(self, vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """(B, V, 3) mesh -> (B, L, 3) landmark positions."""
        tri = vertices[:, faces[self.faces_idx.to(faces.device)]]  # (B, L, 3, 3)
        return (tri * self.bary.to(vertices)[None, :, :, None]).sum(2)
