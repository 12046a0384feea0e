"""``controlnet-emo doctor``: would this training run start? Answered in seconds, before the
queue wait and the GPU hours.

Why: a training job finds a missing EmoNet file, an uncached base model or a hole in its
dataset only when it reaches them, minutes or hours in. The doctor looks at everything the run
named by a config would read, without loading a weight or running a forward pass, and prints
one row per need:

- ok: there, or not needed by this config (the row says which);
- warn: the run starts, but read this (random critic weights, no GPU, a sample of the files
  opened, ...);
- missing: a weight or file is not there; the row says how to get it, in the words the loader
  itself would raise (the messages live beside the loaders and are shared, never copied);
- fail: a setting the run would stop on (a total batch that does not divide, bf16 on a GPU
  without it, an unreadable image, too little disk).

Exit 0 when no row is missing or failing, 1 otherwise; config errors exit 2 like every
subcommand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

from controlnet_emo.config import Config, ConfigError, gradient_accumulation_steps

if TYPE_CHECKING:
    from conditioners.prepare import Plan

Status = Literal["ok", "warn", "missing", "fail"]
BLOCKING: tuple[Status, ...] = ("missing", "fail")
DEFAULT_OPEN = 500
"""Files opened (PIL verify) per run of the doctor by default: a spread sample, so a 300k-row
dataset is checked in seconds; ``--open all`` opens every one."""
SD1_CONTROLNET_PARAMS = 361_279_984
"""An SD 1.x ControlNet's parameter count: the fallback estimate when the base has no UNet
config to count from (a single-file checkpoint)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Row:
    """One line of the report: what was checked, what was found, and how to fix it."""

    status: Status
    check: str
    detail: str
    fix: str = ""


@dataclass
class Launch:
    """How many processes the run will have, and where that number came from."""

    num_processes: int
    source: str
    num_machines: int = 1
    distributed_type: str | None = None


@dataclass
class Sizes:
    """Parameter counts that decide the checkpoint size, and the latent grid for the cache."""

    controlnet: int
    unet: int = 0
    unet_trainable: int = 0
    latent_channels: int = 4
    vae_scale: int = 8
    exact: bool = True
    note: str = ""
    text_encoders: int = 0
    vae: int = 0
    family: str = "sd"
    vae_upcast: bool = True
    unet_config: dict | None = None


# ---------------------------------------------------------------------------------------------
# Entry points


def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    """The doctor's own options (the config ones come from the CLI's shared helper)."""
    p.add_argument(
        "--raw",
        type=Path,
        help="raw data folder: also check what `prepare RAW data.root` needs (ZoeDepth, FAN)",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        help="processes the run will have (as `accelerate launch --num_processes`)",
    )
    p.add_argument(
        "--accelerate-config",
        type=Path,
        help="the accelerate config file the run will be launched with (--config_file)",
    )
    p.add_argument(
        "--open",
        default=str(DEFAULT_OPEN),
        metavar="N|all",
        help=f"dataset files to open and verify (default {DEFAULT_OPEN}, spread over the "
        "dataset; every file is checked for existence)",
    )


def run_doctor(cfg: Config, args: argparse.Namespace) -> int:
    """Print the report for ``cfg``; 0 when the run would start, 1 when it would not."""
    rows = diagnose(
        cfg,
        raw=args.raw,
        num_processes=args.num_processes,
        accelerate_config=args.accelerate_config,
        open_files=parse_open(args.open),
    )
    print(render(rows))
    return verdict(rows)


def parse_open(value: str) -> int | None:
    """``--open``: a count, or ``all`` (None: no limit)."""
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--open {value!r}: expected a number of files or 'all'") from None
    if n < 0:
        raise ConfigError(f"--open {n}: must be >= 0")
    return n


def diagnose(
    cfg: Config,
    raw: Path | None = None,
    num_processes: int | None = None,
    accelerate_config: Path | None = None,
    open_files: int | None = DEFAULT_OPEN,
) -> list[Row]:
    """Every row for this run, in the order the run meets them: weights, data, launch, disk."""
    launch = launch_plan(num_processes, accelerate_config)
    base_rows, base_folder = check_base_model(cfg)
    rows = [*base_rows, *check_controlnet_init(cfg)]
    rows += check_decoder(cfg) + check_lpips(cfg) + check_emonet(cfg)
    data_rows, n_train = check_dataset(cfg, open_files, raw)
    rows += data_rows + check_prepare(cfg, raw, prepared=n_train > 0)
    rows += check_launch(cfg, launch) + check_devices(cfg, launch) + check_packages(cfg, launch)
    sizes = model_sizes(cfg, base_folder)
    rows += check_memory(cfg, sizes) + check_output(cfg, sizes, n_train)
    return rows


def verdict(rows: list[Row]) -> int:
    """1 when any row blocks the run, else 0."""
    return int(any(r.status in BLOCKING for r in rows))


