"""Draw a FLAME mesh as EMOCA-style grey geometry, and its depth, straight onto the original canvas.

Why: re-canvasing EMOCA's 224 px render blurs and aliases it (a face of 600 px is an upscaled
224 px picture, a small face a resampled one). Rendering the mesh at the canvas size through
the crop transform we already know (`conditioners.flame.emoca_crop_box`) gives a sharp map
that superimposes on the photo, and the z-buffer gives a depth map from the same mesh.

Why our own rasterizer: no maintained library installs here from pip without compiling
(pytorch3d and nvdiffrast build CUDA/C++ extensions; moderngl/pyrender need an OpenGL
context). This one is plain batched torch (CPU and CUDA): every triangle enumerates the
supersampled pixel centres of its bounding box, a scatter-max keeps the nearest, so cost
follows the covered area, not faces x pixels.

Conventions (DECA/EMOCA's orthographic camera, FLAME units): a vertex (x, y, z) lands at
``s * (x + tx), s * (y + ty)`` in [-1, 1] crop coordinates, y then flipped to point down;
crop coordinate -1 is the crop square's left/top edge and +1 its right/bottom edge, which is
where `conditioners.flame.crop_to_canvas` puts crop pixels 0 and size - 1. z points to the
camera: larger is nearer. Pixel (row i, column j) is sampled at its centre (x = j, y = i).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# EMOCA-like grey geometry: a key light from the upper left, a weaker fill from the right.
LIGHTS = (((-0.45, 0.55, 1.0), 0.62), ((0.6, -0.1, 1.0), 0.26))  # (direction, intensity)
AMBIENT = 0.1
MAX_CANDIDATES = 4_000_000  # (face, pixel) pairs per rasterizer pass; bounds memory


def crop_frame_box(size: int) -> tuple[float, float, float]:
    """(left, top, side) that renders in a ``size`` crop's own frame (pixels 0 .. size - 1)."""
    return 0.0, 0.0, float(size - 1)


