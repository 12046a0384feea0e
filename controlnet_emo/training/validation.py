"""Validation: a held-out loss with fixed noise, and a picture grid of what the model draws.

The loss uses the same ``compute_losses`` as training with a fixed generator, so its curve is
comparable across steps; the grid rows are conditions | generated | target.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import UniPCMultistepScheduler
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from controlnet_emo.config import Config
from controlnet_emo.data.batch import Batch
from controlnet_emo.models.pipeline import MapGuidedControlNetPipeline
from controlnet_emo.training.step import TrainModels, compute_losses


@torch.no_grad()
def validation_loss(
    m: TrainModels, batches: list[Batch], cfg: Config, device: torch.device
) -> dict[str, float]:
    """Mean loss and terms over fixed validation batches, with noise seeded identically."""
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    sums: dict[str, float] = {}
    for batch in batches:
        loss, terms = compute_losses(m, batch.to(device), cfg, g)
        for k, v in {"loss": loss, **{f"loss/{t}": x for t, x in terms.items()}}.items():
            sums[f"val/{k}"] = sums.get(f"val/{k}", 0.0) + float(v) / len(batches)
    return sums


def build_pipeline(
    m: TrainModels, controlnet: torch.nn.Module, map_guidance: bool = True
) -> MapGuidedControlNetPipeline:
    """The pipeline infer loads, over the in-memory models (nothing is copied or reloaded)."""
    pipe = MapGuidedControlNetPipeline(
        vae=m.sd.vae,
        text_encoder=m.sd.text_encoder,
        tokenizer=m.sd.tokenizer,
        unet=m.sd.unet,
        controlnet=controlnet,
        scheduler=UniPCMultistepScheduler.from_config(m.sd.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.map_guidance = map_guidance
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(
    m: TrainModels,
    controlnet: torch.nn.Module,
    batch: Batch,
    prompts: list[str],
    cfg: Config,
    path: Path,
) -> Path:
    """Generate one image per validation sample and save the comparison grid as PNG."""
    size = batch.pixel_values.shape[-1]
    if m.weight_dtype != torch.float32:
        # The ControlNet trains in fp32, and accelerate wraps its forward to return fp32, which
        # the bf16 / fp16 UNet's norms refuse: sample with an unwrapped copy in the UNet's dtype,
        # as inference will load it.
        controlnet = copy.deepcopy(controlnet)
        controlnet = extract_model_from_parallel(controlnet, keep_fp32_wrapper=False)
        controlnet.to(m.weight_dtype)
    pipe = build_pipeline(m, controlnet, cfg.train.validation_map_guidance)
    rows = []
    for i, prompt in enumerate(prompts):
        cond = batch.conditions[i : i + 1].to(m.weight_dtype)  # (1,3N,H,W) in [0,1]
        image = list(cond.split(3, dim=1)) if isinstance(controlnet, MultiControlNetModel) else cond
        g = torch.Generator().manual_seed(cfg.seed + i)
        out = pipe(
            prompt,
            image=image,
            height=size,
            width=size,
            generator=g,
            num_inference_steps=cfg.train.validation_steps,
            guidance_scale=cfg.train.validation_guidance_scale,
            output_type="np",
        ).images[0]
        maps = [to_uint8(c) for c in batch.conditions[i].split(3, dim=0)]
        target = to_uint8((batch.pixel_values[i] + 1) / 2)
        rows.append(np.concatenate([*maps, (out * 255).round().astype(np.uint8), target], axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
    tmp.replace(path)
    return path


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3,H,W) in [0,1] -> (H,W,3) uint8."""
    return (img.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
