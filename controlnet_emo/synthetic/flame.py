"""A synthetic model in FLAME's file format, and FLAME-style codes for the synthetic faces.

Why: FLAME itself is licence-gated and never ships with us, yet the code path codes -> mesh ->
render -> prepare -> train -> edit must run in the tests and the demo. This builds a small
closed "head" (a deformed ellipsoid with a nose, eye sockets and a jaw) with FLAME's keys,
joint layout and units (metres, y up, z towards the camera), writes it as ``.npz`` or as a
``.pkl`` whose arrays are pickled the way FLAME 2020's are (chumpy ``Ch`` objects, a scipy
sparse ``J_regressor``), without chumpy or scipy installed.
"""

from __future__ import annotations

import copyreg
import io
import math
import pickle
from pathlib import Path

import numpy as np

N_SHAPE, N_EXPRESSION = 100, 100  # FLAME: 300 + 100; the loader takes the last 100 as expression
RADII = np.array([0.075, 0.095, 0.085])  # head half-extents, metres (x right, y up, z front)
ROOT = 2**32 - 1  # FLAME's kintree_table marks the root's parent so
# Expression class (0..7) -> (a few leading expression codes, jaw opening in radians). The
# first synthetic components mean: 0 smile, 1 lower lip down, 2 brows up, 3 brows together,
# 4 mouth corners down, 5 lips pressed.
CLASS_CODES = {
    0: ((0.0,), 0.0),
    1: ((2.5, 0.3, 0.5), 0.05),
    2: ((-0.5, 0.0, 0.8, 1.2, 2.0), 0.0),
    3: ((0.0, 1.0, 2.5, 0.0, 0.0), 0.3),
    4: ((-0.5, 1.0, 2.0, 1.5, 1.0), 0.2),
    5: ((-1.0, 0.0, -1.0, 1.5, 1.0, 1.5), 0.03),
    6: ((-0.5, 0.0, -2.0, 2.5, 0.5, 2.0), 0.0),
    7: ((1.2, 0.0, 0.0, 0.5, -0.8), 0.0),
}


def _bump(directions: np.ndarray, centre, sigma: float) -> np.ndarray:
    c = np.asarray(centre, np.float64)
    c = c / np.linalg.norm(c)
    return np.exp(-np.sum((directions - c) ** 2, -1) / (2 * sigma**2))


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0, 1)
    return t * t * (3 - 2 * t)


