"""The batch job: raw dataset -> prepared dataset (target image + three maps per sample).

Written for a multi-day AffectNet run on a shared cluster: every output file is written
atomically, each finished sample is recorded (fsync'd) in a per-process progress file, and a
rerun skips what is recorded and on disk, so a kill costs at most the depth batch in flight.
Under ``accelerate launch`` each process takes every N-th sample and keeps its own progress
shard; the main process merges them into ``metadata.jsonl`` and ``prepare_report.json``.
Bad inputs never stop the job: each is a skip with a reason in the report; the job fails
only when nothing at all could be prepared.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from conditioners.codes import (
    CodesError,
    camera_for,
    canvas_crop_box,
    class_means,
    read_codes,
    render_codes,
)
from conditioners.depth import (
    AUTO,
    DEFAULT_MODEL,
    PRECOMPUTED,
    DepthConditioner,
    PrecomputedDepth,
    to_png_values,
)
from conditioners.flame import FlameConditioner, emoca_crop_box, emoca_landmark_box
from conditioners.flame_model import FLAME_URL, FlameModel, FlameModelError
from conditioners.io import (
    ImageError,
    append_jsonl,
    load_render,
    load_rgb,
    read_jsonl,
    resize_longest,
    write_json,
    write_jsonl,
    write_png,
)
from conditioners.raw_data import (
    RawIndex,
    RawSample,
    Skip,
    find_captions,
    load_captions,
    read_raw_dataset,
    select_samples,
    split_of,
)
from conditioners.skeleton import NoFaceError, SkeletonConditioner, draw_skeleton
from controlnet_emo.config import Config
from controlnet_emo.labels import CONDITION_KEYS, EXPRESSION_WORDS, EXPRESSIONS

logger = logging.getLogger(__name__)

# metadata column -> output folder: the columns the training loader reads (CONDITION_KEYS).
OUTPUTS = {"file_name": "images", **{col: name for name, col in CONDITION_KEYS.items()}}
PROGRESS = ".progress"
EXPRESSION_CODES = "expression_codes.npz"  # per-class mean FLAME expression + jaw codes
FLAME_MODEL_NAMES = ("flame_model.npz", "flame_model.pkl")  # looked for in RAW/ (synth --codes)


class PrepareError(ValueError):
    """Nothing at all could be prepared (the CLI turns this into a non-zero exit)."""


class SampleSkip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Maps:
    """One sample's target image and maps, waiting for its depth batch."""

    sample: RawSample
    image: np.ndarray  # (H, W, 3) uint8
    flame: np.ndarray  # (H, W, 3) uint8
    skeleton: np.ndarray  # (H, W, 3) uint8
    landmarks: np.ndarray  # (68, 2) the skeleton's points, target-image pixels
    info: dict[str, Any] = field(default_factory=dict)
    flame_depth: np.ndarray | None = None  # (H, W) the FLAME render's z-buffer (codes only)


def prepare_dataset(raw_dir: str | Path, out_dir: str | Path, cfg: Config) -> dict:
    """Prepare ``raw_dir`` into ``out_dir``; return the report (also in prepare_report.json).

    Under ``accelerate launch`` every process runs this; each prepares its share and the main
    process merges. Raises `PrepareError` when nothing at all could be prepared.
    """
    import torch
    from accelerate import PartialState

    started = time.time()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    # cpu=True on a GPU-less machine: without it accelerate ignores torchrun's WORLD_SIZE and
    # every CPU process would think it is alone and prepare everything.
    state = PartialState(cpu=not torch.cuda.is_available())
    plan = plan_samples(raw_dir, cfg)
    prepare_shard(
        plan, out_dir, cfg, state.process_index, state.num_processes, str(state.device),
        show_progress=state.is_local_main_process,
    )  # fmt: skip
    state.wait_for_everyone()
    if state.is_main_process:
        merge_shards(plan, out_dir, cfg, state.num_processes, started)
    state.wait_for_everyone()
    report = json.loads((out_dir / "prepare_report.json").read_text())
    if report["prepared"] == 0:
        raise PrepareError(
            f"nothing could be prepared from {raw_dir} ({report['skipped']} skipped: "
            f"{report['skip_reasons']}); see {out_dir / 'prepare_report.json'}"
        )
    return report


