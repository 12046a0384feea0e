"""``controlnet-emo train-critic``: a face critic with EmoNet's contract, on synthetic faces.

Why synthetic: their labels and landmarks are exact, so the critic's errors are its own and
its held-out figures (top-1, valence/arousal CCC, landmark NME) say how far to trust it. The
demo ships two, trained by this command from ``configs/critic_train.yaml`` and
``configs/critic_eval.yaml``: another seed, another set of faces, another trunk, so the
evaluation critic does not share the training critic's blind spots.

Faces are augmented (blur, noise, contrast) because the critic judges generated faces, which
are softer than the renders it learns from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from controlnet_emo.config import ConfigError, load_typed
from controlnet_emo.evaluation.metrics import (
    ccc,
    flip_test_heatmap,
    heatmap_landmarks,
    nme,
    topk_accuracy,
)
from controlnet_emo.models.face_critic import (
    HEATMAP_SIZE,
    CriticShape,
    FaceCritic,
    save_face_critic,
)
from controlnet_emo.pretrain.base import machine_description
from controlnet_emo.pretrain.faces import FaceSet, render_faces

log = logging.getLogger(__name__)
CONTRACT_SIZE = 256  # what the losses feed a critic (losses.to_emonet_input)


@dataclass
class CriticTrainConfig:
    version: int = 1
    output_dir: str = "runs/critic-train"
    seed: int = 2000
    """Training faces use ``seed``, held-out faces ``seed + 1``."""
    n_train: int = 6000
    n_held_out: int = 512
    resolution: int = 64
    """Faces are rendered at this size (the demo's), then read at 256 like EmoNet."""
    model: CriticShape = field(default_factory=CriticShape)
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2.0e-3
    heatmap_sigma: float = 1.5
    """Gaussian heatmap targets, in 64x64 heatmap pixels."""
    heatmap_weight: float = 1.0
    va_weight: float = 1.0
    augment: bool = True


def load_critic_config(path: str | Path | None, overrides: list[str]) -> CriticTrainConfig:
    cfg = load_typed(CriticTrainConfig, path, overrides)
    for key in ("n_train", "n_held_out", "steps", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be >= 1")
    if cfg.resolution < 16:
        raise ConfigError("resolution: must be >= 16")
    return cfg


def gaussian_heatmaps(landmarks: torch.Tensor, resolution: int, sigma: float) -> torch.Tensor:
    """(B,68,2) image pixels -> (B,68,64,64) unit-peak Gaussians on the heatmap grid."""
    xy = (landmarks + 0.5) * HEATMAP_SIZE / resolution - 0.5  # pixel centres at integers
    grid = torch.arange(HEATMAP_SIZE, dtype=torch.float32)
    gx = torch.exp(-((grid - xy[..., 0:1]) ** 2) / (2 * sigma**2))  # (B,68,64)
    gy = torch.exp(-((grid - xy[..., 1:2]) ** 2) / (2 * sigma**2))  # (B,68,64)
    return gy[..., :, None] * gx[..., None, :]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B,3,R,R) in [0,1]: random blur (sigma up to 1.2 px), contrast, brightness, noise."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=g) * 1.2
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-(k**2)[None] / (2 * sigma[:, None].clamp(min=1e-3) ** 2))  # (B,5)
    kern = kern / kern.sum(1, keepdim=True)
    # separable per-sample blur as a grouped conv over the B*3 channels
    flat = x.reshape(1, b * 3, *x.shape[-2:])
    kx = kern.repeat_interleave(3, 0)[:, None, None, :]  # (3B,1,1,5)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kx, groups=b * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kx.transpose(2, 3), groups=b * 3)
    x = flat.reshape_as(x)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.3
    bright = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.1
    noise = torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.04
    return ((x - 0.5) * contrast + 0.5 + bright + noise).clamp(0, 1)


