"""Save and export trained ControlNets: diffusers folders and original-layout single files.

A diffusers folder (``controlnet/``; multi: also ``controlnet_1/``, ...) is what training
writes and inference loads; each carries its sidecar (``model_info``). One ``.safetensors`` in
the original layout (``original_layout``) is what ComfyUI and A1111 load, when the net has the
shapes they build (`comfyui_compatibility`); its string metadata carries the SAI model-spec
keys, our condition layout and that verdict, so a file that travels alone still says which map
goes in which hint channels and where it will load.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from controlnet_emo.atomic import atomic_write, set_usual_modes
from controlnet_emo.config import Config
from controlnet_emo.export.model_info import (
    ExportError,
    ModelInfo,
    check_channels,
    dtype_kwargs,
    load_controlnets,
    read_model_info,
    write_sidecar,
)
from controlnet_emo.export.original_layout import to_original_layout
from controlnet_emo.models.controlnet import CHANNELS_PER_CONDITION, controlnet_family

log = logging.getLogger(__name__)

FORMATS = ("diffusers", "single-file", "multi")
ORIGINAL_IMPLEMENTATION = "https://github.com/lllyasviel/ControlNet"
HASH_KEY = "controlnet_emo.weights_sha256"
"""Single-file metadata key (the sidecar's is ``weights_sha256``) of `weights_sha256`."""
COMFYUI_KEY = "controlnet_emo.comfyui_compatible"
"""Single-file metadata key: "true", or "false: <why>" (`comfyui_compatibility`)."""


# ---------------------------------------------------------------------------------------------
# Weight hashes


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: per tensor, in name order, its name, dtype, shape and bytes.

    Why not the file's hash: the metadata that carries it lives inside the file. This one
    any loader can recompute from the tensors alone (``safetensors.torch.load_file``), and
    it changes with any weight, name, shape or dtype.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_weights(state: Mapping[str, torch.Tensor], expected: str | None, where: str) -> None:
    """Refuse weights whose hash differs from the one recorded at export (a damaged or
    edited file would otherwise draw subtly wrong faces); no recorded hash: nothing to check."""
    if expected and weights_sha256(state) != expected:
        raise ExportError(
            f"{where}: weights do not match their recorded SHA-256 ({expected[:12]}...); "
            "the file is damaged or was changed after export: export it again"
        )


# ---------------------------------------------------------------------------------------------
# diffusers folders


def _nets(controlnet_or_multi: Any) -> list[torch.nn.Module]:
    nets = getattr(controlnet_or_multi, "nets", None)
    if nets is None:
        nets = (
            controlnet_or_multi
            if isinstance(controlnet_or_multi, list | tuple)
            else [controlnet_or_multi]
        )
    return [getattr(n, "_orig_mod", n) for n in nets]  # unwrap torch.compile


def save_diffusers(
    controlnet_or_multi: Any, run_dir: str | Path, info: dict[str, Any]
) -> list[Path]:
    """Write ``controlnet/`` (multi: also ``controlnet_1/``, ...) and their sidecars.

    ``info``: ``conditions`` (required), ``mode``, ``base_model``, ``resolution``, ``steps``,
    ``unet_trainable``, ``loss_weights``. Each folder is written beside the old one and swapped
    in, so a crash mid-save never leaves a half-written model where a good one was.
    """
    nets = _nets(controlnet_or_multi)
    check_finite(nets, str(run_dir))
    info = dict(info)
    info.setdefault("mode", "multi" if len(nets) > 1 else "stacked")
    conditions = list(info.get("conditions") or [])
    check_channels(nets, conditions, info["mode"], where=str(run_dir))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    for i, net in enumerate(nets):
        folder = run_dir / ("controlnet" if i == 0 else f"controlnet_{i}")
        _save_folder(net, folder, {**info, "index": i})
        folders.append(folder)
    return folders


def check_finite(nets: Iterable[torch.nn.Module], where: str) -> None:
    """Refuse to write a model with a NaN or Inf weight (a diverged run): no consumer can
    use one, and a file that looks fine until it draws black images wastes the user's day."""
    for i, net in enumerate(nets):
        bad = [n for n, p in net.state_dict().items() if not torch.isfinite(p).all()]
        if bad:
            raise ExportError(
                f"{where}: ControlNet {i} holds non-finite weights ({len(bad)} tensors, e.g. "
                f"{bad[0]}); the run diverged: export an earlier checkpoint"
            )


def _save_folder(net: torch.nn.Module, folder: Path, info: dict[str, Any]) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp, safe_serialization=True)
    # the family is the net's own (SDXL's takes added embeddings), whatever the caller knew
    family = controlnet_family(net)
    write_sidecar(
        tmp, {**info, "family": family, "weights_sha256": weights_sha256(net.state_dict())}
    )
    set_usual_modes(tmp)  # safetensors writes 0600: others on the machine must read it too
    old = folder.with_name(folder.name + f".old{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Original-layout single files


def write_single_file(
    controlnet: Any, path: str | Path, metadata: dict[str, str], dtype: torch.dtype | None = None
) -> Path:
    """One ``.safetensors`` in the original layout, with string metadata; written atomically."""
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ExportError(f"safetensors metadata values must be strings: {bad}")
    nets = _nets(controlnet)
    if len(nets) != 1:
        raise ExportError(f"{path}: one file holds one ControlNet, got {len(nets)}")
    state = to_original_layout(nets[0].state_dict())
    state = {
        k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
        for k, v in state.items()
    }
    metadata = {**metadata, HASH_KEY: weights_sha256(state)}
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", **metadata})
    return path


def read_single_file(path: str | Path) -> tuple[ModelInfo, dict[str, Any], str | None]:
    """The ModelInfo, diffusers config and weight hash embedded in one of our single files.

    One file holds one net (a multi run's per-condition file is a plain 3-channel net), so
    the mode is always stacked; the base is what training used (``--base`` overrides it).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise ExportError(f"{path}: not a readable .safetensors file ({err})") from None
    if "controlnet_emo.conditions" not in meta or "controlnet_emo.diffusers_config" not in meta:
        raise ExportError(
            f"{path}: no controlnet-emo metadata (conditions, diffusers config); pass the run "
            "folder it came from, or a file written by `controlnet-emo export`"
        )
    base = meta.get("controlnet_emo.base_model")
    info = ModelInfo(
        conditions=meta["controlnet_emo.conditions"].split(","),
        base_model=None if base in (None, "", "None") else base,
        family=meta.get("controlnet_emo.family", "sd"),
        resolution=int(meta.get("controlnet_emo.resolution", 512)),
        steps=int(meta.get("controlnet_emo.steps", 0)),
        unet_trainable=meta.get("controlnet_emo.unet_trainable", "none"),
        loss_weights=json.loads(meta.get("controlnet_emo.loss_weights", "{}")),
    )
    if "controlnet_emo.depth_model" in meta:
        info.depth_model = meta["controlnet_emo.depth_model"]
    return info, json.loads(meta["controlnet_emo.diffusers_config"]), meta.get(HASH_KEY)


def load_single_file(path: str | Path, dtype: torch.dtype | None = None) -> Any:
    """The ControlNet of one of our single files, its weights checked against their hash."""
    import tempfile

    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    info, config, expected = read_single_file(path)
    state = load_file(str(path))
    check_weights(state, expected, str(path))
    if config.get("addition_embed_type") == "text_time":
        net = _sdxl_from_original_layout(state, config, dtype)
        check_channels([net], info.conditions, "stacked", where=str(path))
        return net
    with tempfile.TemporaryDirectory(prefix="controlnet-emo-config-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        try:
            net = ControlNetModel.from_single_file(str(path), config=folder, **dtype_kwargs(dtype))
        except (OSError, ValueError, RuntimeError) as err:
            raise ExportError(f"{path}: not a loadable ControlNet single file ({err})") from None
    check_channels([net], info.conditions, "stacked", where=str(path))
    return net


def _sdxl_from_original_layout(
    state: dict[str, torch.Tensor], config: dict[str, Any], dtype: torch.dtype | None
) -> Any:
    """An SDXL ControlNet from an original-layout file: diffusers' own converter
    (``convert_controlnet_checkpoint``) for every key it maps, plus the added embedding
    (``label_emb``), which diffusers 0.42 maps for SDXL UNets but not for ControlNets (so its
    ``ControlNetModel.from_single_file`` cannot read SDXL ControlNets in this layout, ours or
    anyone's); the names come from its SDXL UNet map, and every weight must be filled."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_TO_LDM_MAPPING,
        LDM_CONTROLNET_KEY,
        convert_controlnet_checkpoint,
    )

    converted = convert_controlnet_checkpoint(dict(state), config)
    for ours, original in DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"].items():
        converted[ours] = state[LDM_CONTROLNET_KEY + original]
    net = ControlNetModel.from_config(config)
    try:
        net.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise ExportError(f"not a loadable SDXL ControlNet single file ({err})") from None
    return net.to(dtype) if dtype is not None else net


# ---------------------------------------------------------------------------------------------
# Metadata


def safetensors_metadata(cfg: Config, steps: int, **kw: Any) -> dict[str, str]:
    """String metadata for a single file: SAI model-spec keys plus our condition layout."""
    return info_metadata(ModelInfo.from_config(cfg, steps), **kw)


def info_metadata(
    info: ModelInfo,
    controlnet: Any | None = None,
    condition: str | None = None,
    title: str | None = None,
) -> dict[str, str]:
    """Metadata from a ModelInfo. ``condition``: this file is one net of a multi run."""
    conditions = [condition] if condition else list(info.conditions)
    channels = {
        n: [i * CHANNELS_PER_CONDITION, (i + 1) * CHANNELS_PER_CONDITION]
        for i, n in enumerate(conditions)
    }
    res = info.resolution
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_architecture(controlnet, res)}/controlnet",
        "modelspec.implementation": ORIGINAL_IMPLEMENTATION,
        "modelspec.title": title or f"{info.name} ({'+'.join(conditions)})",
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.date": _dt.date.today().isoformat(),
        "modelspec.description": (
            f"Emotion-faithful face ControlNet trained with controlnet-emo on "
            f"{info.base_model}. Hint channels: "
            + ", ".join(f"{n} {a}-{b - 1}" for n, (a, b) in channels.items())
            + ", each an RGB map in [0,1]."
        ),
        "modelspec.usage_hint": (
            "Hint: "
            + " + ".join(conditions)
            + f" maps at {res}x{res}"
            + ("" if len(conditions) == 1 else ", stacked; use `controlnet-emo infer`")
        ),
        "modelspec.tags": "controlnet,face,emotion,flame",
        "controlnet_emo.conditions": ",".join(conditions),
        "controlnet_emo.channels": json.dumps(channels),
        "controlnet_emo.hint_channels": str(CHANNELS_PER_CONDITION * len(conditions)),
        "controlnet_emo.mode": info.mode,
        "controlnet_emo.base_model": str(info.base_model),
        "controlnet_emo.family": controlnet_family(controlnet)
        if controlnet is not None
        else info.family,
        "controlnet_emo.resolution": str(res),
        "controlnet_emo.loss_weights": json.dumps(info.loss_weights),
        "controlnet_emo.steps": str(info.steps),
        "controlnet_emo.unet_trainable": info.unet_trainable,
        "controlnet_emo.depth_model": info.depth_model,
    }
    if condition:
        meta["controlnet_emo.run_conditions"] = ",".join(info.conditions)
    if controlnet is not None:
        config = json.loads(controlnet.to_json_string())  # what config.json holds
        config.pop("_name_or_path", None)
        meta["controlnet_emo.diffusers_config"] = json.dumps(config)
        why_not = comfyui_compatibility(controlnet)
        meta[COMFYUI_KEY] = "true" if why_not is None else f"false: {why_not}"
    return meta


