"""Save and export trained ControlNets: diffusers folders, original-layout single files, sidecar.

Why our own writer: diffusers reads the original ControlNet layout (``control_model.`` keys,
what ComfyUI and A1111 load) but cannot write it. ``to_original_layout`` is the inverse of
diffusers' reader (``convert_controlnet_checkpoint`` in ``diffusers/loaders/single_file_utils``),
so every file we write loads back in plain diffusers to identical tensors (tested).

Every saved ControlNet folder carries a sidecar, ``controlnet_emo.json``: the condition order
and channels, mode, base model and resolution. Inference reads the condition order from it,
never from the command line, so a 9-channel net always sees its maps in the trained order.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

SIDECAR = "controlnet_emo.json"
SIDECAR_FORMAT = "controlnet-emo"
SIDECAR_VERSION = 1
CHANNELS_PER_CONDITION = 3
FORMATS = ("diffusers", "single-file", "multi")
ORIGINAL_PREFIX = "control_model."
DEFAULT_DEPTH_MODEL = "Intel/zoedepth-nyu-kitti"
ORIGINAL_IMPLEMENTATION = "https://github.com/lllyasviel/ControlNet"
# The original hint encoder: conv_in at 0, six convs at 2..12 (SiLU between), conv_out at 14.
_HINT_BLOCKS = 6
_HINT_OUT = 2 * _HINT_BLOCKS + 2


class ExportError(ValueError):
    """A model folder that cannot be read or exported; one line naming the path."""


# ---------------------------------------------------------------------------------------------
# Model info: what a saved ControlNet was trained on


@dataclass
class ModelInfo:
    """What inference and export need to know about a trained ControlNet (from its sidecar)."""

    conditions: list[str]
    mode: str = "stacked"  # stacked | multi
    base_model: str | None = None
    resolution: int = 512
    steps: int = 0
    unet_trainable: str = "none"
    loss_weights: dict[str, float] = field(default_factory=dict)
    depth_model: str = DEFAULT_DEPTH_MODEL
    """What derives a depth map from a reference photo (the run's ``depth.model``)."""
    folders: list[Path] = field(default_factory=list)
    """ControlNet folder(s), in condition order for multi (controlnet/, controlnet_1/, ...)."""
    run_dir: Path | None = None
    unet_lora: Path | None = None
    """A peft LoRA folder (``save_lora_weights``) to load into the base UNet."""
    unet: Path | None = None
    """A full diffusers UNet folder that replaces the base UNet."""

    @property
    def channels(self) -> dict[str, tuple[int, int]]:
        """Condition -> [start, end) hint channels of a stacked net (multi: 0..3 each)."""
        c = CHANNELS_PER_CONDITION
        if self.mode == "multi":
            return {name: (0, c) for name in self.conditions}
        return {name: (i * c, (i + 1) * c) for i, name in enumerate(self.conditions)}

    @property
    def name(self) -> str:
        root = self.run_dir or (self.folders[0] if self.folders else None)
        return root.name if root is not None else "controlnet"

    def sidecar(self) -> dict[str, Any]:
        return {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "conditions": list(self.conditions),
            "channels": {k: list(v) for k, v in self.channels.items()},
            "mode": self.mode,
            "base_model": self.base_model,
            "resolution": self.resolution,
            "steps": self.steps,
            "unet_trainable": self.unet_trainable,
            "loss_weights": dict(self.loss_weights),
            "depth_model": self.depth_model,
        }

    @classmethod
    def from_config(cls, cfg: Config, steps: int = 0) -> ModelInfo:
        return cls(
            conditions=list(cfg.conditions),
            mode=cfg.model.controlnet.mode,
            base_model=cfg.model.pretrained,
            resolution=cfg.data.resolution,
            steps=steps,
            unet_trainable=cfg.model.unet_trainable,
            loss_weights=cfg.loss.weights(),
            depth_model=DEFAULT_DEPTH_MODEL if cfg.depth.model == "precomputed" else cfg.depth.model,
        )


def write_sidecar(folder: str | Path, info: dict[str, Any] | ModelInfo) -> Path:
    """Write ``controlnet_emo.json`` beside a ControlNet's config.json (atomically)."""
    data = info.sidecar() if isinstance(info, ModelInfo) else _complete_sidecar(info)
    path = Path(folder) / SIDECAR
    _atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _complete_sidecar(info: dict[str, Any]) -> dict[str, Any]:
    """Only what the caller knows (missing keys must not override a run's config.yaml)."""
    conditions = info.get("conditions")
    if not conditions:
        raise ExportError("sidecar info needs a non-empty 'conditions' list")
    mode = info.get("mode", "stacked")
    channels = ModelInfo(conditions=list(conditions), mode=mode).channels
    skip = ("folders", "run_dir", "unet_lora", "unet")
    data = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "mode": mode,
            "channels": {k: list(v) for k, v in channels.items()}}
    data.update({k: (list(v) if k == "conditions" else v)
                 for k, v in info.items() if k not in skip})
    return data


