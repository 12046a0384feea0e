"""Images per second of the FLAME renderer (grey shading + depth) at a canvas size; one JSON line.

    python benchmarks/render.py [--size 512] [--batch 4] [--faces 10000] [--device cpu|cuda]

The mesh is the synthetic FLAME-format head (nothing of FLAME ships), refined to about
``--faces`` triangles (FLAME has 9,976) and drawn with a face filling most of the canvas, as a
close-up AffectNet crop does. The timing covers the FLAME forward pass and the render.
Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# Run as a script, this folder would shadow the `conditioners` package it measures.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from conditioners.flame_model import FlameModel  # noqa: E402
from conditioners.render import render_mesh  # noqa: E402
from controlnet_emo.synthetic.flame import build_synthetic_flame  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--faces", type=int, default=10000)
    parser.add_argument("--supersample", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    n_lon = max(8, round(math.sqrt(args.faces * 1.3 / 2)))  # faces ~ 2 * n_lat * n_lon
    n_lat = max(4, round(args.faces / (2 * n_lon)))
    model = FlameModel(build_synthetic_flame(n_lat=n_lat, n_lon=n_lon)).to(args.device)
    b = args.batch
    shape = torch.randn(b, 100, device=args.device) * 0.5
    exp = torch.randn(b, 50, device=args.device) * 0.5
    pose = torch.zeros(b, 6, device=args.device)
    pose[:, 1] = torch.linspace(-0.4, 0.4, b)
    cam = torch.tensor([[7.0, 0.0, 0.0]], device=args.device).expand(b, 3)
    side = 0.9 * args.size
    box = torch.tensor([[0.05 * args.size, 0.05 * args.size, side]], device=args.device)
    box = box.expand(b, 3)

    def run() -> None:
        verts = model(shape, exp, pose).vertices
        render_mesh(verts, model.faces, cam, box, (args.size, args.size), args.supersample)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    run()  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        run()
    seconds = time.perf_counter() - start
    row = {
        "benchmark": "flame_render",
        "size": args.size,
        "faces": int(model.faces.shape[0]),
        "batch": b,
        "supersample": args.supersample,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "images_per_s": round(b * args.repeats / seconds, 2),
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