@dataclass
class Plan:
    """What the whole job will prepare, identical in every process (shards are slices)."""

    raw_dir: Path
    index: RawIndex
    selected: list[RawSample]
    not_selected: int
    depth_source: str = PRECOMPUTED
    """What makes the depth maps: 'precomputed' or the model ``depth.model`` resolved to."""
    flame_source: str = "render"
    """'render' (EMOCA's render re-canvased) or 'codes' (RAW/codes/ rendered on the canvas)."""
    flame_model: str | None = None


def plan_samples(raw_dir: Path, cfg: Config) -> Plan:
    index = read_raw_dataset(raw_dir)
    chosen = select_samples(
        index.samples, cfg.prepare.balance_classes, cfg.prepare.max_samples, cfg.seed
    )
    selected, duplicates = _unique_outputs(chosen)
    index.skipped.extend(duplicates)
    depth = resolve_depth_source(cfg.depth.model, Path(raw_dir), selected)
    flame_source, flame_model = resolve_flame_source(cfg, Path(raw_dir), selected)
    return Plan(
        Path(raw_dir), index, selected, len(index.samples) - len(chosen), depth,
        flame_source, flame_model,
    )  # fmt: skip


def codes_folder(raw_dir: Path, key: str) -> Path:
    """``0/abc.jpg`` -> ``RAW/codes/0/abc/`` (EMOCA's --save_codes layout)."""
    return raw_dir / "codes" / Path(key).with_suffix("")


def resolve_flame_source(
    cfg: Config, raw_dir: Path, selected: list[RawSample]
) -> tuple[str, str | None]:
    """``flame.source: auto`` -> 'codes' when RAW/codes/ holds every selected sample's codes
    and a FLAME model is known (``flame.model``, else RAW/flame_model.npz|pkl), else
    'render'. Decided once for the whole job, like the depth source."""
    model = cfg.flame.model or next(
        (str(raw_dir / n) for n in FLAME_MODEL_NAMES if (raw_dir / n).is_file()), None
    )
    source = cfg.flame.source
    if source == "auto":
        have = (raw_dir / "codes").is_dir() and all(
            (codes_folder(raw_dir, s.key) / "shape.npy").is_file() for s in selected
        )
        source = "codes" if have and model else "render"
        if (raw_dir / "codes").is_dir() and source == "render":
            logger.info(
                "flame.source=auto: rendering from EMOCA's renders (%s)",
                "no FLAME model: set flame.model" if have else "some samples have no codes",
            )
    if source == "codes" and model is None:
        raise PrepareError(
            f"flame.source=codes needs a FLAME model: --set flame.model=FILE "
            f"(FLAME models come from {FLAME_URL}, registration required)"
        )
    if cfg.depth.model == "flame" and source != "codes":
        raise PrepareError("depth.model=flame draws depth from the FLAME codes: it needs "
                           "flame.source codes (RAW/codes/ and a FLAME model)")  # fmt: skip
    return source, model if source == "codes" else cfg.flame.model


def resolve_depth_source(model: str, raw_dir: Path, selected: list[RawSample]) -> str:
    """``depth.model: auto`` -> 'precomputed' when RAW/depth/ has a map for every selected
    sample whose original is on disk (synthetic and pre-processed data ship them), else the
    default depth model.

    Decided once for the whole job, before any shard starts: mixing sources would give one
    dataset two depth conventions. A row whose original is missing is skipped later
    (``missing_file``) whatever makes depth, so it has no say here: one such row must not make
    the job demand a depth network for everything. Other values pass through unchanged.
    """
    if model != AUTO:
        return model
    present = [s.key for s in selected if s.image_path.is_file()]
    missing = PrecomputedDepth(raw_dir).missing(present)
    if not missing:
        return PRECOMPUTED
    logger.info(
        "depth.model=auto: %d of %d samples with an original have no map under %s (e.g. %s); "
        "running %s", len(missing), len(present), raw_dir / "depth", missing[0], DEFAULT_MODEL,
    )  # fmt: skip
    return DEFAULT_MODEL


