"""One forward pass of the training objective: batch in, weighted loss and its terms out.

Randomness (VAE posterior sample, noise, timesteps) comes from the generator the caller seeds
per step, which is what makes ``resume: latest`` continue exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..config import Config
from ..data.batch import Batch
from ..losses import diffusion_loss, diffusion_target
from ..models.controlnet import controlnet_residuals
from ..models.sd import SDComponents

if TYPE_CHECKING:
    from ..losses import PixelLosses


@dataclass
class TrainModels:
    sd: SDComponents
    controlnet: torch.nn.Module
    pixel_losses: PixelLosses | None
    weight_dtype: torch.dtype
    """dtype of the frozen parts (VAE, text encoder, frozen UNet) under mixed precision."""


def encode_latents(
    sd: SDComponents, batch: Batch, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """Scaled SD latents (B,4,H/8,W/8) with the VAE's own constants; cached moments if any."""
    if batch.latent_moments is not None:
        mean, std = batch.latent_moments.chunk(2, dim=1)
        latents = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device)
    else:
        with torch.no_grad():
            dist = sd.vae.encode(batch.pixel_values.to(dtype)).latent_dist
            latents = dist.sample(generator=generator)
    shift = getattr(sd.vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * sd.vae.config.scaling_factor).float()


def compute_losses(
    m: TrainModels, batch: Batch, cfg: Config, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total loss and every enabled term (unweighted) for one micro-batch."""
    sd, device, dtype = m.sd, batch.pixel_values.device, m.weight_dtype
    latents = encode_latents(sd, batch, generator, dtype)  # (B,4,h,w)
    with torch.no_grad():
        text = sd.text_encoder(batch.input_ids, return_dict=False)[0].to(dtype)  # (B,77,D)
    noise = randn_tensor(latents.shape, generator=generator, device=device)
    t_max = sd.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, t_max, (len(batch),), generator=generator).to(device)
    noisy = sd.scheduler.add_noise(latents, noise, timesteps)

    down, mid = controlnet_residuals(
        m.controlnet, noisy.to(dtype), timesteps, text, batch.conditions.to(dtype)
    )
    model_pred = sd.unet(
        noisy.to(dtype),
        timesteps,
        encoder_hidden_states=text,
        down_block_additional_residuals=[r.to(dtype) for r in down],
        mid_block_additional_residual=mid.to(dtype),
        return_dict=False,
    )[0].float()

    weights = cfg.loss.weights()
    terms: dict[str, torch.Tensor] = {}
    if weights["diffusion"] > 0:
        target = diffusion_target(latents, noise, timesteps, sd.scheduler)
        terms["diffusion"] = diffusion_loss(
            model_pred,
            target,
            timesteps,
            sd.scheduler,
            cfg.loss.diffusion.kind,
            cfg.loss.diffusion.snr_gamma,
        )
    if m.pixel_losses is not None:
        terms.update(
            m.pixel_losses(
                noisy,
                model_pred,
                timesteps,
                sd.scheduler,
                batch.pixel_values,
                latents,
                batch.expression,
                batch.valence,
                batch.arousal,
            )
        )
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, terms