def read_model_info(path: str | Path) -> ModelInfo:
    """Describe a run folder, a ControlNet folder (with sidecar) or a multi run's ``controlnet/``.

    A ``controlnet/`` folder inside a run resolves to the whole run, so a tuned UNet
    (``unet_lora/`` or ``unet/``) saved beside it is never silently left out.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or folder")
    if path.is_file():
        raise ExportError(
            f"{path}: is a file; pass a run folder or a diffusers ControlNet folder "
            "(single files load in ComfyUI/A1111, or with ControlNetModel.from_single_file)"
        )
    if (path / "config.yaml").is_file():
        return _run_info(path)
    if (path / "config.json").is_file():
        parent = path.parent
        if path.name == "controlnet" and (parent / "config.yaml").is_file():
            return _run_info(parent)
        return _folder_info(path)
    raise ExportError(
        f"{path}: not a run folder (no config.yaml) nor a diffusers ControlNet folder "
        "(no config.json)"
    )


def _run_info(run: Path) -> ModelInfo:
    try:
        cfg = load_config(run / "config.yaml")
    except ConfigError as err:
        raise ExportError(f"{run / 'config.yaml'}: {err}") from None
    primary = run / "controlnet"
    if not (primary / "config.json").is_file():
        raise ExportError(
            f"{run}: run folder has no trained model (no controlnet/config.json); training "
            "writes controlnet/ when it finishes"
        )
    info = ModelInfo.from_config(cfg, steps=_latest_step(run))
    sidecar = _read_sidecar(primary)
    if sidecar is not None:
        _apply_sidecar(info, sidecar, primary)
    info.run_dir = run
    info.folders = _net_folders(primary, info)
    if (run / "unet_lora").is_dir():
        info.unet_lora = run / "unet_lora"
    elif (run / "unet" / "config.json").is_file():
        info.unet = run / "unet"
    return info


def _folder_info(folder: Path) -> ModelInfo:
    sidecar = _read_sidecar(folder)
    if sidecar is None:
        channels = _read_json(folder / "config.json").get("conditioning_channels", 3)
        if channels != CHANNELS_PER_CONDITION:
            raise ExportError(
                f"{folder}: no {SIDECAR}, so the order of its {channels} hint channels is "
                "unknown; pass the run folder it came from"
            )
        log.warning("%s: no %s; treating it as a FLAME-only ControlNet", folder, SIDECAR)
        sidecar = {"conditions": ["flame"], "mode": "stacked"}
    info = ModelInfo(conditions=[])
    _apply_sidecar(info, sidecar, folder)
    index = int(sidecar.get("index", 0))
    if info.mode == "multi" and index > 0:
        if index >= len(info.conditions):
            raise ExportError(f"{folder / SIDECAR}: index {index} but only "
                              f"{len(info.conditions)} conditions")
        # One net of a multi run, pointed at on its own: a plain single-condition ControlNet.
        info.conditions, info.mode = [info.conditions[index]], "stacked"
    info.folders = _net_folders(folder, info)
    if (folder / "unet_lora").is_dir():
        info.unet_lora = folder / "unet_lora"
    elif (folder / "unet" / "config.json").is_file():
        info.unet = folder / "unet"
    return info


def _apply_sidecar(info: ModelInfo, data: dict[str, Any], where: Path) -> None:
    conditions = data.get("conditions")
    if not isinstance(conditions, list) or not conditions:
        raise ExportError(f"{where / SIDECAR}: 'conditions' must be a non-empty list")
    info.conditions = [str(c) for c in conditions]
    info.mode = data.get("mode", info.mode)
    if info.mode not in ("stacked", "multi"):
        raise ExportError(f"{where / SIDECAR}: mode {info.mode!r} is not stacked or multi")
    info.base_model = data.get("base_model", info.base_model)
    info.resolution = int(data.get("resolution", info.resolution))
    info.steps = int(data.get("steps", info.steps) or info.steps)
    info.unet_trainable = data.get("unet_trainable", info.unet_trainable)
    info.loss_weights = dict(data.get("loss_weights", info.loss_weights))
    info.depth_model = data.get("depth_model", info.depth_model)


def _net_folders(primary: Path, info: ModelInfo) -> list[Path]:
    """diffusers' MultiControlNetModel naming: ``controlnet``, ``controlnet_1``, ..."""
    if info.mode != "multi":
        return [primary]
    folders = [primary] + [
        primary.with_name(f"{primary.name}_{i}") for i in range(1, len(info.conditions))
    ]
    for folder, name in zip(folders, info.conditions, strict=True):
        if not (folder / "config.json").is_file():
            raise ExportError(f"{folder}: missing (multi-mode net for condition {name!r})")
    return folders