def prepare_shard(
    plan: Plan,
    out_dir: Path,
    cfg: Config,
    rank: int = 0,
    world: int = 1,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prepare every ``world``-th selected sample starting at ``rank``; keep its own shard files."""
    shard_name = f"shard-{rank:05d}"
    cfg = replace(
        cfg,
        depth=replace(cfg.depth, model=plan.depth_source),
        flame=replace(cfg.flame, source=plan.flame_source, model=plan.flame_model),
    )
    job = PrepareJob(plan.raw_dir, Path(out_dir), cfg, device, shard_name)
    summary = job.run(plan.selected[rank::world], show_progress=show_progress)
    write_json(Path(out_dir) / PROGRESS / f"{shard_name}.run.json", summary)
    return summary


def merge_shards(
    plan: Plan, out_dir: Path, cfg: Config, world: int = 1, started: float | None = None
) -> dict[str, Any]:
    """Main process: all shards' finished samples -> metadata.jsonl, their skips -> report."""
    out_dir = Path(out_dir)
    done = finished_keys(out_dir)
    wanted = {s.key for s in plan.selected}
    records = sorted((r for k, r in done.items() if k in wanted), key=lambda r: r["file_name"])
    write_jsonl(out_dir / "metadata.jsonl", [_public(r) for r in records])
    skipped, resumed = list(plan.index.skipped), 0
    for rank in range(world):
        run = json.loads((out_dir / PROGRESS / f"shard-{rank:05d}.run.json").read_text())
        resumed += run["resumed"]
        skipped.extend(Skip(s["file"], s["reason"], s["detail"]) for s in run["skipped"])
    report = _report(plan, records, skipped, resumed, world, cfg)
    report["expression_codes"] = write_expression_codes(plan.raw_dir, out_dir, records)
    if started is not None:
        report["seconds"] = round(time.time() - started, 2)
    write_json(out_dir / "prepare_report.json", report)
    logger.info(
        "prepared %d of %d selected samples into %s (%d skipped, %d resumed)",
        report["prepared"], report["selected"], out_dir, report["skipped"], report["resumed"],
    )  # fmt: skip
    return report


class PrepareJob:
    """One process's share: make the maps, batch the depth model, write, record progress."""

    def __init__(
        self, raw_dir: Path, out_dir: Path, cfg: Config, device: str, shard_name: str
    ) -> None:
        self.raw_dir, self.out_dir, self.cfg = raw_dir, out_dir, cfg
        self.captions = load_captions(find_captions(raw_dir, cfg.prepare.captions))
        self.flame = FlameConditioner(cfg.flame.crop_scale, cfg.flame.box_threshold)
        self.skeleton = SkeletonConditioner(
            cfg.skeleton.source, device=device, min_score=cfg.skeleton.min_score
        )
        self.depth = make_depth_source(cfg, raw_dir, device)
        self.flame_model = None
        if cfg.flame.source == "codes":
            try:
                self.flame_model = FlameModel.from_file(cfg.flame.model).to(device)
            except FlameModelError as err:
                raise PrepareError(str(err)) from None
        self.progress = out_dir / PROGRESS / f"{shard_name}.jsonl"
        cfg.data.caption_template.format(expression="x", valence=0.0, arousal=0.0)  # fail fast

    def run(self, shard: list[RawSample], show_progress: bool = True) -> dict[str, Any]:
        """Prepare every unfinished sample of the shard; return its skips and resume count."""
        done = finished_keys(self.out_dir)
        pending = [s for s in shard if s.key not in done]
        skipped: list[Skip] = []
        batch: list[Maps] = []
        bar = tqdm(pending, desc="prepare", unit="img", disable=not show_progress)
        for sample in bar:
            try:
                batch.append(self.make_maps(sample))
            except SampleSkip as skip:
                skipped.append(Skip(sample.key, skip.reason, skip.detail))
            except Exception as err:  # one odd file must not end a multi-day job
                logger.warning("%s: unexpected %r, skipped", sample.key, err)
                skipped.append(Skip(sample.key, "error", repr(err)))
            if len(batch) >= self.depth.batch_size:
                skipped.extend(self.finish(batch))
                batch = []
        skipped.extend(self.finish(batch))
        return {"resumed": len(shard) - len(pending), "skipped": [s.to_dict() for s in skipped]}

    def make_maps(self, sample: RawSample) -> Maps:
        """Target image, FLAME render and skeleton on one canvas (depth comes per batch)."""
        image, converted = _load(sample.image_path, "")
        height, width = image.shape[:2]
        if min(height, width) < self.cfg.prepare.min_size:
            raise SampleSkip("too_small", f"{width}x{height} < {self.cfg.prepare.min_size}")
        image, scale = resize_longest(image, self.cfg.prepare.max_size)
        box = tuple(v * scale for v in sample.box) if sample.box is not None else None
        landmarks = sample.landmarks * scale if sample.landmarks is not None else None
        draw = self._flame_from_codes if self.flame_model is not None else self._flame
        flame, method, score, flame_depth = draw(sample, image, box, landmarks)
        skeleton, points, landmark_source = self._skeleton(image, landmarks, box)
        info = {
            "converted": converted,
            "flame_method": method,
            "flame_match": round(score, 4),
            "landmarks": landmark_source,
        }
        return Maps(sample, image, flame, skeleton, points, info, flame_depth)

    def _flame(self, sample: RawSample, image: np.ndarray, box: tuple | None, landmarks):
        crop, _ = _load(sample.sibling(self.raw_dir / "inputs"), "emoca_crop")
        try:
            render = load_render(sample.sibling(self.raw_dir / "geometry_detail"))
        except ImageError as err:
            raise SampleSkip(_reason(err.reason, "flame_render"), err.detail) from None
        placement = self.flame.place(render, crop, image, box, landmarks)
        if placement.score < self.cfg.flame.min_match:
            raise SampleSkip(
                "flame_low_match",
                f"best match {placement.score:.3f} ({placement.method}) < {self.cfg.flame.min_match}",
            )
        return placement.canvas, placement.method, placement.score, None

    def _flame_from_codes(self, sample: RawSample, image: np.ndarray, box, landmarks):
        """The sample's codes drawn on its canvas through EMOCA's crop (box, else landmarks,
        else the centred square) and camera (cam.npy, else fitted to EMOCA's render)."""
        folder = codes_folder(self.raw_dir, sample.key)
        if not (folder / "shape.npy").is_file():
            raise SampleSkip("missing_codes", str(folder))
        try:
            codes = read_codes(folder)
            crop = None
            if codes.cam is None:
                crop = load_render(sample.sibling(self.raw_dir / "geometry_detail"))
            fit = camera_for(self.flame_model, codes, None, crop)
        except CodesError as err:
            raise SampleSkip("bad_codes", str(err)) from None
        except ImageError as err:
            raise SampleSkip(_reason(err.reason, "flame_render"), err.detail) from None
        if fit.score < self.cfg.flame.min_match:
            raise SampleSkip(
                "flame_low_match",
                f"camera fit {fit.score:.3f} ({fit.method}) < {self.cfg.flame.min_match}",
            )
        height, width = image.shape[:2]
        scale = self.cfg.flame.crop_scale
        if box is not None:
            crop_box = emoca_crop_box(box, scale)
        elif landmarks is not None:
            crop_box = emoca_landmark_box(landmarks, scale)
        else:
            crop_box = canvas_crop_box(None, (width, height), scale)
        render = render_codes(self.flame_model, codes, fit.cam, crop_box, (width, height))
        return render.image_uint8(), f"codes:{fit.method}", fit.score, render.depth_float()

    def _skeleton(self, image: np.ndarray, landmarks: np.ndarray | None, box: tuple | None):
        source = "fan" if landmarks is None or self.cfg.skeleton.source == "fan" else "annotations"
        if source == "fan" and self.cfg.skeleton.source == "annotations":
            raise SampleSkip("no_landmarks", "skeleton.source=annotations")
        try:
            points = self.skeleton.points(image, landmarks, box)
            height, width = image.shape[:2]
            return draw_skeleton(points, height, width), points, source
        except NoFaceError as err:
            raise SampleSkip(NoFaceError.reason, str(err)) from None

    def finish(self, batch: list[Maps]) -> list[Skip]:
        """Run depth for the batch, write each sample's four files, then record it as done."""
        if not batch:
            return []
        skipped = []
        for maps, depth in zip(batch, self.depth(batch), strict=True):
            if isinstance(depth, SampleSkip):
                skipped.append(Skip(maps.sample.key, depth.reason, depth.detail))
                continue
            record = self._write(maps, depth)
            append_jsonl(self.progress, record)
        return skipped

    def _write(self, maps: Maps, depth: np.ndarray) -> dict[str, Any]:
        sample = maps.sample
        names = {column: output_name(folder, sample.key) for column, folder in OUTPUTS.items()}
        write_png(self.out_dir / names["file_name"], maps.image)
        write_png(self.out_dir / names["flame_file_name"], maps.flame)
        write_png(self.out_dir / names["skeleton_file_name"], maps.skeleton)
        write_png(
            self.out_dir / names["depth_file_name"], to_png_values(depth, self.cfg.depth.bits)
        )
        return {
            **names,
            "text": self._caption(sample),
            "expression": sample.expression,
            "valence": sample.valence,
            "arousal": sample.arousal,
            "split": split_of(sample.key, self.cfg.prepare.val_fraction),
            "source": sample.key,
            # the target's 68 points (what evaluate's landmark NME compares against)
            "landmarks": np.round(np.asarray(maps.landmarks, np.float64), 2).tolist(),
            "_info": maps.info,
        }

    def _caption(self, sample: RawSample) -> str:
        text = self.captions.get(sample.key)
        if text is not None:
            return text
        return self.cfg.data.caption_template.format(
            expression=EXPRESSION_WORDS[sample.expression],
            valence=sample.valence,
            arousal=sample.arousal,
        )


# ---------------------------------------------------------------------------------------------
# Depth sources: a model run per batch, or maps read from the raw folder


class ModelDepth:
    def __init__(self, conditioner: DepthConditioner) -> None:
        self.conditioner = conditioner
        self.batch_size = conditioner.batch_size  # one forward pass per batch

    def __call__(self, batch: list[Maps]) -> list[np.ndarray | SampleSkip]:
        return list(self.conditioner([maps.image for maps in batch]))


class FileDepth:
    batch_size = 1  # nothing to batch: write each sample as soon as it is ready

    def __init__(self, raw_dir: Path) -> None:
        self.store = PrecomputedDepth(raw_dir)

    def __call__(self, batch: list[Maps]) -> list[np.ndarray | SampleSkip]:
        return [self._one(maps) for maps in batch]

    def _one(self, maps: Maps) -> np.ndarray | SampleSkip:
        height, width = maps.image.shape[:2]
        try:
            return self.store.load(maps.sample.key, height, width)
        except FileNotFoundError as err:
            return SampleSkip("missing_depth", str(err))
        except ImageError as err:
            return SampleSkip("corrupt_depth", err.detail)


class FlameDepth:
    """``depth.model: flame``: the z-buffer of the sample's own FLAME render (near = bright)."""

    batch_size = 1

    def __call__(self, batch: list[Maps]) -> list[np.ndarray | SampleSkip]:
        return [
            m.flame_depth if m.flame_depth is not None else SampleSkip("missing_flame_depth")
            for m in batch
        ]


DEPTH_SOURCES = {
    PRECOMPUTED: lambda cfg, raw_dir, device: FileDepth(raw_dir),
    "flame": lambda cfg, raw_dir, device: FlameDepth(),
}


def make_depth_source(cfg: Config, raw_dir: Path, device: str):
    """``depth.model`` (resolved, never 'auto'): 'precomputed' reads RAW/depth/, anything
    else is a model to load."""
    special = DEPTH_SOURCES.get(cfg.depth.model)
    if special is not None:
        return special(cfg, raw_dir, device)
    conditioner = DepthConditioner(
        cfg.depth.model,
        device=device,
        batch_size=cfg.depth.batch_size,
        input_size=cfg.depth.input_size,
        allow_download=cfg.depth.allow_download,
    )
    return ModelDepth(conditioner)


# ---------------------------------------------------------------------------------------------
# Progress, resume, merge


def output_name(folder: str, key: str) -> str:
    """``images`` + ``0/abc.jpg`` -> ``images/0/abc.png`` (every output is a PNG)."""
    return (Path(folder) / Path(key).with_suffix(".png")).as_posix()


def finished_keys(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Samples recorded in any progress shard whose four files are all on disk."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted((out_dir / PROGRESS).glob("shard-*.jsonl")):
        for row in read_jsonl(path):
            if "source" in row and all((out_dir / row.get(c, "")).is_file() for c in OUTPUTS):
                records[row["source"]] = row
    return records


def _report(
    plan: Plan,
    records: list[dict[str, Any]],
    skipped: list[Skip],
    resumed: int,
    num_processes: int,
    cfg: Config,
) -> dict[str, Any]:
    index = plan.index
    infos = [r.get("_info", {}) for r in records]
    matches = [i["flame_match"] for i in infos if "flame_match" in i]
    per_class = Counter(EXPRESSIONS[r["expression"]] for r in records)
    return {
        "layout": index.layout,
        "rows": index.rows,
        "selected": len(plan.selected),
        "not_selected": plan.not_selected,
        "prepared": len(records),
        "skipped": len(skipped),
        "resumed": resumed,
        "per_class": {name: per_class.get(name, 0) for name in EXPRESSIONS},
        "per_split": dict(Counter(r["split"] for r in records)),
        "skip_reasons": dict(sorted(Counter(s.reason for s in skipped).items())),
        "filtered": dict(sorted(index.filtered.items())),
        "converted": dict(
            sorted(Counter(c for i in infos for c in i.get("converted", [])).items())
        ),
        "flame_method": dict(Counter(i.get("flame_method") for i in infos if i)),
        "flame_match": {
            "mean": round(float(np.mean(matches)), 4) if matches else None,
            "min": round(float(np.min(matches)), 4) if matches else None,
            "threshold": cfg.flame.min_match,
        },
        "landmarks": dict(Counter(i.get("landmarks") for i in infos if i)),
        "flame_source": plan.flame_source,
        "depth_model": cfg.depth.model,
        "depth_source": plan.depth_source,
        "processes": num_processes,
        "skipped_files": [s.to_dict() for s in sorted(skipped, key=lambda s: (s.reason, s.key))],
    }


def write_expression_codes(
    raw_dir: Path, out_dir: Path, records: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """From the training split's codes (RAW/codes/), each class's mean expression and jaw
    codes -> ``expression_codes.npz`` (what ``edit`` moves a face towards); None without codes.
    """
    if not (raw_dir / "codes").is_dir():
        return None
    codes, labels = [], []
    for r in records:
        folder = codes_folder(raw_dir, r["source"])
        if r["split"] != "train" or not (folder / "shape.npy").is_file():
            continue
        try:
            codes.append(read_codes(folder))
        except CodesError as err:
            logger.warning("%s: left out of %s (%s)", r["source"], EXPRESSION_CODES, err)
            continue
        labels.append(int(r["expression"]))
    if not codes:
        return None
    means = class_means(codes, labels)
    means.save(out_dir / EXPRESSION_CODES)
    per_class = {name: int(n) for name, n in zip(EXPRESSIONS, means.count, strict=True)}
    return {"file": EXPRESSION_CODES, "faces": len(codes), "per_class": per_class}


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _unique_outputs(samples: list[RawSample]) -> tuple[list[RawSample], list[Skip]]:
    """Two originals that would write the same PNG (``a.jpg`` and ``a.png``): keep the first."""
    seen: dict[str, str] = {}
    kept, skipped = [], []
    for sample in samples:
        name = output_name("images", sample.key)
        if name in seen:
            skipped.append(Skip(sample.key, "duplicate_name", f"same output as {seen[name]}"))
            continue
        seen[name] = sample.key
        kept.append(sample)
    return kept, skipped


def _load(path: Path, what: str) -> tuple[np.ndarray, list[str]]:
    try:
        return load_rgb(path)
    except ImageError as err:
        raise SampleSkip(_reason(err.reason, what), err.detail) from None


def _reason(reason: str, what: str) -> str:
    """``missing_file`` + ``emoca_crop`` -> ``missing_emoca_crop``; photos keep the plain name."""
    if not what:
        return reason
    return f"{'missing' if reason == 'missing_file' else 'corrupt'}_{what}"