def render(rows: list[Row]) -> str:
    """The table: status, check, detail; under a blocking or warning row, how to fix it."""
    width = max(len(r.check) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"{r.status:<8} {r.check:<{width}}  {r.detail}")
        if r.fix:
            lines.append(f"{'':<8} {'':<{width}}  -> {r.fix}")
    counts = Counter(r.status for r in rows)
    if verdict(rows):
        summary = ", ".join(f"{counts[s]} {s}" for s in BLOCKING if counts[s])
        lines.append(f"verdict: the run would NOT start ({summary})")
    else:
        warns = counts["warn"]
        lines.append(f"verdict: the run would start ({warns} warning{'' if warns == 1 else 's'})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Where weights are


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of a hub repo, or None; never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a repo id
        return None


def local_or_cached(spec: str, revision: str | None = None) -> Path | None:
    """A local folder, else the hub cache's copy of ``spec``: where from_pretrained reads."""
    from controlnet_emo.models.sd import looks_like_path

    if Path(spec).is_dir():  # as given: the loaders do not expand ~ either
        return Path(spec)
    return None if looks_like_path(spec) else hub_snapshot(spec, revision)


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """Readable weight files in ``folder`` (a broken hub-cache symlink does not count)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file()]
    return [p for p in found if f".{variant}." in p.name] if variant else found


def model_folder_problems(folder: Path, variant: str | None = None) -> list[str]:
    """What a transformers/diffusers model folder lacks: its config.json or a weights file."""
    if not (folder / "config.json").is_file():
        return [f"{folder.name}/config.json missing"]
    if not weight_files(folder, variant):
        return [f"{folder.name}/ has no {variant + ' ' if variant else ''}weights file"]
    return []


def sd_folder_problems(folder: Path, variant: str | None = None) -> list[str]:
    """The parts ``models.sd.load_sd`` reads from a diffusers folder, each checked for files."""
    from controlnet_emo.models.sd import unsupported_family_message

    if (folder / "transformer").is_dir() and not (folder / "unet").is_dir():
        return [unsupported_family_message(folder.name, "a transformer pipeline (no unet/)")]
    xl = base_family(folder) == "sdxl"  # SDXL: two text encoders and two tokenizers
    encoders = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
    problems = []
    for part in ("unet", "vae", *encoders):
        problems += model_folder_problems(folder / part, variant)
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        problems.append("scheduler/scheduler_config.json missing")
    for tok in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
        if not any((folder / tok / n).is_file() for n in ("tokenizer.json", "vocab.json")):
            problems.append(f"{tok}/ has no tokenizer.json or vocab.json")
    return problems


def base_family(folder: Path) -> str:
    """'sdxl' or 'sd', from the folder's unet/config.json (as ``load_sd`` decides)."""
    import json

    from controlnet_emo.models.sd import unet_family

    path = folder / "unet" / "config.json"
    try:
        return unet_family(json.loads(path.read_text())) if path.is_file() else "sd"
    except (OSError, ValueError):
        return "sd"


# ---------------------------------------------------------------------------------------------
# Weights


def check_base_model(cfg: Config) -> tuple[list[Row], Path | None]:
    """``model.pretrained``: 'tiny', a shipped name, a single file, a folder or a hub id.

    Returns the row and the diffusers folder (for counting parameters), None when there is none.
    """
    from controlnet_emo.models.sd import (
        SINGLE_FILE_SUFFIXES,
        missing_model_message,
        resolve_pretrained,
    )

    spec, name = cfg.model.pretrained, "base model"
    try:
        path = resolve_pretrained(spec)
    except FileNotFoundError as err:  # a shipped model absent from this install
        return [Row("missing", name, spec, str(err))], None
    if path.endswith(SINGLE_FILE_SUFFIXES):
        if Path(path).is_file():
            size = Path(path).stat().st_size / 1e9
            return [Row("ok", name, f"{path} (single file, {size:.1f} GB)")], None
        return [Row("missing", name, path, missing_model_message(spec))], None
    folder = local_or_cached(path, cfg.model.revision)
    if folder is None:
        return [Row("missing", name, spec, missing_model_message(spec))], None
    problems = sd_folder_problems(folder, cfg.model.variant)
    if problems:
        detail = f"{folder}: {'; '.join(problems)}"
        return [
            Row("missing", name, detail, missing_model_message(spec, "; ".join(problems)))
        ], None
    if spec in ("tiny", "tiny-xl"):
        return [Row("warn", name, f"{spec}: random weights built from code (tests only)")], folder
    shown = spec if str(folder) == spec else f"{spec} -> {folder}"
    if base_family(folder) == "sdxl":
        vae = "fp32 (fp16 overflows)" if cfg.train.mixed_precision == "fp16" else "run dtype"
        shown += f" (SDXL: text_encoder + text_encoder_2, VAE in {vae})"
    return [Row("ok", name, shown)], folder


def check_controlnet_init(cfg: Config) -> list[Row]:
    """``model.controlnet.init``: a new net from the UNet, or existing folder(s) with the
    hint channels this config's conditions need."""
    from controlnet_emo.models.controlnet import CHANNELS_PER_CONDITION, init_folders

    init, n = cfg.model.controlnet.init, len(cfg.conditions)
    if init == "from_unet":
        return [Row("ok", "controlnet", "new, from the base UNet's encoder (from_unet)")]
    multi = cfg.model.controlnet.mode == "multi"
    folders = init_folders(init, n) if multi else [Path(init)]
    expected = CHANNELS_PER_CONDITION * (1 if multi else n)
    rows = []
    for folder in folders:
        problems = model_folder_problems(folder) if folder.is_dir() else ["no such folder"]
        if problems:
            fix = "set model.controlnet.init to a diffusers ControlNet folder, or from_unet"
            rows.append(Row("missing", "controlnet", f"{folder}: {'; '.join(problems)}", fix))
            continue
        got = _read_json(folder / "config.json").get("conditioning_channels")
        if got != expected:
            detail = f"{folder}: ControlNet reads {got} hint channels, config needs {expected}"
            rows.append(Row("fail", "controlnet", detail, "check conditions and controlnet.mode"))
        else:
            rows.append(Row("ok", "controlnet", f"{folder} ({got} hint channels)"))
    return rows


def check_decoder(cfg: Config) -> list[Row]:
    """The pixel-loss decoder, needed only when a pixel or emotion term has weight > 0."""
    from controlnet_emo.models.critics import TAESD_HUB_ID, missing_taesd_message

    spec, name = cfg.model.decoder, "decoder"
    if not cfg.loss.needs_decoder:
        return [Row("ok", name, "not needed (no pixel or emotion term)")]
    if spec == "vae":
        return [Row("ok", name, "the base model's VAE")]
    if spec == "taesd":
        folder = hub_snapshot(TAESD_HUB_ID)
        if folder is None or model_folder_problems(folder):
            return [Row("missing", name, f"taesd ({TAESD_HUB_ID})", missing_taesd_message())]
        return [Row("ok", name, f"taesd -> {folder}")]
    if not Path(spec).is_dir() or model_folder_problems(Path(spec)):
        fix = "set model.decoder to vae, taesd, or an AutoencoderTiny folder"
        return [Row("missing", name, f"{spec}: not an AutoencoderTiny folder", fix)]
    return [Row("ok", name, spec)]


def check_lpips(cfg: Config) -> list[Row]:
    """The LPIPS trunk (torchvision's cache, a file, or random), when its weight is > 0."""
    name = f"LPIPS-{cfg.model.lpips_net} trunk"
    if cfg.loss.lpips.weight <= 0:
        return [Row("ok", name, "not needed (loss.lpips.weight is 0)")]
    if cfg.loss.lpips.space == "latent":
        return [Row("ok", name, "not needed (loss.lpips.space: latent reads the decoder)")]
    backbone = cfg.model.lpips_backbone
    if backbone == "random":
        return [Row("warn", name, "random trunk (model.lpips_backbone=random): LPIPS is noise")]
    if backbone != "pretrained":
        if Path(backbone).is_file():
            return [Row("ok", name, backbone)]
        fix = "point model.lpips_backbone at torchvision's trunk file, or use pretrained"
        return [Row("missing", name, f"model.lpips_backbone: {backbone} is not a file", fix)]
    from controlnet_emo.models.critics import lpips_backbone_file, missing_lpips_message

    path = lpips_backbone_file(cfg.model.lpips_net)
    if not path.is_file():
        return [Row("missing", name, str(path), missing_lpips_message(cfg.model.lpips_net))]
    return [Row("ok", name, str(path))]


def check_emonet(cfg: Config) -> list[Row]:
    """``model.emonet`` (EmoNet file, face-critic folder, shipped name), when an emotion term
    has weight > 0; the same cases ``models.emonet.build_emonet`` tells apart."""
    from controlnet_emo.models.emonet import missing_weights_message
    from controlnet_emo.models.face_critic import CONFIG_NAME, WEIGHTS_NAME, is_face_critic_folder
    from controlnet_emo.models.shipped import shipped_path

    spec, name = cfg.model.emonet, "emotion critic"
    if not cfg.loss.needs_critic:
        return [Row("ok", name, "not needed (every emotion and landmark weight is 0)")]
    if spec == "random":
        return [Row("warn", name, "random EmoNet (model.emonet=random): emotion terms are noise")]
    try:
        folder = shipped_path(spec)
    except FileNotFoundError as err:
        return [Row("missing", name, spec, str(err))]
    path = folder or Path(spec)
    if path.is_dir():
        if not is_face_critic_folder(path):
            return [
                Row("missing", name, f"{path}: no {CONFIG_NAME}", missing_weights_message(spec))
            ]
        if not (path / WEIGHTS_NAME).is_file():
            detail, fix = f"{path / WEIGHTS_NAME}: face critic file missing", "rerun train-critic"
            return [Row("missing", name, detail, fix)]
        return [Row("ok", name, f"{spec} (face critic)" + (f" -> {path}" if folder else ""))]
    if not path.is_file():
        return [Row("missing", name, spec, missing_weights_message(spec))]
    return [Row("ok", name, f"{spec} (EmoNet weights, {path.stat().st_size / 1e6:.0f} MB)")]


# ---------------------------------------------------------------------------------------------
# Data


def check_dataset(
    cfg: Config, open_files: int | None, raw: Path | None = None
) -> tuple[list[Row], int]:
    """data.root, its metadata rows and every file they name; returns the training row count.

    A missing or unreadable file blocks: training would silently put another sample in its
    place (``PreparedDataset`` skips to the next one), which skews the data without a word.
    """
    from controlnet_emo.data.dataset import read_metadata

    root = Path(cfg.data.root)
    name = "dataset"
    fix = f"controlnet-emo prepare {raw or 'RAW'} {root}"
    fix += "" if raw else " (doctor --raw RAW checks what prepare needs)"
    if not root.is_dir():
        return [Row("missing", name, f"data.root {root}: no such folder", fix)], 0
    try:
        records = read_metadata(root, None, cfg.conditions)
    except FileNotFoundError as err:
        return [Row("missing", name, str(err), fix)], 0
    except ValueError as err:  # a malformed row, or one without a condition's column
        return [Row("fail", name, str(err), "fix that row or rerun prepare")], 0
    d = cfg.data
    train = [r for r in records if r.split == d.train_split]
    val = [r for r in records if r.split == d.val_split]
    if not train:
        splits = dict(Counter(r.split for r in records))
        detail = f"{root / 'metadata.jsonl'}: no rows in split {d.train_split!r} (found {splits})"
        return [Row("fail", name, detail, "set data.train_split to one of those")], 0
    rows = [
        Row("ok", name, f"{root}: {len(train)} {d.train_split} / {len(val)} {d.val_split} rows")
    ]
    if not val:
        rows.append(Row("warn", name, f"no {d.val_split!r} rows: validation uses training rows"))
    return rows + check_dataset_files(root, train + val, cfg.conditions, open_files), len(train)


def check_dataset_files(
    root: Path, records: list, conditions: list[str], open_files: int | None
) -> list[Row]:
    """Each target image and condition map exists; a spread sample of them opens (PIL verify,
    which reads the file through without decoding it)."""
    from PIL import Image

    paths = list(dict.fromkeys(p for r in records for p in (r.file_name, *r.maps.values())))
    what = f"images + {'/'.join(conditions)} maps"
    absent = [p for p in paths if not (root / p).is_file()]
    rows = []
    if absent:
        detail = f"{len(absent)} of {len(paths)} files named in metadata.jsonl do not exist: "
        detail += ", ".join(absent[:3]) + (" ..." if len(absent) > 3 else "")
        fix = (
            f"rerun `controlnet-emo prepare RAW {root}` (it resumes), or remove those rows; "
            "training would silently train on other samples in their place"
        )
        rows.append(Row("missing", "dataset files", detail, fix))
    gone = set(absent)
    present = [p for p in paths if p not in gone]
    chosen = spread(present, open_files)
    bad = []
    for p in chosen:
        try:
            with Image.open(root / p) as image:
                image.verify()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... per format
            bad.append(f"{p} ({type(err).__name__}: {err})")
    if bad:
        detail = f"{len(bad)} of {len(chosen)} opened files are unreadable: {', '.join(bad[:3])}"
        rows.append(Row("fail", "dataset files", detail, f"rerun prepare for them into {root}"))
    if not rows:
        opened = "all opened" if len(chosen) == len(present) else f"{len(chosen)} opened"
        detail = f"{len(paths)} files ({what}) exist, {opened}"
        if len(chosen) < len(present):
            detail += " (--open all opens every one)"
        rows.append(Row("ok", "dataset files", detail))
    return rows


def spread(items: list, n: int | None) -> list:
    """At most ``n`` items evenly spaced over ``items`` (all when ``n`` is None)."""
    if n is None or len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def check_prepare(cfg: Config, raw: Path | None, prepared: bool) -> list[Row]:
    """What ``prepare RAW data.root`` needs: the raw layout, ZoeDepth unless every map is on
    disk (``depth.model: auto``), FAN unless every sample has annotated landmarks."""
    name = "prepare (ZoeDepth, FAN)"
    if raw is None:
        if prepared:
            return [Row("ok", name, f"not needed: {cfg.data.root} is prepared")]
        return [Row("warn", name, "not checked: give --raw RAW to check what prepare needs")]
    from conditioners.prepare import plan_samples

    try:
        plan = plan_samples(Path(raw), cfg)
    except (FileNotFoundError, ValueError) as err:
        return [
            Row("missing", "raw data", str(err), 'see README, "Real data, step by step", step 3')
        ]
    if not plan.selected:
        return [Row("fail", "raw data", f"{raw}: no sample to prepare", "see prepare_report")]
    rows = [Row("ok", "raw data", f"{raw}: {len(plan.selected)} samples selected")]
    return rows + check_depth(cfg, plan) + check_fan(cfg, plan)


def check_depth(cfg: Config, plan: Plan) -> list[Row]:
    """The depth source prepare resolved (``prepare.resolve_depth_source``), and its weights."""
    from conditioners.depth import (
        AUTO,
        PRECOMPUTED,
        PrecomputedDepth,
        _hub_offline,
        missing_model_message,
    )

    source, name = plan.depth_source, "depth model"
    if source == PRECOMPUTED:
        missing = PrecomputedDepth(plan.raw_dir).missing([s.key for s in plan.selected])
        if missing:
            detail = f"{len(missing)} of {len(plan.selected)} samples have no map under depth/"
            return [Row("warn", name, detail + ": prepare skips them")]
        return [
            Row("ok", name, f"precomputed maps under {plan.raw_dir / 'depth'} for every sample")
        ]
    if source == "tiny":
        return [Row("warn", name, "tiny random ZoeDepth (tests only)")]
    shown = source + (
        " (depth.model=auto: RAW/depth/ lacks maps)" if cfg.depth.model == AUTO else ""
    )
    folder = local_or_cached(source)
    if folder is not None and not model_folder_problems(folder):
        return [Row("ok", name, f"{shown} -> {folder}")]
    if cfg.depth.allow_download and not _hub_offline():  # the loader's own rule
        return [Row("warn", name, f"{shown}: not cached; prepare downloads it (allow_download)")]
    return [Row("missing", name, shown, missing_model_message(source))]


def check_fan(cfg: Config, plan: Plan) -> list[Row]:
    """face-alignment's FAN: needed for skeleton.source=fan, or auto with samples that have no
    annotated landmarks (``PrepareJob._skeleton``'s rule)."""
    name = "FAN (landmarks)"
    source = cfg.skeleton.source
    unmarked = sum(s.landmarks is None for s in plan.selected)
    if source == "annotations":
        if unmarked:
            return [Row("warn", name, f"{unmarked} samples have no landmarks: prepare skips them")]
        return [Row("ok", name, "not needed (skeleton.source=annotations)")]
    if source == "auto" and not unmarked:
        return [Row("ok", name, "not needed: every selected sample has annotated landmarks")]
    if importlib.util.find_spec("face_alignment") is None:
        return [Row("missing", name, "the face-alignment package", "pip install face-alignment")]
    from conditioners.skeleton import fan_checkpoint, missing_fan_message

    checkpoint, _ = fan_checkpoint()
    if not checkpoint.is_file():
        return [Row("missing", name, str(checkpoint), missing_fan_message())]
    return [Row("ok", name, str(checkpoint))]


# ---------------------------------------------------------------------------------------------
# Launch, devices, packages


def launch_plan(num_processes: int | None, accelerate_config: Path | None) -> Launch:
    """The process count, read where ``accelerate launch`` reads it: its flag, its config
    file, WORLD_SIZE (inside a launched job), then accelerate's default config file; a plain
    ``controlnet-emo train`` is one process."""
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f"--num-processes {num_processes}: must be >= 1")
        return Launch(num_processes, "--num-processes")
    if accelerate_config is None and os.environ.get("WORLD_SIZE", "").isdigit():
        return Launch(int(os.environ["WORLD_SIZE"]), "WORLD_SIZE")
    path = accelerate_config
    if path is None:
        from accelerate.commands.config.config_args import default_config_file

        if not Path(default_config_file).is_file():
            return Launch(1, "plain `controlnet-emo train`; no accelerate config")
        path = Path(default_config_file)
    if not Path(path).is_file():
        raise ConfigError(f"--accelerate-config {path}: no such file")
    return _launch_from_file(Path(path))


