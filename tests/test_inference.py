"""Inference: the same image a plain diffusers pipeline draws, maps in the model's order."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    UniPCMultistepScheduler,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from controlnet_emo.cli.generate import add_infer_arguments, run_infer
from controlnet_emo.config import Config
from controlnet_emo.export.formats import export_run
from controlnet_emo.export.model_info import SIDECAR, ModelInfo
from controlnet_emo.inference.infer import (
    InferenceError,
    generate,
    infer,
    load_condition_maps,
    load_map,
    load_pipeline,
)
from controlnet_emo.models.sampling import Sampling
from controlnet_emo.models.sd import load_sd, resolve_pretrained
from tests.runs import CONDITIONS, SIZE, make_run


@pytest.fixture(scope="session")
def tiny_unet():
    return load_sd("tiny").unet


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_unet) -> Path:
    return make_run(tmp_path_factory.mktemp("infer") / "run", tiny_unet)[0]


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def pattern(h: int, w: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("maps")
    return {
        "flame": write_image(d / "flame.png", pattern(SIZE, SIZE, 1)),
        "depth": write_image(d / "depth.png", pattern(SIZE, SIZE, 2)[..., 0]),  # grey
        "skeleton": write_image(d / "skeleton.png", pattern(SIZE, SIZE, 3)),
    }


def hand_built_pipeline(
    controlnet, channels_last: bool = True
) -> StableDiffusionControlNetPipeline:
    """What a diffusers user writes: the base folder plus the exported ControlNet; in
    channels_last by default, the layout our loader runs the nets in (fast_paths.py), so the
    two compare bit for bit."""
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        resolve_pretrained("tiny"), controlnet=controlnet, safety_checker=None
    )
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        for net in (pipe.unet, pipe.controlnet, pipe.vae):
            net.to(memory_format=torch.channels_last)
    return pipe


def to_tensor(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)  # (3,H,W)


def test_generate_equals_a_plain_diffusers_pipeline(run, maps):
    """Bit for bit in the same memory layout; within one 8-bit level of a stock pipeline left
    in PyTorch's default layout."""
    (file,) = export_run(run)
    controlnet = ControlNetModel.from_single_file(str(file), config=str(run / "controlnet"))
    hint = torch.cat([to_tensor(maps[c]) for c in CONDITIONS])[None]  # (1,9,H,W) in [0,1]
    draw = dict(image=hint, height=SIZE, width=SIZE, num_inference_steps=2)
    expected, nchw = (
        hand_built_pipeline(controlnet, channels_last=layout)(
            "a photo of a happy face", generator=torch.Generator().manual_seed(5), **draw
        ).images[0]
        for layout in (True, False)
    )

    pipe, info = load_pipeline(run, Sampling(map_guidance=False), device="cpu")
    ours = load_condition_maps(info, SIZE, **maps)
    assert torch.equal(ours, hint[0])
    image = generate(pipe, info, ours, "a photo of a happy face", Sampling(seed=5, steps=2))
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    gap = np.abs(np.asarray(image, np.int16) - np.asarray(nchw, np.int16))
    assert gap.max() <= 1
    without = generate(
        pipe, info, torch.zeros_like(ours), "a photo of a happy face", Sampling(seed=5, steps=2)
    )
    assert not np.array_equal(np.asarray(without), np.asarray(image))  # the maps matter


def test_map_guidance_gives_the_unconditional_branch_zeroed_maps(run, maps):
    pipe, info = load_pipeline(run, device="cpu")  # on by default
    hint = load_condition_maps(info, SIZE, **maps)
    seen: list[torch.Tensor] = []
    forward = pipe.controlnet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["controlnet_cond"].clone())
        return forward(*args, **kwargs)

    pipe.controlnet.forward = spy
    guided = np.asarray(generate(pipe, info, hint, "a face", Sampling(seed=5, steps=2)))
    uncond, cond = seen[0].chunk(2)  # diffusers' order: unconditional first
    assert torch.count_nonzero(uncond) == 0 and torch.equal(cond[0], hint)
    pipe.map_guidance = False
    stock = np.asarray(generate(pipe, info, hint, "a face", Sampling(seed=5, steps=2)))
    assert torch.equal(seen[-1][0], hint)  # stock diffusers: both branches see the maps
    assert not np.array_equal(guided, stock)
    # without classifier-free guidance there is no unconditional branch: nothing changes
    plain = [generate(pipe, info, hint, "a face", Sampling(seed=5, steps=2, guidance_scale=1.0))]
    pipe.map_guidance = True
    plain.append(
        generate(pipe, info, hint, "a face", Sampling(seed=5, steps=2, guidance_scale=1.0))
    )
    assert np.array_equal(np.asarray(plain[0]), np.asarray(plain[1]))


