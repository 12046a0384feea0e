"""Shared fixtures: an isolated cache for the tiny SD, and small prepared datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory) -> Path:
    """The tiny random SD is built once per session into a temporary cache."""
    cache = tmp_path_factory.mktemp("controlnet-emo-cache")
    os.environ["CONTROLNET_EMO_CACHE"] = str(cache)
    return cache


def write_prepared(
    root: Path, n: int = 12, size: tuple[int, int] = (72, 88), n_val: int = 2, seed: int = 0
) -> Path:
    """A prepared dataset of random pictures in the exact layout `prepare` writes."""
    rng = np.random.default_rng(seed)
    for d in ("images", "flame", "depth", "skeleton"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = (rng.random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(255 - img).save(root / "flame" / f"{i}.png")
        Image.fromarray(img[..., ::-1].copy()).save(root / "skeleton" / f"{i}.png")
        Image.fromarray((rng.random(size) * 65535).astype(np.uint16)).save(
            root / "depth" / f"{i}.png"
        )
        rows.append(
            dict(
                file_name=f"images/{i}.png",
                flame_file_name=f"flame/{i}.png",
                depth_file_name=f"depth/{i}.png",
                skeleton_file_name=f"skeleton/{i}.png",
                text="a photo of a happy face" if i % 2 else None,
                expression=i % 8,
                valence=float(rng.uniform(-1, 1)),
                arousal=float(rng.uniform(-1, 1)),
                split="val" if i >= n - n_val else "train",
            )
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def prepared(tmp_path) -> Path:
    return write_prepared(tmp_path / "data")


DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


CRITIC_TERMS = {  # the critic-read terms at the weights demo.yaml trained with until 70e4698
    "loss.pixel_l1.weight": 0.01,
    "loss.emotion.valence": 0.003,
    "loss.emotion.arousal": 0.003,
    "loss.emotion.expression": 0.002,
    "loss.landmarks.weight": 0.1,
}


def tiny_overrides(out: Path, data: Path, keep_losses: bool = False, **extra) -> list[str]:
    """A fast CPU recipe on top of configs/demo.yaml: the tiny random SD and critic (the
    plumbing tests' models), and, unless ``keep_losses``, only the diffusion term."""
    losses_off = {
        "loss.pixel_l1.weight": 0,
        "loss.emotion.valence": 0,
        "loss.emotion.arousal": 0,
        "loss.emotion.expression": 0,
    }
    base = {
        "output_dir": out,
        "model.pretrained": "tiny",
        "model.emonet": "random",
        **({} if keep_losses else losses_off),
        "data.root": data,
        "data.resolution": 64,
        "data.num_workers": 0,
        "train.batch_size": 2,
        "train.total_batch_size": 2,
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.validate_every": 100,
        "train.validation_samples": 2,
        "train.validation_steps": 2,
        "train.report_to": "none",
        "train.lr_warmup_steps": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def random_fan_home(tmp_path_factory) -> Path:
    """TORCH_HOME holding a random-weight 2D FAN in the exact file face-alignment loads."""
    from face_alignment.api import models_urls
    from face_alignment.models import FAN

    from conditioners.skeleton import fan_checkpoint_path

    home = tmp_path_factory.mktemp("torch_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        path = fan_checkpoint_path(models_urls["2DFAN-4"])
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), path)
    return home


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed precision per process; a test that picks its own resets it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
