"""Images per second of each conditioner on this machine; one JSON line per conditioner.

    python benchmarks/conditioner_speed.py [--size 512] [--full-depth] [--device cpu|cuda]

Inputs are synthetic faces at ``--size``. Networks carry random weights (nothing is
downloaded) but the real architectures, so the compute is what the real weights cost: FAN is
face-alignment's 2DFAN-4, and ``--full-depth`` builds ZoeDepth at its default (BEiT-large)
size instead of the tiny test model. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file would shadow the `conditioners` package it measures.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conditioners.depth import DepthConditioner  # noqa: E402
from conditioners.flame import FlameConditioner  # noqa: E402
from conditioners.skeleton import (  # noqa: E402
    SkeletonConditioner,
    draw_skeleton,
    fan_checkpoint_path,
)
from controlnet_emo.synthetic.faces import (  # noqa: E402
    crop_to_emoca,
    render_face,
    sample_face_params,
)


def rate(fn: Callable[[], int], min_seconds: float = 2.0, min_calls: int = 2) -> float:
    """Images per second of ``fn`` (returns how many images it handled), after one warm-up."""
    fn()
    images, calls, start = 0, 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        images += fn()
        calls += 1
    return images / (time.perf_counter() - start)


def emit(name: str, images_per_s: float, **extra) -> None:
    row = {"conditioner": name, "images_per_s": round(images_per_s, 2), **extra}
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--full-depth", action="store_true", help="ZoeDepth at full size")
    args = parser.parse_args()
    common = {"size": args.size, "device": args.device, "threads": torch.get_num_threads()}

    faces = [
        render_face(sample_face_params(np.random.default_rng([3, i]), args.size, i), args.size)
        for i in range(8)
    ]

    i = iter(range(10**9))
    emit("skeleton_draw", rate(lambda: _draw(faces, next(i))), **common)

    flame = FlameConditioner()
    inputs = [
        (crop_to_emoca(f.render, f.face_box), crop_to_emoca(f.image, f.face_box), f) for f in faces
    ]
    emit("flame_box_rule", rate(lambda: _place(flame, inputs, next(i), True)), **common)
    emit("flame_registered", rate(lambda: _place(flame, inputs, next(i), False)), **common)

    images = [f.image for f in faces[: args.batch_size]]
    model = _full_zoedepth() if args.full_depth else "tiny"
    depth = DepthConditioner(model, device=args.device, batch_size=args.batch_size)
    name = "depth_zoedepth_full_random" if args.full_depth else "depth_zoedepth_tiny"
    emit(name, rate(lambda: len(depth(images)), min_calls=1), batch_size=args.batch_size, **common)

    with tempfile.TemporaryDirectory() as home:
        os.environ["TORCH_HOME"] = home
        _random_fan()
        fan = SkeletonConditioner("fan", device=args.device)
        emit("skeleton_fan", rate(lambda: _fan(fan, faces, next(i)), min_calls=1), **common)


def _draw(faces, k: int) -> int:
    f = faces[k % len(faces)]
    draw_skeleton(f.landmarks, *f.image.shape[:2])
    return 1


def _place(flame: FlameConditioner, inputs, k: int, with_box: bool) -> int:
    render, crop, f = inputs[k % len(inputs)]
    flame.place(render, crop, f.image, f.face_box if with_box else None)
    return 1


def _fan(fan: SkeletonConditioner, faces, k: int) -> int:
    f = faces[k % len(faces)]
    fan(f.image, box=f.face_box)
    return 1


def _random_fan() -> None:
    from face_alignment.api import models_urls
    from face_alignment.models import FAN

    path = fan_checkpoint_path(models_urls["2DFAN-4"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(FAN(4).state_dict(), path)


def _full_zoedepth() -> str:
    """ZoeDepth at its default configuration, random weights, saved like a checkpoint."""
    from transformers import ZoeDepthConfig, ZoeDepthForDepthEstimation, ZoeDepthImageProcessor

    folder = Path(tempfile.mkdtemp(prefix="zoedepth-full-"))
    ZoeDepthForDepthEstimation(ZoeDepthConfig()).save_pretrained(folder)
    ZoeDepthImageProcessor().save_pretrained(folder)
    return str(folder)


if __name__ == "__main__":
    main()
