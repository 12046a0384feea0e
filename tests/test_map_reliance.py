"""The probe that tells a ControlNet that follows its maps from one that ignores them."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel

from controlnet_emo.data.dataset import PreparedDataset, collate, read_metadata
from controlnet_emo.evaluation.map_reliance import map_reliance
from controlnet_emo.inference.infer import load_pipeline
from tests.runs import CONDITIONS, SIZE, make_run


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(make_run(tmp_path_factory.mktemp("probe") / "run")[0], device="cpu")[0]


def _batches(pipe, data, n: int = 4) -> list:
    records = read_metadata(data, "train", CONDITIONS)[:n]
    ds = PreparedDataset(
        data, records, CONDITIONS, SIZE, pipe.tokenizer, "a {expression} face", train=False
    )
    return [collate([ds[i] for i in range(0, 2)]), collate([ds[i] for i in range(2, n)])]


def test_a_new_controlnet_ignores_its_maps_exactly(pipe, prepared):
    """Fresh from the UNet, the zero convs keep the maps out: every ratio is exactly 1."""
    trained = pipe.controlnet
    pipe.controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_channels=9)
    try:
        r = map_reliance(pipe, _batches(pipe, prepared))
    finally:
        pipe.controlnet = trained
    assert r["own"] > 0
    assert r["shuffled_over_own"] == 1.0 and r["none_over_own"] == 1.0


def test_a_controlnet_that_reads_its_maps_moves_the_ratio_and_repeats(pipe, prepared):
    batches = _batches(pipe, prepared)
    r = map_reliance(pipe, batches)
    assert r["shuffled_over_own"] != 1.0 and r["none"] != r["own"]
    assert map_reliance(pipe, batches) == r  # seeded noise: the same figure every time
    assert torch.isfinite(torch.tensor([r["own"], r["shuffled"], r["none"]])).all()


@pytest.mark.parametrize("hint_init", ["zero", "random"])
def test_hint_init_opens_the_hint_path_but_a_new_controlnet_still_adds_nothing(hint_init):
    """random gives the hint encoder's last conv a gradient from step one; either way the
    residual zero convs keep a new ControlNet from changing the base."""
    from controlnet_emo.config import load_config
    from controlnet_emo.models.controlnet import build_controlnet, controlnet_residuals
    from controlnet_emo.models.sd import load_sd

    cfg = load_config(None, [f"model.controlnet.hint_init={hint_init}"])
    sd = load_sd("tiny")
    net = build_controlnet(cfg, sd.unet)
    hint_out = net.controlnet_cond_embedding.conv_out.weight
    assert (hint_out.abs().sum() > 0) == (hint_init == "random")
    latents = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, sd.text_encoder.config.hidden_size)
    down, mid = controlnet_residuals(
        net, latents, torch.tensor([500]), text, torch.rand(1, 9, 64, 64)
    )
    assert all(float(r.abs().max()) == 0.0 for r in [*down, mid])