# ---------------------------------------------------------------------------------------------
# Where a single file loads: ComfyUI's ControlNet loader (comfy/controlnet.py), as facts

COMFYUI_HINT_ENCODER = (16, 32, 96, 256)
"""ComfyUI builds this hint encoder whatever the file holds (three stride-2 convs: 8x)."""
COMFYUI_NORM_GROUPS = 32
COMFYUI_HEAD_CHANNELS = 64
"""Channels per attention head ComfyUI builds for every shape but SD 1.5's (8 heads)."""


def comfyui_compatibility(controlnet: Any) -> str | None:
    """None when ComfyUI's loader builds this ControlNet as it was trained; else why not.

    ComfyUI reads the hint channel count from ``input_hint_block.0.weight`` and the block
    layout from the keys, but fixes the rest: an 8x hint encoder (16, 32, 96, 256), GroupNorm
    with 32 groups, and 8 attention heads for the SD 1.5 shape (320 channels, 768-wide text,
    no linear projection), else 64-channel heads. A net that differs either fails to load or
    loads and computes something else; SD 1.5 / 2.x / SDXL bases pass, the demo base does not.
    """
    c = controlnet.config
    reasons = []
    hint = tuple(c.conditioning_embedding_out_channels)
    if hint != COMFYUI_HINT_ENCODER:
        reasons.append(
            f"hint encoder {list(hint)} ({2 ** (len(hint) - 1)}x), ComfyUI builds only "
            f"{list(COMFYUI_HINT_ENCODER)} (8x, SD's VAE)"
        )
    if c.norm_num_groups != COMFYUI_NORM_GROUPS:
        reasons.append(f"norm_num_groups {c.norm_num_groups}, ComfyUI uses {COMFYUI_NORM_GROUPS}")
    levels = _attention_levels(c)  # (channels, heads) per attention block
    sd15 = (
        c.block_out_channels[0] == 320
        and c.cross_attention_dim == 768
        and not c.use_linear_projection
        and c.addition_embed_type is None
        and c.class_embed_type is None
    )
    if sd15 and any(heads != 8 for _, heads in levels):
        heads = sorted({h for _, h in levels})
        reasons.append(f"attention heads {heads}, ComfyUI reads the SD 1.5 shape with 8 heads")
    if not sd15 and any(ch != heads * COMFYUI_HEAD_CHANNELS for ch, heads in levels):
        widths = sorted({ch // heads for ch, heads in levels})
        reasons.append(
            f"{'/'.join(map(str, widths))}-channel attention heads, ComfyUI builds "
            f"{COMFYUI_HEAD_CHANNELS}-channel heads for this shape"
        )
    cross_only = c.only_cross_attention
    if any(cross_only) if isinstance(cross_only, list | tuple) else cross_only:
        reasons.append("only_cross_attention, ComfyUI builds self-attention")
    if c.resnet_time_scale_shift != "default":
        reasons.append(
            f"resnet_time_scale_shift {c.resnet_time_scale_shift!r}, ComfyUI builds 'default'"
        )
    return "; ".join(reasons) or None


def _attention_levels(config: Any) -> list[tuple[int, int]]:
    """(channels, heads) of each attention block: down blocks, then the mid block.

    diffusers reads ``attention_head_dim`` as the head count when ``num_attention_heads`` is
    unset (a legacy name, as in its UNet)."""
    heads = config.num_attention_heads or config.attention_head_dim
    types = list(config.down_block_types)
    heads = [heads] * len(types) if isinstance(heads, int) else list(heads)
    channels = list(config.block_out_channels)
    levels = [
        (ch, h) for kind, ch, h in zip(types, channels, heads, strict=True) if "CrossAttn" in kind
    ]
    if config.mid_block_type == "UNetMidBlock2DCrossAttn":
        levels.append((channels[-1], heads[-1]))
    return levels


def _architecture(controlnet: Any | None, resolution: int) -> str:
    """SAI architecture id of the base, read from the ControlNet's text-conditioning width."""
    dim = getattr(getattr(controlnet, "config", None), "cross_attention_dim", 768)
    if controlnet is not None and controlnet_family(controlnet) == "sdxl":
        return "stable-diffusion-xl-v1-base" if dim == 2048 else f"stable-diffusion-xl-custom-{dim}"
    if dim == 1024:
        return "stable-diffusion-v2-768-v" if resolution >= 768 else "stable-diffusion-v2-512"
    if dim == 768:
        return "stable-diffusion-v1"
    return f"stable-diffusion-custom-{dim}"


# ---------------------------------------------------------------------------------------------
# export_run


def export_run(
    run_dir: str | Path,
    fmt: str = "single-file",
    out: Path | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Export a run (or a ControlNet folder) and return the written paths.

    diffusers: ``out`` is the ControlNet folder (multi: ``out``, ``out_1``, ... as diffusers'
    MultiControlNetModel writes); default: the run's own ``controlnet/`` (already written).
    single-file: one original-layout file (default ``RUN/controlnet.safetensors``).
    multi: one file per condition, ``controlnet_<condition>.safetensors`` in ``out`` (a
    folder, default the run folder); a multi-mode run's single-file export is the same.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    info = read_model_info(run_dir)
    nets = load_controlnets(info)
    check_finite(nets, str(run_dir))
    home = info.run_dir or info.folders[0].parent
    if fmt == "diffusers":
        return _export_diffusers(nets, info, out)
    if info.mode == "multi" or fmt == "multi":
        if info.mode != "multi":
            raise ExportError(
                f"{run_dir}: a stacked run has one {CHANNELS_PER_CONDITION * len(info.conditions)}"
                "-channel ControlNet, not one per condition; use --format single-file (or "
                "train with model.controlnet.mode=multi)"
            )
        folder = Path(out) if out is not None else home
        return [
            write_single_file(
                net,
                folder / f"controlnet_{name}.safetensors",
                info_metadata(info, net, condition=name),
                dtype,
            )
            for net, name in zip(nets, info.conditions, strict=True)
        ]
    path = Path(out) if out is not None else home / "controlnet.safetensors"
    if path.is_dir() or not path.suffix:  # a folder to write into
        path = path / "controlnet.safetensors"
    if info.unet_lora or info.unet:
        log.warning(
            "%s: the tuned UNet (%s) is not part of a single file; ship it beside it",
            path,
            info.unet_lora or info.unet,
        )
    return [write_single_file(nets[0], path, info_metadata(info, nets[0]), dtype)]


def _export_diffusers(nets: list[Any], info: ModelInfo, out: Path | None) -> list[Path]:
    if out is None:
        return list(info.folders)
    out = Path(out)
    folders = [out] + [out.with_name(f"{out.name}_{i}") for i in range(1, len(nets))]
    for i, (net, folder) in enumerate(zip(nets, folders, strict=True)):
        _save_folder(net, folder, {**info.sidecar(), "index": i})
    # A tuned UNet travels inside the primary folder, where read_model_info looks for it.
    for extra in _present([info.unet_lora, info.unet]):
        target = out / extra.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(extra, target)
        set_usual_modes(target)  # copytree keeps the source's modes (0600 from safetensors)
    return folders


def _present(paths: Iterable[Path | None]) -> list[Path]:
    return [p for p in paths if p is not None]


# ---------------------------------------------------------------------------------------------
# Command line (plugged into controlnet_emo.cli)
