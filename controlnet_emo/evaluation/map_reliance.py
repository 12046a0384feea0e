"""How much a ControlNet relies on its maps, measured without sampling a single image.

A ControlNet that follows its FLAME render predicts a held-out sample's noise (or velocity) better from that
sample's own maps than from another sample's. So we noise the held-out latents at a fixed set
of timesteps with seeded noise, and compare the UNet's noise-prediction error with the own
maps, with the maps of the next sample in the set (same statistics, wrong face) and with every
map zeroed. ``shuffled / own`` above 1 says the maps steer the prediction; at 1 the
ControlNet ignores them, whatever its training loss says. It is cheap (one forward pass per
sample, map set and timestep) and deterministic, so a test and the ablation can read it where
judging drawn faces would need hundreds of sampling steps.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from controlnet_emo.data.batch import Batch
from controlnet_emo.models.controlnet import added_conditions, controlled_prediction
from controlnet_emo.models.text_cache import encode_captions, text_encoders_of
from controlnet_emo.training.losses import diffusion_target

PROBE_TIMESTEPS = (100, 300, 500, 700, 900)
"""Spread over the schedule: layout is decided at high noise, detail at low noise."""


@torch.no_grad()
def map_reliance(
    pipe: Any, batches: list[Batch], timesteps: tuple[int, ...] = PROBE_TIMESTEPS
) -> dict[str, float]:
    """Mean noise-prediction MSE of ``pipe`` (a diffusers ControlNet pipeline) over the held-out
    ``batches`` with own, shuffled and no maps, and the ratios that say what the maps add."""
    conditions = torch.cat([b.conditions for b in batches])
    shuffled = conditions.roll(1, dims=0)  # the next sample's maps: wrong face, same kind
    errors = {"own": 0.0, "shuffled": 0.0, "none": 0.0}
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    start = 0
    for batch in batches:
        stop = start + len(batch)
        maps = {
            "own": conditions[start:stop],
            "shuffled": shuffled[start:stop],
            "none": torch.zeros_like(conditions[start:stop]),
        }
        for name, err in _batch_errors(pipe, scheduler, batch, maps, timesteps).items():
            errors[name] += err * len(batch)
        start = stop
    errors = {k: v / len(conditions) for k, v in errors.items()}
    return errors | {
        "shuffled_over_own": errors["shuffled"] / errors["own"],
        "none_over_own": errors["none"] / errors["own"],
        "timesteps": list(timesteps),
    }


def _batch_errors(
    pipe: Any,
    scheduler: DDPMScheduler,
    batch: Batch,
    maps: dict[str, Tensor],
    timesteps: tuple[int, ...],
) -> dict[str, float]:
    """Per map set, the noise-prediction MSE averaged over ``timesteps`` for one batch."""
    p = next(pipe.unet.parameters())
    device, dtype = p.device, p.dtype
    vae = pipe.vae
    pixels = batch.pixel_values.to(device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (latents - shift) * vae.config.scaling_factor
    text = encode_captions(text_encoders_of(pipe), batch.input_ids.to(device), dtype)
    added = added_conditions(text.pooled, batch.time_ids)
    out = dict.fromkeys(maps, 0.0)
    for t in timesteps:
        generator = torch.Generator("cpu").manual_seed(t)  # the same noise for every map set
        noise = randn_tensor(latents.shape, generator=generator).to(device)
        ts = torch.full((len(latents),), t, device=device, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, ts).to(dtype)
        target = diffusion_target(latents, noise, ts, scheduler)  # noise, or v for v-models
        for name, cond in maps.items():
            pred = controlled_prediction(
                pipe.unet, pipe.controlnet, noisy, ts, text.hidden, cond.to(device), dtype, added
            )
            out[name] += float(((pred - target) ** 2).mean()) / len(timesteps)
    return out
