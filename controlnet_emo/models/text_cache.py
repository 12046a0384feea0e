"""Encode each distinct caption once: the frozen text encoder's output is a pure function of
the token ids, and captions repeat (templates like "a photo of a happy face").

Training and the validation loss share one cache through ``TrainModels``, so neither pays the
CLIP forward pass again for a token sequence it has seen. The output is exactly what the
encoder returns for the row (rows are encoded independently, so batching changes nothing).
"""

from __future__ import annotations

import torch


class TextEmbeddingCache:
    """``(B,77) ids -> (B,77,D)`` hidden states, computed once per distinct row and kept on
    the encoder's device (at most ``max_entries`` rows; later new rows are encoded uncached)."""

    def __init__(self, text_encoder: torch.nn.Module, dtype: torch.dtype, max_entries: int = 4096):
        self.text_encoder, self.dtype, self.max_entries = text_encoder, dtype, max_entries
        self._rows: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Keys are read on the host: pass the batch's ids before it moves to the GPU, and the
        # step needs no device-to-host copy (a sync) for them.
        keys = [row.tobytes() for row in input_ids.cpu().numpy()]
        missing = list(dict.fromkeys(k for k in keys if k not in self._rows))
        fresh: dict[bytes, torch.Tensor] = {}
        if missing:
            rows = [keys.index(k) for k in missing]
            device = next(self.text_encoder.parameters()).device
            hidden = encode_captions(self.text_encoder, input_ids[rows].to(device), self.dtype)
            fresh = dict(zip(missing, hidden, strict=True))
            room = max(0, self.max_entries - len(self._rows))
            self._rows.update(list(fresh.items())[:room])
        picked = [self._rows[k] if k in self._rows else fresh[k] for k in keys]
        return torch.stack(picked)  # (B,77,D), on the encoder's device


@torch.no_grad()
def encode_captions(
    text_encoder: torch.nn.Module, input_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(B,77) ids -> (B,77,D): the frozen encoder's last hidden state, cached or not."""
    return text_encoder(input_ids, return_dict=False)[0].to(dtype)
