"""Export: every format loads back in plain diffusers to identical tensors, with its metadata."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from huggingface_hub import ModelCard
from safetensors import safe_open

from controlnet_emo.cli.export import add_export_arguments, run_export
from controlnet_emo.config import Config
from controlnet_emo.export.formats import (
    export_run,
    safetensors_metadata,
    save_diffusers,
    write_single_file,
)
from controlnet_emo.export.model_card import comfyui_problem, write_model_card
from controlnet_emo.export.model_info import SIDECAR, ExportError, read_model_info
from controlnet_emo.export.original_layout import to_original_layout
from controlnet_emo.models.sd import load_sd
from tests.runs import CONDITIONS, make_run, random_controlnet


@pytest.fixture(scope="session")
def tiny_unet():
    return load_sd("tiny").unet


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_key_map_is_the_inverse_of_diffusers_reader_for_sd15_shapes():
    """The real SD 1.5 ControlNet structure (4 blocks, 2 layers, attention in 3), on the meta
    device so its 360M parameters cost nothing: diffusers' own reader must undo our map."""
    with torch.device("meta"):
        net = ControlNetModel(cross_attention_dim=768)  # diffusers' defaults are SD 1.5's
    state = net.state_dict()
    original = to_original_layout(state)
    assert len(original) == len(state)
    for key in (
        "control_model.time_embed.0.weight",
        "control_model.time_embed.2.bias",
        "control_model.input_blocks.0.0.weight",
        "control_model.input_blocks.1.0.in_layers.0.weight",
        "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "control_model.input_blocks.3.0.op.weight",
        "control_model.input_blocks.4.0.skip_connection.weight",
        "control_model.input_blocks.9.0.op.bias",
        "control_model.input_blocks.11.0.out_layers.3.weight",
        "control_model.middle_block.0.emb_layers.1.weight",
        "control_model.middle_block.1.proj_out.weight",
        "control_model.middle_block.2.in_layers.2.weight",
        "control_model.middle_block_out.0.weight",
        "control_model.zero_convs.11.0.weight",
        "control_model.input_hint_block.0.weight",
        "control_model.input_hint_block.12.weight",
        "control_model.input_hint_block.14.weight",
    ):
        assert key in original, key
    assert "control_model.zero_convs.12.0.weight" not in original  # no downsampler after block 3
    back = convert_controlnet_checkpoint(original, config=dict(net.config))
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)  # the very same tensors, re-keyed


def test_single_file_round_trip_and_metadata(tmp_path, tiny_unet):
    run, (net,) = make_run(tmp_path / "run", tiny_unet)
    (path,) = export_run(run)  # default: single-file into the run
    assert path == run / "controlnet.safetensors"
    back = ControlNetModel.from_single_file(str(path), config=str(run / "controlnet"))
    assert_same_tensors(back, net)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("control_model.input_hint_block.0.weight").shape[1] == 9
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"].endswith("/controlnet")
    assert meta["modelspec.resolution"] == "64x64"
    for key in ("modelspec.title", "modelspec.implementation", "modelspec.date"):
        assert meta[key]
    assert meta["controlnet_emo.conditions"] == "flame,depth,skeleton"
    assert json.loads(meta["controlnet_emo.channels"]) == {
        "flame": [0, 3],
        "depth": [3, 6],
        "skeleton": [6, 9],
    }
    assert meta["controlnet_emo.base_model"] == "tiny"
    assert meta["controlnet_emo.steps"] == "7"
    assert json.loads(meta["controlnet_emo.loss_weights"])["lpips"] == pytest.approx(0.08)


def test_diffusers_export_round_trip(tmp_path, tiny_unet):
    run, (net,) = make_run(tmp_path / "run", tiny_unet)
    (folder,) = export_run(run, "diffusers", out=tmp_path / "exported")
    assert_same_tensors(ControlNetModel.from_pretrained(folder), net)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    info = read_model_info(folder)  # the exported folder describes itself
    assert info.conditions == CONDITIONS and info.base_model == "tiny" and info.steps == 7