def build_synthetic_flame(n_lat: int = 24, n_lon: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """The model's arrays under FLAME's keys (float64, as FLAME's own file holds them)."""
    rng = np.random.default_rng(seed)
    theta = np.linspace(0, math.pi, n_lat + 1)[1:-1]  # polar angle from the top
    phi = np.linspace(0, 2 * math.pi, n_lon, endpoint=False)  # 0 = front (+z)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1).reshape(-1, 3)
    unit = np.vstack([[0, 1, 0], ring, [0, -1, 0]])  # (V, 3) directions on the unit sphere
    n_v = len(unit)
    faces = []
    for j in range(n_lon):  # caps, then quads split in two, wound outwards
        k = (j + 1) % n_lon
        faces.append((0, 1 + j, 1 + k))
        last = 1 + (n_lat - 2) * n_lon
        faces.append((n_v - 1, last + k, last + j))
    for i in range(n_lat - 2):
        for j in range(n_lon):
            k = (j + 1) % n_lon
            a, b = 1 + i * n_lon + j, 1 + i * n_lon + k
            c, d = a + n_lon, b + n_lon
            faces += [(a, d, b), (a, c, d)]
    faces = np.array(faces, np.int64)

    relief = (  # nose, eye sockets, a flatter face front, brow ridge and chin (metres)
        0.028 * _bump(unit, (0, -0.08, 1), 0.14)
        - 0.014 * (_bump(unit, (0.33, 0.22, 0.9), 0.13) + _bump(unit, (-0.33, 0.22, 0.9), 0.13))
        + 0.006 * _bump(unit, (0, 0.38, 0.9), 0.2)
        + 0.006 * _bump(unit, (0, -0.75, 0.65), 0.2)
    )
    v_template = unit * RADII + unit * relief[:, None]

    front = _smoothstep(unit[:, 2], -0.1, 0.5)
    shape_fields = _smooth_fields(unit, N_SHAPE, rng, 0.004)
    exp_fields = _smooth_fields(unit, N_EXPRESSION, rng, 0.0015) * front[:, None, None]
    exp_fields[..., :6] = _semantic_expressions(unit)
    shapedirs = np.concatenate([shape_fields, exp_fields], -1)  # (V, 3, 200)
    posedirs = _smooth_fields(unit, 36, rng, 0.002)  # (V, 3, 36)

    targets = (
        np.array(
            [
                [0, -0.85, -0.1],
                [0, -0.55, -0.2],
                [0, -0.3, -0.25],
                [0.33, 0.22, 0.6],
                [-0.33, 0.22, 0.6],
            ]
        )
        * RADII
    )  # global, neck, jaw, left eye, right eye
    regressor = np.zeros((5, n_v))
    for j, target in enumerate(targets):
        for offset in (np.array([1, 0, 0]), np.array([0, 0, 1])):  # symmetric pairs around it
            for sign in (1, -1):
                probe = target + sign * offset * RADII * 0.6
                regressor[j, np.argmin(np.linalg.norm(v_template - probe, axis=1))] += 0.25
    weights = np.zeros((n_v, 5))
    weights[:, 0] = _smoothstep(-unit[:, 1], 0.75, 0.95)
    weights[:, 2] = _smoothstep(-unit[:, 1], 0.35, 0.55) * _smoothstep(unit[:, 2], -0.1, 0.4)
    weights[:, 3] = 0.6 * _bump(unit, (0.33, 0.22, 0.9), 0.06)
    weights[:, 4] = 0.6 * _bump(unit, (-0.33, 0.22, 0.9), 0.06)
    weights[:, 2:] = np.minimum(weights[:, 2:], (1 - weights[:, :1]))
    weights[:, 1] = 1 - weights[:, [0, 2, 3, 4]].sum(1)
    return {
        "v_template": v_template,
        "f": faces.astype(np.uint32),
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": np.array([[ROOT, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
    }


def _smooth_fields(unit: np.ndarray, n: int, rng: np.random.Generator, amp: float) -> np.ndarray:
    """(V, 3, n) low-frequency displacement fields, weaker for later components (as PCA)."""
    x, y, z = unit.T
    mono = np.stack([np.ones_like(x), x, y, z, x * y, y * z, x * z, x * x, y * y, z * z,
                     x * y * z, x * x * y, y * y * z, z * z * x], -1)  # fmt: skip
    coef = rng.standard_normal((mono.shape[1], 3, n))
    fields = np.einsum("vm,mcn->vcn", mono, coef) / math.sqrt(mono.shape[1])
    return amp * fields / (1 + np.arange(n) / 10.0)


def _semantic_expressions(unit: np.ndarray) -> np.ndarray:
    """(V, 3, 6) the leading expression components: visible, nameable motions (metres)."""
    corners = _bump(unit, (0.32, -0.45, 0.88), 0.12) + _bump(unit, (-0.32, -0.45, 0.88), 0.12)
    side = np.sign(unit[:, 0])
    one = np.ones_like(side)
    lower = _bump(unit, (0, -0.55, 0.85), 0.14)
    brows = _bump(unit, (0.3, 0.4, 0.87), 0.14) + _bump(unit, (-0.3, 0.4, 0.87), 0.14)
    glabella = _bump(unit, (0, 0.35, 0.94), 0.1)
    lips = _bump(unit, (0, -0.45, 0.9), 0.12)
    out = np.zeros((len(unit), 3, 6))
    out[:, :, 0] = np.stack([0.4 * side, one, -0.4 * one], -1) * corners[:, None] * 0.004
    out[:, :, 1] = np.array([0, -1.0, 0.2]) * lower[:, None] * 0.004
    out[:, :, 2] = np.array([0, 1.0, 0.1]) * brows[:, None] * 0.003
    out[:, :, 3] = np.stack([-side, -0.6 * one, -0.3 * one], -1)
    out[:, :, 3] *= (brows + glabella)[:, None] * 0.002
    out[:, :, 4] = np.array([0, -1.0, 0]) * corners[:, None] * 0.003
    out[:, :, 5] = np.array([0, 0, -1.0]) * lips[:, None] * 0.003
    return out


# ---------------------------------------------------------------------------------------------
# Writing in FLAME's layouts


class ChumpyStyle:
    """Pickles as FLAME's chumpy arrays do: class ``chumpy.ch.Ch``, the array in state 'x'."""

    pickle_as = ("chumpy.ch", "Ch")

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __reduce__(self):
        return copyreg._reconstructor, (type(self), object, None), {"x": self.x}


class SparseStyle:
    """Pickles as a scipy ``csc_matrix`` (its __dict__: data, indices, indptr, _shape)."""

    pickle_as = ("scipy.sparse._csc", "csc_matrix")

    def __init__(self, dense: np.ndarray) -> None:
        cols = [np.flatnonzero(dense[:, j]) for j in range(dense.shape[1])]
        self.state = {
            "data": np.concatenate([dense[c, j] for j, c in enumerate(cols)]),
            "indices": np.concatenate(cols).astype(np.int32),
            "indptr": np.cumsum([0] + [len(c) for c in cols]).astype(np.int32),
            "_shape": dense.shape,
            "maxprint": 50,
        }

    def __reduce__(self):
        return copyreg._reconstructor, (type(self), object, None), self.state


class _ForeignNamePickler(pickle._Pickler):
    """Writes our stand-in classes under the foreign names FLAME's pickle uses."""

    def save_global(self, obj, name=None):
        foreign = getattr(obj, "pickle_as", None) if isinstance(obj, type) else None
        if foreign is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{foreign[0]}\n{foreign[1]}\n".encode())
        self.memoize(obj)


def flame_pickle_bytes(arrays: dict, chumpy: bool = True, protocol: int = 2) -> bytes:
    """FLAME 2020-style pickle: chumpy ``shapedirs``/``v_template``/``posedirs``, sparse
    ``J_regressor`` (what a real ``generic_model.pkl`` looks like to an unpickler)."""
    data = dict(arrays)
    if chumpy:
        for key in ("v_template", "shapedirs", "posedirs"):
            data[key] = ChumpyStyle(np.asarray(arrays[key]))
        data["J_regressor"] = SparseStyle(np.asarray(arrays["J_regressor"]))
    data["bs_style"], data["bs_type"] = "lbs", "lrotmin"
    buf = io.BytesIO()
    _ForeignNamePickler(buf, protocol=protocol).dump(data)
    return buf.getvalue()


def write_synthetic_flame(
    path: str | Path, seed: int = 0, chumpy: bool = True, protocol: int = 2
) -> Path:
    """Write the synthetic model as ``.npz`` or (any other suffix) a FLAME-style ``.pkl``
    at pickle ``protocol`` (FLAME 2020: 2 with chumpy; FLAME 2023: plain numpy, newer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = build_synthetic_flame(seed=seed)
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        path.write_bytes(flame_pickle_bytes(arrays, chumpy=chumpy, protocol=protocol))
    return path


# ---------------------------------------------------------------------------------------------
# Codes for one synthetic face


def _matrix_to_axis_angle(r: np.ndarray) -> np.ndarray:
    angle = math.acos(float(np.clip((np.trace(r) - 1) / 2, -1, 1)))
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    return axis / (2 * math.sin(angle)) * angle


def class_codes(expression: int, n_exp: int = 50) -> tuple[np.ndarray, float]:
    """(n_exp,) expression codes and jaw angle of an expression class's prototype."""
    leading, jaw = CLASS_CODES[int(expression)]
    exp = np.zeros(n_exp)
    exp[: len(leading)] = leading
    return exp, jaw


def face_codes(
    expression: int, yaw: float, roll: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """EMOCA-layout codes of one face: its class prototype plus person-to-person noise.

    ``yaw`` > 0 turns the nose to the image right, ``roll`` tilts clockwise on screen
    (degrees, as `FaceParams`).
    """
    exp, jaw = class_codes(expression)
    exp = exp + 0.25 * rng.standard_normal(exp.shape)
    y, r = math.radians(yaw), math.radians(-roll)
    rot_y = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rot_z = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    jaw_angle = max(0.0, jaw + 0.03 * rng.standard_normal())
    pose = np.concatenate([_matrix_to_axis_angle(rot_z @ rot_y), [jaw_angle, 0, 0]])
    return {
        "shape": (0.8 * rng.standard_normal(100)).astype(np.float32),
        "exp": exp.astype(np.float32),
        "pose": pose.astype(np.float32),
        "tex": np.zeros(50, np.float32),
        "detail": np.zeros(128, np.float32),
    }


def synthetic_camera(
    vertices: np.ndarray, face_box: tuple[float, float, float, float], crop_scale: float = 1.25
) -> np.ndarray:
    """(s, tx, ty) that lays the posed (V, 3) mesh over a face box in EMOCA's crop frame.

    The crop is the box's centred square of side ``crop_scale`` x its longer side, so in crop
    coordinates the box spans +-w/side by +-h/side. The head is drawn a little taller than
    the box (which starts at the forehead) with its chin on the box's bottom edge.
    """
    _, _, w, h = face_box
    side = crop_scale * max(w, h)
    lo, hi = vertices[:, :2].min(0), vertices[:, :2].max(0)
    s = 2 * h / side * 1.15 / float(hi[1] - lo[1])
    tx = -float(lo[0] + hi[0]) / 2
    ty = -h / (side * s) - float(lo[1])
    return np.array([s, tx, ty], np.float32)


def write_codes(folder: str | Path, codes: dict[str, np.ndarray], cam: np.ndarray | None) -> None:
    """EMOCA's ``--save_codes`` layout: one (1, n) ``.npy`` per code (+ ``cam.npy`` if given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in codes.items():
        np.save(folder / f"{name}.npy", np.asarray(value, np.float32)[None])
    if cam is not None:
        np.save(folder / "cam.npy", np.asarray(cam, np.float32)[None])


FLAME_MODEL_FILE = "flame_model.npz"  # where `synth --codes` puts the synthetic model


class SyntheticCodes:
    """`synth --codes`: the synthetic model once (``RAW/flame_model.npz``), then per face its
    EMOCA-layout codes and, as EMOCA's ``geometry_detail/``, the crop-frame render of them."""

    def __init__(self, raw: str | Path, camera: bool = False, crop_size: int = 224) -> None:
        from conditioners.flame_model import FlameModel

        self.model = FlameModel.from_file(write_synthetic_flame(Path(raw) / FLAME_MODEL_FILE))
        self.camera, self.crop_size = camera, crop_size

    def write(self, folder: str | Path, expression: int, yaw: float, roll: float,
              face_box: tuple, rng: np.random.Generator) -> np.ndarray:  # fmt: skip
        """Write one face's codes (``cam.npy`` only if ``camera``); return its (S, S, 3) render."""
        import torch

        from conditioners.render import crop_frame_box, render_mesh

        codes = face_codes(expression, yaw, roll, rng)
        tensors = [torch.from_numpy(codes[k])[None] for k in ("shape", "exp", "pose")]
        with torch.no_grad():
            verts = self.model(*tensors).vertices
        cam = synthetic_camera(verts[0].numpy(), face_box)
        write_codes(folder, codes, cam if self.camera else None)
        size = self.crop_size
        render = render_mesh(verts, self.model.faces, torch.from_numpy(cam)[None],
                             torch.tensor([crop_frame_box(size)]), (size, size))  # fmt: skip
        return render.image_uint8()
