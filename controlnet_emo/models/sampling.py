"""One way to draw faces: the settings and the call that infer, edit, evaluate, training's
validation grids and the app share.

Why one path: a face drawn by ``infer --seed 3`` must be the face ``evaluate`` graded as its
row 3 and the face the app shows for seed 3. Three copies of the pipeline call drifted apart
before (one generator for a batch here, one per sample there); now the noise, the map scaling
and the 8-bit rounding are written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from controlnet_emo.config import Config

SCHEDULERS = {
    "default": None,  # whatever the base model ships
    "unipc": "UniPCMultistepScheduler",  # what training's validation grids use
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
}


class SamplingError(ValueError):
    """A sampling setting that cannot work, as one line naming the flag."""


@dataclass
class Sampling:
    """How a face is drawn from its maps (the command-line flags of infer, edit and evaluate).

    ``scales``: per-condition strength. Multi mode: each net's conditioning scale. Stacked mode:
    the condition's map is multiplied by it (0 = the map is absent, as in condition dropout).
    ``map_guidance``: the unconditional branch of classifier-free guidance sees zeroed maps as
    well as the empty prompt (``models/pipeline.py``); False draws what stock diffusers draws.
    """

    steps: int = 30
    guidance_scale: float = 7.5
    map_guidance: bool = True
    scheduler: str = "unipc"
    seed: int = 0
    negative_prompt: str = ""
    controlnet_scale: float = 1.0
    scales: dict[str, float] = field(default_factory=dict)

    @classmethod
    def validation(cls, cfg: Config, **changes: Any) -> Sampling:
        """How a run's validation grids draw (``train.validation_*``): the demo draws and
        grades its faces the same way, so its pictures and its figures agree."""
        return cls(
            steps=cfg.train.validation_steps,
            guidance_scale=cfg.train.validation_guidance_scale,
            map_guidance=cfg.train.validation_map_guidance,
            **changes,
        )

    def check(self, conditions: Sequence[str] | None = None) -> Sampling:
        """Refuse settings that would fail deep inside diffusers; returns self for chaining."""
        if self.steps < 1:
            raise SamplingError(f"--steps {self.steps}: need at least 1")
        if self.scheduler not in SCHEDULERS:
            raise SamplingError(
                f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}"
            )
        unknown = sorted(set(self.scales) - set(conditions or self.scales))
        if unknown:
            raise SamplingError(
                f"--scale {unknown[0]}: not a condition of this model ({', '.join(conditions)})"
            )
        return self

    def record(self) -> dict[str, Any]:
        """The settings as plain JSON values, for PNG text chunks and metrics.json."""
        return dataclasses.asdict(self)


def sample(
    pipe: Any,
    conditions: Sequence[str],
    mode: str,
    maps: torch.Tensor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    s: Sampling,
) -> torch.Tensor:
    """(B,3N,H,W) maps in [0,1] -> (B,3,H,W) faces in [0,1], quantised to 8 bits as a PNG is.

    One CPU generator per face, seeded ``seeds[i]``: the noise a single ``infer --seed`` draws,
    so any face of a batch can be drawn again alone, on any device.
    """
    b, _, h, w = maps.shape
    if len(prompts) != b or len(seeds) != b:
        raise SamplingError(f"{b} map sets but {len(prompts)} prompts and {len(seeds)} seeds")
    per_map = list(maps.split(3, dim=1))  # N x (B,3,H,W), in the model's condition order
    if mode == "multi":
        image: Any = per_map
        scale: Any = [s.controlnet_scale * s.scales.get(c, 1.0) for c in conditions]
    else:
        image = torch.cat(
            [m * s.scales.get(c, 1.0) for m, c in zip(per_map, conditions, strict=True)], dim=1
        )
        scale = s.controlnet_scale
    out = pipe(
        list(prompts),
        image=image,
        height=h,
        width=w,
        num_inference_steps=s.steps,
        guidance_scale=s.guidance_scale,
        negative_prompt=[s.negative_prompt] * b if s.negative_prompt else None,
        generator=[torch.Generator("cpu").manual_seed(int(x)) for x in seeds],
        controlnet_conditioning_scale=scale,
        output_type="np",
    ).images
    arr = (np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8)  # (B,H,W,3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