def test_multi_mode_diffusers_layout_and_one_file_per_condition(tmp_path, tiny_unet):
    run, nets = make_run(tmp_path / "run", tiny_unet, mode="multi")
    assert [p.name for p in sorted(run.glob("controlnet*"))] == [
        "controlnet",
        "controlnet_1",
        "controlnet_2",
    ]
    multi = MultiControlNetModel.from_pretrained(str(run / "controlnet"))  # diffusers' loader
    for a, b in zip(multi.nets, nets, strict=True):
        assert_same_tensors(a, b)
    paths = export_run(run, "multi", out=tmp_path / "files")
    assert [p.name for p in paths] == [f"controlnet_{c}.safetensors" for c in CONDITIONS]
    for i, (path, net, name) in enumerate(zip(paths, nets, CONDITIONS, strict=True)):
        folder = run / ("controlnet" if i == 0 else f"controlnet_{i}")
        assert_same_tensors(ControlNetModel.from_single_file(str(path), config=str(folder)), net)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            assert f.get_tensor("control_model.input_hint_block.0.weight").shape[1] == 3  # RGB
        assert meta["controlnet_emo.conditions"] == name
        assert meta["controlnet_emo.run_conditions"] == "flame,depth,skeleton"


def test_stacked_run_refuses_multi_format(tmp_path, tiny_unet):
    run, _ = make_run(tmp_path / "run", tiny_unet)
    with pytest.raises(ExportError, match="stacked run"):
        export_run(run, "multi")


def test_run_without_model_and_channel_mismatch_are_one_line_errors(tmp_path, tiny_unet):
    empty = tmp_path / "empty"
    empty.mkdir()
    Config().save(empty / "config.yaml")
    with pytest.raises(ExportError, match="no trained model"):
        read_model_info(empty)
    with pytest.raises(ExportError, match="do not match"):
        save_diffusers(
            random_controlnet(tiny_unet, 6), tmp_path / "bad", {"conditions": CONDITIONS}
        )


def test_sidecar_written_by_the_training_loop_keeps_the_config_values(tmp_path, tiny_unet):
    run, _ = make_run(tmp_path / "run", tiny_unet)
    sidecar = json.loads((run / "controlnet" / SIDECAR).read_text())
    assert sidecar["conditions"] == CONDITIONS and sidecar["channels"]["depth"] == [3, 6]
    info = read_model_info(run / "controlnet")  # resolves to the run
    assert info.run_dir == run and info.loss_weights["diffusion"] == pytest.approx(0.92)


def test_write_single_file_is_atomic_and_needs_string_metadata(tmp_path, tiny_unet):
    net = random_controlnet(tiny_unet, 9)
    with pytest.raises(ExportError, match="strings"):
        write_single_file(net, tmp_path / "x.safetensors", {"steps": 3})
    meta = safetensors_metadata(Config(), 3)
    path = write_single_file(net, tmp_path / "x.safetensors", meta)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["controlnet_emo.steps"] == "3"


def test_model_card(tmp_path, tiny_unet):
    run, _ = make_run(tmp_path / "run", tiny_unet)
    (run / "samples").mkdir()
    for step in (5, 20, 100):
        (run / "samples" / f"step-{step}.png").write_bytes(b"")
    cfg = Config()
    cfg.model.pretrained = "runwayml/stable-diffusion-v1-5"
    path = write_model_card(run, cfg, 100)
    text = path.read_text()
    meta = ModelCard.load(path).data  # the header as the hub reads it
    assert (meta.library_name, meta.base_model) == ("diffusers", "runwayml/stable-diffusion-v1-5")
    assert meta.pipeline_tag == "text-to-image" and meta.license == "other"
    assert {"controlnet", "flame", "depth", "skeleton"} <= set(meta.tags)
    assert "its licence" in text  # a base's licence carries over; the card says so
    cfg.model.pretrained = "demo-face-base"  # the project's own weights: no hub id
    own = ModelCard.load(write_model_card(run, cfg, 100)).data
    assert own.license == "apache-2.0" and own.base_model is None
    assert "(samples/step-100.png)" in text
    assert "| 0-2 | flame |" in text and "| 6-8 | skeleton |" in text
    assert "| lpips | 0.08 |" in text
    assert "ControlNetModel.from_pretrained" in text and "from_single_file" in text
    assert "ComfyUI" in text and "controlnet-emo infer" in text
    # the tiny base's net is not of a shape ComfyUI builds: the card must not promise it
    assert "will not load in ComfyUI or A1111 as trained" in text


