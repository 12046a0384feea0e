"""``controlnet-emo evaluate``: how faithful the generated faces are, as numbers and pictures.

A loss curve says the model fits its objective, not that its faces carry the intended emotion
or follow the FLAME geometry. So for the first N samples of a split we draw a face from the
sample's maps and caption (the ``infer`` pipeline and seed scheme: every row can be redrawn
with ``controlnet-emo infer --seed S``, sample i with S = seed + i) and read generated and
real faces with one frozen critic (EmoNet, or a face critic with its contract):

- emotion: valence/arousal RMSE, CCC, PCC and top-1 / top-3 expression accuracy / macro-F1
  against the labels, beside the same figures for the critic on the real photos (the
  ceiling: how well it reads this data at all) and the EmoNet paper's AffectNet figures;
- geometry: landmarks from the critic's 68 heatmaps; NME (normalised by the target's
  outer-eye-corner distance) against the target's landmarks that prepare recorded, or the
  critic's reading of the target where there are none. A control generation with every map
  zeroed (what condition dropout trained for) shows what the ControlNet adds;
- reliance on the maps: the held-out noise-prediction error with each sample's own maps
  against another sample's and none (``map_reliance.py``), which needs no sampling and
  tells a ControlNet that follows its render from one that ignores it.

A critic must not grade its own pupil: ``evaluate`` warns when it is the run's training
critic (the demo grades with ``demo-critic-eval``, trained apart from ``demo-critic-train``).
Metrics live in ``metrics.py``, the files and pictures in ``report.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from controlnet_emo.config import Config, load_config
from controlnet_emo.data.dataset import PreparedDataset, Record, collate, read_metadata
from controlnet_emo.evaluation.map_reliance import map_reliance
from controlnet_emo.evaluation.metrics import (
    crop_landmarks,
    emotion_metrics,
    flip_test_heatmap,
    heatmap_landmarks,
    nme,
)
from controlnet_emo.evaluation.report import (
    format_table,
    sample_row,
    write_maps_sweep,
    write_outputs,
)
from controlnet_emo.evaluation.structure import (
    face_regions,
    structure_scores,
    summarize_structure,
    to_grey,
)
from controlnet_emo.export.model_info import ModelInfo
from controlnet_emo.inference.infer import check_sampling, load_pipeline, model_info
from controlnet_emo.models.sampling import Sampling, sample
from controlnet_emo.models.text_cache import tokenizers_of

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
NEUTRAL_PROMPT = "a close-up photo of a face"
"""A prompt that names no expression and no hair colour: maps_sweep.png draws every sample
with it and one seed, so that the maps are the only thing that differs across its row (the
emotion ablation grades with it too: there the expression must come from the render)."""

RANDOM_WARNING = (
    "EmoNet has RANDOM weights (model.emonet=random): every emotion and landmark "
    "figure here is meaningless; pass --emonet /path/to/emonet_8.pth"
)
SELF_GRADING_WARNING = (
    "the evaluation critic {spec!r} is the one this run trained against (model.emonet): its "
    "figures flatter the run; pass --emonet with an independent critic (e.g. demo-critic-eval)"
)


class EvaluationError(ValueError):
    """A bad input to evaluation, as one line naming the path."""


def grades_itself(spec: str, cfg: Config, is_run: bool) -> bool:
    """Whether critic ``spec`` is the one a training run's critic-read terms pushed against:
    a run that trained the diffusion term alone (the demo) never saw its ``model.emonet``."""
    return is_run and spec != "random" and spec == cfg.model.emonet and cfg.loss.needs_critic


# ---------------------------------------------------------------------------------------------
# Generation and reading


@torch.no_grad()
def read_faces(emonet: torch.nn.Module, images: Tensor) -> dict[str, Tensor]:
    """(B,3,H,W) in [0,1] -> the critic's expression (B,) class and (B,C) logits, valence,
    arousal, landmarks (B,68,2); landmarks by the flip test (``metrics.flip_test_heatmap``),
    the emotion from the image as given."""
    p = next(emonet.parameters())
    x = images.to(p.device, p.dtype)
    out = emonet(x)
    heatmap = flip_test_heatmap(out["heatmap"], emonet(x.flip(-1))["heatmap"])
    return {
        "expression": out["expression"].argmax(1).cpu(),
        "expression_logits": out["expression"].float().cpu(),
        "valence": out["valence"].float().cpu(),
        "arousal": out["arousal"].float().cpu(),
        "landmarks": heatmap_landmarks(heatmap, tuple(images.shape[-2:])).cpu(),
    }


def row_seed(seed: int, i: int) -> int:
    """The noise seed of the split's i-th evaluated sample (and of its no-maps baseline)."""
    return seed + i