def heatmap_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,68,64,64) logits, (B,68,64,64) Gaussians -> mean over landmarks of -sum t log p."""
    t = target.flatten(2)
    t = t / t.sum(dim=2, keepdim=True).clamp(min=1e-12)
    return -(t * logits.flatten(2).log_softmax(dim=2)).sum(dim=2).mean()


def to_contract(x: torch.Tensor) -> torch.Tensor:
    """What the losses hand a critic: the face resized to 256 px (bilinear)."""
    return F.interpolate(x, (CONTRACT_SIZE,) * 2, mode="bilinear", align_corners=False)


def train_critic(cfg: CriticTrainConfig) -> Path:
    """Train, score on held-out faces, write ``OUT/model/`` (critic + critic_report.json)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    faces = render_faces(cfg.n_train, cfg.resolution, cfg.seed, "render training faces")
    held = render_faces(cfg.n_held_out, cfg.resolution, cfg.seed + 1, "render held-out faces")
    torch.manual_seed(cfg.seed)
    model = FaceCritic(cfg.model)
    t1 = time.perf_counter()
    final = fit(model, faces, cfg)
    seconds = {"render_s": t1 - t0, "train_s": time.perf_counter() - t1}
    model.eval()
    report = {
        "held_out": score_critic(model, held),
        "final_train_losses": final,
        "seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": machine_description(),
        "command": " ".join(["controlnet-emo", *sys.argv[1:]]),
        "config": dataclasses.asdict(cfg),
    }
    model_dir = out / "model"
    save_face_critic(model, model_dir, extra={"trained_on": f"synthetic faces, seed {cfg.seed}"})
    (model_dir / "critic_report.json").write_text(json.dumps(report, indent=2))
    log.info("critic written to %s: %s", model_dir, json.dumps(report["held_out"]))
    return model_dir


def fit(model: FaceCritic, faces: FaceSet, cfg: CriticTrainConfig) -> dict[str, float]:
    """Expression cross-entropy + valence/arousal MSE + a per-landmark cross-entropy between
    the heatmap's softmax and the normalised Gaussian target (trains far faster than MSE on
    heatmaps, which first learns to predict zeros everywhere)."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=cfg.steps)
    model.train()
    history: dict[str, list[float]] = {"expression": [], "va": [], "heatmap": []}
    bar = tqdm(range(cfg.steps), desc="train critic", unit="step")
    for _ in bar:
        idx = torch.randint(len(faces), (cfg.batch_size,), generator=g)
        x = faces.float_images(idx)
        if cfg.augment:
            x = augment(x, g)
        pred = model(to_contract(x))
        target_hm = gaussian_heatmaps(faces.landmarks[idx], cfg.resolution, cfg.heatmap_sigma)
        terms = {
            "expression": F.cross_entropy(pred["expression"], faces.expression[idx]),
            "va": F.mse_loss(pred["valence"], faces.valence[idx])
            + F.mse_loss(pred["arousal"], faces.arousal[idx]),
            "heatmap": heatmap_cross_entropy(pred["heatmap_logits"], target_hm),
        }
        loss = terms["expression"] + cfg.va_weight * terms["va"]
        loss = loss + cfg.heatmap_weight * terms["heatmap"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in terms.items():
            history[k].append(v.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return {k: float(np.mean(v[-50:])) for k, v in history.items()}


@torch.no_grad()
def score_critic(model, faces: FaceSet, batch_size: int = 64) -> dict[str, float]:
    """Top-1 / top-3, valence / arousal CCC, landmark NME (inter-ocular) on exact labels.

    NME twice: of one reading (``nme_iod``) and by the flip test that ``evaluate`` reads
    landmarks with (``nme_iod_flip_test``, ``metrics.flip_test_heatmap``).
    """
    logits, val, aro, points, flip_points = [], [], [], [], []
    res = faces.images.shape[-1]
    for start in range(0, len(faces), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(faces)))
        x = to_contract(faces.float_images(idx))
        pred = model(x)
        logits.append(pred["expression"])
        val.append(pred["valence"])
        aro.append(pred["arousal"])
        points.append(heatmap_landmarks(pred["heatmap"], res))
        heatmap = flip_test_heatmap(pred["heatmap"], model(x.flip(-1))["heatmap"])
        flip_points.append(heatmap_landmarks(heatmap, res))
    logits = torch.cat(logits)
    return {
        "top1": topk_accuracy(logits, faces.expression, 1),
        "top3": topk_accuracy(logits, faces.expression, 3),
        "valence_ccc": ccc(torch.cat(val), faces.valence),
        "arousal_ccc": ccc(torch.cat(aro), faces.arousal),
        "nme_iod": float(nme(torch.cat(points), faces.landmarks).mean()),
        "nme_iod_flip_test": float(nme(torch.cat(flip_points), faces.landmarks).mean()),
        "n": len(faces),
    }