def _read_sidecar(folder: Path) -> dict[str, Any] | None:
    path = folder / SIDECAR
    return _read_json(path) if path.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data


def _latest_step(run: Path) -> int:
    """Training steps of a run without a sidecar: the newest checkpoint-N or metrics line."""
    steps = [int(m.group(1)) for p in run.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines()[-1:]:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                pass
    return max(steps, default=0)


# ---------------------------------------------------------------------------------------------
# diffusers folders


def _nets(controlnet_or_multi: Any) -> list[torch.nn.Module]:
    nets = getattr(controlnet_or_multi, "nets", None)
    if nets is None:
        nets = controlnet_or_multi if isinstance(controlnet_or_multi, list | tuple) else [
            controlnet_or_multi]
    return [getattr(n, "_orig_mod", n) for n in nets]  # unwrap torch.compile


def save_diffusers(controlnet_or_multi: Any, run_dir: str | Path, info: dict[str, Any]) -> list[Path]:
    """Write ``controlnet/`` (multi: also ``controlnet_1/``, ...) and their sidecars.

    ``info``: ``conditions`` (required), ``mode``, ``base_model``, ``resolution``, ``steps``,
    ``unet_trainable``, ``loss_weights``. Each folder is written beside the old one and swapped
    in, so a crash mid-save never leaves a half-written model where a good one was.
    """
    nets = _nets(controlnet_or_multi)
    info = dict(info)
    info.setdefault("mode", "multi" if len(nets) > 1 else "stacked")
    conditions = list(info.get("conditions") or [])
    _check_channels(nets, conditions, info["mode"], where=str(run_dir))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    for i, net in enumerate(nets):
        folder = run_dir / ("controlnet" if i == 0 else f"controlnet_{i}")
        _save_folder(net, folder, {**info, "index": i})
        folders.append(folder)
    return folders


def _save_folder(net: torch.nn.Module, folder: Path, info: dict[str, Any]) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp, safe_serialization=True)
    write_sidecar(tmp, info)
    old = folder.with_name(folder.name + f".old{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _check_channels(nets: list[Any], conditions: list[str], mode: str, where: str) -> None:
    if not conditions:
        raise ExportError(f"{where}: info needs the 'conditions' list")
    got = [int(n.config.conditioning_channels) for n in nets]
    c = CHANNELS_PER_CONDITION
    want = [c] * len(conditions) if mode == "multi" else [c * len(conditions)]
    if got != want:
        raise ExportError(
            f"{where}: ControlNet hint channels {got} do not match {mode} conditions "
            f"{conditions} (expected {want})"
        )


def load_controlnets(info: ModelInfo, dtype: torch.dtype | None = None) -> list[Any]:
    """The trained ControlNet(s) in condition order, checked against the sidecar."""
    from diffusers import ControlNetModel

    nets = []
    for folder in info.folders:
        try:
            nets.append(ControlNetModel.from_pretrained(folder, **dtype_kwargs(dtype)))
        except (OSError, ValueError, RuntimeError) as err:
            raise ExportError(f"{folder}: not a loadable diffusers ControlNet ({err})") from None
    _check_channels(nets, info.conditions, info.mode, where=str(info.folders[0]))
    return nets


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: diffusers renamed ``torch_dtype`` to ``dtype``
    (PR 14205); older versions ignore ``dtype``, newer ones warn on ``torch_dtype``."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype" if renamed else "torch_dtype": dtype}