def project(vertices: torch.Tensor, cam: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) FLAME vertices, (B, 3) cam (s, tx, ty), (B, 3) crop boxes (left, top, side)
    -> (B, V, 3) canvas pixels (u right, v down) and depth in pixels (larger = nearer)."""
    s, t = cam[:, None, :1], cam[:, None, 1:3]
    left, top, side = (boxes[:, None, i] for i in range(3))
    ndc = s * (vertices[..., :2] + t)  # (B, V, 2), y up
    u = left + (ndc[..., 0] + 1) / 2 * side
    v = top + (1 - ndc[..., 1]) / 2 * side
    z = s[..., 0] * vertices[..., 2] * side / 2
    return torch.stack([u, v, z], -1)


@dataclass
class Fragments:
    """Nearest visible face per (supersampled) pixel."""

    face: torch.Tensor  # (B, H, W) long, index into faces, -1 = background
    bary: torch.Tensor  # (B, H, W, 3) barycentric weights of the pixel centre in that face
    zbuf: torch.Tensor  # (B, H, W) interpolated depth, -inf on the background


def rasterize(
    screen: torch.Tensor, faces: torch.Tensor, height: int, width: int, cull: bool = True
) -> Fragments:
    """Z-buffer rasterization of (B, V, 3) screen vertices (pixels; z larger = nearer).

    ``cull`` drops faces wound clockwise on screen (back faces of an outward-wound mesh seen
    through the y-flipping camera). A pixel centre on a shared edge belongs to both faces;
    the z-buffer settles it.
    """
    batch, device, n_faces = screen.shape[0], screen.device, faces.shape[0]
    tri = screen[:, faces].reshape(-1, 3, 3)  # (B*F, 3 corners, xyz)
    x, y = tri[..., 0], tri[..., 1]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    x0 = x.min(1).values.ceil().clamp(0, width).long()
    x1 = x.max(1).values.floor().clamp(-1, width - 1).long()
    y0 = y.min(1).values.ceil().clamp(0, height).long()
    y1 = y.max(1).values.floor().clamp(-1, height - 1).long()
    keep = (area < -1e-9) if cull else (area.abs() > 1e-9)
    keep &= (x1 >= x0) & (y1 >= y0)
    ids = keep.nonzero()[:, 0]  # the faces that can cover a pixel centre
    planes = _planes(tri[ids], area[ids])  # (K, 4, 3): w0, w1, w2, z as a*px + b*py + c
    origin = torch.stack([x0[ids], y0[ids], ids // n_faces], 1)  # (K, 3) box corner, image
    bw = (x1 - x0 + 1)[ids]
    counts = bw * (y1 - y0 + 1)[ids]

    size = batch * height * width
    zbuf = torch.full((size,), -torch.inf, device=device, dtype=screen.dtype)
    passes = []
    for lo, hi in _chunks(counts, MAX_CANDIDATES):  # pass 1: nearest depth per pixel
        pix, k, z = _candidates(planes, origin, bw, counts, lo, hi, height, width)
        zbuf.scatter_reduce_(0, pix, z, "amax")
        passes.append((pix, k, z))
    winner = torch.full((size,), -1, device=device, dtype=torch.long)
    for pix, k, z in passes:  # pass 2: which face gave that depth (largest on a tie)
        win = z >= zbuf[pix]
        winner.scatter_reduce_(0, pix[win], k[win], "amax")
    covered = (winner >= 0).nonzero()[:, 0]
    bary = torch.zeros(size, 3, device=device, dtype=screen.dtype)
    k = winner[covered]
    px, py = (covered % width).to(screen.dtype), (covered // width % height).to(screen.dtype)
    p = planes[k, :3]  # (N, 3, 3)
    bary[covered] = p[..., 0] * px[:, None] + p[..., 1] * py[:, None] + p[..., 2]
    face = torch.full((size,), -1, device=device, dtype=torch.long)
    face[covered] = ids[k] % n_faces
    return Fragments(
        face.reshape(batch, height, width),
        bary.reshape(batch, height, width, 3),
        zbuf.reshape(batch, height, width),
    )


def _planes(tri: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """(K, 3, 3) screen triangles -> (K, 4, 3) barycentric weights and z as planes in (px, py).

    Weight k is the doubled signed area of the edge opposite corner k with the point, over
    the triangle's; orthographic depth is linear in screen space, so z is a plane too.
    """
    x, y, z = tri.unbind(-1)  # (K, 3) each
    rows = []
    for a, b in ((1, 2), (2, 0), (0, 1)):
        dx, dy = x[:, b] - x[:, a], y[:, b] - y[:, a]
        rows.append(torch.stack([-dy, dx, dy * x[:, a] - dx * y[:, a]], -1) / area[:, None])
    w = torch.stack(rows, 1)  # (K, 3, 3)
    zplane = (w * z[:, :, None]).sum(1, keepdim=True)  # (K, 1, 3)
    return torch.cat([w, zplane], 1)


def _chunks(counts: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Split faces into consecutive runs of at most ``budget`` candidate pixels each."""
    ends = torch.cumsum(counts, 0).tolist()
    out, lo, done = [], 0, 0
    for i, end in enumerate(ends):
        if end - done > budget and i > lo:
            out.append((lo, i))
            lo, done = i, ends[i - 1]
    return out + [(lo, len(ends))] if ends else []


