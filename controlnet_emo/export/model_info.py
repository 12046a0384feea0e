"""What a saved ControlNet is: its sidecar, and how a run or a model folder is read back.

Every saved ControlNet folder carries a sidecar, ``controlnet_emo.json``: the condition order
and channels, mode, base model and resolution. Inference reads the condition order from it,
never from the command line, so a 9-channel net always sees its maps in the trained order.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from controlnet_emo.atomic import atomic_write_text
from controlnet_emo.config import Config, ConfigError, load_config
from controlnet_emo.models.controlnet import CHANNELS_PER_CONDITION

log = logging.getLogger(__name__)

SIDECAR = "controlnet_emo.json"
SIDECAR_FORMAT = "controlnet-emo"
SIDECAR_VERSION = 1
DEFAULT_DEPTH_MODEL = "Intel/zoedepth-nyu-kitti"


class ExportError(ValueError):
    """A model folder that cannot be read or exported; one line naming the path."""


@dataclass
class ModelInfo:
    """What inference and export need to know about a trained ControlNet (from its sidecar)."""

    conditions: list[str]
    mode: str = "stacked"  # stacked | multi
    base_model: str | None = None
    family: str = "sd"
    """The base's family, ``models.sd.FAMILIES`` ('sd' / 'sdxl'), read from its UNet."""
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
            "family": self.family,
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
            depth_model=DEFAULT_DEPTH_MODEL
            if cfg.depth.model in ("precomputed", "flame")  # maps made beside, not a network
            else cfg.depth.model,
        )


# ---------------------------------------------------------------------------------------------
# The sidecar


def write_sidecar(folder: str | Path, info: dict[str, Any] | ModelInfo) -> Path:
    """Write ``controlnet_emo.json`` beside a ControlNet's config.json (atomically)."""
    data = info.sidecar() if isinstance(info, ModelInfo) else _complete_sidecar(info)
    path = Path(folder) / SIDECAR
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path


def _complete_sidecar(info: dict[str, Any]) -> dict[str, Any]:
    """Only what the caller knows (missing keys must not override a run's config.yaml)."""
    conditions = info.get("conditions")
    if not conditions:
        raise ExportError("sidecar info needs a non-empty 'conditions' list")
    mode = info.get("mode", "stacked")
    channels = ModelInfo(conditions=list(conditions), mode=mode).channels
    skip = ("folders", "run_dir", "unet_lora", "unet")
    data = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "mode": mode,
        "channels": {k: list(v) for k, v in channels.items()},
    }
    data.update(
        {k: (list(v) if k == "conditions" else v) for k, v in info.items() if k not in skip}
    )
    return data


# ---------------------------------------------------------------------------------------------
# Reading a run or a ControlNet folder back


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
    _find_tuned_unet(info, run)
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
            raise ExportError(
                f"{folder / SIDECAR}: index {index} but only {len(info.conditions)} conditions"
            )
        # One net of a multi run, pointed at on its own: a plain single-condition ControlNet.
        info.conditions, info.mode = [info.conditions[index]], "stacked"
    info.folders = _net_folders(folder, info)
    _find_tuned_unet(info, folder)
    return info


def _find_tuned_unet(info: ModelInfo, folder: Path) -> None:
    """A tuned UNet saved beside the ControlNet: a LoRA (``unet_lora/``) or a full ``unet/``."""
    if (folder / "unet_lora").is_dir():
        info.unet_lora = folder / "unet_lora"
    elif (folder / "unet" / "config.json").is_file():
        info.unet = folder / "unet"


def _apply_sidecar(info: ModelInfo, data: dict[str, Any], where: Path) -> None:
    conditions = data.get("conditions")
    if not isinstance(conditions, list) or not conditions:
        raise ExportError(f"{where / SIDECAR}: 'conditions' must be a non-empty list")
    info.conditions = [str(c) for c in conditions]
    info.mode = data.get("mode", info.mode)
    if info.mode not in ("stacked", "multi"):
        raise ExportError(f"{where / SIDECAR}: mode {info.mode!r} is not stacked or multi")
    info.base_model = data.get("base_model", info.base_model)
    info.family = data.get("family", info.family)
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
    steps = [
        int(m.group(1))
        for p in run.glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines()[-1:]:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                pass
    return max(steps, default=0)


# ---------------------------------------------------------------------------------------------
# Loading the trained nets


def load_controlnets(info: ModelInfo, dtype: torch.dtype | None = None) -> list[Any]:
    """The trained ControlNet(s) in condition order, checked against the sidecar."""
    from diffusers import ControlNetModel

    nets = []
    for folder in info.folders:
        try:
            nets.append(ControlNetModel.from_pretrained(folder, **dtype_kwargs(dtype)))
        except (OSError, ValueError, RuntimeError) as err:
            raise ExportError(f"{folder}: not a loadable diffusers ControlNet ({err})") from None
    check_channels(nets, info.conditions, info.mode, where=str(info.folders[0]))
    return nets


def check_channels(nets: list[Any], conditions: list[str], mode: str, where: str) -> None:
    """Each net reads the hint channels its conditions need: 3 each (multi) or 3N (stacked)."""
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


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: diffusers renamed ``torch_dtype`` to ``dtype``
    (PR 14205); older versions ignore ``dtype``, newer ones warn on ``torch_dtype``."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype" if renamed else "torch_dtype": dtype}
