"""The shipped critics re-scored on held-out synthetic faces, one reading and the flip test.

Why: ``train-critic`` scores a critic once, when it is trained; when the way ``evaluate``
reads a critic changes (the flip test, ``metrics.flip_test_heatmap``), the shipped critics'
figures must be measured again without retraining them. Each critic is scored on the very
held-out faces its training scored (its config's seed + 1) and on faces of a seed no critic
trained on (``--unseen-seed``).

    python benchmarks/critic_scores.py                 # both shipped critics
    python benchmarks/critic_scores.py --write         # also store the held-out figures in
                                                       # each critic's critic_report.json

Prints one JSON line per (critic, face set).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlnet_emo.atomic import atomic_write_text  # noqa: E402
from controlnet_emo.models.emonet import build_emonet  # noqa: E402
from controlnet_emo.models.shipped import shipped_path  # noqa: E402
from controlnet_emo.pretrain.critic import score_critic  # noqa: E402
from controlnet_emo.pretrain.faces import render_faces  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--critics", nargs="+", default=["demo-critic-train", "demo-critic-eval"])
    ap.add_argument("--unseen-seed", type=int, default=7777)
    ap.add_argument("--write", action="store_true", help="update each critic_report.json")
    args = ap.parse_args()
    for name in args.critics:
        folder = shipped_path(name) or Path(name)
        report_path = folder / "critic_report.json"
        report = json.loads(report_path.read_text())
        cfg = report["config"]
        critic = build_emonet(name)
        sets = {"held_out": cfg["seed"] + 1, "unseen": args.unseen_seed}
        for kind, seed in sets.items():
            faces = render_faces(cfg["n_held_out"], cfg["resolution"], seed, f"{kind} faces")
            scores = score_critic(critic, faces)
            print(json.dumps({"critic": name, "faces": kind, "seed": seed, **scores}))
            if kind == "held_out" and args.write:
                report["held_out"] = scores
        if args.write:
            atomic_write_text(report_path, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
