"""The generating subcommands' arguments and handlers: ``infer``, ``evaluate``, ``edit`` and
``render``. Each handler turns a bad input into one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conditioners.codes import CodesError, parse_numbers
from conditioners.flame_model import FlameModelError
from conditioners.posed import parse_size, render_folders
from controlnet_emo.config import ConfigError
from controlnet_emo.inference.edit import EXPRESSION_CODES, SWEEP, EditError, edit
from controlnet_emo.inference.infer import InferenceError, infer
from controlnet_emo.labels import EXPRESSIONS
from controlnet_emo.models.sampling import SCHEDULERS, Sampling


def add_sampling_arguments(p: argparse.ArgumentParser, seed_help: str = "noise seed") -> None:
    """The flags of a `Sampling`, the same for infer, edit, evaluate (and the app's fields)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=int, default=0, help=seed_help)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument(
        "--map-guidance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="classifier-free guidance over the maps too: the unconditional branch sees zeroed "
        "maps (default on; --no-map-guidance draws what stock diffusers draws)",
    )
    g.add_argument(
        "--scheduler",
        choices=tuple(SCHEDULERS),
        default="unipc",
        help="sampler (default unipc, as validation; 'default' = the base's own)",
    )
    g.add_argument("--negative-prompt", default="")
    g.add_argument(
        "--controlnet-scale", type=float, default=1.0, help="overall ControlNet conditioning scale"
    )
    g.add_argument(
        "--scale",
        nargs="+",
        default=[],
        metavar="COND=S",
        help="per-condition strength, e.g. --scale flame=1.0 depth=0.5",
    )


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """The `Sampling` the sampling flags describe."""
    return Sampling(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        map_guidance=args.map_guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        controlnet_scale=args.controlnet_scale,
        scales=parse_scales(args.scale),
    )


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``controlnet-emo evaluate``."""
    add_sampling_arguments(
        p, "sample i is drawn with noise seed SEED + i (its no-maps baseline too)"
    )

    p.add_argument("run_dir", type=Path, help="training run folder")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=64, help="evaluate the first N samples of the split")
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/eval)")
    p.add_argument(
        "--emonet",
        help="critic: EmoNet weights, a face-critic folder or a shipped name such as "
        "demo-critic-eval (default: the run's model.emonet, which warns: self-grading)",
    )
    p.add_argument(
        "--prompt", help="one prompt for every sample instead of its caption (e.g. neutral)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the control generation with all condition maps zeroed",
    )
    p.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the training resolution)"
    )
    p.add_argument(
        "--grid-rows", type=int, default=8, help="samples shown in grid.png and maps_sweep.png"
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def run_evaluate(args: argparse.Namespace) -> int:
    """The ``evaluate`` subcommand; a bad input is one line on stderr, exit 2."""
    from controlnet_emo.evaluation.evaluate import EvaluationError, evaluate

    try:
        evaluate(
            args.run_dir,
            args.data,
            sampling_from_args(args),
            split=args.split,
            n=args.n,
            out=args.out,
            emonet=args.emonet,
            batch_size=args.batch_size,
            baseline=not args.no_baseline,
            resolution=args.resolution,
            device=args.device,
            grid_rows=args.grid_rows,
            prompt=args.prompt,
        )
    except (EvaluationError, InferenceError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def parse_scales(items: list[str] | None) -> dict[str, float]:
    """``["flame=1.0", "depth=0.5"]`` -> {"flame": 1.0, "depth": 0.5}."""
    scales = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            scales[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(
                f"--scale {item!r}: expected CONDITION=NUMBER, e.g. depth=0.5"
            ) from None
    return scales


def add_infer_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``controlnet-emo infer`` (and ``python infer.py``)."""
    add_sampling_arguments(p)

    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="run folder, an exported diffusers ControlNet folder, or a controlnet.safetensors "
        "from `controlnet-emo export` (conditions and base read from it; --base overrides)",
    )
    p.add_argument(
        "--flame",
        required=True,
        type=Path,
        help="FLAME render (PNG), or a folder of them (then --out is a folder)",
    )
    p.add_argument("--depth", type=Path, help="depth map (file, or folder matched by name)")
    p.add_argument("--skeleton", type=Path, help="skeleton map (file, or folder matched by name)")
    p.add_argument(
        "--reference",
        type=Path,
        help="photo to derive the depth and skeleton maps from (conditioners)",
    )
    p.add_argument(
        "--depth-model",
        default=None,
        help="depth network for --reference (default: the run's depth.model)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, type=Path, help="output PNG (or folder)")
    p.add_argument(
        "--base", help="base SD model (hub id, folder, .safetensors); default: the run's"
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="output size (default: the training resolution)",
    )
    p.add_argument(
        "--sheet",
        action="store_true",
        help="also write <out>_sheet.png: conditions | result side by side",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="auto: fp16 on GPU, fp32 on CPU",
    )


def run_infer(args: argparse.Namespace) -> int:
    """The ``infer`` subcommand: prints each written PNG; a bad input is one line, exit 2."""
    import torch

    dtypes = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    try:
        written = infer(
            args.model,
            args.flame,
            args.prompt,
            args.out,
            sampling_from_args(args),
            depth=args.depth,
            skeleton=args.skeleton,
            reference=args.reference,
            base=args.base,
            resolution=args.resolution,
            sheet=args.sheet,
            device=args.device,
            dtype=dtypes[args.dtype],
            depth_model=args.depth_model,
        )
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``controlnet-emo render``."""
    p.add_argument("--flame-model", required=True, type=Path, help="FLAME .pkl / .npz (yours)")
    p.add_argument(
        "--codes", required=True, type=Path, help="EMOCA code folder, or a folder of them"
    )
    p.add_argument("--cam", help="orthographic camera s,tx,ty (default: cam.npy, else fitted)")
    p.add_argument(
        "--size",
        help="canvas WxH, the crop its centred square (default: the original photo in a raw "
        "folder, else EMOCA's 224 px crop frame)",
    )
    p.add_argument("--depth", action="store_true", help="also write <out>_depth.png (z-buffer)")
    p.add_argument("--out", required=True, type=Path, help="PNG (or a folder)")


def run_render(args: argparse.Namespace) -> int:
    """The ``render`` subcommand: one line per PNG with its camera; bad input: one line, exit 2."""
    try:
        written = render_folders(
            args.flame_model,
            args.codes,
            args.out,
            cam=parse_numbers(args.cam, 3, "--cam") if args.cam else None,
            size=parse_size(args.size),
            depth=args.depth,
        )
    except (EditError, CodesError, FlameModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, fit in written:
        cam = ",".join(f"{v:.5g}" for v in fit.cam)
        print(f"{path}  cam {cam} ({fit.method}, quality {fit.score:.3f})")
    return 0


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``controlnet-emo edit``."""
    add_sampling_arguments(p)

    p.add_argument("--model", required=True, type=Path, help="training run folder")
    p.add_argument("--flame-model", required=True, type=Path, help="FLAME .pkl / .npz (yours)")
    p.add_argument("--codes", required=True, type=Path, help="one EMOCA code folder")
    p.add_argument("--expression", required=True, help=f"target class: {', '.join(EXPRESSIONS)}")
    p.add_argument("--strength", type=float, default=0.8, help="0 = unchanged, 1 = class mean")
    p.add_argument("--sweep", action="store_true", help=f"a row over strengths {SWEEP}")
    p.add_argument("--prompt", help="default: 'a photo of a <expression> face'")
    p.add_argument(
        "--expression-codes",
        type=Path,
        help=f"class means (default: {EXPRESSION_CODES} in the run's prepared dataset)",
    )
    p.add_argument(
        "--landmark-embedding",
        type=Path,
        help="FLAME's 68-landmark embedding: draws the skeleton map (else it is left out)",
    )
    p.add_argument("--cam", help="orthographic camera s,tx,ty (default: cam.npy, else fitted)")
    p.add_argument("--out", required=True, type=Path, help="sheet PNG")
    p.add_argument("--base", help="base SD model (default: the run's)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def run_edit(args: argparse.Namespace) -> int:
    """The ``edit`` subcommand: prints each written PNG; a bad input is one line, exit 2."""

    try:
        written = edit(
            args.model,
            args.flame_model,
            args.codes,
            args.expression,
            args.out,
            sampling_from_args(args),
            strength=args.strength,
            sweep=args.sweep,
            prompt=args.prompt,
            expression_codes=args.expression_codes,
            landmark_embedding=args.landmark_embedding,
            cam=parse_numbers(args.cam, 3, "--cam") if args.cam else None,
            base=args.base,
            device=args.device,
        )
    except (EditError, CodesError, FlameModelError, InferenceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
