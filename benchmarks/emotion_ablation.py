"""The research's ablation in miniature: does the emotion loss make faces carry their emotion?
ControlNets on the shipped demo base (``demo-face-base``) and one synthetic dataset, trained
with ``demo.yaml``'s recipe (the diffusion term alone) plus the critic-read terms at the
weights the demo used until 70e4698 (a tenth of the research's), which join halfway through
the steps on two decoded samples per batch:
  diffusion        the diffusion term alone (configs/demo.yaml)
  +emotion         plus valence / arousal / expression read by ``demo-critic-train``
  +emotion+l1      plus pixel L1 on the decoded prediction
  +emotion+l1+landmarks  plus the landmark term
  +emotion+l1+balance  the last, with the pixel, emotion and landmark terms' pull on the
                   noise prediction capped at half the diffusion term's (``loss.pixel.balance``)
each graded by the *held-out* critic (``demo-critic-eval``: another seed, faces and trunk) on
the same held-out samples and seeds, twice: with the samples' captions (which name the
expression) and with a prompt that names none, so that the emotion must come from the
render and the loss. The research reports +8 points top-1 (31 -> 39 %) from its emotion loss.

    python benchmarks/emotion_ablation.py --out runs/ablation   # demo.yaml's steps

Prints a JSON line per (variant, prompt) and a Markdown table for BENCHMARKS.md; "maps x" is
the held-out noise-prediction error with another sample's maps over that with the own maps
(``controlnet_emo/evaluation/map_reliance.py``): 1.00 means the ControlNet ignores its maps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The checkout this script sits in, not whichever copy the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlnet_emo.config import RECIPES as REPO_CONFIGS  # noqa: E402
from controlnet_emo.config import load_config  # noqa: E402
from controlnet_emo.evaluation.evaluate import NEUTRAL_PROMPT, evaluate  # noqa: E402
from controlnet_emo.models.sampling import Sampling  # noqa: E402

EMOTION = [
    "loss.emotion.valence=0.003",
    "loss.emotion.arousal=0.003",
    "loss.emotion.expression=0.002",
]
PIXEL_L1 = ["loss.pixel_l1.weight=0.01"]
LANDMARKS = ["loss.landmarks.weight=0.1"]
VARIANTS = {
    "diffusion": [],
    "+emotion": EMOTION,
    "+emotion+l1": EMOTION + PIXEL_L1,
    "+emotion+l1+landmarks": EMOTION + PIXEL_L1 + LANDMARKS,
    "+emotion+l1+balance": EMOTION + PIXEL_L1 + LANDMARKS + ["loss.pixel.balance=0.5"],
}
COLUMNS = (
    ("top-1", "expression_accuracy"),
    ("top-3", "expression_top3_accuracy"),
    ("val CCC", "valence_ccc"),
    ("aro CCC", "arousal_ccc"),
    ("NME", "nme"),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--steps", type=int, default=None, help="train.max_steps (default: demo's)")
    p.add_argument("--n", type=int, default=None, help="synthetic faces (default: demo's)")
    p.add_argument("--n-eval", type=int, default=48, help="held-out samples evaluated")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--critic", default="demo-critic-eval")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="for every variant"
    )
    args = p.parse_args()

    from controlnet_emo.cli.demo import prepare_demo_data
    from controlnet_emo.training.loop import train

    data_cfg = load_config(REPO_CONFIGS / "demo.yaml", [f"data.root={args.out / 'data'}"])
    prepare_demo_data(data_cfg, args.out / "raw", n=args.n)
    steps = args.steps or data_cfg.train.max_steps
    rows = []
    for name in args.variants:
        run = args.out / name.replace("+", "plus_")
        overrides = [
            f"output_dir={run}",
            f"data.root={args.out / 'data'}",
            *args.set,
            *VARIANTS[name],
            f"train.max_steps={steps}",
        ]
        if VARIANTS[name]:  # the terms join halfway, on two decoded samples per batch
            overrides += [f"loss.pixel.start_step={steps // 2}", "loss.pixel.samples_per_batch=2"]
        cfg = load_config(REPO_CONFIGS / "demo.yaml", overrides)
        t = time.perf_counter()
        if not (run / "controlnet").is_dir():
            train(cfg)
        train_s = time.perf_counter() - t
        for prompt_name, prompt in (("caption", None), ("neutral", NEUTRAL_PROMPT)):
            m = evaluate(
                run,
                cfg.data.root,
                Sampling.validation(cfg, steps=args.eval_steps),
                split=cfg.data.val_split,
                n=args.n_eval,
                out=run / f"eval_{prompt_name}",
                emonet=args.critic,
                prompt=prompt,
                grid_rows=4,
                batch_size=16,
            )
            row = {
                "variant": name,
                "prompt": prompt_name,
                "train_s": round(train_s, 1),
                "steps": cfg.train.max_steps,
                "n": m["n"],
                "maps_shuffled_over_own": m["map_reliance"]["shuffled_over_own"],
                **{key: m["generated"].get(key) for _, key in COLUMNS},
                "baseline": {key: m["baseline"].get(key) for _, key in COLUMNS},
                "real": {key: m["real"].get(key) for _, key in COLUMNS},
            }
            print(json.dumps(row))
            rows.append(row)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "| variant | prompt | "
        + " | ".join(name for name, _ in COLUMNS)
        + " | NME / no maps | maps x |",
        "|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for r in rows:
        ratio = r["nme"] / r["baseline"]["nme"] if r["nme"] and r["baseline"]["nme"] else None
        lines.append(
            f"| {r['variant']} | {r['prompt']} | "
            + " | ".join(cell(r[key]) for _, key in COLUMNS)
            + f" | {'-' if ratio is None else f'{ratio:.2f}x'}"
            + f" | {cell(r['maps_shuffled_over_own'])} |"
        )
    for label in ("baseline", "real"):
        for r in rows:
            if r["variant"] == rows[0]["variant"]:
                lines.append(
                    f"| {label} ({r['variant']} run) | {r['prompt']} | "
                    + " | ".join(cell(r[label][key]) for _, key in COLUMNS)
                    + " | - | - |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