def test_multi_mode_equals_a_plain_multicontrolnet_pipeline(tmp_path, tiny_unet, maps):
    run, _ = make_run(tmp_path / "multi", tiny_unet, mode="multi")
    multi = MultiControlNetModel.from_pretrained(str(run / "controlnet"))
    hints = [to_tensor(maps[c])[None] for c in CONDITIONS]
    expected = hand_built_pipeline(multi)(
        "a face",
        image=hints,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=1.0,
        controlnet_conditioning_scale=[1.0, 0.5, 1.0],
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    pipe, info = load_pipeline(run, device="cpu")
    image = generate(
        pipe,
        info,
        load_condition_maps(info, SIZE, **maps),
        "a face",
        Sampling(seed=1, steps=2, guidance_scale=1.0, scales={"depth": 0.5}),
    )
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_condition_order_comes_from_the_sidecar(tmp_path, maps):
    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"conditioning_channels": 9}))
    (folder / SIDECAR).write_text(json.dumps({"conditions": ["skeleton", "flame", "depth"]}))
    from controlnet_emo.export.model_info import read_model_info

    info = read_model_info(folder)
    assert info.conditions == ["skeleton", "flame", "depth"]
    out = load_condition_maps(
        info, SIZE, flame=maps["flame"], depth=maps["depth"], skeleton=maps["skeleton"]
    )
    assert torch.equal(out[0:3], to_tensor(maps["skeleton"]))
    assert torch.equal(out[3:6], to_tensor(maps["flame"]))
    assert torch.equal(out[6:9], to_tensor(maps["depth"]))


def test_missing_maps_are_zeros(maps):
    info = ModelInfo(conditions=CONDITIONS)
    out = load_condition_maps(info, SIZE, flame=maps["flame"])
    assert out.shape == (9, SIZE, SIZE)
    assert torch.equal(out[:3], to_tensor(maps["flame"])) and not out[3:].any()


def test_flame_of_any_size_and_mode_is_converted(tmp_path):
    rgb = pattern(96, 80, 4)
    rgba = np.concatenate([rgb, np.full((96, 80, 1), 128, np.uint8)], axis=-1)
    for name, arr in {"rgba": rgba, "grey": rgb[..., 0], "rgb": rgb}.items():
        out = load_map(write_image(tmp_path / f"{name}.png", arr), SIZE)
        assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
        assert 0 <= out.min() and out.max() <= 1
    grey = load_map(tmp_path / "grey.png", SIZE)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.equal(load_map(tmp_path / "rgba.png", SIZE), load_map(tmp_path / "rgb.png", SIZE))
    deep = tmp_path / "depth16.png"
    Image.fromarray(np.full((SIZE, SIZE), 65535, np.uint16)).save(deep)
    assert torch.allclose(load_map(deep, SIZE), torch.ones(3, SIZE, SIZE))


@pytest.mark.parametrize("case", ["not_image", "missing", "folder", "wrong_condition"])
def test_bad_maps_are_one_line_errors_naming_the_file(tmp_path, maps, case):
    info = ModelInfo(conditions=["flame", "depth"])
    bad = {
        "not_image": tmp_path / "notes.png",
        "missing": tmp_path / "absent.png",
        "folder": tmp_path,
        "wrong_condition": maps["skeleton"],
    }[case]
    (tmp_path / "notes.png").write_text("not a picture")
    kwargs = {"skeleton": bad} if case == "wrong_condition" else {"flame": bad}
    with pytest.raises(InferenceError) as err:
        load_condition_maps(info, SIZE, **kwargs)
    message = str(err.value)
    assert str(bad) in message and "\n" not in message


def test_model_errors(tmp_path, tiny_unet, maps):
    empty = tmp_path / "empty"
    empty.mkdir()
    Config().save(empty / "config.yaml")
    with pytest.raises(InferenceError, match="no trained model"):
        load_pipeline(empty)
    # A sidecar that claims two conditions beside a 9-channel net.
    run, _ = make_run(tmp_path / "run", tiny_unet)
    sidecar = run / "controlnet" / SIDECAR
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "conditions": ["flame", "depth"]}))
    with pytest.raises(InferenceError, match=r"hint channels \[9\] do not match"):
        load_pipeline(run, device="cpu")


