"""Encode each distinct caption once: the frozen text encoders' output is a pure function of
the token ids, and captions repeat (templates like "a photo of a happy face").

Training and the validation loss share one cache through ``TrainModels``, so neither pays the
CLIP forward pass again for a token sequence it has seen. The output is exactly what the
encoders return for the row (rows are encoded independently, so batching changes nothing).

SD has one encoder: ids are (B,77) and the UNet reads its last hidden state. SDXL has two: ids
are (B,2,77), one row per tokenizer, and the UNet reads both encoders' penultimate hidden
states concatenated, plus the second encoder's pooled, projected output (``text_embeds``), as
``StableDiffusionXLPipeline.encode_prompt`` computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TextConditioning:
    """What the UNet reads of a caption: ``hidden`` (B,77,D) and SDXL's ``pooled`` (B,P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def tokenize(tokenizers: Sequence, texts: Sequence[str]) -> torch.Tensor:
    """Captions -> (B,77) ids for one tokenizer, (B,K,77) for SDXL's K=2 (padded, truncated)."""
    ids = [
        tok(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=tok.model_max_length,
            return_tensors="pt",
        ).input_ids
        for tok in tokenizers
    ]
    return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)


def _encoders(text_encoders: torch.nn.Module | Sequence[torch.nn.Module]) -> list:
    return [text_encoders] if isinstance(text_encoders, torch.nn.Module) else list(text_encoders)


class TextEmbeddingCache:
    """``ids -> TextConditioning``, computed once per distinct row and kept on the encoders'
    device (at most ``max_entries`` rows; later new rows are encoded uncached)."""

    def __init__(
        self,
        text_encoders: torch.nn.Module | Sequence[torch.nn.Module],
        dtype: torch.dtype,
        max_entries: int = 4096,
    ):
        self.text_encoders, self.dtype = _encoders(text_encoders), dtype
        self.max_entries = max_entries
        self._rows: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> TextConditioning:
        # Keys are read on the host: pass the batch's ids before it moves to the GPU, and the
        # step needs no device-to-host copy (a sync) for them.
        keys = [row.tobytes() for row in input_ids.cpu().numpy()]
        missing = list(dict.fromkeys(k for k in keys if k not in self._rows))
        fresh: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if missing:
            device = next(self.text_encoders[0].parameters()).device
            for key in missing:
                # one row at a time: a cached row must not depend on which captions shared its
                # first batch (batched GEMMs round differently per batch size), or a resumed
                # run, whose cache starts empty, would drift from an uninterrupted one
                row = input_ids[keys.index(key)][None].to(device)
                text = encode_captions(self.text_encoders, row, self.dtype)
                pooled = None if text.pooled is None else text.pooled[0]
                fresh[key] = (text.hidden[0], pooled)
            room = max(0, self.max_entries - len(self._rows))
            self._rows.update(list(fresh.items())[:room])
        picked = [self._rows[k] if k in self._rows else fresh[k] for k in keys]
        hidden = torch.stack([h for h, _ in picked])  # (B,77,D), on the encoders' device
        pooled = None if picked[0][1] is None else torch.stack([p for _, p in picked])
        return TextConditioning(hidden, pooled)


@torch.no_grad()
def encode_captions(
    text_encoders: torch.nn.Module | Sequence[torch.nn.Module],
    input_ids: torch.Tensor,
    dtype: torch.dtype,
) -> TextConditioning:
    """ids -> the frozen encoders' conditioning, cached or not: SD's (B,77) ids give the last
    hidden state; SDXL's (B,2,77) give both penultimate states concatenated (B,77,D1+D2) and
    the second encoder's projected pooled output (B,P)."""
    encoders = _encoders(text_encoders)
    if len(encoders) == 1:
        return TextConditioning(encoders[0](input_ids, return_dict=False)[0].to(dtype))
    states, pooled = [], None
    for k, encoder in enumerate(encoders):
        out = encoder(input_ids[:, k], output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (B,77,Dk): SDXL reads the penultimate layer
        pooled = out[0]  # the last encoder's text_embeds (B,P), as encode_prompt keeps
    return TextConditioning(torch.cat(states, dim=-1).to(dtype), pooled.to(dtype))


def tokenizers_of(owner: object) -> list:
    """The tokenizers of an SDComponents or a diffusers pipeline (SDXL's two, else one)."""
    return [t for t in (owner.tokenizer, getattr(owner, "tokenizer_2", None)) if t is not None]


def text_encoders_of(owner: object) -> list[torch.nn.Module]:
    """The text encoders of an SDComponents or a diffusers pipeline, in tokenizer order."""
    parts = (owner.text_encoder, getattr(owner, "text_encoder_2", None))
    return [e for e in parts if e is not None]
