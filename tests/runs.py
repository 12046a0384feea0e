"""Fake run folders with tiny, perturbed ControlNets, shared by the export/infer/eval tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from controlnet_emo.config import Config
from controlnet_emo.export.formats import save_diffusers
from controlnet_emo.models.sd import load_sd

CONDITIONS = ["flame", "depth", "skeleton"]
SIZE = 64


def random_controlnet(unet, channels: int, seed: int = 0) -> ControlNetModel:
    """from_unet, then every tensor perturbed: zero convs stop being zero (so the net changes
    the output), and a swapped key could not hide behind two equal tensors."""
    net = ControlNetModel.from_unet(unet, conditioning_channels=channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def make_run(
    root: Path, unet=None, mode: str = "stacked", conditions=CONDITIONS, steps: int = 7
) -> tuple[Path, list[ControlNetModel]]:
    """A run folder as training leaves it: config.yaml + controlnet/ (+ controlnet_i/)."""
    unet = unet if unet is not None else load_sd("tiny").unet
    cfg = Config()
    cfg.conditions = list(conditions)
    cfg.model.controlnet.mode = mode
    cfg.data.resolution = SIZE
    root.mkdir(parents=True)
    cfg.save(root / "config.yaml")
    if mode == "multi":
        nets = [random_controlnet(unet, 3, seed=i) for i in range(len(conditions))]
        model = MultiControlNetModel(nets)
    else:
        nets = [random_controlnet(unet, 3 * len(conditions))]
        model = nets[0]
    info = {
        "conditions": list(conditions),
        "mode": mode,
        "base_model": "tiny",
        "resolution": SIZE,
        "steps": steps,
    }
    save_diffusers(model, root, info)
    return root, nets