def _launch_from_file(path: Path) -> Launch:
    """``num_processes`` (the total over machines) and the distributed type of an accelerate
    config file, parsed by accelerate's own reader."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        conf = load_config_from_file(str(path))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{path}: not an accelerate config ({err})") from None
    kind = getattr(conf, "distributed_type", None)
    n = conf.num_processes  # -1: "pass --num_processes", which check_launch reports
    return Launch(
        1 if n is None else int(n),
        str(path),
        int(getattr(conf, "num_machines", 1) or 1),
        str(getattr(kind, "value", kind)) if kind is not None else None,
    )


def check_launch(cfg: Config, launch: Launch) -> list[Row]:
    """Process count and the accumulation it implies, from ``config.gradient_accumulation_steps``
    (what ``training.loop.make_accelerator`` sets)."""
    n, t = launch.num_processes, cfg.train
    if n < 1:
        fix = "pass --num_processes to accelerate launch (and here --num-processes)"
        return [Row("fail", "processes", f"{launch.source}: num_processes is unset (-1)", fix)]
    rows = [Row("ok", "processes", f"{n} ({launch.source})")]
    try:
        accum = gradient_accumulation_steps(cfg, n)
    except ConfigError as err:
        fix = f"make train.total_batch_size a multiple of {t.batch_size * n}"
        return [*rows, Row("fail", "accumulation", str(err), fix)]
    detail = f"{accum} (total batch {t.total_batch_size} = {t.batch_size} x {n} x {accum})"
    return [*rows, Row("ok", "accumulation", detail)]


def check_devices(cfg: Config, launch: Launch) -> list[Row]:
    """CUDA, the GPUs one machine needs, and whether they do the configured precision."""
    import torch

    precision = cfg.train.mixed_precision
    if not torch.cuda.is_available():
        rows = [Row("warn", "devices", "no CUDA GPU here: the run would train on CPU (slow)")]
        if precision == "fp16":
            rows.append(Row("warn", "precision", "fp16 needs a GPU: trains in fp32 on CPU"))
        else:
            rows.append(Row("ok", "precision", f"{precision} (CPU)"))
        return rows
    count = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    per_machine = math.ceil(launch.num_processes / launch.num_machines)
    detail = f"{count} CUDA GPU(s): {', '.join(names)} (torch {torch.__version__})"
    rows = [Row("ok", "devices", detail)]
    if per_machine > count:
        detail = f"{per_machine} processes per machine but {count} GPU(s) here"
        rows.append(Row("fail", "devices", detail, f"launch {count} processes per machine"))
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        fix = "--set train.mixed_precision=fp16"
        rows.append(Row("fail", "precision", f"bf16 is not supported on {names[0]}", fix))
    else:
        rows.append(Row("ok", "precision", precision))
    return rows


def check_packages(cfg: Config, launch: Launch) -> list[Row]:
    """Optional packages this config switches on (tracker, xformers, 8-bit Adam, ...)."""
    from accelerate.utils import is_tensorboard_available

    needs: dict[str, tuple[bool, str]] = {}
    report = cfg.train.report_to
    if report == "tensorboard":
        needs["tensorboard"] = (is_tensorboard_available(), "pip install tensorboard")
    elif report != "none":
        needs[report] = (_installed(report), f"pip install {report}")
    if cfg.model.attention == "xformers":
        needs["xformers"] = (_installed("xformers"), "pip install -e .[xformers], or sdpa")
    if cfg.train.use_8bit_adam:
        needs["bitsandbytes"] = (_installed("bitsandbytes"), "pip install -e .[bnb]")
    if cfg.model.unet_trainable == "lora":
        needs["peft"] = (_installed("peft"), "pip install peft")
    if cfg.loss.lpips.weight > 0:
        needs["lpips"] = (_installed("lpips"), "pip install lpips")
    if launch.distributed_type == "DEEPSPEED":
        needs["deepspeed"] = (_installed("deepspeed"), "pip install deepspeed")
    rows = [Row("missing", "package", name, fix) for name, (ok, fix) in needs.items() if not ok]
    present = [name for name, (ok, _) in needs.items() if ok]
    if present or not rows:
        rows.insert(0, Row("ok", "packages", ", ".join(present) or "no optional ones needed"))
    return rows


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------------------------
# Output folder and disk


def model_sizes(cfg: Config, base_folder: Path | None) -> Sizes:
    """Parameter counts of the ControlNet(s) and the UNet, built on PyTorch's meta device from
    the config files alone: exact, with no weight read and no memory taken. Without a UNet
    config (a single-file base) the SD 1.x ControlNet's count stands in."""
    if base_folder is None:
        return Sizes(SD1_CONTROLNET_PARAMS, exact=False, note="SD 1.x ControlNet assumed")
    try:
        return _count_on_meta(cfg, base_folder)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        note = f"SD 1.x ControlNet assumed ({type(err).__name__}: {str(err)[:80]})"
        return Sizes(SD1_CONTROLNET_PARAMS, exact=False, note=note)


