"""controlnet-emo: one console script, one subcommand per stage of the flow.

Each subcommand parses its arguments, builds a validated config where it takes one (errors
name the key before any model loads), and calls into the package.
"""

from __future__ import annotations

import argparse
import logging
import sys
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

    write_raw_dataset(args.out_dir, n=args.n, resolution=args.resolution, seed=args.seed)
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
    from .training.loop import train

    cfg = config_from_args(args)
    out = train(cfg)
    print(f"run written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """synth -> prepare -> train (configs/demo.yaml) -> export, all into runs/demo/."""
    from conditioners.prepare import prepare_dataset

    from .data.synthetic import write_raw_dataset
    from .training.loop import train

    out = Path(args.out)
    overrides = [f"output_dir={out}", f"data.root={out / 'data'}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_config(args.config or REPO_CONFIGS / "demo.yaml", overrides)
    raw = out / "raw"
    if not (raw / "annotations.csv").is_file():
        write_raw_dataset(raw, n=args.n, resolution=args.resolution, seed=cfg.seed)
    prepare_dataset(raw, cfg.data.root, cfg)
    train(cfg)
    demo_infer_and_evaluate(cfg, out)
    print(
        f"demo finished: {out} (controlnet/, controlnet.safetensors, samples/, metrics.jsonl, "
        f"infer/, eval/)"
    )
    return 0


def demo_infer_and_evaluate(cfg: Config, out: Path) -> None:
    """Use the run as a user would: draw a face from one held-out FLAME render, then score."""
    from .data.dataset import held_out_records
    from .evaluation import evaluate
    from .inference import infer

    first = held_out_records(cfg)[0]
    root = Path(cfg.data.root)
    infer(
        out,
        root / first.maps["flame"],
        prompt="a photo of a happy face",
        out=out / "infer" / "happy.png",
        steps=cfg.train.validation_steps,
        sheet=True,
        depth=root / first.maps["depth"] if "depth" in first.maps else None,
        skeleton=root / first.maps["skeleton"] if "skeleton" in first.maps else None,
    )
    evaluate(out, root, split=cfg.data.val_split, n=4, steps=cfg.train.validation_steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlnet-emo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a raw dataset of synthetic faces")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--n", type=int, default=96, help="synthetic faces to generate")
    p.add_argument("--resolution", type=int, default=128, help="synthetic image size")
    p.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    add_config_arguments(p)
    p.set_defaults(func=cmd_demo)

    # These stages register their own arguments beside the code that reads them.
    from .evaluation import add_evaluate_arguments, run_evaluate
    from .export import add_export_arguments, run_export
    from .inference import add_infer_arguments, run_infer

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
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
