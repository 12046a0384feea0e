"""When does a ControlNet start to use its maps? Map reliance over training steps.

Why: a ControlNet's zero convolutions make it leave the base untouched at first, and the maps
take hold only after a while ("sudden convergence"); a demo that stops before then draws the
base's faces whatever the render says. This trains one recipe in process with the trainer's
own pieces (``build_models``, ``make_loader``, ``compute_losses``) and, every ``--every``
steps, prints the held-out map reliance (``controlnet_emo/evaluation/map_reliance.py``): the
noise-prediction error with another sample's maps over that with the own maps (1.00: maps
ignored). Compare recipes by running it once per ``--set`` list on the same data.

    controlnet-emo synth /tmp/raw --n 400 --resolution 64
    controlnet-emo prepare /tmp/raw /tmp/data --set data.resolution=64 --set depth.model=precomputed
    python benchmarks/map_reliance_curve.py --data /tmp/data --steps 600 --every 100 \\
        --set loss.diffusion.timesteps=cubic --set model.controlnet.hint_init=random

Prints one JSON line per probe: step, seconds, mean training loss since the last probe, the
held-out error with the own maps, ``shuffled_over_own`` and ``none_over_own``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator

# The checkout this script sits in, not whichever copy the environment installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlnet_emo.config import RECIPES as REPO_CONFIGS  # noqa: E402
from controlnet_emo.config import load_config  # noqa: E402
from controlnet_emo.data.dataset import collate, dataset_from_config, held_out_records  # noqa: E402
from controlnet_emo.evaluation.map_reliance import map_reliance  # noqa: E402
from controlnet_emo.training.loop import build_models, make_loader, make_optimizer  # noqa: E402
from controlnet_emo.training.step import compute_losses  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO_CONFIGS / "demo.yaml"))
    p.add_argument("--data", required=True, help="a prepared dataset (data.root)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--n-held-out", type=int, default=32)
    p.add_argument("--out", help="output folder for the latent cache (default: a temporary one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    # its own output folder: the latent cache lives there, not in the recipe's run folder
    out = args.out or tempfile.mkdtemp(prefix="map_reliance_")
    cfg = load_config(args.config, [f"data.root={args.data}", f"output_dir={out}", *args.set])
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    models, params, _ = build_models(cfg, accelerator)
    optimizer = make_optimizer(cfg, params)
    batches = iter(make_loader(cfg, models, accelerator, start_batch=0))
    held_out = held_out_probe(cfg, models, args.n_held_out)
    pipe = SimpleNamespace(
        unet=models.sd.unet,
        vae=models.sd.vae,
        text_encoder=models.sd.text_encoder,
        scheduler=models.sd.scheduler,
        controlnet=models.controlnet,
    )
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        warmup = min(1.0, step / max(1, cfg.train.lr_warmup_steps))  # constant_with_warmup
        for group in optimizer.param_groups:
            group["lr"] = cfg.train.learning_rate * warmup
        batch = next(batches).to(accelerator.device)
        loss, _ = compute_losses(models, batch, cfg, generator, step=step - 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step % args.every == 0:
            models.controlnet.eval()
            r = map_reliance(pipe, held_out)
            models.controlnet.train()
            row = {
                "step": step,
                "s": round(time.perf_counter() - start),
                "loss": round(float(torch.stack(losses).mean()), 4),
                "own": round(r["own"], 4),
                "shuffled_over_own": round(r["shuffled_over_own"], 4),
                "none_over_own": round(r["none_over_own"], 4),
            }
            losses = []
            print(json.dumps(row), flush=True)


def held_out_probe(cfg, models, n: int) -> list:
    """The first ``n`` held-out samples as batches of 16 (no augmentation)."""
    records = held_out_records(cfg)[:n]
    ds = dataset_from_config(cfg, records, models.sd.tokenizer, train=False)
    return [collate([ds[i] for i in range(j, min(j + 16, len(ds)))]) for j in range(0, len(ds), 16)]


if __name__ == "__main__":
    main()
