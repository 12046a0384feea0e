"""Raw image -> condition map (FLAME render on the original canvas, depth, landmark skeleton).

Each conditioner is usable on its own, at prepare time and at inference time;
`prepare_dataset` is the batch job that writes a prepared dataset with all three.
"""

from conditioners.depth import DepthConditioner, PrecomputedDepth
from conditioners.flame import FlameConditioner
from conditioners.prepare import PrepareError, prepare_dataset
from conditioners.skeleton import SkeletonConditioner, draw_skeleton

CONDITIONERS = {
    "flame": FlameConditioner,
    "depth": DepthConditioner,
    "skeleton": SkeletonConditioner,
}
"""Condition name (as in ``cfg.conditions``) -> the class that makes its map."""

__all__ = [
    "CONDITIONERS",
    "DepthConditioner",
    "FlameConditioner",
    "PrecomputedDepth",
    "PrepareError",
    "SkeletonConditioner",
    "draw_skeleton",
    "prepare_dataset",
]
