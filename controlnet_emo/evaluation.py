"""``controlnet-emo evaluate``: how faithful the generated faces are, as numbers and pictures.

A loss curve says the model fits its objective, not that its faces carry the intended emotion
or follow the FLAME geometry. So for the first N samples of a split we draw a face from the
sample's maps and caption (the ``infer`` pipeline and seed scheme: every row can be redrawn
with ``controlnet-emo infer --seed S``) and read generated and real faces with one frozen
EmoNet:

- emotion: valence/arousal RMSE, CCC, PCC and expression accuracy / macro-F1 against the
  labels, beside the same figures for EmoNet on the real photos (the ceiling: how well EmoNet
  reads this data at all) and the EmoNet paper's AffectNet figures;
- geometry: landmarks from EmoNet's 68 heatmaps on both images; NME (normalised by the
  target's outer-eye-corner distance) needs no FAN weights. A control generation with every
  map zeroed (what condition dropout trained for) shows what the ControlNet adds.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .config import Config, ConfigError, load_config
from .data.dataset import PreparedDataset, collate, read_metadata
from .inference import SCHEDULERS, InferenceError, load_pipeline, model_info
from .labels import EXPRESSIONS

LEFT_EYE, RIGHT_EYE = 36, 45  # outer eye corners, 68-point scheme
PUBLISHED_EMONET = {  # Toisoul et al. 2021 on AffectNet (FACTS.md), by class count
    8: {
        "valence_rmse": 0.29,
        "valence_ccc": 0.82,
        "arousal_rmse": 0.27,
        "arousal_ccc": 0.75,
        "expression_accuracy": 0.75,
    },
    5: {"valence_ccc": 0.90, "arousal_ccc": 0.80, "expression_accuracy": 0.82},
}
RANDOM_WARNING = (
    "EmoNet has RANDOM weights (model.emonet=random): every emotion and landmark "
    "figure here is meaningless; pass --emonet /path/to/emonet_8.pth"
)


class EvaluationError(ValueError):
    """A bad input to evaluation, as one line naming the path."""


# ---------------------------------------------------------------------------------------------
# Metrics: pure functions on CPU tensors


def rmse(pred: Tensor, target: Tensor) -> float:
    """Root mean squared error of two (N,) series; NaN when empty."""
    if pred.numel() == 0:
        return math.nan
    return float(((pred.double() - target.double()) ** 2).mean().sqrt())


def pearson(pred: Tensor, target: Tensor) -> float:
    """Pearson correlation; blind to shifts and scales (which is why CCC is reported too)."""
    x, y = pred.double() - pred.double().mean(), target.double() - target.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / denom) if x.numel() > 1 and denom > 0 else math.nan


def ccc(pred: Tensor, target: Tensor) -> float:
    """Lin's concordance correlation: 1 only when the series agree in value, so a constant
    offset or a squashed range (a model that always predicts ~0) is penalised, unlike PCC."""
    x, y = pred.double(), target.double()
    if x.numel() < 2:
        return math.nan
    cov = ((x - x.mean()) * (y - y.mean())).mean()
    denom = x.var(unbiased=False) + y.var(unbiased=False) + (x.mean() - y.mean()) ** 2
    return float(2 * cov / denom) if denom > 0 else math.nan


def macro_f1(pred: Tensor, target: Tensor) -> float:
    """Mean per-class F1 over the classes in labels or predictions (sklearn's convention), so
    the majority class (happy is about half of AffectNet) cannot carry the figure."""
    if target.numel() == 0:
        return math.nan
    scores = []
    for c in torch.unique(torch.cat([pred, target])):
        tp = ((pred == c) & (target == c)).sum().item()
        wrong = ((pred == c) != (target == c)).sum().item()  # false positives + negatives
        scores.append(2 * tp / (2 * tp + wrong))
    return float(np.mean(scores))


def heatmap_landmarks(
    heatmap: Tensor, image_size: int | tuple[int, int], radius: int = 3
) -> Tensor:
    """(B,K,h,w) heatmaps -> (B,K,2) (x, y) in image pixels, pixel centres at integers.

    Argmax, refined by the weighted mean of its (2r+1)^2 window (weights: heatmap minus the
    window's minimum): sub-pixel accuracy (~0.1 heatmap px for Gaussians of sigma <= 2) that
    ignores a background offset, without a whole-map soft-argmax's pull towards the centre.
    """
    b, k, h, w = heatmap.shape
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    flat = heatmap.detach().float().reshape(b * k, h, w)
    idx = flat.flatten(1).argmax(1)  # (BK,)
    offs = torch.arange(-radius, radius + 1, device=flat.device)  # (win,)
    ys = torch.div(idx, w, rounding_mode="floor")[:, None] + offs  # (BK, win)
    xs = (idx % w)[:, None] + offs  # (BK, win)
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    win = flat[
        torch.arange(b * k, device=flat.device)[:, None, None],
        ys.clamp(0, h - 1)[:, :, None],
        xs.clamp(0, w - 1)[:, None, :],
    ]  # (BK, win, win)
    weights = (win - win.amin(dim=(1, 2), keepdim=True)) * inside
    total = weights.sum(dim=(1, 2)).clamp(min=1e-12)  # flat window: weights 0, offset 0
    y = (weights.sum(2) * ys).sum(1) / total + (total <= 1e-12) * ys[:, radius]
    x = (weights.sum(1) * xs).sum(1) / total + (total <= 1e-12) * xs[:, radius]
    xy = torch.stack([(x + 0.5) * W / w - 0.5, (y + 0.5) * H / h - 0.5], dim=1)
    return xy.reshape(b, k, 2)


def nme(pred: Tensor, target: Tensor, left: int = LEFT_EYE, right: int = RIGHT_EYE) -> Tensor:
    """(B,K,2), (B,K,2) -> (B,) mean point distance over the target's inter-ocular distance.

    Scale-free, so any resolution compares; NaN where the target's eye corners coincide.
    """
    iod = (target[:, left] - target[:, right]).norm(dim=-1)  # (B,)
    err = (pred - target).norm(dim=-1).mean(dim=1)  # (B,)
    return torch.where(iod > 1e-6, err / iod.clamp(min=1e-6), math.nan)


def emotion_metrics(
    read: dict[str, Tensor], expression: Tensor, valence: Tensor, arousal: Tensor, n_classes: int
) -> dict[str, float]:
    """EmoNet readings vs labels; samples whose label is missing (-1, NaN, AffectNet's -2)
    or outside the EmoNet's classes (5-class model) are left out of that figure."""
    out: dict[str, float] = {}
    for name, truth in (("valence", valence), ("arousal", arousal)):
        keep = torch.isfinite(truth) & (truth != -2)
        p, t = read[name][keep], truth[keep]
        out |= {
            f"{name}_rmse": rmse(p, t),
            f"{name}_ccc": ccc(p, t),
            f"{name}_pcc": pearson(p, t),
            f"n_{name}": int(keep.sum()),
        }
    keep = (expression >= 0) & (expression < n_classes)
    p, t = read["expression"][keep], expression[keep]
    acc = float((p == t).double().mean()) if t.numel() else math.nan
    return out | {
        "expression_accuracy": acc,
        "expression_macro_f1": macro_f1(p, t),
        "n_expression": int(keep.sum()),
    }


# ---------------------------------------------------------------------------------------------
# Generation and reading


@torch.no_grad()
def read_faces(emonet: torch.nn.Module, images: Tensor) -> dict[str, Tensor]:
    """(B,3,H,W) in [0,1] -> EmoNet's expression (B,) class, valence, arousal, landmarks (B,68,2)."""
    p = next(emonet.parameters())
    out = emonet(images.to(p.device, p.dtype))
    return {
        "expression": out["expression"].argmax(1).cpu(),
        "valence": out["valence"].float().cpu(),
        "arousal": out["arousal"].float().cpu(),
        "landmarks": heatmap_landmarks(out["heatmap"], tuple(images.shape[-2:])).cpu(),
    }


def generate_batch(
    pipe: Any,
    mode: str,
    maps: Tensor,
    prompts: list[str],
    seed: int,
    steps: int,
    guidance_scale: float,
) -> Tensor:
    """(B,3N,H,W) maps -> (B,3,H,W) in [0,1], quantised to 8 bits as a saved PNG is.

    One CPU generator per sample, each seeded ``seed``: the noise ``infer --seed`` draws for a
    single image, so differences between rows come from the conditions and captions alone.
    """
    b, _, h, w = maps.shape
    image: Any = list(maps.split(3, dim=1)) if mode == "multi" else maps
    gens = [torch.Generator("cpu").manual_seed(seed) for _ in range(b)]
    out = pipe(
        prompts,
        image=image,
        height=h,
        width=w,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=gens,
        output_type="np",
    ).images
    arr = (np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8)  # (B,H,W,3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def generate_and_read(
    pipe: Any,
    mode: str,
    critic: torch.nn.Module,
    ds: PreparedDataset,
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    batch_size: int,
    baseline: bool,
    grid_rows: int,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], list[dict]]:
    """Draw and read every sample, batch by batch.

    Returns EmoNet's readings per image kind (generated, real, baseline; each key (N,...),
    with per-sample ``nme`` against the real image's landmarks), the labels as the dataset
    loaded them (-1 / NaN where missing), and the images of the first ``grid_rows`` samples
    (only those are kept: N images at 512 px would not fit in memory).
    """
    from tqdm.auto import tqdm

    kinds = ["generated", "real"] + (["baseline"] if baseline else [])
    reads: dict[str, list[dict[str, Tensor]]] = {k: [] for k in kinds}
    labels: dict[str, list[Tensor]] = {"expression": [], "valence": [], "arousal": []}
    shown: list[dict[str, Tensor]] = []
    for start in tqdm(range(0, len(ds), batch_size), desc="evaluate", unit="batch"):
        stop = min(start + batch_size, len(ds))
        batch = collate([ds[i] for i in range(start, stop)])
        draw = dict(
            prompts=prompts[start:stop], seed=seed, steps=steps, guidance_scale=guidance_scale
        )
        images = {
            "generated": generate_batch(pipe, mode, batch.conditions, **draw),
            "real": (batch.pixel_values + 1) / 2,
        }  # (B,3,H,W) in [0,1]
        if baseline:  # every map zeroed: what the base draws from the caption alone
            images["baseline"] = generate_batch(pipe, mode, batch.conditions * 0, **draw)
        read = {kind: read_faces(critic, images[kind]) for kind in kinds}
        for kind in kinds:
            if kind != "real":
                read[kind]["nme"] = nme(read[kind]["landmarks"], read["real"]["landmarks"])
            reads[kind].append(read[kind])
        for key in labels:
            labels[key].append(getattr(batch, key))
        for i in range(min(stop, grid_rows) - start):
            shown.append({k: v[i] for k, v in images.items()} | {"maps": batch.conditions[i]})
    return (
        {
            kind: {key: torch.cat([r[key] for r in rs]) for key in rs[0]}
            for kind, rs in reads.items()
        },
        {key: torch.cat(v) for key, v in labels.items()},
        shown,
    )


def score(
    read: dict[str, dict[str, Tensor]], labels: dict[str, Tensor], n_classes: int
) -> dict[str, Any]:
    """The report's figures: each image kind against the labels (+ mean NME), and the
    generated faces against EmoNet's reading of the real ones (usable without labels)."""
    out: dict[str, Any] = {}
    for kind, r in read.items():
        out[kind] = emotion_metrics(r, **labels, n_classes=n_classes)
        if "nme" in r:
            valid = r["nme"][r["nme"].isfinite()]
            out[kind]["nme"] = float(valid.mean()) if valid.numel() else math.nan
    teacher = {k: read["real"][k] for k in ("expression", "valence", "arousal")}
    out["generated_vs_emonet_on_real"] = emotion_metrics(
        read["generated"], **teacher, n_classes=n_classes
    )
    out["published_emonet_affectnet"] = PUBLISHED_EMONET.get(n_classes, {})
    return out


def evaluate(
    run: str | Path,
    data: str | Path,
    split: str = "val",
    n: int = 64,
    out: str | Path | None = None,
    emonet: str | None = None,
    steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 4,
    baseline: bool = True,
    scheduler: str = "unipc",
    resolution: int | None = None,
    device: str | None = None,
    grid_rows: int = 8,
) -> dict[str, Any]:
    """Generate, read, score; write metrics.json, per_sample.jsonl, grid.png; return metrics.

    Every input is checked before the pipeline loads, so a typo fails in the first second.
    """
    from .models.emonet import build_emonet

    if min(n, batch_size, steps) < 1:
        raise EvaluationError("--n, --batch-size and --steps must be at least 1")
    info = model_info(run)
    cfg = load_config(info.run_dir / "config.yaml") if info.run_dir else Config()
    try:
        records = read_metadata(data, split, info.conditions)[:n]  # the first N: deterministic
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    if not records:
        raise EvaluationError(f"{Path(data) / 'metadata.jsonl'}: no samples in split {split!r}")
    spec = emonet or cfg.model.emonet
    try:
        critic = build_emonet(spec)
    except ValueError as err:
        raise EvaluationError(f"--emonet {spec}: {err}") from None
    pipe, info = load_pipeline(run, device=device, scheduler=scheduler)
    size = resolution or info.resolution
    ds = PreparedDataset(
        data, records, info.conditions, size, pipe.tokenizer, cfg.data.caption_template, train=False
    )
    prompts = [ds.caption(r) for r in records]
    read, labels, shown = generate_and_read(
        pipe,
        info.mode,
        critic.to(pipe.device),
        ds,
        prompts,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        baseline=baseline,
        grid_rows=grid_rows,
    )
    metrics: dict[str, Any] = {
        "n": len(records),
        "split": split,
        "run": str(run),
        "data": str(data),
        "emonet": {"source": spec, "n_expression": critic.n_expression},
        "warning": RANDOM_WARNING if spec == "random" else None,
        "settings": {
            "steps": steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "scheduler": scheduler,
            "resolution": size,
            "batch_size": batch_size,
            "conditions": info.conditions,
            "mode": info.mode,
            "base": info.base_model,
            "baseline": baseline,
        },
    } | score(read, labels, critic.n_expression)
    out = Path(out) if out is not None else Path(run) / "eval"
    samples = [_sample_row(i, r, prompts[i], read, labels) for i, r in enumerate(records)]
    _write_outputs(out, metrics, samples, shown, read, info.conditions)
    print(format_table(metrics))
    print(f"wrote {out / 'metrics.json'}, {out / 'per_sample.jsonl'}, {out / 'grid.png'}")
    return metrics


# ---------------------------------------------------------------------------------------------
# Reports


def _expr_name(i: int) -> str | None:
    return EXPRESSIONS[i] if 0 <= i < len(EXPRESSIONS) else None


def _sample_row(
    i: int, rec: Any, prompt: str, read: dict[str, dict[str, Tensor]], labels: dict[str, Tensor]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": i,
        "file_name": rec.file_name,
        "prompt": prompt,
        "label": {
            "expression": _expr_name(int(labels["expression"][i])),
            "valence": float(labels["valence"][i]),
            "arousal": float(labels["arousal"][i]),
        },
    }
    for kind, r in read.items():
        row[kind] = {
            "expression": _expr_name(int(r["expression"][i])),
            "valence": float(r["valence"][i]),
            "arousal": float(r["arousal"][i]),
        }
        if "nme" in r:
            row[kind]["nme"] = float(r["nme"][i])
    return row


def _finite(obj: Any) -> Any:
    """NaN / inf -> None, so the JSON is strict (other tools reject a bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _describe(r: dict[str, Any]) -> str:
    """'happy v+0.31 a-0.12'; missing parts left out."""
    va = [f"{k[0]}{r[k]:+.2f}" for k in ("valence", "arousal") if math.isfinite(r[k])]
    return " ".join([r["expression"] or "-", *va])


def _write_outputs(
    out: Path,
    metrics: dict[str, Any],
    samples: list[dict[str, Any]],
    shown: list[dict[str, Tensor]],
    read: dict[str, dict[str, Tensor]],
    conditions: list[str],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2, allow_nan=False))
    (out / "per_sample.jsonl").write_text(
        "".join(json.dumps(_finite(s), allow_nan=False) + "\n" for s in samples)
    )
    rows = []
    for i, (s, img) in enumerate(zip(samples, shown, strict=False)):
        tiles = [(m, [c], None) for c, m in zip(conditions, img["maps"].split(3), strict=True)]
        for kind, title in (
            ("generated", "generated"),
            ("real", "target"),
            ("baseline", "no maps"),
        ):
            if kind not in img:
                continue
            lines = [title, ("EmoNet " if kind == "real" else "") + _describe(s[kind])]
            lines.append(
                "label " + _describe(s["label"]) if kind == "real" else f"NME {s[kind]['nme']:.3f}"
            )
            tiles.append((img[kind], lines, read[kind]["landmarks"][i]))
        rows.append(tiles)
    if rows:  # --grid-rows 0: no picture
        grid_image(rows).save(out / "grid.png")


def grid_image(
    rows: list[list[tuple[Tensor, list[str], Tensor | None]]], min_tile: int = 256
) -> Image.Image:
    """Rows of (3,H,W) [0,1] tiles with text lines and (68,2) landmarks (or None) drawn on
    them; small tiles are upscaled so the text stays readable."""
    h = rows[0][0][0].shape[-1]
    t = max(h, min_tile)
    font = ImageFont.load_default(size=max(10, t // 20))
    sheet = Image.new("RGB", (t * max(len(r) for r in rows), t * len(rows)))
    draw = ImageDraw.Draw(sheet)
    for y, row in enumerate(rows):
        for x, (img, lines, points) in enumerate(row):
            arr = (img.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((t, t), Image.Resampling.NEAREST)
            sheet.paste(tile, (x * t, y * t))
            for px, py in ((points + 0.5) * t / h - 0.5).tolist() if points is not None else []:
                cx, cy = x * t + px, y * t + py
                draw.ellipse((cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5), fill=(0, 255, 255))
            draw.multiline_text(
                (x * t + 3, y * t + 2),
                "\n".join(lines),
                font=font,
                fill=(255, 255, 0),
                stroke_width=1,
                stroke_fill=(0, 0, 0),
            )
    return sheet


def format_table(m: dict[str, Any]) -> str:
    """The headline figures, one row per image source."""
    cols = [
        ("val RMSE", "valence_rmse"),
        ("val CCC", "valence_ccc"),
        ("aro RMSE", "arousal_rmse"),
        ("aro CCC", "arousal_ccc"),
        ("expr acc", "expression_accuracy"),
        ("macro F1", "expression_macro_f1"),
        ("NME", "nme"),
    ]
    rows = [
        ("generated", m["generated"]),
        ("no maps (baseline)", m.get("baseline")),
        ("EmoNet on real", m["real"]),
        ("EmoNet paper", m["published_emonet_affectnet"]),
    ]
    lines = [f"evaluate: {m['n']} samples of split {m['split']!r}, EmoNet {m['emonet']['source']}"]
    if m["warning"]:
        lines.append(f"WARNING: {m['warning']}")
    lines.append(f"{'':20}" + "".join(f"{name:>10}" for name, _ in cols))
    for name, r in rows:
        if r is None:
            continue
        cells = [r.get(key) for _, key in cols]
        lines.append(
            f"{name:20}"
            + "".join(
                f"{v:10.3f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>10}"
                for v in cells
            )
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The ``evaluate`` subcommand


def add_evaluate_arguments(p: Any) -> None:
    """Arguments of ``controlnet-emo evaluate``."""
    p.add_argument("run_dir", type=Path, help="training run folder")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=64, help="evaluate the first N samples of the split")
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/eval)")
    p.add_argument("--emonet", help="EmoNet weights (default: the run's model.emonet)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
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
    p.add_argument("--grid-rows", type=int, default=8, help="samples shown in grid.png")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")


def run_evaluate(args: Any) -> int:
    """The ``evaluate`` subcommand; a bad input is one line on stderr, exit 2."""
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
            seed=args.seed,
            batch_size=args.batch_size,
            baseline=not args.no_baseline,
            scheduler=args.scheduler,
            resolution=args.resolution,
            device=args.device,
            grid_rows=args.grid_rows,
        )
    except (EvaluationError, InferenceError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