# ---------------------------------------------------------------------------------------------
# The original ControlNet layout


_RESNET_TO_ORIGINAL = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_FIXED_TO_ORIGINAL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_cond_embedding.conv_out": f"input_hint_block.{_HINT_OUT}",
    "controlnet_mid_block": "middle_block_out.0",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}


def to_original_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ControlNet keys -> original ``control_model.`` keys (the same tensors).

    Original input blocks are numbered across the whole encoder: 0 is conv_in, then per down
    block ``layers_per_block`` resnet(+attention) entries and one downsampler (none after the
    last block). The hint encoder must have the original's six hidden convs.
    """
    lpb = _layers_per_block(state_dict)
    hint_blocks = {int(m.group(1)) for k in state_dict
                   if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))}
    if hint_blocks != set(range(_HINT_BLOCKS)):
        raise ExportError(
            f"the hint encoder has {len(hint_blocks)} hidden convs; the original layout (and "
            f"diffusers' reader) needs {_HINT_BLOCKS} (conditioning_embedding_out_channels of "
            "length 4)"
        )
    if any(k.startswith("mid_block.resnets.") for k in state_dict) and not any(
            k.startswith("mid_block.attentions.0.") for k in state_dict):
        raise ExportError("a mid block without attention has no original-layout equivalent")
    out = {}
    for key, tensor in state_dict.items():
        new = ORIGINAL_PREFIX + _original_key(key, lpb)
        if new in out:
            raise ExportError(f"two diffusers keys map to {new}")
        out[new] = tensor
    return out


def _layers_per_block(state_dict: dict[str, torch.Tensor]) -> int:
    ids = {int(m.group(1)) for k in state_dict
           if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    if not ids:
        raise ExportError("not a diffusers ControlNet state dict (no down_blocks.0.resnets)")
    return max(ids) + 1


def _original_key(key: str, lpb: int) -> str:
    module, _, param = key.rpartition(".")
    if module in _FIXED_TO_ORIGINAL:
        return f"{_FIXED_TO_ORIGINAL[module]}.{param}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 * int(m.group(1)) + 2}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m.group(1)}.0.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{_input_index(int(m.group(1)), lpb, lpb)}.0.op.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        i = _input_index(block, layer, lpb)
        if kind == "attentions":
            return f"input_blocks.{i}.1.{rest}"
        return f"input_blocks.{i}.0.{_resnet_rest(rest, key)}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m.group(1))}.{_resnet_rest(m.group(2), key)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m.group(1)}"
    raise ExportError(f"{key}: no original ControlNet layout equivalent")


def _input_index(block: int, layer: int, lpb: int) -> int:
    """Inverse of diffusers' ``block_id = (i-1) // (lpb+1)``, ``layer = (i-1) % (lpb+1)``."""
    return 1 + block * (lpb + 1) + layer


def _resnet_rest(rest: str, key: str) -> str:
    name, _, param = rest.partition(".")
    if name not in _RESNET_TO_ORIGINAL:
        raise ExportError(f"{key}: unknown resnet parameter {name!r}")
    return f"{_RESNET_TO_ORIGINAL[name]}.{param}"


def write_single_file(controlnet: Any, path: str | Path, metadata: dict[str, str],
                      dtype: torch.dtype | None = None) -> Path:
    """One ``.safetensors`` in the original layout, with string metadata; written atomically."""
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise ExportError(f"safetensors metadata values must be strings: {bad}")
    nets = _nets(controlnet)
    if len(nets) != 1:
        raise ExportError(f"{path}: one file holds one ControlNet, got {len(nets)}")
    state = to_original_layout(nets[0].state_dict())
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
             for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Metadata


def safetensors_metadata(cfg: Config, steps: int, **kw: Any) -> dict[str, str]:
    """String metadata for a single file: SAI model-spec keys plus our condition layout."""
    return info_metadata(ModelInfo.from_config(cfg, steps), **kw)


