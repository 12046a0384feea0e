"""diffusers ControlNet keys -> the original ControlNet layout (``control_model.`` keys).

Why our own map: diffusers reads the original layout (what ComfyUI and A1111 load) but cannot
write it. ``to_original_layout`` is the inverse of diffusers' reader
(``convert_controlnet_checkpoint`` in ``diffusers/loaders/single_file_utils``), so every file
we write loads back in plain diffusers to identical tensors (tested).
"""

from __future__ import annotations

import re

import torch

from controlnet_emo.export.model_info import ExportError

ORIGINAL_PREFIX = "control_model."
# The original hint encoder: conv_in at 0, six convs at 2..12 (SiLU between), conv_out at 14.
# A hint encoder for a 4x VAE (the demo base) has four hidden convs, at 2..8; its conv_out
# stays at 14, which is where diffusers' single-file reader looks for it.
_HINT_BLOCKS = 6
_HINT_OUT = 2 * _HINT_BLOCKS + 2

_RESNET_TO_ORIGINAL = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_FIXED_TO_ORIGINAL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_cond_embedding.conv_out": f"input_hint_block.{_HINT_OUT}",
    "controlnet_mid_block": "middle_block_out.0",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    # SDXL's added text/time embedding: the original UNet's label_emb, as diffusers' SDXL
    # UNet map (DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]) names it
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def to_original_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ControlNet keys -> original ``control_model.`` keys (the same tensors).

    Original input blocks are numbered across the whole encoder: 0 is conv_in, then per down
    block ``layers_per_block`` resnet(+attention) entries and one downsampler (none after the
    last block). The hint encoder has the original's six hidden convs (SD's 8x VAE), or
    four (a 4x VAE).
    """
    lpb = _layers_per_block(state_dict)
    hint_blocks = {
        int(m.group(1))
        for k in state_dict
        if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))
    }
    if hint_blocks not in (set(range(_HINT_BLOCKS)), set(range(_HINT_BLOCKS - 2))):
        raise ExportError(
            f"the hint encoder has {len(hint_blocks)} hidden convs; the original layout (and "
            f"diffusers' reader) needs {_HINT_BLOCKS} (conditioning_embedding_out_channels of "
            f"length 4, SD's 8x VAE) or {_HINT_BLOCKS - 2} (length 3, a 4x VAE)"
        )
    if any(k.startswith("mid_block.resnets.") for k in state_dict) and not any(
        k.startswith("mid_block.attentions.0.") for k in state_dict
    ):
        raise ExportError("a mid block without attention has no original-layout equivalent")
    out = {}
    for key, tensor in state_dict.items():
        new = ORIGINAL_PREFIX + _original_key(key, lpb)
        if new in out:
            raise ExportError(f"two diffusers keys map to {new}")
        out[new] = tensor
    return out


def _layers_per_block(state_dict: dict[str, torch.Tensor]) -> int:
    ids = {
        int(m.group(1))
        for k in state_dict
        if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))
    }
    if not ids:
        raise ExportError("not a diffusers ControlNet state dict (no down_blocks.0.resnets)")
    return max(ids) + 1


def _original_key(key: str, lpb: int) -> str:
    module, _, param = key.rpartition(".")
    if module in _FIXED_TO_ORIGINAL:
        return f"{_FIXED_TO_ORIGINAL[module]}.{param}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 * int(m.group(1)) + 2}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m.group(1)}.0.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{_input_index(int(m.group(1)), lpb, lpb)}.0.op.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        i = _input_index(block, layer, lpb)
        if kind == "attentions":
            return f"input_blocks.{i}.1.{rest}"
        return f"input_blocks.{i}.0.{_resnet_rest(rest, key)}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m.group(1))}.{_resnet_rest(m.group(2), key)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m.group(1)}"
    raise ExportError(f"{key}: no original ControlNet layout equivalent")


def _input_index(block: int, layer: int, lpb: int) -> int:
    """Inverse of diffusers' ``block_id = (i-1) // (lpb+1)``, ``layer = (i-1) % (lpb+1)``."""
    return 1 + block * (lpb + 1) + layer


def _resnet_rest(rest: str, key: str) -> str:
    name, _, param = rest.partition(".")
    if name not in _RESNET_TO_ORIGINAL:
        raise ExportError(f"{key}: unknown resnet parameter {name!r}")
    return f"{_RESNET_TO_ORIGINAL[name]}.{param}"