def test_export_cli(tmp_path, tiny_unet, capsys):
    run, _ = make_run(tmp_path / "run", tiny_unet)
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    assert run_export(parser.parse_args([str(run), "--out", str(tmp_path / "cn.safetensors")])) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cn.safetensors")
    assert (run / "README.md").is_file()
    assert run_export(parser.parse_args([str(tmp_path / "nowhere")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err


def test_export_refuses_a_model_with_nan_weights(tmp_path, tiny_unet):
    run, nets = make_run(tmp_path / "run", unet=tiny_unet)
    with torch.no_grad():
        nets[0].controlnet_mid_block.weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match="non-finite"):
        save_diffusers(nets[0], tmp_path / "again", {"conditions": CONDITIONS})
    folder = run / "controlnet"
    state = ControlNetModel.from_pretrained(folder).state_dict()
    state["conv_in.weight"][0, 0, 0, 0] = float("inf")
    net = ControlNetModel.from_pretrained(folder)
    net.load_state_dict(state)
    net.save_pretrained(folder)  # what a diverged run left on disk
    with pytest.raises(ExportError, match="non-finite"):
        export_run(run, "single-file")
    assert not (run / "controlnet.safetensors").exists()


def test_a_4x_vae_hint_encoder_exports_and_reads_back(tiny_unet):
    """The demo base's VAE downsamples 4x, so its ControlNet's hint encoder has three
    widths; the single file keeps conv_out at 14, where diffusers' reader finds it."""
    from controlnet_emo.models.controlnet import hint_encoder_channels

    net = ControlNetModel.from_unet(
        tiny_unet,
        conditioning_channels=9,
        conditioning_embedding_out_channels=hint_encoder_channels(4),
    )
    state = to_original_layout(net.state_dict())
    assert "control_model.input_hint_block.14.weight" in state
    assert "control_model.input_hint_block.8.weight" in state
    assert "control_model.input_hint_block.10.weight" not in state
    back = convert_controlnet_checkpoint(state, config=dict(net.config))
    ours = net.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_weights_carry_a_sha256_that_matches_and_changes_with_a_weight(tmp_path, tiny_unet):
    """The hash in the single file's metadata and in the diffusers sidecar is recomputable
    from the tensors alone, and a changed weight no longer matches it."""
    from safetensors.torch import load_file, save_file

    from controlnet_emo.export.formats import (
        HASH_KEY,
        check_weights,
        load_single_file,
        weights_sha256,
    )

    run, (net,) = make_run(tmp_path / "run", tiny_unet)
    (path,) = export_run(run)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    assert meta[HASH_KEY] == weights_sha256(state) and len(meta[HASH_KEY]) == 64
    sidecar = json.loads((run / "controlnet" / SIDECAR).read_text())
    folder_state = load_file(str(run / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert sidecar["weights_sha256"] == weights_sha256(folder_state)
    assert_same_tensors(load_single_file(path), net)  # hash checked on load

    key = "control_model.input_hint_block.0.weight"
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1e-3
    assert weights_sha256(state) != meta[HASH_KEY]
    with pytest.raises(ExportError, match="do not match their recorded SHA-256"):
        check_weights(state, meta[HASH_KEY], str(path))
    tampered = tmp_path / "tampered.safetensors"
    save_file(state, str(tampered), metadata=meta)  # the old hash, a new weight
    with pytest.raises(ExportError, match="tampered.safetensors: weights do not match"):
        load_single_file(tampered)


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_exported_model_files_carry_the_umask_modes_not_0600(
    tmp_path, tiny_unet, umask, file_mode, dir_mode
):
    """Every format, as open() and mkdir would have made it: a colleague or a ComfyUI running
    as another user reads what a 0o022 umask shares (safetensors alone writes 0600)."""
    import os
    import stat

    old = os.umask(umask)
    try:
        run, _ = make_run(tmp_path / "run", tiny_unet)
        written = [*export_run(run), *export_run(run, "diffusers", tmp_path / "cn")]
        multi, _ = make_run(tmp_path / "multi", tiny_unet, mode="multi")
        written += export_run(multi, "multi", tmp_path / "files")
    finally:
        os.umask(old)
    folders = [run / "controlnet", tmp_path / "cn", multi / "controlnet_2"]
    files = [p for p in written if p.is_file()] + [f for d in folders for f in d.iterdir()]
    assert len(files) == 1 + 3 + 3 * 3  # single, 3 multi files, 3 folders' files
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in files} == dict.fromkeys(files, file_mode)
    assert {stat.S_IMODE(d.stat().st_mode) for d in folders} == {dir_mode}


def _shaped_controlnet(**shape) -> ControlNetModel:
    """A tiny 9-channel ControlNet; default: the shapes ComfyUI builds (8x hint encoder
    16/32/96/256, 32 norm groups, 64-channel attention heads)."""
    config = {
        "block_out_channels": (64, 128),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "attention_head_dim": (1, 2),  # diffusers' legacy name: heads per level, 64 ch each
        "norm_num_groups": 32,
        "conditioning_embedding_out_channels": (16, 32, 96, 256),
        "cross_attention_dim": 32,
        "layers_per_block": 1,
        "conditioning_channels": 9,
    }
    return ControlNetModel(**{**config, **shape})


DEMO_LIKE = {  # the demo base: 4x VAE, 16 norm groups, 32-channel heads
    "block_out_channels": (32, 64, 128),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "attention_head_dim": (1, 2, 4),
    "norm_num_groups": 16,
    "conditioning_embedding_out_channels": (16, 32, 96),
    "cross_attention_dim": 64,
}


def test_single_file_says_whether_comfyui_can_load_it(tmp_path):
    """ComfyUI (comfy/controlnet.py) builds a fixed 8x hint encoder, 32 norm groups and
    64-channel heads (8 heads for SD 1.5's shape): checked against its own loader, a net of
    those shapes gives the same residuals, one of the demo base's does not load at all."""
    from controlnet_emo.export.formats import COMFYUI_KEY, comfyui_compatibility, info_metadata
    from controlnet_emo.export.model_info import ModelInfo

    info = ModelInfo(conditions=list(CONDITIONS))
    verdicts = {}
    for name, net in {
        "comfy": _shaped_controlnet(),
        "demo": _shaped_controlnet(**DEMO_LIKE),
    }.items():
        path = write_single_file(net, tmp_path / f"{name}.safetensors", info_metadata(info, net))
        with safe_open(str(path), "pt") as f:
            verdicts[name] = f.metadata()[COMFYUI_KEY]
    assert verdicts["comfy"] == "true"
    demo = verdicts["demo"]
    assert demo.startswith("false: ") and "\n" not in demo
    for reason in ("hint encoder [16, 32, 96] (4x)", "norm_num_groups 16", "32-channel attention"):
        assert reason in demo, demo
    # the SD 1.5 shape is read with 8 heads: its own 8 heads pass, 64-channel heads do not
    with torch.device("meta"):
        assert comfyui_compatibility(ControlNetModel(cross_attention_dim=768)) is None
        sd15_64 = ControlNetModel(cross_attention_dim=768, attention_head_dim=(5, 10, 20, 20))
        sd2 = ControlNetModel(
            cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
        )
    assert "ComfyUI reads the SD 1.5 shape with 8 heads" in comfyui_compatibility(sd15_64)
    assert comfyui_compatibility(sd2) is None


def test_export_cli_warns_where_comfyui_cannot_load_the_file(tmp_path, capsys):

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    info = {"conditions": list(CONDITIONS), "base_model": "tiny", "resolution": 64}
    for name, shape in {"comfy": {}, "demo": DEMO_LIKE}.items():
        save_diffusers(_shaped_controlnet(**shape), tmp_path / name, info)
    assert run_export(parser.parse_args([str(tmp_path / "comfy" / "controlnet")])) == 0
    assert capsys.readouterr().err == ""
    assert run_export(parser.parse_args([str(tmp_path / "demo" / "controlnet")])) == 0
    out, err = capsys.readouterr()
    path = tmp_path / "demo" / "controlnet.safetensors"
    assert out.strip() == str(path) and path.is_file()
    assert err.startswith(f"warning: {path} will not load as trained in ComfyUI/A1111: ")
    assert "norm_num_groups 16" in err and len(err.strip().splitlines()) == 1
    # the model card says the same as the export
    assert comfyui_problem(tmp_path / "comfy") is None
    assert "norm_num_groups 16" in comfyui_problem(tmp_path / "demo")
