"""The multi-condition ControlNet: diffusers' own models, in two arrangements.

stacked: one ``ControlNetModel`` whose hint encoder reads 3 channels per condition.
multi:   one 3-channel ``ControlNetModel`` per condition inside ``MultiControlNetModel``, whose
         residuals are summed, which is what ComfyUI / A1111 drive with ordinary RGB hints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from controlnet_emo.config import Config

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

# The hint layout the sidecar and export metadata record too. diffusers is imported inside the
# functions so that reading this (model_info, export) at CLI start-up stays cheap.
CHANNELS_PER_CONDITION = 3


def controlnet_family(controlnet: object) -> str:
    """'sdxl' when a ControlNet (or the first net of a multi) takes SDXL's added embeddings,
    else 'sd': the net itself says which base family and pipeline drive it."""
    nets = getattr(controlnet, "nets", [controlnet])
    config = nets[0].config
    get = config.get if isinstance(config, dict) else config.__dict__.get
    return "sdxl" if get("addition_embed_type") == "text_time" else "sd"


def hint_encoder_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """SD's hint encoder widths (16, 32, 96, 256) cut to the VAE's downsampling: the encoder
    halves the hint once per width after the first, so its output lands on the latent grid
    (8x for SD; the demo base's 4x VAE keeps three widths)."""
    halvings = max(1, vae_scale_factor.bit_length() - 1)
    if 2**halvings != vae_scale_factor or halvings > 3:
        raise ValueError(f"VAE downsampling {vae_scale_factor}: expected 2, 4 or 8")
    return (16, 32, 96, 256)[: halvings + 1]


def build_controlnet(
    cfg: Config, unet: UNet2DConditionModel, vae_scale_factor: int = 8
) -> ControlNetModel | MultiControlNetModel:
    """New ControlNet(s) initialised from the UNet encoder, or loaded from ``controlnet.init``."""
    from diffusers import ControlNetModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    n = len(cfg.conditions)
    init = cfg.model.controlnet.init
    hint = hint_encoder_channels(vae_scale_factor)
    if cfg.model.controlnet.mode == "stacked":
        if init == "from_unet":
            net = ControlNetModel.from_unet(
                unet,
                conditioning_embedding_out_channels=hint,
                conditioning_channels=CHANNELS_PER_CONDITION * n,
            )
            return _init_hint_out(net, cfg.model.controlnet.hint_init)
        net = ControlNetModel.from_pretrained(init)
        _check_channels(net, CHANNELS_PER_CONDITION * n, init)
        return net
    if init == "from_unet":
        nets = [
            _init_hint_out(
                ControlNetModel.from_unet(
                    unet,
                    conditioning_embedding_out_channels=hint,
                    conditioning_channels=CHANNELS_PER_CONDITION,
                ),
                cfg.model.controlnet.hint_init,
            )
            for _ in range(n)
        ]
    else:
        folders = init_folders(init, n)
        nets = [ControlNetModel.from_pretrained(f) for f in folders]
        for net, folder in zip(nets, folders, strict=False):
            _check_channels(net, CHANNELS_PER_CONDITION, str(folder))
    return MultiControlNetModel(nets)


def init_folders(init: str, n: int) -> list[Path]:
    """The folders ``controlnet.init`` names for ``n`` multi-mode nets, diffusers' layout:
    init/, init_1/, init_2/ ... (the loader and ``controlnet-emo doctor`` read the same)."""
    return [Path(init)] + [Path(f"{init}_{i}") for i in range(1, n)]


def _init_hint_out(net: ControlNetModel, how: str) -> ControlNetModel:
    """Give the hint encoder's zero conv PyTorch's default conv init when asked.

    The paper zeroes it, so its gradient is zero until the residual zero convs have grown, and
    the hint takes hold late ("sudden convergence"). Those zero convs alone already make a new
    ControlNet leave the base unchanged."""
    if how == "random":
        net.controlnet_cond_embedding.conv_out.reset_parameters()
    return net


def _check_channels(net: ControlNetModel, expected: int, source: str) -> None:
    got = net.config.conditioning_channels
    if got != expected:
        raise ValueError(f"{source}: ControlNet reads {got} hint channels, config needs {expected}")


def controlnet_residuals(
    controlnet: ControlNetModel | MultiControlNetModel,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeddings: torch.Tensor,
    conditions: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Down-block and mid-block residuals for the UNet; conditions is (B,3N,H,W) in [0,1];
    ``added_cond_kwargs``: SDXL's ``text_embeds`` and ``time_ids`` (None for SD)."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    if isinstance(controlnet, MultiControlNetModel):
        hints = list(conditions.split(CHANNELS_PER_CONDITION, dim=1))  # N x (B,3,H,W)
        scales = [1.0] * len(hints)
    else:
        hints, scales = conditions, 1.0
    down, mid = controlnet(
        noisy_latents,
        timesteps,
        encoder_hidden_states=text_embeddings,
        controlnet_cond=hints,
        conditioning_scale=scales,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )
    return down, mid


def added_conditions(
    pooled: torch.Tensor | None, time_ids: torch.Tensor | None
) -> dict[str, torch.Tensor] | None:
    """SDXL's ``added_cond_kwargs`` for ControlNet and UNet: the pooled text (B,P) and the
    micro-conditioning (B,6); None for SD, whose text has no pooled part."""
    if pooled is None:
        return None
    if time_ids is None:
        raise ValueError("an SDXL base needs the batch's time_ids (original size, crop, target)")
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device)}


def controlled_prediction(
    unet: UNet2DConditionModel,
    controlnet: ControlNetModel | MultiControlNetModel,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    text_embeddings: torch.Tensor,
    conditions: torch.Tensor,
    dtype: torch.dtype,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The UNet's fp32 prediction (noise or velocity) with the ControlNet's residuals added:
    what training scores and what the map-reliance probe compares across map sets.
    ``added_cond_kwargs`` (SDXL, ``added_conditions``) goes to both nets."""
    noisy = noisy_latents.to(dtype)
    added = None
    if added_cond_kwargs is not None:  # time_ids stay fp32: bf16 cannot hold 1023 exactly
        added = dict(added_cond_kwargs, text_embeds=added_cond_kwargs["text_embeds"].to(dtype))
    down, mid = controlnet_residuals(
        controlnet, noisy, timesteps, text_embeddings, conditions.to(dtype), added
    )
    return unet(
        noisy,
        timesteps,
        encoder_hidden_states=text_embeddings,
        added_cond_kwargs=added,
        down_block_additional_residuals=[r.to(dtype) for r in down],
        mid_block_additional_residual=mid.to(dtype),
        return_dict=False,
    )[0].float()
