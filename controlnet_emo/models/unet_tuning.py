"""Which UNet weights train beside the ControlNet, and how they are saved for inference.

none: frozen (the ControlNet paper's default). attention: every attention block's weights.
up_blocks: the decoder half. lora: peft LoRA adapters on the attention projections.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from controlnet_emo.atomic import set_usual_modes

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SELECTORS = {
    "none": lambda name: False,
    "attention": lambda name: ".attn1." in name or ".attn2." in name,
    "up_blocks": lambda name: name.startswith("up_blocks."),
}


def configure_unet(
    unet: UNet2DConditionModel, mode: str, lora_rank: int = 8
) -> list[torch.nn.Parameter]:
    """Freeze the UNet, then unfreeze (or add) what ``mode`` trains; returns those params."""
    unet.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_rank,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            )
        )
        return [p for p in unet.parameters() if p.requires_grad]
    select = SELECTORS[mode]
    params = []
    for name, p in unet.named_parameters():
        if select(name):
            p.requires_grad_(True)
            params.append(p)
    return params


def save_unet(unet: UNet2DConditionModel, mode: str, run_dir: Path) -> Path | None:
    """unet_lora/ (diffusers LoRA file) or unet/ (full folder); nothing when frozen."""
    if mode == "none":
        return None
    if mode == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        folder = run_dir / "unet_lora"
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers, safe_serialization=True
        )
    else:
        folder = run_dir / "unet"
        unet.save_pretrained(folder, safe_serialization=True)
    set_usual_modes(folder)  # safetensors writes 0600: a colleague could not load the run
    return folder
