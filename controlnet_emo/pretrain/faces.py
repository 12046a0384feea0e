"""Synthetic faces in memory: the training data of the shipped demo base and critics.

Why not the raw-folder writer: pretraining wants thousands of faces as tensors, with their
exact landmarks and labels, and no files. Each face comes from ``default_rng([seed, i])``
like ``synth`` draws them, so a set is reproducible from (seed, n, resolution) alone, and
pretraining uses seeds no demo or test dataset uses (the demo's faces stay held out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from controlnet_emo.synthetic.faces import caption, render_face, sample_face_params


@dataclass
class FaceSet:
    images: torch.Tensor  # (N,3,R,R) uint8 RGB
    landmarks: torch.Tensor  # (N,68,2) float32, pixel coords (pixel centres at integers)
    expression: torch.Tensor  # (N,) int64, 0..7
    valence: torch.Tensor  # (N,) float32
    arousal: torch.Tensor  # (N,) float32
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def float_images(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,3,R,R) in [0,1] for the given indices."""
        return self.images[idx].float() / 255.0


def render_faces(n: int, resolution: int, seed: int, desc: str = "render faces") -> FaceSet:
    """``n`` faces at ``resolution``; classes cycle 0..7 so every set is balanced."""
    if n < 1 or resolution < 16:
        raise ValueError(f"render_faces: need n >= 1 and resolution >= 16, got {n}, {resolution}")
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    landmarks = np.empty((n, 68, 2), np.float32)
    labels = np.empty((n, 3), np.float32)
    captions = []
    for i in tqdm(range(n), desc=desc, unit="face", leave=False):
        p = sample_face_params(np.random.default_rng([seed, i]), resolution, i % 8)
        face = render_face(p, resolution)
        images[i], landmarks[i] = face.image, face.landmarks
        labels[i] = (p.expression, p.valence, p.arousal)
        captions.append(caption(p))
    return FaceSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        landmarks=torch.from_numpy(landmarks),
        expression=torch.from_numpy(labels[:, 0]).long(),
        valence=torch.from_numpy(labels[:, 1]),
        arousal=torch.from_numpy(labels[:, 2]),
        captions=captions,
    )


def caption_words(samples: int = 2000, seed: int = 0) -> list[str]:
    """Every word the synthetic captions use, in first-seen order (the demo tokenizer's vocab)."""
    import re

    words: dict[str, None] = {}
    for i in range(samples):
        p = sample_face_params(np.random.default_rng([seed, i]), 64, i % 8)
        for w in re.findall(r"[a-z][a-z-]*", caption(p)):
            words.setdefault(w)
    return list(words)
