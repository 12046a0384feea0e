"""SDXL as a base: loading, its text and micro-conditioning, training, export and inference,
on the tiny random SDXL built in code (``model.pretrained: tiny-xl``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from controlnet_emo.config import load_config
from controlnet_emo.data.dataset import PreparedDataset, read_metadata
from controlnet_emo.models.sd import ModelLoadError, load_sd, resolve_pretrained
from controlnet_emo.models.text_cache import encode_captions, tokenize
from controlnet_emo.training.loop import train
from tests.conftest import CRITIC_TERMS, DEMO_CONFIG, tiny_overrides, write_prepared

XL = {"model.pretrained": "tiny-xl"}
EVERY_TERM = {
    **XL,
    **CRITIC_TERMS,
    "loss.pixel.start_step": 0,
    "loss.pixel.samples_per_batch": 1,
    "loss.lpips.weight": 0.1,
    "model.lpips_backbone": "random",
    "data.condition_dropout": 0.3,
    "train.max_steps": 2,
    "train.checkpoint_every": 1,
    "train.validate_every": 2,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("xl") / "data", n=6)


@pytest.fixture(scope="module")
def xl_run(tmp_path_factory, data) -> Path:
    """Two steps of tiny SDXL with every term on (pixel L1, LPIPS, emotion, landmarks)."""
    out = tmp_path_factory.mktemp("xl") / "run"
    train(load_config(DEMO_CONFIG, tiny_overrides(out, data, keep_losses=True, **EVERY_TERM)))
    return out


def test_family_is_read_from_the_unet_and_other_families_are_one_line_errors(tmp_path):
    assert load_sd("tiny-xl").family == "sdxl"
    assert load_sd("tiny").family == "sd"
    sd3 = tmp_path / "sd3"
    (sd3 / "transformer").mkdir(parents=True)
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "x"]}
    (sd3 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        load_sd(str(sd3))
    msg = str(err.value)
    assert "\n" not in msg and "StableDiffusion3Pipeline" in msg
    assert "sd (" in msg and "sdxl (" in msg


def test_text_conditioning_is_what_the_sdxl_pipeline_encodes():
    """Both penultimate states concatenated, and the second encoder's pooled projection:
    what StableDiffusionXLPipeline.encode_prompt gives the UNet."""
    from diffusers import StableDiffusionXLPipeline

    sd = load_sd("tiny-xl")
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_pretrained("tiny-xl"))
    prompts = ["a photo of a happy face", ""]
    ids = tokenize(sd.tokenizers, prompts)  # (2,2,77)
    ours = encode_captions(sd.text_encoders, ids, torch.float32)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)


def test_time_ids_say_the_original_size_and_the_centre_crop(data):
    """72x88 pictures at 64 px: the short side scales to 64, the long to 78, the centre crop
    starts 7 px in; SDXL is told (72, 88), (0, 7), (64, 64)."""
    records = read_metadata(data, "train")
    sd = load_sd("tiny-xl")
    ds = PreparedDataset(data, records, ["flame"], 64, sd.tokenizers, "{expression}", train=False)
    sample = ds[0]
    assert sample["time_ids"].tolist() == [72, 88, 0, 7, 64, 64]
    assert sample["input_ids"].shape == (2, 77)


def test_training_with_every_term_writes_a_run_sdxl_pipelines_load(xl_run):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    rows = [json.loads(x) for x in (xl_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for term in ("diffusion", "pixel_l1", "lpips", "valence", "expression"):
        assert all(torch.isfinite(torch.tensor(r[f"loss/{term}"])) for r in rows), term
    assert (xl_run / "samples" / "step-2.png").is_file()  # the validation grid was drawn
    sidecar = json.loads((xl_run / "controlnet" / "controlnet_emo.json").read_text())
    assert sidecar["family"] == "sdxl"
    card = (xl_run / "README.md").read_text()
    assert "StableDiffusionXLControlNetPipeline" in card and "SDXL base" in card

    net = ControlNetModel.from_pretrained(xl_run / "controlnet")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        resolve_pretrained("tiny-xl"), controlnet=net
    )
    image = pipe(
        "a photo of a happy face",
        image=torch.rand(1, 9, 64, 64),
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)


def test_single_file_has_label_emb_and_loads_back_exactly(xl_run):
    """The original layout with SDXL's label_emb: diffusers' own single-file converter maps
    every other key back, its SDXL UNet map names label_emb, and our loader gives the net."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_TO_LDM_MAPPING,
        convert_controlnet_checkpoint,
    )

    from controlnet_emo.export.formats import load_single_file

    path = xl_run / "controlnet.safetensors"
    net = ControlNetModel.from_pretrained(xl_run / "controlnet")
    want = net.state_dict()
    state = load_file(path)
    config = dict(net.config)
    converted = convert_controlnet_checkpoint(dict(state), config)
    added = DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    assert set(want) - set(converted) == set(added)  # only the added embedding is left
    for key in converted:
        torch.testing.assert_close(converted[key], want[key], rtol=0, atol=0, msg=key)
    for ours, original in added.items():
        torch.testing.assert_close(state[f"control_model.{original}"], want[ours])
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["controlnet_emo.family"] == "sdxl"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-xl")
    back = load_single_file(path).state_dict()
    for key in want:
        torch.testing.assert_close(back[key], want[key], rtol=0, atol=0, msg=key)


