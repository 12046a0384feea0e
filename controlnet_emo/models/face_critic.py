"""Small face critics with EmoNet's contract, trained by the project on its synthetic faces.

Why: the emotion losses and the evaluation need a critic that reads expression, valence,
arousal and landmarks off a face. EmoNet's weights are non-commercial and know nothing of
synthetic faces, so the demo ships two critics of its own (``controlnet-emo train-critic``):
one the demo trains against, one, of another architecture, seed and data split, that grades.

Contract (EmoNet's, so the losses and ``evaluate`` take either): input (B,3,H,W) RGB in
[0,1] (256x256 is what EmoNet reads; any size is resized), output a dict with "expression"
(B,C) logits, "valence" (B,), "arousal" (B,) and "heatmap" (B,68,64,64); attribute
``n_expression``. A critic works at a lower resolution than 256 (``work_size``): the faces it
judges are 64 px, and a 256 px trunk would only make every training step slower.

Two trunks: "unet" (an encoder-decoder whose 64x64 decoder output carries the heatmaps, like
EmoNet's hourglass) and "resnet" (a strided trunk with a feature-pyramid heatmap head). Both
read the emotion where the face shows it: the head pools the fine features under each
landmark's heatmap (68 local descriptors: mouth corners, brows, eyelids) beside a global
pool, the way EmoNet masks its features with its heatmaps. Heatmaps are a softmax over the
64x64 grid per landmark, scaled so a sharp Gaussian of sigma 1.5 px peaks near 1.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from controlnet_emo.atomic import atomic_write

N_LANDMARKS = 68
HEATMAP_SIZE = 64
HEATMAP_GAIN = 2 * math.pi * 1.5**2
"""softmax -> heatmap scale: a normalised Gaussian of sigma 1.5 px peaks at 1 / this."""
CONFIG_NAME = "critic_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class CriticShape:
    arch: str = "unet"
    """"unet" (BatchNorm, 64x64 decoder) or "resnet" (GroupNorm, pyramid head)."""
    work_size: int = 64
    """Inputs are resized to this (antialiased, differentiable) before the trunk."""
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 192])
    n_expression: int = 8


def _norm(kind: str, ch: int) -> nn.Module:
    return nn.BatchNorm2d(ch) if kind == "batch" else nn.GroupNorm(8, ch)


class ResBlock(nn.Module):
    """Two 3x3 convs with a (projected) skip; stride 2 in the first conv halves the size."""

    def __init__(self, c_in: int, c_out: int, norm: str, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.skip = (
            nn.Identity()
            if c_in == c_out and stride == 1
            else nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


class FaceCritic(nn.Module):
    def __init__(self, shape: CriticShape):
        super().__init__()
        if shape.arch not in ("unet", "resnet"):
            raise ValueError(f"critic arch must be 'unet' or 'resnet', got {shape.arch!r}")
        if shape.work_size % 8 or len(shape.widths) != 4:
            raise ValueError("critic: work_size must divide by 8 and widths have 4 entries")
        self.shape = shape
        self.n_expression = shape.n_expression
        w = shape.widths
        norm = "batch" if shape.arch == "unet" else "group"
        # unet: full-size stem (64 -> 64), then three halvings to 8.
        # resnet: a stride-2 stem (work_size -> work_size/2), then three halvings.
        stride = 1 if shape.arch == "unet" else 2
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, stride, 1), ResBlock(w[0], w[0], norm))
        self.down = nn.ModuleList(ResBlock(w[i], w[i + 1], norm, 2) for i in range(3))
        if shape.arch == "unet":
            self.lateral = nn.ModuleList(nn.Conv2d(w[i + 1], w[i], 1) for i in range(3))
            self.up = nn.ModuleList(ResBlock(w[i], w[i], norm) for i in range(3))
            self.heat = nn.Conv2d(w[0], N_LANDMARKS, 1)
            local = w[0]
        else:
            self.lateral = nn.ModuleList(nn.Conv2d(w[i], w[1], 1) for i in range(1, 4))
            self.up = nn.ModuleList([ResBlock(w[1], w[1], norm)])
            self.fine = nn.Sequential(nn.ConvTranspose2d(w[1], w[1], 4, 2, 1), nn.ReLU())
            self.heat = nn.Conv2d(w[1], N_LANDMARKS, 1)
            local = w[1]
        self.local = nn.Linear(local, 8)  # per-landmark descriptor width
        self.head = nn.Sequential(
            nn.Linear(2 * w[3] + 8 * N_LANDMARKS, 256),
            nn.ReLU(),
            nn.Linear(256, shape.n_expression + 2),
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = self.shape.work_size
        if x.shape[-2:] != (size, size):  # (B,3,H,W) -> (B,3,S,S)
            down = x.shape[-1] > size
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=down)
        feats = [self.stem(x)]  # unet: (B,w0,S,S); resnet: (B,w0,S/2,S/2)
        for block in self.down:
            feats.append(block(feats[-1]))  # three halvings
        fine = self._fine(feats)  # (B,c,64,64)
        logits = self.heat(fine)  # (B,68,64,64)
        prob = logits.flatten(2).softmax(dim=2)  # (B,68,4096): where each landmark is
        local = torch.einsum("bkp,bcp->bkc", prob, fine.flatten(2))  # (B,68,c) under each map
        z = feats[-1]  # (B,w3,S/8,S/8) or (B,w3,S/16,S/16)
        pooled = [z.mean(dim=(2, 3)), z.amax(dim=(2, 3)), self.local(local).flatten(1)]
        out = self.head(torch.cat(pooled, dim=1))
        c = self.n_expression
        return {
            "expression": out[:, :c],  # (B,C) logits
            "valence": out[:, c],  # (B,)
            "arousal": out[:, c + 1],  # (B,)
            "heatmap": prob.reshape_as(logits) * HEATMAP_GAIN,  # (B,68,64,64)
            "heatmap_logits": logits,  # what training's cross-entropy reads
        }

    def _fine(self, feats: list[Tensor]) -> Tensor:
        """The 64x64 feature map the heatmaps and the local descriptors come from."""
        if self.shape.arch == "unet":  # decode 8 -> 16 -> 32 -> 64 with skips
            y = feats[3]
            for i in (2, 1, 0):
                y = F.interpolate(self.lateral[i](y), scale_factor=2.0, mode="nearest")
                y = self.up[i](y + feats[i])
            return y
        # resnet: sum the three deeper levels at the finest of them, then upsample 2x
        target = feats[1].shape[-2:]
        y = sum(
            F.interpolate(lat(f), target, mode="bilinear")
            for lat, f in zip(self.lateral, feats[1:], strict=True)
        )
        y = self.fine(self.up[0](y))
        if y.shape[-1] != HEATMAP_SIZE:  # a work size other than 128
            y = F.interpolate(y, (HEATMAP_SIZE,) * 2, mode="bilinear")
        return y


def save_face_critic(model: FaceCritic, folder: str | os.PathLike, extra: dict | None = None):
    """``folder/critic_config.json`` + ``folder/model.safetensors`` (what ``load`` reads).

    Weights are stored in fp16 (half the shipped size; loading casts back to fp32)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if v.is_floating_point() else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_write(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config = {"kind": "face_critic", "shape": asdict(model.shape), **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def is_face_critic_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def load_face_critic(folder: str | os.PathLike) -> FaceCritic:
    """A frozen, eval-mode critic; strict keys, so a truncated file fails here, not later."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: face critic file missing")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("kind") != "face_critic":
        raise ValueError(f"{folder / CONFIG_NAME}: not a face critic config")
    model = FaceCritic(CriticShape(**config["shape"]))
    state = load_file(folder / WEIGHTS_NAME)
    try:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{folder / WEIGHTS_NAME}: does not match its config ({err})") from err
    model.requires_grad_(False)
    return model.eval()