def _count_on_meta(cfg: Config, base_folder: Path) -> Sizes:
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    from controlnet_emo.models.controlnet import build_controlnet, init_folders
    from controlnet_emo.models.sd import unet_family, vae_scale_factor
    from controlnet_emo.models.unet_tuning import configure_unet

    vae_config = AutoencoderKL.load_config(base_folder, subfolder="vae")
    vae = SimpleNamespace(config=SimpleNamespace(**vae_config))
    unet_config = UNet2DConditionModel.load_config(base_folder, subfolder="unet")
    family = unet_family(unet_config)
    init = cfg.model.controlnet.init
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae_params = _numel(AutoencoderKL.from_config(vae_config).parameters())
        text_params = _count_text_encoders(base_folder, family)
        if init == "from_unet":
            nets = [build_controlnet(cfg, unet, vae_scale_factor(vae))]
        else:
            multi = cfg.model.controlnet.mode == "multi"
            folders = init_folders(init, len(cfg.conditions)) if multi else [Path(init)]
            nets = [ControlNetModel.from_config(ControlNetModel.load_config(f)) for f in folders]
        unet_total = _numel(unet.parameters())
        trainable = configure_unet(unet, cfg.model.unet_trainable, cfg.model.lora_rank)
    return Sizes(
        controlnet=sum(_numel(n.parameters()) for n in nets),
        unet=unet_total,
        unet_trainable=_numel(trainable),
        latent_channels=int(vae_config.get("latent_channels", 4)),
        vae_scale=vae_scale_factor(vae),
        text_encoders=text_params,
        vae=vae_params,
        family=family,
        vae_upcast=bool(vae_config.get("force_upcast", True)),
        unet_config=dict(unet_config),
    )


