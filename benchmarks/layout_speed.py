"""channels_last against PyTorch's default layout, on the demo's own training.

Why: the trainer puts the UNet, VAE, ControlNet and critics in channels_last on the CPU as
well as on GPUs (``train.channels_last``); this measures what that buys on the machine at
hand, with the real trainer, data and base, rather than on a synthetic micro-step. Short
``train`` runs of ``configs/demo.yaml`` alternate the two layouts (``--rounds`` each), once
with the diffusion term alone and once with every term from step 0 (decoder and critics on
each step), and report the median logged samples/s after the first 10 steps.

    python benchmarks/layout_speed.py --data runs/demo/data    # a prepared demo dataset

Prints one JSON line per (phase, layout, round) and a summary line with the ratios. Never
asserts on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from emotion_ablation import VARIANTS  # noqa: E402
from peer_speed import logged_rate  # noqa: E402

from controlnet_emo.config import RECIPES, load_config  # noqa: E402
from controlnet_emo.training.loop import train  # noqa: E402

PHASES = {  # demo.yaml trains the diffusion term alone; every_term adds the critic-read terms
    "diffusion": [],
    "every_term": [
        *VARIANTS["+emotion+l1+landmarks"],
        "loss.pixel.start_step=0",
        "loss.pixel.samples_per_batch=2",
    ],
}


def rate(data: Path, out: Path, steps: int, overrides: list[str]) -> float:
    """Median logged samples/s of one short demo-recipe run (its first 10 steps skipped)."""
    cfg = load_config(
        RECIPES / "demo.yaml",
        [
            f"output_dir={out}",
            f"data.root={data}",
            f"train.max_steps={steps}",
            "train.validate_every=100000",
            "train.checkpoint_every=100000",
            *overrides,
        ],
    )
    train(cfg)
    return logged_rate(out, skip=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a prepared demo dataset")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase, extra in PHASES.items():
            rates: dict[str, list[float]] = {"nchw": [], "channels_last": []}
            for r in range(args.rounds):
                for layout in rates:
                    out = Path(tmp) / f"{phase}-{layout}-{r}"
                    flag = f"train.channels_last={str(layout == 'channels_last').lower()}"
                    rates[layout].append(rate(args.data, out, args.steps, [*extra, flag]))
                    row = dict(phase=phase, layout=layout, round=r, samples_per_s=rates[layout][-1])
                    print(json.dumps(row))
            ratio = statistics.median(rates["channels_last"]) / statistics.median(rates["nchw"])
            summary[phase] = {**rates, "ratio": round(ratio, 3)}
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
