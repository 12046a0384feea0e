"""The prepared dataset (metadata.jsonl, HF imagefolder style) and its sample stream.

Randomness here is a pure function of (seed, position in the stream), never of RNG state,
so a resumed run sees exactly the batches an uninterrupted one would, with any worker count.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from controlnet_emo.config import Config
from controlnet_emo.data.batch import Batch
from controlnet_emo.data.transforms import paired_transform_with_time_ids
from controlnet_emo.labels import CONDITION_KEYS, EXPRESSION_WORDS
from controlnet_emo.models.text_cache import tokenize

log = logging.getLogger(__name__)


def template_caption(template: str, expression: int) -> str:
    """The caption a sample without text gets: its expression word in ``data.caption_template``
    (an unknown expression reads as neutral)."""
    word = EXPRESSION_WORDS[expression] if 0 <= expression < len(EXPRESSION_WORDS) else "neutral"
    return template.format(expression=word)


@dataclass(frozen=True)
class Record:
    file_name: str
    maps: dict[str, str]
    text: str | None
    expression: int
    valence: float
    arousal: float
    split: str
    landmarks: list | None = None
    """The target's 68 (x, y) points in its own pixels, when prepare wrote them."""


def read_metadata(
    root: str | Path,
    split: str | None = None,
    conditions: list[str] | tuple[str, ...] = tuple(CONDITION_KEYS),
) -> list[Record]:
    """Parse metadata.jsonl; a malformed line is an error naming the file and line."""
    path = Path(root) / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metadata.jsonl (run `controlnet-emo prepare` first)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rec = Record(
                file_name=row["file_name"],
                maps={c: row[CONDITION_KEYS[c]] for c in conditions},
                text=row.get("text") or None,
                expression=int(row.get("expression", -1)),
                valence=float(row.get("valence", float("nan"))),
                arousal=float(row.get("arousal", float("nan"))),
                split=row.get("split", "train"),
                landmarks=row.get("landmarks"),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{lineno}: bad metadata row ({err!r})") from None
        if split is None or rec.split == split:
            records.append(rec)
    return records


def load_rgb(path: Path) -> torch.Tensor:
    """(3,H,W) float in [0,1]; single-channel maps (depth, 8 or 16 bit) are replicated."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I", "I;16", "I;16B", "F"):
            arr = np.asarray(im, dtype=np.float32)
            arr = arr / (65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0)
            t = torch.from_numpy(np.clip(arr, 0, 1))[None].repeat(3, 1, 1)
            return t
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


class PreparedDataset(Dataset):
    """Target image + ordered condition maps + caption + emotion labels, one per record."""

    def __init__(
        self,
        root: str | Path,
        records: list[Record],
        conditions: list[str],
        resolution: int,
        tokenizer,
        caption_template: str,
        *,
        train: bool,
        seed: int = 0,
        condition_dropout: float = 0.0,
        caption_dropout: float = 0.0,
        hflip: bool = True,
        latent_moments: torch.Tensor | None = None,
        load_target: bool = True,
        cache_images: bool = False,
    ):
        if not records:
            raise ValueError(f"{root}: no samples for this split")
        self.root, self.records, self.conditions = Path(root), records, conditions
        self.resolution, self.template = resolution, caption_template
        # one tokenizer (SD) or SDXL's two, whose ids are stacked per sample (2,77)
        self.tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
        self.train, self.seed, self.hflip = train, seed, hflip
        self.condition_dropout, self.caption_dropout = condition_dropout, caption_dropout
        # (N,O,2C,h,w) cached VAE posteriors, O orientations (plain, mirrored), or None
        self.latent_moments = latent_moments
        self.load_target = load_target or latent_moments is None
        """False: skip decoding the target (cached latents and no pixel terms need none)."""
        self.decoded: dict[str, torch.Tensor] | None = {} if cache_images else None
        """Decoded images by file name (``data.cache_images``); nothing downstream writes
        to them."""

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, rec: Record) -> str:
        return rec.text or template_caption(self.template, rec.expression)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, key = item if isinstance(item, tuple) else (item, item)
        # One bad file must not stop a run: fall back to the next sample, deterministically.
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            try:
                return self._load(i, key)
            except (OSError, ValueError) as err:
                log.warning("skipping sample %s: %s", self.records[i].file_name, err)
        raise RuntimeError(f"{self.root}: no sample could be read")

    def _load(self, i: int, key: int) -> dict:
        rec = self.records[i]
        rng = np.random.default_rng([self.seed, key]) if self.train else None
        paths = [rec.file_name, *(rec.maps[c] for c in self.conditions)]
        images = [self._read(p) for p in paths[1 - self.load_target :]]
        if self.latent_moments is None:
            (target, *maps), time_ids = paired_transform_with_time_ids(
                images, self.resolution, rng, self.hflip
            )
            orientation = 0
        else:  # the cache holds the centre crop, plain and mirrored: crop there, flip freely
            images, time_ids = paired_transform_with_time_ids(images, self.resolution, None)
            orientation = int(self._draw_flip(rng))
            images = [im.flip(-1) for im in images] if orientation else images
            target, *maps = images if self.load_target else [torch.zeros(3, 0, 0), *images]
        keep = torch.ones(len(maps))
        text = self.caption(rec)
        if rng is not None:
            keep = torch.from_numpy(rng.random(len(maps)) >= self.condition_dropout).float()
            if rng.random() < self.caption_dropout:
                text = ""
        conditions = torch.cat(
            [m * k for m, k in zip(maps, keep, strict=False)]
        )  # (3N,H,W), dropped = 0
        ids = tokenize(self.tokenizers, [text])[0]  # (77,), or (2,77) for SDXL
        sample = {
            "pixel_values": target * 2 - 1,  # (3,H,W) in [-1,1] per image; (3,0,0) unloaded
            "conditions": conditions,
            "input_ids": ids,
            "expression": rec.expression if 0 <= rec.expression < 8 else -1,
            "valence": rec.valence,
            "arousal": rec.arousal,
            "time_ids": time_ids,  # (6,)
        }
        if self.latent_moments is not None:
            sample["latent_moments"] = self.latent_moments[i, orientation]  # (2C,h,w)
        return sample

    def _read(self, file_name: str) -> torch.Tensor:
        if self.decoded is None:
            return load_rgb(self.root / file_name)
        if file_name not in self.decoded:
            self.decoded[file_name] = load_rgb(self.root / file_name)
        return self.decoded[file_name]

    def _draw_flip(self, rng: np.random.Generator | None) -> bool:
        """A training flip, when flips are on and the cache has the mirrored moments."""
        mirrored = self.latent_moments is not None and self.latent_moments.shape[1] > 1
        return bool(rng is not None and self.hflip and mirrored and rng.random() < 0.5)


def dataset_from_config(
    cfg: Config,
    records: list[Record],
    tokenizer,
    *,
    train: bool,
    latent_moments: torch.Tensor | None = None,
    load_target: bool = True,
) -> PreparedDataset:
    """The dataset a run's config describes (training draws augmentations, eval does not)."""
    d = cfg.data
    return PreparedDataset(
        d.root,
        records,
        cfg.conditions,
        d.resolution,
        tokenizer,
        d.caption_template,
        train=train,
        seed=cfg.seed,
        condition_dropout=d.condition_dropout,
        caption_dropout=d.caption_dropout,
        hflip=d.hflip,
        latent_moments=latent_moments,
        load_target=load_target,
        cache_images=d.cache_images and train,
    )


def held_out_records(cfg: Config) -> list[Record]:
    """The validation split, or the training split when a dataset has no held-out rows."""
    records = read_metadata(cfg.data.root, cfg.data.val_split, cfg.conditions)
    return records or read_metadata(cfg.data.root, cfg.data.train_split, cfg.conditions)


def collate(samples: list[dict]) -> Batch:
    return Batch(
        pixel_values=torch.stack([s["pixel_values"] for s in samples]),
        conditions=torch.stack([s["conditions"] for s in samples]),
        input_ids=torch.stack([s["input_ids"] for s in samples]),
        expression=torch.tensor([s["expression"] for s in samples], dtype=torch.long),
        valence=torch.tensor([s["valence"] for s in samples], dtype=torch.float32),
        arousal=torch.tensor([s["arousal"] for s in samples], dtype=torch.float32),
        latent_moments=torch.stack([s["latent_moments"] for s in samples])
        if "latent_moments" in samples[0]
        else None,
        time_ids=torch.stack([s["time_ids"] for s in samples])
        if "time_ids" in samples[0]
        else None,
    )


def class_balance_weights(records: list[Record]) -> torch.Tensor:
    """1 / class frequency, so each expression is drawn equally often (AffectNet is ~50% happy)."""
    counts = Counter(r.expression for r in records)
    return torch.tensor([1.0 / counts[r.expression] for r in records], dtype=torch.float64)


class StreamSampler(Sampler):
    """Endless, resumable stream of (index, draw key) for one process.

    Epoch ``e`` is a permutation (or a class-balanced draw with replacement) seeded by
    (seed, e). Global batches are dealt round-robin to processes. ``start_batch`` skips this
    process's first batches arithmetically, which is how resume lands on the same data.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        *,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world: int = 1,
        start_batch: int = 0,
    ):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.weights, self.rank, self.world, self.start_batch = weights, rank, world, start_batch
        per_round = batch_size * world
        self.epoch_len = max(per_round, n - n % per_round)  # whole global batches per epoch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.epoch_len, replacement=True, generator=g)
        reps = -(-self.epoch_len // self.n)
        return torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[
            : self.epoch_len
        ]

    def __iter__(self):
        local_per_epoch = self.epoch_len // (self.batch_size * self.world)
        epoch, skip = divmod(self.start_batch, local_per_epoch)
        while True:
            order = self._epoch_order(epoch)
            for b in range(skip, local_per_epoch):
                start = (b * self.world + self.rank) * self.batch_size
                for pos in range(start, start + self.batch_size):
                    yield int(order[pos]), epoch * self.epoch_len + pos
            epoch, skip = epoch + 1, 0