def _count_text_encoders(base_folder: Path, family: str) -> int:
    """Both SDXL text encoders' parameters (one for SD), built from their configs on the meta
    device (the caller's ``torch.device('meta')``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = [("text_encoder", CLIPTextModel)]
    if family == "sdxl":
        parts.append(("text_encoder_2", CLIPTextModelWithProjection))
    total = 0
    for sub, cls in parts:
        config = CLIPTextConfig.from_pretrained(base_folder / sub)
        total += _numel(cls(config).parameters())
    return total


def _numel(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------
# GPU memory


SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    transformer_layers_per_block=1,
)
"""SD 1.5's UNet levels: the shape the activation rule was measured on."""
ACTIVATION_BYTES_PER_UNIT = 0.33e9 / 4.67e6
"""Bytes of training activations per activation unit (``activation_units``), in bf16 with
gradient checkpointing on UNet and ControlNet: SD 1.5 at 512 px measured 0.33 GB a sample
(latent_only, H200, BENCHMARKS.md "GPU benchmark": 7.8 GB at batch 8, 15.7 GB at 32), and SD
1.5 at 512 px has 4.67 M units."""


def activation_units(unet_config: dict, resolution: int, vae_scale: int = 8) -> float:
    """The activation rule: a sample's saved activations grow with each UNet level's feature
    map (channels x latent area at that level) times the blocks that read it (one ResNet, plus
    each transformer layer of a cross-attention level). SD 1.5 at 512 px: 4.67 M; SDXL at 1024
    px: 27.5 M (5.9x: 4x the area, ten transformer layers on its 1280-channel level)."""
    channels = list(unet_config["block_out_channels"])
    kinds = list(unet_config["down_block_types"])
    depth = unet_config.get("transformer_layers_per_block", 1)
    depths = [depth] * len(channels) if isinstance(depth, int) else list(depth)
    depths = [d if isinstance(d, int) else max(d) for d in depths]  # per-layer lists
    area = (resolution / vae_scale) ** 2
    units = 0.0
    for level, (c, kind, d) in enumerate(zip(channels, kinds, depths, strict=False)):
        units += c * area / 4**level * (1 + (d if "CrossAttn" in kind else 0))
    return units


