"""Validation: a held-out loss with fixed noise, and a picture grid of what the model draws.

The loss uses the same ``compute_losses`` as training with a fixed generator, so its curve is
comparable across steps; the grid rows are conditions | generated | target, drawn by the
sampling path infer uses (``models/sampling.py``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import UniPCMultistepScheduler
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from controlnet_emo.config import Config
from controlnet_emo.data.batch import Batch
from controlnet_emo.models.pipeline import PIPELINES, MapGuidance
from controlnet_emo.models.sampling import Sampling, sample
from controlnet_emo.pictures import Panel, labelled_grid, save_sheet
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
) -> MapGuidance:
    """The pipeline infer loads, over the in-memory models (nothing is copied or reloaded)."""
    sd = m.sd
    parts: dict = dict(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=sd.unet,
        controlnet=controlnet,
        scheduler=UniPCMultistepScheduler.from_config(sd.scheduler.config),
        feature_extractor=None,
    )
    if sd.family == "sdxl":
        parts.update(
            text_encoder_2=sd.text_encoder_2, tokenizer_2=sd.tokenizer_2, add_watermarker=False
        )
    else:
        parts.update(safety_checker=None, requires_safety_checker=False)
    pipe = PIPELINES[sd.family](**parts)
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
    """Draw one face per validation sample and save the grid (maps | generated | target).

    Sample i is drawn with noise seed ``cfg.seed + i`` through the path infer uses, so
    ``controlnet-emo infer --seed`` redraws any row from the saved run."""
    if m.weight_dtype != torch.float32:
        # The ControlNet trains in fp32, and accelerate wraps its forward to return fp32, which
        # the bf16 / fp16 UNet's norms refuse: sample with an unwrapped copy in the UNet's dtype,
        # as inference will load it.
        controlnet = copy.deepcopy(controlnet)
        controlnet = extract_model_from_parallel(controlnet, keep_fp32_wrapper=False)
        controlnet.to(m.weight_dtype)
    pipe = build_pipeline(m, controlnet, cfg.train.validation_map_guidance)
    how = Sampling.validation(cfg)
    mode = "multi" if isinstance(controlnet, MultiControlNetModel) else "stacked"
    n = len(prompts)
    maps = batch.conditions[:n].to(m.weight_dtype)  # (n,3N,H,W) in [0,1]
    faces = torch.cat(  # one face at a time: the noise and memory of a single infer call
        [
            sample(
                pipe, cfg.conditions, mode, maps[i : i + 1], prompts[i : i + 1], [cfg.seed + i], how
            )
            for i in range(n)
        ]
    )
    rows = []
    for i in range(n):
        panels = [
            Panel(c, [name] if i == 0 else [])
            for name, c in zip(cfg.conditions, batch.conditions[i].split(3), strict=True)
        ]
        panels.append(Panel(faces[i], ["generated"] if i == 0 else []))
        panels.append(Panel((batch.pixel_values[i] + 1) / 2, ["target"] if i == 0 else []))
        rows.append(panels)
    return save_sheet(labelled_grid(rows, min_tile=128), path)