def generate_and_read(
    pipe: Any,
    info: ModelInfo,
    critic: torch.nn.Module,
    ds: PreparedDataset,
    prompts: list[str],
    s: Sampling,
    *,
    batch_size: int,
    baseline: bool,
    grid_rows: int,
    targets: Tensor,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], list[dict]]:
    """Draw and read every sample, batch by batch.

    Sample i is drawn with noise seed ``s.seed + i``, its no-maps baseline too (each pair shares
    its noise): the figures average over N noise draws, not one (one shared draw flattered
    the demo: top-1 0.59 against 0.47, NME 0.58x against 0.68x of no maps), and row i is
    redrawn with ``controlnet-emo infer --seed <seed + i>``.

    Returns the critic's readings per image kind (generated, real, baseline; each key (N,...),
    with per-sample ``nme`` against ``targets`` (N,68,2), the target's landmarks in the
    evaluated frame, NaN rows where unknown: there the critic's reading of the real image
    stands in), the labels as the dataset loaded them (-1 / NaN where missing), and the
    images of the first ``grid_rows`` samples (only those are kept: N images at 512 px would
    not fit in memory).
    """
    from tqdm.auto import tqdm

    kinds = ["generated", "real"] + (["baseline"] if baseline else [])
    region_map = info.conditions.index("flame") if "flame" in info.conditions else 0
    reads: dict[str, list[dict[str, Tensor]]] = {k: [] for k in kinds}
    labels: dict[str, list[Tensor]] = {"expression": [], "valence": [], "arousal": []}
    shown: list[dict[str, Tensor]] = []
    for start in tqdm(range(0, len(ds), batch_size), desc="evaluate", unit="batch"):
        stop = min(start + batch_size, len(ds))
        batch = collate([ds[i] for i in range(start, stop)])
        rows = prompts[start:stop], [row_seed(s.seed, i) for i in range(start, stop)]
        images = {
            "generated": sample(pipe, info.conditions, info.mode, batch.conditions, *rows, s),
            "real": (batch.pixel_values + 1) / 2,
        }  # (B,3,H,W) in [0,1]; N noise draws, not one
        if baseline:  # every map zeroed: what the base draws from the caption alone
            zeroed = batch.conditions * 0
            images["baseline"] = sample(pipe, info.conditions, info.mode, zeroed, *rows, s)
        read = {kind: read_faces(critic, images[kind]) for kind in kinds}
        target = targets[start:stop]
        known = target[:, :, 0].isfinite().all(dim=1)[:, None, None]  # (B,1,1)
        reference = torch.where(known, target, read["real"]["landmarks"])
        render = batch.conditions[:, 3 * region_map : 3 * region_map + 3]  # (B,3,H,W)
        read["real"]["region"] = face_regions(render)  # for the structure measures
        for kind in kinds:
            read[kind]["nme"] = nme(read[kind]["landmarks"], reference)
            read[kind]["grey"] = to_grey(images[kind].cpu())  # (B,1,64,64): small, kept for all
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
    generated faces against the critic's reading of the real ones (usable without labels)."""
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
    sampling: Sampling | None = None,
    *,
    split: str = "val",
    n: int = 64,
    out: str | Path | None = None,
    emonet: str | None = None,
    batch_size: int = 4,
    baseline: bool = True,
    resolution: int | None = None,
    device: str | None = None,
    grid_rows: int = 8,
    prompt: str | None = None,
) -> dict[str, Any]:
    """Generate, read, score; write metrics.json, per_sample.jsonl, grid.png, confusion.png,
    valence_arousal.png; return metrics.

    ``prompt`` replaces every sample's caption (e.g. one that names no expression, so that
    the emotion must come from the maps). Every input is checked before the pipeline loads,
    so a typo fails in the first second.
    """
    from controlnet_emo.models.emonet import build_emonet

    s = sampling or Sampling()
    if min(n, batch_size) < 1:
        raise EvaluationError("--n and --batch-size must be at least 1")
    info = model_info(run)
    check_sampling(s, info)
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
    warnings = [RANDOM_WARNING] if spec == "random" else []
    if grades_itself(spec, cfg, info.run_dir is not None):
        warnings.append(SELF_GRADING_WARNING.format(spec=spec))
    pipe, info = load_pipeline(run, s, device=device)
    size = resolution or info.resolution
    ds = PreparedDataset(
        data,
        records,
        info.conditions,
        size,
        tokenizers_of(pipe),
        cfg.data.caption_template,
        train=False,
    )
    prompts = [prompt if prompt is not None else ds.caption(r) for r in records]
    read, labels, shown = generate_and_read(
        pipe,
        info,
        critic.to(pipe.device),
        ds,
        prompts,
        s,
        batch_size=batch_size,
        baseline=baseline,
        grid_rows=grid_rows,
        targets=target_landmarks(data, records, size),
    )
    batches = [
        collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        for start in range(0, len(ds), batch_size)
    ]
    metrics: dict[str, Any] = {
        "n": len(records),
        "split": split,
        "run": str(run),
        "data": str(data),
        "emonet": {"source": spec, "n_expression": critic.n_expression},
        "warnings": warnings,
        "nme_reference": "target landmarks (metadata)"
        if all(r.landmarks for r in records)
        else "target landmarks where recorded, else the critic on the target",
        "settings": {
            **s.record(),
            "resolution": size,
            "batch_size": batch_size,
            "conditions": info.conditions,
            "mode": info.mode,
            "base": info.base_model,
            "baseline": baseline,
            "prompt": prompt,
            "landmark_reading": "flip test (metrics.flip_test_heatmap)",
        },
        "map_reliance": map_reliance(pipe, batches),
    } | score(read, labels, critic.n_expression)
    structure = {
        kind: structure_scores(read[kind]["grey"], read["real"]["grey"], read["real"]["region"])
        for kind in ("generated", "baseline")
        if kind in read
    }
    metrics["structure"] = {kind: summarize_structure(v) for kind, v in structure.items()}
    real_nme = metrics["real"].get("nme", math.nan)
    metrics["generated"]["nme_over_real"] = (
        metrics["generated"].get("nme", math.nan) / real_nme if real_nme > 0 else math.nan
    )
    out = Path(out) if out is not None else Path(run) / "eval"
    samples = []
    for i, r in enumerate(records):
        row = sample_row(i, r, prompts[i], read, labels) | {"seed": row_seed(s.seed, i)}
        for kind, v in structure.items():
            row[kind] |= {
                "ssim_own": float(v["ssim_own"][i]),
                "ssim_margin": float(v["ssim_margin"][i]),
                "own_target_is_best": bool(v["own_is_best"][i]),
            }
        samples.append(row)
    written = write_outputs(out, metrics, samples, shown, read, labels, info.conditions)
    if shown:
        follow = sample(
            pipe,
            info.conditions,
            info.mode,
            torch.stack([row["maps"] for row in shown]),
            [NEUTRAL_PROMPT] * len(shown),
            [s.seed] * len(shown),
            s,
        )
        written.append(write_maps_sweep(out / "maps_sweep.png", shown, follow, info.conditions))
    print(format_table(metrics))
    print("wrote " + ", ".join(str(p) for p in written))
    return metrics


def target_landmarks(data: str | Path, records: list[Record], size: int) -> Tensor:
    """(N,68,2) each target's recorded landmarks in the evaluated (resized, centre-cropped)
    frame; NaN for a record without them."""
    out = torch.full((len(records), 68, 2), math.nan)
    for i, rec in enumerate(records):
        if rec.landmarks:
            with Image.open(Path(data) / rec.file_name) as im:  # header only
                width, height = im.size
            points = torch.tensor(rec.landmarks, dtype=torch.float32)
            out[i] = crop_landmarks(points, height, width, size)
    return out