def _candidates(planes, origin, bw, counts, lo, hi, height, width):
    """Pixel centres inside faces ``lo:hi``: pixel index, face, depth.

    Each face's rows are enumerated first, and on each row only the span its three edges
    allow (widened by a pixel so rounding cannot open cracks; the exact test follows), so the
    work follows the covered area rather than the bounding boxes.
    """
    device = counts.device
    heights = counts[lo:hi] // bw[lo:hi]
    k = torch.arange(lo, hi, device=device).repeat_interleave(heights)  # (R,) one per row
    start = (torch.cumsum(heights, 0) - heights).repeat_interleave(heights)
    o = origin[k]
    py = o[:, 1] + torch.arange(len(k), device=device) - start
    p = planes[k]  # (R, 4, 3)
    a, rest = p[:, :3, 0], p[:, :3, 1] * py[:, None].to(p.dtype) + p[:, :3, 2]  # a x + rest >= 0
    bound = -rest / torch.where(a == 0, torch.ones_like(a), a)
    inf = torch.full_like(bound, torch.inf)
    lower = torch.where(a > 0, bound, -inf).amax(1).nan_to_num(0).clamp(-1, width)
    upper = torch.where(a < 0, bound, inf).amin(1).nan_to_num(0).clamp(-1, width)
    x_lo = torch.maximum(lower.floor().long(), o[:, 0])
    x_hi = torch.minimum(upper.ceil().long(), o[:, 0] + bw[k] - 1)
    spans = (x_hi - x_lo + 1).clamp_min(0)
    total = int(spans.sum())
    row = torch.arange(len(k), device=device).repeat_interleave(spans, output_size=total)
    first = (torch.cumsum(spans, 0) - spans).repeat_interleave(spans, output_size=total)
    px = x_lo[row] + torch.arange(total, device=device) - first
    py, k, p = py[row], k[row], p[row]
    fx, fy = px.to(p.dtype)[:, None], py.to(p.dtype)[:, None]
    val = p[..., 0] * fx + p[..., 1] * fy + p[..., 2]  # (N, 4): w0, w1, w2, z
    inside = (val[:, :3] >= 0).all(1)
    pix = (o[row, 2] * height + py) * width + px
    return pix[inside], k[inside], val[inside, 3]


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) area-weighted unit normals (outward for an outward-wound mesh)."""
    tri = vertices[:, faces]  # (B, F, 3, 3)
    n = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
    normals = torch.zeros_like(vertices)
    for corner in range(3):
        normals.index_add_(1, faces[:, corner], n)
    return F.normalize(normals, dim=-1)


@dataclass
class Render:
    """A batch of renders on the canvas, anti-aliased (box filter over the supersamples)."""

    image: torch.Tensor  # (B, H, W) grey shading in [0, 1], black background
    depth: torch.Tensor  # (B, H, W) in [0, 1], near = 1, background 0
    coverage: torch.Tensor  # (B, H, W) fraction of the pixel the mesh covers

    def image_uint8(self, i: int = 0) -> np.ndarray:
        """(H, W, 3) uint8 RGB, the map a ControlNet reads."""
        grey = (self.image[i].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return np.repeat(grey[..., None], 3, -1)

    def depth_float(self, i: int = 0) -> np.ndarray:
        """(H, W) float32 depth, the form `conditioners.depth.to_png_values` writes."""
        return self.depth[i].float().cpu().numpy()


def render_mesh(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    cam: torch.Tensor,
    boxes: torch.Tensor,
    size: tuple[int, int],
    supersample: int = 2,
    cull: bool = True,
) -> Render:
    """(B, V, 3) meshes seen by (B, 3) cams through (B, 3) crop boxes -> renders of ``size``
    (width, height) on the canvas the boxes refer to."""
    width, height = size
    k = supersample
    dtype = torch.float32
    vertices, cam, boxes = (
        vertices.to(dtype),
        cam.to(vertices.device, dtype),
        boxes.to(vertices.device, dtype),
    )
    screen = project(vertices, cam, boxes)  # (B, V, 3) canvas pixels
    screen = torch.cat([(screen[..., :2] + 0.5) * k - 0.5, screen[..., 2:] * k], -1)
    frags = rasterize(screen, faces, height * k, width * k, cull=cull)
    covered = frags.face >= 0  # (B, kH, kW)
    where = covered.nonzero(as_tuple=True)
    normals = vertex_normals(vertices, faces)  # (B, V, 3), camera space (z to the camera)
    corners = normals[where[0][:, None], faces[frags.face[where]]]  # (N, 3 corners, 3)
    n = F.normalize((frags.bary[where][..., None] * corners).sum(1), dim=-1)  # (N, 3)
    grey = torch.zeros_like(frags.zbuf)
    grey[where] = shade(n)
    depth = _normalised_depth(frags.zbuf, covered)
    pooled = F.avg_pool2d(torch.stack([grey, depth, covered.to(dtype)], 1), k)  # (B, 3, H, W)
    return Render(pooled[:, 0], pooled[:, 1], pooled[:, 2])


def shade(normals: torch.Tensor) -> torch.Tensor:
    """(..., 3) unit normals (camera space) -> (...) grey in [0, 1], Lambert over `LIGHTS`."""
    grey = torch.full(normals.shape[:-1], AMBIENT, dtype=normals.dtype, device=normals.device)
    for direction, intensity in LIGHTS:
        d = F.normalize(normals.new_tensor(direction), dim=0)
        grey = grey + intensity * (normals @ d).clamp_min(0)
    return grey.clamp(0, 1)


def _normalised_depth(zbuf: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Per image: the visible face spans [0.1, 1] (nearest = 1), background 0.

    The floor keeps the farthest visible point apart from the background, as ControlNet
    depth maps do.
    """
    z = torch.where(covered, zbuf, torch.nan).flatten(1)
    near = torch.nan_to_num(z.nan_to_num(-torch.inf).amax(1), 0.0)[:, None, None]
    far = torch.nan_to_num(z.nan_to_num(torch.inf).amin(1), 0.0)[:, None, None]
    scaled = 0.1 + 0.9 * (zbuf - far) / (near - far).clamp_min(1e-6)
    return torch.where(covered, scaled, 0.0)
