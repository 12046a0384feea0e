"""Training throughput of ``controlnet-emo train`` against diffusers' own ControlNet trainer.

Why: a ControlNet trainer that is slower than the reference example on the same work loses its
users; this puts one number on "the same work". Both trainers get the same tiny SD 1.x
pipeline folder (4-block VAE, built here from code), the same 64 images at 64 px, batch 4, one
3-channel condition, MSE on epsilon, no min-SNR, no pixel or emotion terms, no mid-run
validation or checkpoints, fp32 on the CPU. Each trainer runs twice, for a short and a long
number of steps, as its own process; steady-state samples/s is the difference of the two runs'
samples over the difference of their wall times, so start-up, the final save and (ours) the
closing validation cancel out.

The peer is diffusers' ``examples/controlnet/train_controlnet.py`` given by path (never copied
into this project), launched unmodified with ``accelerate launch --cpu``; it reads a HF
``datasets`` folder with ``image``, ``conditioning_image`` and ``text`` columns, which this
script writes as parquet with the peer's interpreter (``--peer-python``; it needs the
``datasets`` package, which this project does not depend on).

Prints one JSON object: ``ours``, ``peer``, ``ratio``, ``ours_cached`` (``data.cache_latents``
and ``data.cache_images`` on), ``ratio_cached``, the same rates per CPU second (``per_cpu_s``:
steadier where other tenants load the machine), the start-up seconds of each and the load
average around the runs;
with ``--compile`` also ``ours_compiled`` / ``ours_cached_compiled`` (``train.compile``) and
``compiled_over_eager``, from ``logged``: the median samples/s our trainer wrote per step to
``metrics.jsonl`` (the wall-time difference mixes a compiled run's tracing into its rate).
Each compiled variant first runs once untimed, to fill inductor's cache. ``ceiling``: the
samples/s of the ControlNet and UNet step alone on fixed tensors (``ceiling_rate``), measured
in each round; ``ceiling_over_peer``, per round, is the largest ratio any eager trainer could
show over the peer.

    python benchmarks/peer_speed.py --peer /tmp/peer/train_controlnet.py
    python benchmarks/peer_speed.py --quick             # ours only, 10 and 40 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPTION = "a photo of a {} face"
EXPRESSIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")


# --- shared inputs ---------------------------------------------------------------------------


def write_images(root: Path, n: int, size: int, seed: int = 0) -> list[dict]:
    """``n`` smooth random pictures and condition maps (PNG) and their rows."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "flame").mkdir(exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        img = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1)
        img = ((img + 1) * 127.5).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(255 - img).save(root / "flame" / f"{i}.png")
        rows.append(
            dict(
                file_name=f"images/{i}.png",
                flame_file_name=f"flame/{i}.png",
                text=CAPTION.format(EXPRESSIONS[i % 8]),
                expression=i % 8,
                valence=0.0,
                arousal=0.0,
                split="train",
            )
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


_PEER_DATA = """
import sys, json
from datasets import Dataset, Features, Image, Value
root, out = sys.argv[1], sys.argv[2]
rows = [json.loads(x) for x in open(root + "/metadata.jsonl")]
def png(name):  # the bytes themselves, so the parquet file stands alone
    return {"bytes": open(root + "/" + name, "rb").read(), "path": None}
ds = Dataset.from_dict(
    {"image": [png(r["file_name"]) for r in rows],
     "conditioning_image": [png(r["flame_file_name"]) for r in rows],
     "text": [r["text"] for r in rows]},
    features=Features(image=Image(), conditioning_image=Image(), text=Value("string")),
)
import os; os.makedirs(out, exist_ok=True)
ds.to_parquet(out + "/train.parquet")
"""


def write_peer_dataset(python: str, prepared: Path, out: Path) -> None:
    """The same images as a parquet ``datasets`` folder (image, conditioning_image, text)."""
    proc = subprocess.run(
        [python, "-c", _PEER_DATA, str(prepared), str(out)], capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(
            f"peer dataset: {python} could not write it (the peer needs the `datasets` package;"
            f" point --peer-python at an interpreter that has it):\n{proc.stderr[-2000:]}"
        )


# --- the two trainers ------------------------------------------------------------------------


def recipe_path(repo: Path, name: str) -> Path:
    """A shipped recipe in ``repo``: inside the package since the stage layout, in the
    top-level ``configs/`` before it (``--baseline-repo`` may be an older checkout)."""
    inside = repo / "controlnet_emo" / "configs" / name
    return inside if inside.exists() else repo / "configs" / name


def ours_command(
    repo: Path, model: Path, data: Path, out: Path, steps: int, cached: bool, compiled: bool = False
):
    """`controlnet-emo train` (through the repo's train_controlnet.py) on the shared work."""
    sets = {
        "output_dir": out,
        "model.pretrained": model,
        "model.emonet": "random",
        "conditions": "[flame]",
        "data.root": data,
        "data.resolution": 64,
        "data.num_workers": 0,
        "data.balance_classes": "false",
        "data.condition_dropout": 0,
        "data.hflip": "false",
        "data.cache_latents": str(cached).lower(),
        "data.cache_images": str(cached).lower(),
        "loss.diffusion.weight": 1.0,
        "loss.diffusion.kind": "l2",
        "loss.diffusion.snr_gamma": "null",
        "loss.pixel_l1.weight": 0,
        "loss.lpips.weight": 0,
        "loss.emotion.valence": 0,
        "loss.emotion.arousal": 0,
        "loss.emotion.expression": 0,
        "train.batch_size": 4,
        "train.total_batch_size": 4,
        "train.learning_rate": 1e-5,
        "train.lr_scheduler": "constant",
        "train.lr_warmup_steps": 0,
        "train.max_steps": steps,
        "train.mixed_precision": "no",
        "train.gradient_checkpointing": "false",
        "train.checkpoint_every": 10**6,
        "train.validate_every": 10**6,
        "train.validation_samples": 1,
        "train.validation_steps": 1,
        "train.report_to": "tensorboard",
        "train.compile": str(compiled).lower(),
    }
    return [
        sys.executable,
        str(repo / "train_controlnet.py"),
        "--config",
        str(recipe_path(repo, "demo.yaml")),
        *[f"--set={k}={v}" for k, v in sets.items()],
    ]


def peer_command(python: str, peer: Path, model: Path, data: Path, out: Path, steps: int):
    """diffusers' example, unmodified, under ``accelerate launch --cpu``, its defaults kept
    except what defines the shared work."""
    return [
        python,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes=1",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        str(peer),
        f"--pretrained_model_name_or_path={model}",
        f"--train_data_dir={data}",
        f"--output_dir={out}",
        "--resolution=64",
        "--train_batch_size=4",
        "--learning_rate=1e-5",
        f"--max_train_steps={steps}",
        "--checkpointing_steps=1000000",
        "--image_column=image",
        "--conditioning_image_column=conditioning_image",
        "--caption_column=text",
        "--seed=0",
    ]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one trainer process (CPU time is what a shared machine's other
    tenants disturb least); its output goes to ``log``."""
    start, cpu = time.perf_counter(), children_cpu_s()
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds, cpu = time.perf_counter() - start, children_cpu_s() - cpu
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{cmd[1]} exited {proc.returncode} (log {log}):\n{tail}")
    return seconds, cpu


def steady_rate(short_run: tuple, long_run: tuple, short: int, long: int, batch: int) -> dict:
    """Samples per wall second and per CPU second between the short and the long run, and
    the start-up that leaves."""
    (short_s, short_cpu), (long_s, long_cpu) = short_run, long_run
    if long_s <= short_s:
        raise SystemExit(
            f"the {long}-step run ({long_s:.1f} s) was no slower than the {short}-step run "
            f"({short_s:.1f} s): their start-up differed; rerun with more steps"
        )
    samples = (long - short) * batch
    rate = samples / (long_s - short_s)
    return dict(
        samples_per_s=round(rate, 2),
        samples_per_cpu_s=round(samples / max(long_cpu - short_cpu, 1e-9), 2),
        startup_s=round(short_s - short * batch / rate, 2),
        wall_s=[round(short_s, 2), round(long_s, 2)],
        cpu_s=[round(short_cpu, 2), round(long_cpu, 2)],
    )


def logged_rate(run_dir: Path, skip: int = 20) -> float | None:
    """Median samples/s our trainer logged per step after ``skip`` steps: the steady state
    with no start-up in it. For a compiled run it is the figure to trust: dynamo traces again
    in every process and the cache loads differ between the short and the long run, so the
    wall-time difference mixes start-up into the rate."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rates = [json.loads(line)["samples_per_s"] for line in path.read_text().splitlines()[skip:]]
    return round(float(np.median(rates)), 2) if rates else None


def ceiling_rate(model: Path, steps: int = 100, batch: int = 4, size: int = 64) -> float:
    """Samples/s of the work's irreducible part, measured in this process: the ControlNet and
    UNet forward and backward and a fused AdamW step on fixed tensors; no data, VAE, text
    encoder, noise schedule or logging. No eager trainer of this work runs faster, so
    ``ceiling / peer`` bounds the ratio any trainer can show over the peer. The faster of
    PyTorch's default layout and channels_last, after 10 warm-up steps each."""
    import torch
    from diffusers import ControlNetModel

    from controlnet_emo.models.controlnet import controlled_prediction
    from controlnet_emo.models.sd import load_sd, vae_scale_factor

    torch.manual_seed(0)
    sd = load_sd(str(model))
    unet = sd.unet.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, fused=True)
    side = size // vae_scale_factor(sd.vae)
    latents, noise = torch.randn(2, batch, 4, side, side)
    t = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, 77, unet.config.cross_attention_dim)
    hint = torch.rand(batch, 3, size, size)

    def step() -> None:
        pred = controlled_prediction(unet, controlnet, latents, t, text, hint, torch.float32)
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rates = []
    for layout in (torch.contiguous_format, torch.channels_last):
        unet.to(memory_format=layout)
        controlnet.to(memory_format=layout)
        for _ in range(10):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch / (time.perf_counter() - start))
    return round(max(rates), 2)


