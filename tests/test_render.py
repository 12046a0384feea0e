"""Renderer: the mesh lands where EMOCA's camera and crop say, sharp, culled and depth-ordered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conditioners.flame import crop_to_canvas, emoca_crop_box, warp_to_canvas
from conditioners.flame_model import FlameModel
from conditioners.render import crop_frame_box, rasterize, render_mesh
from controlnet_emo.synthetic.flame import build_synthetic_flame, class_codes


@pytest.fixture(scope="module")
def head():
    model = FlameModel(build_synthetic_flame())
    exp, jaw = class_codes(1)
    pose = torch.tensor([[0.05, 0.3, 0.0, jaw, 0.0, 0.0]])
    verts = model(torch.zeros(1, 100), torch.tensor(exp)[None], pose).vertices
    return verts, model.faces


def _render(head, cam=(8.0, 0.0, 0.0), box=(40.0, 20.0, 200.0), size=(280, 240), **kw):
    verts, faces = head
    return render_mesh(verts, faces, torch.tensor([cam]), torch.tensor([box]), size, **kw)


def _centroid(cover: torch.Tensor) -> np.ndarray:
    ys, xs = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float32) for n in cover.shape), indexing="ij"
    )
    total = cover.sum()
    return np.array([float((xs * cover).sum() / total), float((ys * cover).sum() / total)])


def test_positive_tx_moves_the_face_right_and_ty_moves_it_up(head):
    base = _centroid(_render(head).coverage[0])
    right = _centroid(_render(head, cam=(8.0, 0.01, 0.0)).coverage[0])
    up = _centroid(_render(head, cam=(8.0, 0.0, 0.01)).coverage[0])
    step = 8.0 * 0.01 * 200.0 / 2  # s * t in crop units, half a crop side per unit
    np.testing.assert_allclose(right - base, [step, 0.0], atol=0.05)
    np.testing.assert_allclose(up - base, [0.0, -step], atol=0.05)


def test_larger_scale_draws_a_larger_face(head):
    small = float(_render(head, cam=(6.0, 0.0, 0.0)).coverage.sum())
    large = float(_render(head, cam=(9.0, 0.0, 0.0)).coverage.sum())
    assert large / small == pytest.approx((9.0 / 6.0) ** 2, rel=0.01)


def test_render_on_the_canvas_matches_recanvasing_a_crop_frame_render(head):
    face_box = (95.0, 50.0, 110.0, 130.0)  # x, y, w, h on a 320 x 256 original
    left, top, side = emoca_crop_box(face_box)
    cam = (7.5, 0.004, 0.01)
    crop = _render(head, cam=cam, box=crop_frame_box(224), size=(224, 224)).coverage[0]
    crop = (crop.numpy() * 255).astype(np.uint8)
    matrix = crop_to_canvas(left, top, side, 224)
    recanvased = warp_to_canvas(crop, matrix, crop.shape, (256, 320)) > 127
    direct = _render(head, cam=cam, box=(left, top, side), size=(320, 256)).coverage[0] > 0.5
    direct = direct.numpy()
    iou = (direct & recanvased).sum() / (direct | recanvased).sum()
    assert iou >= 0.97, iou


def test_edges_are_antialiased_and_subpixel_shifts_move_the_face(head):
    render = _render(head)
    cover = render.coverage[0]
    edge = (cover > 0.05) & (cover < 0.95)
    assert edge.sum() > 50  # partial pixels along the silhouette
    grey = render.image[0][edge]
    assert float(grey.max()) < float(render.image[0].max())  # edges blend to black
    base = _centroid(cover)
    shifted = _centroid(_render(head, box=(40.3, 20.0, 200.0)).coverage[0])
    assert shifted[0] - base[0] == pytest.approx(0.3, abs=0.06)


def _two_triangles(z_front: float, z_back: float, front_first: bool):
    """Two overlapping screen triangles (counter-clockwise on screen = facing the camera)."""
    a = [[10, 10, z_front], [10, 40, z_front], [40, 10, z_front]]
    b = [[20, 20, z_back], [20, 50, z_back], [50, 20, z_back]]
    verts = torch.tensor([a + b if front_first else b + a], dtype=torch.float32)
    return verts, torch.tensor([[0, 1, 2], [3, 4, 5]])


@pytest.mark.parametrize("front_first", [True, False])
def test_the_nearer_surface_wins_whatever_the_drawing_order(front_first):
    verts, faces = _two_triangles(5.0, 1.0, front_first)
    frags = rasterize(verts, faces, 64, 64)
    front_face = 0 if front_first else 1
    assert int(frags.face[0, 22, 22]) == front_face  # inside both: the nearer one
    assert float(frags.zbuf[0, 22, 22]) == pytest.approx(5.0)
    assert int(frags.face[0, 45, 22]) == 1 - front_face  # only the far one covers this


def test_depth_map_is_bright_near_and_black_on_the_background(head):
    verts, faces = head
    render = _render(head)
    depth = render.depth[0]
    assert float(depth[0, 0]) == 0.0 and float(depth.max()) == pytest.approx(1.0, abs=0.02)
    nose = verts[0, verts[0, :, 2].argmax()]  # the nearest vertex: the nose tip
    u = 40 + (8 * nose[0] + 1) / 2 * 200
    v = 20 + (1 - 8 * nose[1]) / 2 * 200
    assert float(depth[int(v), int(u)]) > 0.9
    cheek = depth[render.coverage[0] > 0.99]
    assert float(cheek.min()) < 0.5  # the far side of the visible head is darker


def test_back_faces_are_culled():
    verts = torch.tensor([[[10, 10, 0], [40, 10, 0], [10, 40, 0.0]]])  # clockwise on screen
    faces = torch.tensor([[0, 1, 2]])
    assert int((rasterize(verts, faces, 64, 64).face >= 0).sum()) == 0
    assert int((rasterize(verts, faces, 64, 64, cull=False).face >= 0).sum()) > 300


def test_a_batch_renders_as_its_items_alone(head):
    verts, faces = head
    cams = torch.tensor([[8.0, 0.0, 0.0], [6.0, 0.01, -0.01]])
    boxes = torch.tensor([[40.0, 20.0, 200.0], [0.0, 0.0, 150.0]])
    both = render_mesh(verts.expand(2, -1, -1), faces, cams, boxes, (200, 180))
    for i in range(2):
        alone = render_mesh(verts, faces, cams[i : i + 1], boxes[i : i + 1], (200, 180))
        torch.testing.assert_close(both.image[i], alone.image[0])
        torch.testing.assert_close(both.depth[i], alone.depth[0])


@pytest.mark.gpu
def test_cuda_render_matches_cpu(head):
    verts, faces = head
    cpu = _render(head)
    cuda = render_mesh(verts.cuda(), faces.cuda(), torch.tensor([[8.0, 0, 0]]).cuda(),
                       torch.tensor([[40.0, 20.0, 200.0]]).cuda(), (280, 240))  # fmt: skip
    assert (cuda.coverage.cpu() - cpu.coverage).abs().mean() < 1e-3
