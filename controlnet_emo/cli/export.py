"""``controlnet-emo export``: arguments and handler."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from controlnet_emo.config import ConfigError, load_config
from controlnet_emo.export.formats import COMFYUI_KEY, FORMATS, export_run
from controlnet_emo.export.model_info import ExportError, read_model_info

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_export_arguments(p: Any) -> None:
    """``controlnet-emo export RUN_DIR [--format ...] [--out PATH] [--dtype ...]``."""
    p.add_argument("run_dir", type=Path, help="run folder, or a ControlNet folder with its sidecar")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        default="single-file",
        help="diffusers folder(s); one original-layout file (ComfyUI/A1111 where the net has "
        "their shapes: SD 1.5/2.x/SDXL bases; export warns otherwise); one file per condition "
        "(multi-mode runs)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="file (single-file), folder (multi) or ControlNet folder (diffusers); "
        "default: inside the run folder",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default=None,
        help="cast the exported tensors (default: as trained)",
    )


def run_export(args: Any) -> int:
    """The ``export`` subcommand: prints each written path; a bad input is one line, exit 2."""
    try:
        paths = export_run(
            args.run_dir, args.fmt, args.out, _DTYPES[args.dtype] if args.dtype else None
        )
        if (Path(args.run_dir) / "config.yaml").is_file():
            from controlnet_emo.export.model_card import write_model_card

            run = Path(args.run_dir)
            write_model_card(run, load_config(run / "config.yaml"), read_model_info(run).steps)
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
        why_not = _comfyui_verdict(path)
        if why_not:
            print(
                f"warning: {path} will not load as trained in ComfyUI/A1111: {why_not}",
                file=sys.stderr,
            )
    return 0


def _comfyui_verdict(path: Path) -> str | None:
    """The reason a written single file's metadata gives for not loading in ComfyUI, if any."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        verdict = (f.metadata() or {}).get(COMFYUI_KEY, "true")
    return verdict.removeprefix("false: ") if verdict.startswith("false") else None
