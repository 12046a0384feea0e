"""controlnet-emo: one console script, one subcommand per stage of the flow.

Each subcommand parses its arguments, builds a validated config where it takes one (errors
name the key before any model loads), and calls into the package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from controlnet_emo.config import Config, ConfigError, load_config

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
    from controlnet_emo.synthetic.faces import write_raw_dataset

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
    from controlnet_emo.training.checkpointing import PREEMPTED_EXIT_CODE, Preempted
    from controlnet_emo.training.loop import train

    cfg = config_from_args(args)
    try:
        out = train(cfg)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    print(f"run written to {out}")
    return 0


def cmd_pretrain_base(args: argparse.Namespace) -> int:
    from controlnet_emo.pretrain.base import load_base_config, pretrain_base

    model_dir = pretrain_base(load_base_config(args.config, args.overrides))
    print(f"pretrained base written to {model_dir} (see pretrain_report.json, ../samples.png)")
    return 0


def cmd_train_critic(args: argparse.Namespace) -> int:
    from controlnet_emo.pretrain.critic import load_critic_config, train_critic

    model_dir = train_critic(load_critic_config(args.config, args.overrides))
    print(f"critic written to {model_dir} (see critic_report.json)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Preflight of a run config (controlnet_emo/cli/doctor.py): 0 when it would start, else 1."""
    from controlnet_emo.cli.doctor import run_doctor

    return run_doctor(config_from_args(args), args)


def cmd_app(args: argparse.Namespace) -> int:
    """The local web app (controlnet_emo/app); a missing run or critic is one line, exit 2."""
    from controlnet_emo.app.engine import AppError
    from controlnet_emo.app.ui import launch
    from controlnet_emo.inference.infer import InferenceError

    try:
        launch(args.model, args.host, args.port, args.critic, args.device, args.data)
    except (AppError, InferenceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
    from controlnet_emo.cli.demo import cmd_demo

    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("pretrain-base", help="pretrain the small demo SD on synthetic faces")
    add_config_arguments(p)
    p.set_defaults(func=cmd_pretrain_base)

    p = sub.add_parser("train-critic", help="train an EmoNet-contract face critic")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train_critic)

    from controlnet_emo.cli.doctor import add_doctor_arguments

    p = sub.add_parser("doctor", help="preflight: would this run start? (weights, data, disk)")
    add_config_arguments(p, required=True)
    add_doctor_arguments(p)
    p.set_defaults(func=cmd_doctor)

    from controlnet_emo.cli.export import add_export_arguments, run_export
    from controlnet_emo.cli.generate import (
        add_edit_arguments,
        add_evaluate_arguments,
        add_infer_arguments,
        add_render_arguments,
        run_edit,
        run_evaluate,
        run_infer,
        run_render,
    )

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

    p = sub.add_parser("app", help="local web app: draw faces from a run and read them")
    p.add_argument("--model", help="run folder (default: runs/demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--critic",
        help="evaluation critic: EmoNet weights, a face-critic folder or a shipped name "
        "(default: demo-critic-eval on the demo base, else the run's model.emonet, which warns)",
    )
    p.add_argument("--data", help="prepared dataset for the held-out gallery (default: the run's)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.set_defaults(func=cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from controlnet_emo.models.sd import ModelLoadError
    from controlnet_emo.training.divergence import DivergedError

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