def info_metadata(info: ModelInfo, controlnet: Any | None = None, condition: str | None = None,
                  title: str | None = None) -> dict[str, str]:
    """Metadata from a ModelInfo. ``condition``: this file is one net of a multi run."""
    conditions = [condition] if condition else list(info.conditions)
    channels = {n: [i * CHANNELS_PER_CONDITION, (i + 1) * CHANNELS_PER_CONDITION]
                for i, n in enumerate(conditions)}
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
            "Hint: " + " + ".join(conditions) + f" maps at {res}x{res}"
            + ("" if len(conditions) == 1 else ", stacked; use `controlnet-emo infer`")
        ),
        "modelspec.tags": "controlnet,face,emotion,flame",
        "controlnet_emo.conditions": ",".join(conditions),
        "controlnet_emo.channels": json.dumps(channels),
        "controlnet_emo.hint_channels": str(CHANNELS_PER_CONDITION * len(conditions)),
        "controlnet_emo.mode": info.mode,
        "controlnet_emo.base_model": str(info.base_model),
        "controlnet_emo.resolution": str(res),
        "controlnet_emo.loss_weights": json.dumps(info.loss_weights),
        "controlnet_emo.steps": str(info.steps),
        "controlnet_emo.unet_trainable": info.unet_trainable,
    }
    if condition:
        meta["controlnet_emo.run_conditions"] = ",".join(info.conditions)
    if controlnet is not None:
        config = json.loads(controlnet.to_json_string())  # what config.json holds
        config.pop("_name_or_path", None)
        meta["controlnet_emo.diffusers_config"] = json.dumps(config)
    return meta


def _architecture(controlnet: Any | None, resolution: int) -> str:
    """SAI architecture id of the base, read from the ControlNet's text-conditioning width."""
    dim = getattr(getattr(controlnet, "config", None), "cross_attention_dim", 768)
    if dim == 1024:
        return "stable-diffusion-v2-768-v" if resolution >= 768 else "stable-diffusion-v2-512"
    if dim == 768:
        return "stable-diffusion-v1"
    return f"stable-diffusion-custom-{dim}"


# ---------------------------------------------------------------------------------------------
# export_run


def export_run(run_dir: str | Path, fmt: str = "single-file", out: Path | None = None,
               dtype: torch.dtype | None = None) -> list[Path]:
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
            write_single_file(net, folder / f"controlnet_{name}.safetensors",
                              info_metadata(info, net, condition=name), dtype)
            for net, name in zip(nets, info.conditions, strict=True)
        ]
    path = Path(out) if out is not None else home / "controlnet.safetensors"
    if path.is_dir() or not path.suffix:  # a folder to write into
        path = path / "controlnet.safetensors"
    if info.unet_lora or info.unet:
        log.warning("%s: the tuned UNet (%s) is not part of a single file; ship it beside it",
                    path, info.unet_lora or info.unet)
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
    return folders


def _present(paths: Iterable[Path | None]) -> list[Path]:
    return [p for p in paths if p is not None]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Command line (plugged into controlnet_emo.cli)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_export_arguments(p: Any) -> None:
    """``controlnet-emo export RUN_DIR [--format ...] [--out PATH] [--dtype ...]``."""
    p.add_argument("run_dir", type=Path, help="run folder, or a ControlNet folder with its sidecar")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="single-file",
                   help="diffusers folder(s); one original-layout file (ComfyUI/A1111); "
                        "one file per condition (multi-mode runs)")
    p.add_argument("--out", type=Path, default=None,
                   help="file (single-file), folder (multi) or ControlNet folder (diffusers); "
                        "default: inside the run folder")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default=None,
                   help="cast the exported tensors (default: as trained)")


def run_export(args: Any) -> int:
    """The ``export`` subcommand: prints each written path; a bad input is one line, exit 2."""
    try:
        paths = export_run(args.run_dir, args.fmt, args.out,
                           _DTYPES[args.dtype] if args.dtype else None)
        if (Path(args.run_dir) / "config.yaml").is_file():
            from .model_card import write_model_card

            run = Path(args.run_dir)
            write_model_card(run, load_config(run / "config.yaml"), read_model_info(run).steps)
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
