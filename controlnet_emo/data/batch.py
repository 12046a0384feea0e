"""The training batch: named, typed fields instead of a dict of strings."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B,3,H,W) targets in [-1,1]; (B,3,0,0) if unneeded (cache)
    conditions: torch.Tensor  # (B,3N,H,W) condition maps in [0,1], conditions order; dropped = 0
    input_ids: torch.Tensor  # (B,77) CLIP token ids; (B,2,77) for SDXL's two tokenizers
    expression: torch.Tensor  # (B,) long, 0..7, -1 = unknown
    valence: torch.Tensor  # (B,) float, NaN = unknown
    arousal: torch.Tensor  # (B,) float, NaN = unknown
    latent_moments: torch.Tensor | None = None  # (B,2C,h,w) cached VAE mean|std, or None
    time_ids: torch.Tensor | None = None  # (B,6) SDXL's original size, crop, target size

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        # non_blocking: from the loader's pinned memory the copy does not stall the host
        return replace(
            self,
            **{k: v.to(device, non_blocking=True) for k, v in moved.items() if v is not None},
        )

    def __len__(self) -> int:
        return self.pixel_values.shape[0]
