"""One forward pass of the training objective: batch in, weighted loss and its terms out.

Randomness (VAE posterior sample, noise, timesteps) comes from the generator the caller seeds
per step, which is what makes ``resume: latest`` continue exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from controlnet_emo.config import Config
from controlnet_emo.data.batch import Batch
from controlnet_emo.models.controlnet import added_conditions, controlled_prediction
from controlnet_emo.models.sd import SDComponents, vae_dtype
from controlnet_emo.models.text_cache import TextConditioning, TextEmbeddingCache, encode_captions
from controlnet_emo.training.losses import diffusion_loss, diffusion_target, gradient_balance

if TYPE_CHECKING:
    from controlnet_emo.training.losses import PixelLosses


@dataclass
class TrainModels:
    sd: SDComponents
    controlnet: torch.nn.Module
    pixel_losses: PixelLosses | None
    weight_dtype: torch.dtype
    """dtype of the frozen parts (VAE, text encoder, frozen UNet) under mixed precision."""
    text_cache: TextEmbeddingCache | None = None
    """Hidden states of captions already seen (``data.cache_text``); None encodes every time."""

    def encode_text(self, input_ids: torch.Tensor) -> TextConditioning:
        """ids -> frozen text-encoder states (B,77,D) (+ SDXL's pooled), from the cache when
        there is one."""
        if self.text_cache is not None:
            return self.text_cache(input_ids)
        return encode_captions(self.sd.text_encoders, input_ids, self.weight_dtype)


def host_random(draw, device: torch.device) -> torch.Tensor:
    """A CPU-generator draw moved to ``device`` without a host sync: pageable host-to-device
    copies block until the GPU queue drains, pinned ones with ``non_blocking`` do not."""
    t = draw()
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def sample_timesteps(n: int, t_max: int, how: str, generator: torch.Generator) -> torch.Tensor:
    """(n,) training timesteps: uniform, or cubic (skewed toward high noise)."""
    if how == "cubic":
        u = torch.rand(n, generator=generator)
        return ((1 - u**3) * t_max).long().clamp_(0, t_max - 1)
    return torch.randint(0, t_max, (n,), generator=generator)


def encode_latents(
    sd: SDComponents, batch: Batch, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """Scaled SD latents (B,C,H/f,W/f) with the VAE's own constants; cached moments if any.
    The VAE runs in its own dtype (``vae_dtype``: never SDXL's in fp16)."""
    if batch.latent_moments is not None:
        mean, std = batch.latent_moments.chunk(2, dim=1)
    else:
        with torch.no_grad():
            dist = sd.vae.encode(batch.pixel_values.to(vae_dtype(sd, dtype))).latent_dist
        mean, std = dist.mean, dist.std
    # The posterior sample as DiagonalGaussianDistribution.sample draws it (fp32 noise).
    eps = host_random(lambda: torch.randn(mean.shape, generator=generator), mean.device)
    latents = mean + std * eps.to(mean.dtype)
    shift = getattr(sd.vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * sd.vae.config.scaling_factor).float()


def compute_losses(
    m: TrainModels,
    batch: Batch,
    cfg: Config,
    generator: torch.Generator,
    text: TextConditioning | None = None,
    step: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total loss and every enabled term (unweighted) for one micro-batch.

    ``text``: the batch's text states when the caller already has them (the loop
    reads the cache with host ids, before the batch moves); else they are computed here.
    ``step``: the optimizer step, which holds the pixel terms back before
    ``loss.pixel.start_step``; None (validation) computes every term.
    """
    sd, device, dtype = m.sd, batch.conditions.device, m.weight_dtype
    latents = encode_latents(sd, batch, generator, dtype)  # (B,4,h,w)
    text = m.encode_text(batch.input_ids) if text is None else text  # (B,77,D) (+ pooled)
    added = added_conditions(text.pooled, batch.time_ids)  # SDXL's; None for SD
    noise = host_random(lambda: torch.randn(latents.shape, generator=generator), device)
    t_max = sd.scheduler.config.num_train_timesteps
    timesteps = host_random(
        lambda: sample_timesteps(len(batch), t_max, cfg.loss.diffusion.timesteps, generator),
        device,
    )
    noisy = sd.scheduler.add_noise(latents, noise, timesteps)

    model_pred = controlled_prediction(
        sd.unet, m.controlnet, noisy, timesteps, text.hidden, batch.conditions, dtype, added
    )

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
    if m.pixel_losses is not None and (step is None or step >= cfg.loss.pixel.start_step):
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
    anchor = weights["diffusion"] * terms["diffusion"] if "diffusion" in terms else 0.0
    pixel = sum(weights[k] * v for k, v in terms.items() if k != "diffusion")
    ratio = cfg.loss.pixel.balance
    if ratio is not None and torch.is_tensor(pixel) and torch.is_tensor(anchor):
        if model_pred.requires_grad:  # training; validation reports the unscaled terms
            scale = gradient_balance(anchor, pixel, model_pred, ratio)
            pixel = pixel * scale
            terms["pixel_scale"] = scale  # logged beside the terms; not itself a loss
    return anchor + pixel, terms