def test_cli_writes_png_with_text_chunks_and_reports_errors(run, maps, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    out = tmp_path / "face.png"
    args = parser.parse_args(
        [
            "--model",
            str(run),
            "--flame",
            str(maps["flame"]),
            "--depth",
            str(maps["depth"]),
            "--prompt",
            "a photo of a sad face",
            "--out",
            str(out),
            "--seed",
            "9",
            "--steps",
            "2",
            "--scale",
            "depth=0.5",
            "--sheet",
            "--no-map-guidance",
            "--device",
            "cpu",
        ]
    )  # 2 steps: UniPC's minimum
    assert run_infer(args) == 0
    text = Image.open(out).text
    assert text["map_guidance"] == "false" and "Map guidance: False" in text["parameters"]
    assert text["prompt"] == "a photo of a sad face" and text["seed"] == "9"
    assert text["steps"] == "2" and json.loads(text["scales"]) == {"depth": 0.5}
    assert json.loads(text["conditions"]) == CONDITIONS
    assert "Seed: 9" in text["parameters"]
    assert json.loads(text["controlnet_emo"])["inputs"]["depth"] == str(maps["depth"])
    sheet = Image.open(tmp_path / "face_sheet.png")
    tile = max(SIZE, 256)  # small faces are shown upscaled, at a size a person can judge
    assert sheet.size == (4 * tile, tile)
    capsys.readouterr()
    bad = parser.parse_args(
        [
            "--model",
            str(run),
            "--flame",
            str(tmp_path / "nope.png"),
            "--prompt",
            "x",
            "--out",
            str(out),
        ]
    )
    assert run_infer(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope.png'}: no such file or folder"


def test_folder_batch(run, tmp_path):
    flames, depths = tmp_path / "flame", tmp_path / "depth"
    for i in range(2):
        write_image(flames / f"f{i}.png", pattern(SIZE, SIZE, 10 + i))
        write_image(depths / f"f{i}.jpg", pattern(SIZE, SIZE, 20 + i)[..., 0])
    written = infer(
        run, flames, "a face", tmp_path / "out", Sampling(steps=1), depth=depths, device="cpu"
    )
    assert [p.name for p in written] == ["f0.png", "f1.png"]
    assert all(Image.open(p).size == (SIZE, SIZE) for p in written)
    write_image(flames / "f2.png", pattern(SIZE, SIZE, 12))  # no f2 depth map
    with pytest.raises(InferenceError, match="no depth image named f2"):
        infer(run, flames, "a face", tmp_path / "out", Sampling(steps=2), depth=depths)


def test_reference_photo_derives_missing_maps(monkeypatch, tmp_path, maps, random_fan_home):
    """--reference runs the real conditioners on the photo: a tiny random ZoeDepth and
    face-alignment's FAN (random weights, from the file it would download), their maps
    resized and centre-cropped like the given ones, the given FLAME render kept."""
    from conditioners.depth import DepthConditioner
    from conditioners.skeleton import SkeletonConditioner
    from controlnet_emo.data.transforms import resize_center_crop
    from controlnet_emo.synthetic.faces import render_face, sample_face_params

    monkeypatch.setenv("TORCH_HOME", str(random_fan_home))
    face = render_face(sample_face_params(np.random.default_rng(7), 96, 1), 96)
    photo = np.ascontiguousarray(face.image[:, 8:88])  # (96, 80, 3): portrait, cropped
    path = write_image(tmp_path / "photo.png", photo)
    info = ModelInfo(conditions=CONDITIONS, depth_model="tiny")
    out = load_condition_maps(info, SIZE, flame=maps["flame"], skeleton=None, reference=path)
    assert out.shape == (9, SIZE, SIZE)

    def as_map(image: np.ndarray) -> torch.Tensor:  # (H,W[,3]) -> (3,SIZE,SIZE) in [0,1]
        t = torch.from_numpy(np.ascontiguousarray(image)).float()
        t = t[None].repeat(3, 1, 1) if t.ndim == 2 else t.permute(2, 0, 1) / 255
        return resize_center_crop(t.clamp(0, 1), SIZE)

    depth = DepthConditioner("tiny")([photo])[0]
    skeleton = SkeletonConditioner()(photo)
    torch.testing.assert_close(out[3:6], as_map(depth), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[6:9], as_map(skeleton), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:3], as_map(np.asarray(Image.open(maps["flame"]))))
    assert out[3:6].std() > 0.01  # a depth map, not a constant
    # random FAN points: long crossing lines, but lines on black all the same
    assert 0.005 < (skeleton.max(-1) > 0).mean() < 0.9


def test_tuned_unet_lora_is_loaded(tmp_path, tiny_unet, maps):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    run, _ = make_run(tmp_path / "run", tiny_unet)
    unet = load_sd("tiny").unet
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(run / "unet_lora", unet_lora_layers=layers)
    pipe, info = load_pipeline(run, device="cpu")
    assert info.unet_lora == run / "unet_lora"
    lora = {k: v for k, v in pipe.unet.state_dict().items() if "lora_A" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())


def test_infer_from_the_single_file_alone(run, maps, tmp_path):
    """`infer --model controlnet.safetensors --base BASE`: the condition order and the net's
    config come from the file's metadata; the image equals the run folder's."""
    (file,) = export_run(run, out=tmp_path / "alone" / "controlnet.safetensors")
    common = dict(
        prompt="a photo of a happy face", sampling=Sampling(seed=3, steps=2), device="cpu"
    )
    (from_file,) = infer(file, maps["flame"], out=tmp_path / "file.png", base="tiny", **common)
    (from_run,) = infer(run, maps["flame"], out=tmp_path / "run.png", **common)
    image = np.asarray(Image.open(from_file))
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0
    assert np.array_equal(image, np.asarray(Image.open(from_run)))
    with pytest.raises(InferenceError, match="no controlnet-emo metadata"):
        from safetensors.torch import save_file

        bare = tmp_path / "bare.safetensors"
        save_file({"x": torch.zeros(1)}, str(bare))
        infer(bare, maps["flame"], out=tmp_path / "bare.png", base="tiny", **common)