def memory_estimate(cfg: Config, sizes: Sizes) -> tuple[float, str]:
    """Bytes one GPU holds at the peak of a training micro-step, and how that sum was made.

    Frozen UNet and text encoders in the run's weight dtype (2 B a parameter in fp16/bf16, 4 B
    in fp32); the VAE likewise, but fp32 for SDXL in fp16 unless the VAE is an fp16-fixed one
    (``force_upcast: false``), as ``models.sd.vae_dtype`` decides; the trained ControlNet in
    fp32 with its gradients and AdamW's two moments (16 B a parameter; 10 B with 8-bit Adam;
    +4 B with EMA), and the trained part of the UNet alike; activations per sample from
    ``activation_units`` at ``data.resolution`` (x2 in fp32). The pixel terms' decoder and
    critics are not counted: they add their activations per decoded sample."""
    t, m = cfg.train, cfg.model
    half = t.mixed_precision in ("fp16", "bf16")
    weight = 2 if half else 4
    vae_bytes = (
        4
        if (sizes.family == "sdxl" and t.mixed_precision == "fp16" and sizes.vae_upcast)
        else weight
    )
    frozen = weight * (sizes.unet + sizes.text_encoders) + vae_bytes * sizes.vae
    per_trained = 16 - (6 if t.use_8bit_adam else 0) + (4 if t.ema else 0)
    trained = per_trained * sizes.controlnet
    if m.unet_trainable != "none":
        trained += per_trained * sizes.unet_trainable
    units = activation_units(sizes.unet_config or SD15_UNET, cfg.data.resolution, sizes.vae_scale)
    per_sample = units * ACTIVATION_BYTES_PER_UNIT * (1 if half else 2)
    total = frozen + trained + t.batch_size * per_sample
    how = (
        f"frozen {size_text(frozen)} (UNet, {'both text encoders' if sizes.family == 'sdxl' else 'text encoder'}, "
        f"VAE in {'fp32' if vae_bytes == 4 else t.mixed_precision}) + ControlNet with "
        f"gradients and optimizer {size_text(trained)} + {t.batch_size} x "
        f"{size_text(per_sample)} activations at {cfg.data.resolution} px"
    )
    if not t.gradient_checkpointing:
        how += "; gradient checkpointing is off: activations several times this (not measured)"
    return total, how