def test_resume_continues_exactly(tmp_path, data, xl_run):
    half = tmp_path / "half"
    steps = {k: v for k, v in EVERY_TERM.items() if k != "train.max_steps"}
    for more in ({"train.max_steps": 1}, {"train.max_steps": 2, "train.resume": "latest"}):
        flags = {**steps, **more}
        train(load_config(DEMO_CONFIG, tiny_overrides(half, data, keep_losses=True, **flags)))
    a = load_file(xl_run / "checkpoint-2" / "model.safetensors")
    b = load_file(half / "checkpoint-2" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_infer_draws_a_held_out_render(xl_run, data, tmp_path):
    from controlnet_emo.inference.infer import infer
    from controlnet_emo.models.sampling import Sampling

    held_out = read_metadata(data, "val")[0]
    out = tmp_path / "face.png"
    paths = infer(
        xl_run,
        data / held_out.maps["flame"],
        "a photo of a happy face",
        out,
        Sampling(steps=2, guidance_scale=2.0),
        depth=data / held_out.maps["depth"],
        skeleton=data / held_out.maps["skeleton"],
    )
    from PIL import Image

    assert paths == [out] and Image.open(out).size == (64, 64)


def test_multi_mode_with_lora_trains_and_exports_one_file_per_condition(tmp_path, data):
    out = tmp_path / "multi"
    flags = {
        **XL,
        "model.controlnet.mode": "multi",
        "model.unet_trainable": "lora",
        "loss.diffusion.snr_gamma": 5.0,
        "train.max_steps": 1,
        "train.checkpoint_every": 1,
        "train.validate_every": 1,
    }
    train(load_config(DEMO_CONFIG, tiny_overrides(out, data, **flags)))
    from controlnet_emo.export.formats import load_single_file

    for name in ("flame", "depth", "skeleton"):
        net = load_single_file(out / f"controlnet_{name}.safetensors")
        assert net.config.conditioning_channels == 3
        assert net.config.addition_embed_type == "text_time"
    assert (out / "unet_lora").is_dir()
    shutil.rmtree(out)


def test_doctor_checks_both_text_encoders_of_an_sdxl_folder(tmp_path):
    from controlnet_emo.cli.doctor import sd_folder_problems

    folder = tmp_path / "xl"
    shutil.copytree(resolve_pretrained("tiny-xl"), folder)
    assert sd_folder_problems(folder) == []
    shutil.rmtree(folder / "text_encoder_2")
    shutil.rmtree(folder / "tokenizer_2")
    problems = "; ".join(sd_folder_problems(folder))
    assert "text_encoder_2" in problems and "tokenizer_2/" in problems


def test_doctor_estimates_sdxl_training_memory_growing_with_resolution(tmp_path):
    """The GPU memory row names SDXL, counts both text encoders, and its activations grow with
    the latent area (4x from 64 to 128 px); the VAE is fp32 in fp16 runs (it overflows)."""
    from controlnet_emo.cli import doctor

    folder = Path(resolve_pretrained("tiny-xl"))
    estimates = {}
    for res in (64, 128):
        over = {**XL, "data.resolution": res, "train.mixed_precision": "fp16"}
        cfg = load_config(DEMO_CONFIG, tiny_overrides(tmp_path / "run", tmp_path / "d", **over))
        sizes = doctor.model_sizes(cfg, folder)
        assert sizes.family == "sdxl" and sizes.exact
        rows = doctor.check_memory(cfg, sizes)
        assert [r.check for r in rows] == ["GPU memory"]
        assert "SDXL" in rows[0].detail and "both text encoders" in rows[0].detail
        assert "VAE in fp32" in rows[0].detail, rows[0].detail
        estimates[res] = doctor.memory_estimate(cfg, sizes)[0]
    units = doctor.activation_units(sizes.unet_config, 64, sizes.vae_scale)
    per_sample = units * doctor.ACTIVATION_BYTES_PER_UNIT  # at 64 px; 4x at 128 px
    assert estimates[128] - estimates[64] == pytest.approx(3 * 2 * per_sample)  # batch 2
    # SDXL-base's UNet levels at 1024 px: 5.9x SD 1.5's at 512 px
    xl_base = dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
    )
    ratio = doctor.activation_units(xl_base, 1024) / doctor.activation_units(doctor.SD15_UNET, 512)
    assert ratio == pytest.approx(5.9, abs=0.05)


