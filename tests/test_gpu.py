"""Checks that need a CUDA device (skipped without one): mixed precision with every term on."""

import json
import math

import pytest
import torch

from controlnet_emo.config import load_config
from controlnet_emo.training.loop import train
from tests.conftest import DEMO_CONFIG, tiny_overrides

ALL_TERMS = {
    "loss.pixel_l1.weight": 0.1,
    "loss.lpips.weight": 0.1,
    "model.lpips_backbone": "random",
    "loss.emotion.valence": 0.03,
    "loss.emotion.arousal": 0.03,
    "loss.emotion.expression": 0.02,
    "loss.pixel.start_step": 0,
    "train.gradient_checkpointing": True,
    "train.max_steps": 3,
}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_logs_every_term(
    tmp_path, prepared, precision, fresh_accelerator_state
):
    assert torch.cuda.is_available()
    out = tmp_path / precision
    cfg = load_config(
        DEMO_CONFIG,
        tiny_overrides(out, prepared, **ALL_TERMS, **{"train.mixed_precision": precision}),
    )
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for term in ("diffusion", "pixel_l1", "lpips", "valence", "arousal", "expression"):
        assert all(math.isfinite(r[f"loss/{term}"]) for r in rows), term
    assert (out / "controlnet.safetensors").is_file()
    assert (out / "samples" / "step-3.png").is_file()  # sampled beside the bf16 / fp16 UNet
