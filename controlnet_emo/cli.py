"""controlnet-emo: one console script, one subcommand per stage of the flow.

Each subcommand parses its arguments, builds a validated config where it takes one (errors
name the key before any model loads), and calls into the package.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .config import Config, ConfigError, load_config

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
log = logging.getLogger("controlnet_emo")


def add_config_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", type=Path, required=required, help="YAML recipe")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML-typed value); repeatable",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import write_raw_dataset

    if args.n < 1:
        raise ConfigError(f"--n {args.n}: need at least 1 face")
    if args.resolution < 32:
        raise ConfigError(f"--resolution {args.resolution}: need at least 32 px")
    write_raw_dataset(
        args.out_dir,
        n=args.n,
        resolution=args.resolution,
        seed=args.seed,
        codes=args.codes or args.codes_cam,
        codes_camera=args.codes_cam,
    )
    print(f"wrote {args.n} synthetic faces to {args.out_dir}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from conditioners.prepare import PrepareError, prepare_dataset

    cfg = config_from_args(args)
    try:
        report = prepare_dataset(args.raw_dir, args.out_dir, cfg)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"prepared {report.get('prepared', '?')} samples into {args.out_dir} "
        f"(skipped {report.get('skipped', 0)}; see prepare_report.json)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Exit 0 when finished; PREEMPTED_EXIT_CODE (85) after a SIGTERM stop with its checkpoint
    written (the trainer logged the one line saying so), for schedulers to requeue."""
    from .training.checkpointing import PREEMPTED_EXIT_CODE, Preempted
    from .training.loop import train

    cfg = config_from_args(args)
    try:
        out = train(cfg)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    print(f"run written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """synth -> prepare -> train (configs/demo.yaml) -> export -> infer -> evaluate, in OUT/."""
    from .training.loop import train

    out = Path(args.out)
    overrides = [f"output_dir={out}", f"data.root={out / 'data'}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_config(args.config or REPO_CONFIGS / "demo.yaml", overrides)
    seconds: dict[str, float] = {}
    with timed(seconds, "data"):
        prepare_demo_data(cfg, out / "raw", n=args.n, resolution=args.resolution, codes=args.codes)
    with timed(seconds, "train"):
        train(cfg)
    with timed(seconds, "infer+evaluate"):
        demo_infer_and_evaluate(cfg, out)
    if args.codes:
        with timed(seconds, "edit"):
            demo_edit(cfg, out)
    print(
        f"demo finished: {out} (controlnet/, controlnet.safetensors, samples/, metrics.jsonl, "
        f"infer/, eval/{', edit/' if args.codes else ''})"
    )
    print("demo time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return 0


@contextmanager
def timed(seconds: dict[str, float], name: str):
    """Wall seconds of the block into ``seconds[name]``: the demo says where its time went."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = time.perf_counter() - start


DEMO_FACES, DEMO_RESOLUTION, DEMO_EVAL_SAMPLES = 400, 64, 32
DEMO_EVAL_BATCH = 16
"""Evaluation batch: on the demo's 64 px faces 16 draws as much as 4 in 0.7 of the time."""
DEMO_EVAL_CRITIC = "demo-critic-eval"
"""The demo grades with the critic it did not train against (models/shipped.py)."""


def prepare_demo_data(
    cfg: Config,
    raw: Path,
    n: int | None = None,
    resolution: int | None = None,
    codes: bool = False,
) -> None:
    """Synthetic raw faces (seeded by ``cfg.seed``; kept when already there), then prepare.
    ``codes``: the faces carry FLAME codes of a synthetic FLAME-format model and no camera,
    so prepare fits each camera and renders the FLAME maps from the codes."""
    from conditioners.prepare import prepare_dataset

    from .data.synthetic import write_raw_dataset

    if not (raw / "annotations.csv").is_file():
        write_raw_dataset(
            raw,
            n=n or DEMO_FACES,
            resolution=resolution or DEMO_RESOLUTION,
            seed=cfg.seed,
            codes=codes,
        )
    elif codes and not (raw / "codes").is_dir():
        raise ConfigError(f"{raw}: holds faces without FLAME codes; remove it to use --codes")
    prepare_dataset(raw, cfg.data.root, cfg)


def demo_infer_and_evaluate(cfg: Config, out: Path) -> None:
    """Use the run as a user would: draw faces from held-out FLAME renders, then score them
    with the independent critic."""
    from .data.dataset import held_out_records
    from .evaluation import evaluate
    from .inference import infer

    first = held_out_records(cfg)[0]
    root = Path(cfg.data.root)
    infer(
        out,
        root / first.maps["flame"],
        prompt="a close-up photo of a happy face, smiling, facing the camera, brown hair",
        out=out / "infer" / "happy.png",
        steps=cfg.train.validation_steps,
        guidance_scale=cfg.train.validation_guidance_scale,
        map_guidance=cfg.train.validation_map_guidance,
        sheet=True,
        depth=root / first.maps["depth"] if "depth" in first.maps else None,
        skeleton=root / first.maps["skeleton"] if "skeleton" in first.maps else None,
    )
    evaluate(
        out,
        root,
        split=cfg.data.val_split,
        n=DEMO_EVAL_SAMPLES,
        steps=cfg.train.validation_steps,
        emonet=DEMO_EVAL_CRITIC,
        guidance_scale=cfg.train.validation_guidance_scale,
        map_guidance=cfg.train.validation_map_guidance,
        batch_size=DEMO_EVAL_BATCH,
    )


def demo_edit(cfg: Config, out: Path) -> None:
    """The FLAME path's last step: the first held-out face's codes moved toward 'happy' over
    the sweep's strengths, rendered and drawn by the run (``controlnet-emo edit --sweep``)."""
    from conditioners.prepare import codes_folder

    from .data.dataset import held_out_records
    from .data.synthetic_flame import FLAME_MODEL_FILE
    from .flame_edit import edit

    first = Path(held_out_records(cfg)[0].file_name).relative_to("images")  # <sub>/<stem>.png
    raw = out / "raw"
    paths = edit(
        out,
        raw / FLAME_MODEL_FILE,
        codes_folder(raw, str(first)),
        "happy",
        out / "edit" / "happy_sweep.png",
        sweep=True,
        steps=cfg.train.validation_steps,
        guidance_scale=cfg.train.validation_guidance_scale,
        map_guidance=cfg.train.validation_map_guidance,
    )
    print(f"edit sheet: {paths[0]}")


def cmd_pretrain_base(args: argparse.Namespace) -> int:
    from .pretrain.base import load_base_config, pretrain_base

    model_dir = pretrain_base(load_base_config(args.config, args.overrides))
    print(f"pretrained base written to {model_dir} (see pretrain_report.json, ../samples.png)")
    return 0


def cmd_train_critic(args: argparse.Namespace) -> int:
    from .pretrain.critic import load_critic_config, train_critic

    model_dir = train_critic(load_critic_config(args.config, args.overrides))
    print(f"critic written to {model_dir} (see critic_report.json)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Preflight of a run config (controlnet_emo/doctor.py): 0 when it would start, else 1."""
    from .doctor import run_doctor

    return run_doctor(config_from_args(args), args)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``controlnet-emo evaluate``."""
    from .inference import SCHEDULERS, add_map_guidance_argument

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
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    add_map_guidance_argument(p)
    p.add_argument(
        "--controlnet-scale",
        type=float,
        default=1.0,
        help="overall ControlNet conditioning scale, as infer's (the baseline uses it too)",
    )
    p.add_argument("--seed", type=int, default=0, help="the same seed for every sample, as infer")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the control generation with all condition maps zeroed",
    )
    p.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="unipc")
    p.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the training resolution)"
    )
    p.add_argument(
        "--grid-rows", type=int, default=8, help="samples shown in grid.png and maps_sweep.png"
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def run_evaluate(args: argparse.Namespace) -> int:
    """The ``evaluate`` subcommand; a bad input is one line on stderr, exit 2."""
    from .config import ConfigError
    from .evaluation import EvaluationError, evaluate
    from .inference import InferenceError

    try:
        evaluate(
            args.run_dir,
            args.data,
            split=args.split,
            n=args.n,
            out=args.out,
            emonet=args.emonet,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            controlnet_scale=args.controlnet_scale,
            seed=args.seed,
            batch_size=args.batch_size,
            baseline=not args.no_baseline,
            scheduler=args.scheduler,
            resolution=args.resolution,
            device=args.device,
            grid_rows=args.grid_rows,
            prompt=args.prompt,
            map_guidance=args.map_guidance,
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
    from .inference import SCHEDULERS, add_map_guidance_argument

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
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", required=True, type=Path, help="output PNG (or folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    add_map_guidance_argument(p)
    p.add_argument(
        "--base", help="base SD model (hub id, folder, .safetensors); default: the run's"
    )
    p.add_argument(
        "--scale",
        nargs="+",
        default=[],
        metavar="COND=S",
        help="per-condition strength, e.g. --scale flame=1.0 depth=0.5",
    )
    p.add_argument(
        "--controlnet-scale", type=float, default=1.0, help="overall ControlNet conditioning scale"
    )
    p.add_argument(
        "--scheduler",
        choices=tuple(SCHEDULERS),
        default="unipc",
        help="sampler (default unipc, as validation; 'default' = the base's own)",
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

    from .inference import InferenceError, infer

    dtypes = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    try:
        written = infer(
            args.model,
            args.flame,
            args.prompt,
            args.out,
            depth=args.depth,
            skeleton=args.skeleton,
            reference=args.reference,
            base=args.base,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            scales=parse_scales(args.scale),
            controlnet_scale=args.controlnet_scale,
            resolution=args.resolution,
            scheduler=args.scheduler,
            sheet=args.sheet,
            device=args.device,
            dtype=dtypes[args.dtype],
            depth_model=args.depth_model,
            map_guidance=args.map_guidance,
        )
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlnet-emo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a raw dataset of synthetic faces")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--codes",
        action="store_true",
        help="also EMOCA-style FLAME codes (codes/) of a synthetic FLAME-format model "
        "(flame_model.npz); geometry_detail/ is then their render",
    )
    p.add_argument("--codes-cam", action="store_true", help="--codes, with cam.npy written too")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="raw data -> condition maps -> prepared dataset")
    p.add_argument("raw_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    add_config_arguments(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a ControlNet (works under `accelerate launch`)")
    add_config_arguments(p, required=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="synth -> prepare -> train -> export on a tiny model")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--n", type=int, default=None, help="synthetic faces (default 400)")
    p.add_argument("--resolution", type=int, default=None, help="synthetic image size (64)")
    p.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    p.add_argument(
        "--codes",
        action="store_true",
        help="the FLAME path: faces with FLAME codes (no camera), maps rendered from them, "
        "and an expression-edit sweep of a held-out face at the end (edit/)",
    )
    add_config_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain-base", help="pretrain the small demo SD on synthetic faces")
    add_config_arguments(p)
    p.set_defaults(func=cmd_pretrain_base)

    p = sub.add_parser("train-critic", help="train an EmoNet-contract face critic")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train_critic)

    from .doctor import add_doctor_arguments

    p = sub.add_parser("doctor", help="preflight: would this run start? (weights, data, disk)")
    add_config_arguments(p, required=True)
    add_doctor_arguments(p)
    p.set_defaults(func=cmd_doctor)

    # These stages register their own arguments beside the code that reads them.
    from .export import add_export_arguments, run_export
    from .flame_edit import add_edit_arguments, add_render_arguments, run_edit, run_render

    stages = {
        "infer": ("faces from FLAME renders (+ depth, skeleton)", add_infer_arguments, run_infer),
        "export": (
            "diffusers folder / single file / one file per condition",
            add_export_arguments,
            run_export,
        ),
        "evaluate": (
            "emotion and geometry faithfulness of a run's faces",
            add_evaluate_arguments,
            run_evaluate,
        ),
        "render": ("EMOCA's FLAME codes -> render (+ depth)", add_render_arguments, run_render),
        "edit": (
            "move a face's FLAME expression towards a class, render and generate",
            add_edit_arguments,
            run_edit,
        ),
    }
    for name, (help_text, add_arguments, handler) in stages.items():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from .models.sd import ModelLoadError
    from .training.divergence import DivergedError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