def test_comfyui_verdict_on_sdxl_shapes(xl_run):
    """SDXL's shape (linear projections, 2048-wide text, ``text_time``) with 64-channel heads
    and 32 norm groups: ComfyUI's own ``load_controlnet`` built the scaled-down one below from
    our single file with no missing key and the same residuals as diffusers (3e-7, see
    docs/export.md); SDXL-base's real shape passes too. 32-channel heads, or the tiny-xl's
    16 groups and 16-channel heads, do not."""
    from diffusers import ControlNetModel

    from controlnet_emo.export.formats import comfyui_compatibility

    xl = dict(
        block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    base = dict(
        xl,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
    )
    with torch.device("meta"):
        assert comfyui_compatibility(ControlNetModel(attention_head_dim=(1, 2), **xl)) is None
        assert comfyui_compatibility(ControlNetModel(**base)) is None
        narrow = ControlNetModel(attention_head_dim=(2, 4), **xl)
    assert "32-channel attention heads" in comfyui_compatibility(narrow)
    tiny = ControlNetModel.from_pretrained(xl_run / "controlnet")
    reasons = comfyui_compatibility(tiny)
    assert "norm_num_groups 16" in reasons and "16-channel attention" in reasons, reasons


def test_v_prediction_sdxl_trains_with_min_snr(tmp_path, data):
    """A v-prediction SDXL base (the scheduler's ``prediction_type``, as such bases ship it):
    the target is the velocity and min-SNR weighs it min(SNR, g) / (SNR + 1); two training
    steps with min-SNR give finite losses."""
    from controlnet_emo.training.losses import diffusion_loss, diffusion_target

    folder = tmp_path / "xl_v"
    shutil.copytree(resolve_pretrained("tiny-xl"), folder)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched_config = json.loads(sched_file.read_text())
    sched_file.write_text(json.dumps({**sched_config, "prediction_type": "v_prediction"}))
    scheduler = load_sd(str(folder)).scheduler
    assert scheduler.config.prediction_type == "v_prediction"

    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 400, 900])
    target = diffusion_target(latents, noise, t, scheduler)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target, abar.sqrt() * noise - (1 - abar).sqrt() * latents, atol=1e-6)
    pred = torch.randn_like(target)
    snr = (abar / (1 - abar)).flatten()
    weights = torch.clamp(snr, max=5.0) / (snr + 1)
    expected = (weights * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
    got = diffusion_loss(pred, target, t, scheduler, "l2", snr_gamma=5.0)
    assert torch.allclose(got, expected, rtol=1e-5)

    out = tmp_path / "run"
    over = {"model.pretrained": str(folder), "loss.diffusion.snr_gamma": 5.0}
    over |= {"train.max_steps": 2, "train.checkpoint_every": 2}
    train(load_config(DEMO_CONFIG, tiny_overrides(out, data, **over)))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/diffusion"] for r in rows if "loss/diffusion" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses))), rows
    shutil.rmtree(out)


def test_the_app_draws_from_an_sdxl_run(xl_run, data):
    """The app goes through the same loading and sampling path: an SDXL run opens in it, its
    held-out gallery fills, and a face comes back with the critic's reading."""
    pytest.importorskip("gradio")
    from controlnet_emo.app.engine import Engine

    engine = Engine(xl_run, critic="demo-critic-eval", device="cpu", data=data)
    assert type(engine.pipe).__name__ == "MapGuidedControlNetXLPipeline"
    assert engine.held_out
    maps, _ = engine.held_out_maps(0)
    face = engine.draw(maps, engine.held_out[0].prompt, engine.sampling(seed=1, steps=2))
    assert face.size == (64, 64) and np.asarray(face).std() > 0