def median_round(rounds: list[dict]) -> dict:
    """The round with the median rate (load on a shared machine comes and goes)."""
    ordered = sorted(rounds, key=lambda r: r["samples_per_s"])
    return {**ordered[len(ordered) // 2], "all": [r["samples_per_s"] for r in rounds]}


# --- entry -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer", type=Path, help="diffusers' examples/controlnet/train_controlnet.py")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter with `datasets`")
    p.add_argument("--ours-repo", type=Path, default=ROOT, help="checkout of this project")
    p.add_argument(
        "--baseline-repo",
        type=Path,
        default=None,
        help="another checkout of this project, timed alongside (before/after a change)",
    )
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run")
    p.add_argument("--quick", action="store_true", help="10 and 40 steps instead of 40 and 200")
    p.add_argument("--steps", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"))
    p.add_argument("--repeats", type=int, default=1, help="rounds; the median rate is kept")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--no-cached", action="store_true", help="skip the latent-cache variant")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time ours with train.compile (the compile itself cancels out, as start-up)",
    )
    p.add_argument("--work", type=Path, default=None, help="keep inputs and logs here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    short, long = args.steps or ((10, 40) if args.quick else (40, 200))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["HF_DATASETS_OFFLINE"] = "1"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env["CONTROLNET_EMO_CACHE"] = str(work / "cache")
        env["HF_HOME"] = str(work / "hf")  # the peer's datasets cache stays in the work folder
        from controlnet_emo.models.sd import tiny_sd_folder

        model = tiny_sd_folder(work / "cache")
        write_images(work / "data", args.images, 64)
        variants = {}
        for cached in (False,) if args.no_cached else (False, True):
            for compiled in (False, True) if args.compile else (False,):
                name = "ours" + "_cached" * cached + "_compiled" * compiled
                variants[name] = lambda n, o, c=cached, k=compiled: ours_command(
                    args.ours_repo, model, work / "data", o, n, c, k
                )
        if args.baseline_repo is not None:
            variants["baseline"] = lambda n, o: ours_command(
                args.baseline_repo, model, work / "data", o, n, False
            )
            if not args.no_cached:
                variants["baseline_cached"] = lambda n, o: ours_command(
                    args.baseline_repo, model, work / "data", o, n, True
                )
        if args.peer is not None:
            write_peer_dataset(args.peer_python, work / "data", work / "peer_data")
            variants["peer"] = lambda n, o: peer_command(
                args.peer_python, args.peer.resolve(), model, work / "peer_data", o, n
            )
        for name, command in variants.items():
            if name.endswith("_compiled"):
                # Fill inductor's caches first: otherwise the first timed run compiles and the
                # second loads the result, and the compile no longer cancels out.
                timed(command(short, work / f"{name}-warmup"), env, work / f"{name}-warmup.log")
        if args.threads:  # the in-process ceiling runs on as many threads as the trainers
            import torch

            torch.set_num_threads(args.threads)
        load_before = os.getloadavg()
        rounds: dict[str, list[dict]] = {name: [] for name in variants}
        ceilings: list[float] = []
        for r in range(args.repeats):
            walls: dict[str, dict[int, tuple]] = {name: {} for name in variants}
            for n in (short, long):  # every trainer's short run, then the long ones
                for name, command in variants.items():
                    out = work / f"{name}-{n}-{r}"
                    walls[name][n] = timed(command(n, out), env, work / f"{name}-{n}-{r}.log")
            for name, w in walls.items():
                rate = steady_rate(w[short], w[long], short, long, 4)
                rate["logged_samples_per_s"] = logged_rate(work / f"{name}-{long}-{r}")
                rounds[name].append(rate)
            ceilings.append(ceiling_rate(model))  # in every round: the VM's mood drifts
        result = {name: median_round(rs) for name, rs in rounds.items()}
        figures = {k: v["samples_per_s"] for k, v in result.items()}
        per_cpu = {k: v["samples_per_cpu_s"] for k, v in result.items()}
        logged = {k: v["logged_samples_per_s"] for k, v in result.items() if k != "peer"}
        summary = dict(
            ours=figures["ours"],
            peer=figures.get("peer"),
            ratio=round(figures["ours"] / figures["peer"], 2) if "peer" in figures else None,
            ours_cached=figures.get("ours_cached"),
            ratio_cached=round(figures["ours_cached"] / figures["peer"], 2)
            if "peer" in figures and "ours_cached" in figures
            else None,
            steps=[short, long],
            ceiling=float(np.median(ceilings)),
            ceiling_rounds=ceilings,
            ceiling_over_peer=[  # per round: the ceiling and the peer met the same VM mood
                round(c / p["samples_per_s"], 2)
                for c, p in zip(ceilings, rounds["peer"], strict=True)
            ]
            if "peer" in rounds
            else None,
            logged=logged,
            compiled_over_eager={
                k: round(logged[k + "_compiled"] / logged[k], 2)
                for k in ("ours", "ours_cached")
                if logged.get(k) and logged.get(k + "_compiled")
            },
            vs_baseline={
                k: round(figures[k] / figures[b], 2)
                for k, b in (("ours", "baseline"), ("ours_cached", "baseline_cached"))
                if k in figures and b in figures
            },
            per_cpu_s=per_cpu,
            threads=env.get("OMP_NUM_THREADS"),
            detail=result,
            load_avg_before=[round(x, 2) for x in load_before],
            load_avg_after=[round(x, 2) for x in os.getloadavg()],
            cpus=os.cpu_count(),
        )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