def check_memory(cfg: Config, sizes: Sizes) -> list[Row]:
    """Training memory on one GPU for this base's family and ``data.resolution``; a warning
    when the GPU here has less (the estimate is a rule, not a measurement)."""
    import torch

    if sizes.unet_config is None:
        return [Row("ok", "GPU memory", f"not estimated ({sizes.note or 'no UNet config'})")]
    need, how = memory_estimate(cfg, sizes)
    family = "SDXL" if sizes.family == "sdxl" else "SD"
    detail = f"{family}: about {size_text(need)} per GPU ({how})"
    if torch.cuda.is_available():
        have = torch.cuda.get_device_properties(0).total_memory
        if have < need:
            fix = "lower train.batch_size (raise accumulation), or use_8bit_adam"
            return [Row("warn", "GPU memory", f"{detail}; the GPU has {size_text(have)}", fix)]
    return [Row("ok", "GPU memory", detail)]


def disk_estimate(cfg: Config, sizes: Sizes, n_train: int) -> tuple[int, str]:
    """Bytes the run writes at its peak, and how that sum was made.

    A checkpoint holds fp32 weights and AdamW's two moments of every trained tensor (12 B a
    parameter), EMA weights when on, and the whole UNet when part of it trains (accelerate
    saves prepared models whole). Saving writes the new checkpoint before pruning the oldest,
    so ``checkpoints_total_limit + 1`` exist for a moment. The end adds controlnet/ and
    controlnet.safetensors (fp32), and the tuned UNet; ``data.cache_latents`` adds the
    cache (posterior mean and std, plain and mirrored, fp32 at most).
    """
    t = cfg.train
    per_ckpt = 12 * sizes.controlnet + (4 * sizes.controlnet if t.ema else 0)
    if cfg.model.unet_trainable != "none":
        per_ckpt += 4 * sizes.unet + 8 * sizes.unet_trainable
    saves = len(set(range(t.checkpoint_every, t.max_steps + 1, t.checkpoint_every)) | {t.max_steps})
    kept = saves if t.checkpoints_total_limit is None else min(saves, t.checkpoints_total_limit + 1)
    final = 8 * sizes.controlnet
    if cfg.model.unet_trainable != "none":
        lora = cfg.model.unet_trainable == "lora"
        final += 4 * (sizes.unet_trainable if lora else sizes.unet)
    cache = 0
    if cfg.data.cache_latents:
        grid = (cfg.data.resolution // sizes.vae_scale) ** 2
        cache = n_train * 2 * 2 * sizes.latent_channels * grid * 4
    total = kept * per_ckpt + final + cache
    how = (
        f"{kept} checkpoint(s) x {size_text(per_ckpt)} + final {size_text(final)}"
        + (f" + latent cache {size_text(cache)}" if cache else "")
        + f"; ControlNet {sizes.controlnet / 1e6:.1f} M params"
        + ("" if sizes.exact else f", rough: {sizes.note}")
    )
    return total, how


def size_text(n_bytes: float) -> str:
    """GB, or MB below a tenth of one (the demo's checkpoints are a few MB)."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def check_output(cfg: Config, sizes: Sizes, n_train: int) -> list[Row]:
    """output_dir: writable, enough free disk for the checkpoints, and what resume will do."""
    from controlnet_emo.training.checkpointing import list_checkpoints, resolve_resume

    out = Path(cfg.output_dir)
    anchor = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(anchor, os.W_OK):
        return [Row("fail", "output_dir", f"{anchor}: not writable", "set output_dir")]
    need, how = disk_estimate(cfg, sizes, n_train)
    free = shutil.disk_usage(anchor).free
    detail = f"{free / 1e9:.1f} GB free at {anchor}; the run needs about {size_text(need)} ({how})"
    if free < need:
        fix = "free space, set output_dir elsewhere, or lower train.checkpoints_total_limit"
        rows = [Row("fail", "disk", detail, fix)]
    elif free < 1.5 * need:
        rows = [Row("warn", "disk", detail + ": little headroom")]
    else:
        rows = [Row("ok", "disk", detail)]
    try:
        start = resolve_resume(out, cfg.train.resume)
    except FileNotFoundError as err:
        return [*rows, Row("fail", "resume", str(err), "point train.resume at checkpoint-N/")]
    if start is not None:
        rows.append(Row("ok", "resume", f"continues from {start}"))
    elif cfg.train.resume == "latest":
        rows.append(Row("ok", "resume", "latest: no checkpoint yet, starts at step 0"))
    elif list_checkpoints(out):
        newest = list_checkpoints(out)[-1][1]
        detail = f"{out} already holds {newest.name}; this run starts over at step 0"
        rows.append(Row("warn", "resume", detail, "--set train.resume=latest to continue it"))
    return rows


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
