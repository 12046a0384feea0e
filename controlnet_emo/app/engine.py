"""The app's model side, with no Gradio in it: open a run, list its held-out samples, turn
any input (a held-out sample, uploaded maps, a photo, FLAME codes) into condition maps, draw
a face through the one sampling path and read it with the evaluation critic.

Why a plain module: every number the page shows comes from here, so it is tested without a
browser, and the face the app draws for a seed is the face ``infer --seed`` draws (same
``load_condition_maps``, same ``generate``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from conditioners.codes import CodesError, ExpressionMeans, blend_expression, expression_index
from conditioners.flame_model import FlameModel, FlameModelError, LandmarkEmbedding
from conditioners.posed import draw, pose_folder
from controlnet_emo.config import Config, load_config
from controlnet_emo.data.dataset import Record, held_out_records, template_caption
from controlnet_emo.evaluation.evaluate import SELF_GRADING_WARNING, grades_itself, read_faces
from controlnet_emo.export.model_info import ModelInfo
from controlnet_emo.inference.edit import (
    EXPRESSION_CODES,
    EditError,
    condition_maps,
    find_expression_codes,
    landmark_skeleton,
)
from controlnet_emo.inference.infer import (
    InferenceError,
    check_sampling,
    generate,
    load_condition_maps,
    load_map,
    load_pipeline,
    model_info,
    set_scheduler,
)
from controlnet_emo.labels import EXPRESSION_WORDS, EXPRESSIONS
from controlnet_emo.models.sampling import Sampling
from controlnet_emo.pictures import Panel, labelled_grid, to_pil

log = logging.getLogger(__name__)

DEMO_RUN = Path("runs/demo")
DEMO_BASE = "demo-face-base"
DEMO_CRITIC = "demo-critic-eval"
NO_DEMO = (
    f"no run at {DEMO_RUN}: make one with `make demo` (or `controlnet-emo demo`), "
    "or pass --model RUN"
)
GALLERY_SIZE = 24
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SHOWN = 256
"""Pixels a face is shown at, at least: a 64 px demo face is a thumbnail nobody can judge."""

Progress = Callable[[float, str], None]


class AppError(ValueError):
    """A bad input or setting, as one line the page shows (never a traceback)."""


# ---------------------------------------------------------------------------------------------
# What the critic reads


@dataclass(frozen=True)
class Reading:
    """The critic's reading of one face: a probability per expression, valence, arousal."""

    probabilities: dict[str, float]
    valence: float
    arousal: float

    @property
    def expression(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def probability(self) -> float:
        return self.probabilities[self.expression]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values: what the ``/generate`` endpoint returns as text."""
        return {
            "expression": self.expression,
            "probability": round(self.probability, 4),
            "valence": round(self.valence, 4),
            "arousal": round(self.arousal, 4),
            "probabilities": {k: round(v, 4) for k, v in self.probabilities.items()},
        }


@dataclass(frozen=True)
class Labels:
    """What a held-out sample was annotated with (its ground truth, where known)."""

    expression: str | None
    valence: float
    arousal: float


@dataclass(frozen=True)
class HeldOut:
    """One held-out sample of the run's prepared data: its maps, target and labels."""

    index: int
    record: Record
    root: Path
    prompt: str

    @property
    def render(self) -> Path:
        """The file the gallery shows: the FLAME render where the run has one."""
        name = self.record.maps.get("flame") or next(iter(self.record.maps.values()))
        return self.root / name

    @property
    def caption(self) -> str:
        e = self.record.expression
        return f"#{self.index} {EXPRESSIONS[e] if 0 <= e < len(EXPRESSIONS) else '?'}"

    @property
    def labels(self) -> Labels:
        e = self.record.expression
        return Labels(
            EXPRESSIONS[e] if 0 <= e < len(EXPRESSIONS) else None,
            self.record.valence,
            self.record.arousal,
        )


# ---------------------------------------------------------------------------------------------
# Which run, which critic


def resolve_run(model: str | Path | None) -> Path:
    """``--model``, else ``runs/demo``; a missing folder is one line saying how to make it."""
    if model is None:
        if not DEMO_RUN.is_dir():
            raise AppError(NO_DEMO)
        return DEMO_RUN
    if not Path(model).exists():
        raise AppError(f"--model {model}: no such run folder or file")
    return Path(model)


def critic_spec(info: ModelInfo, cfg: Config, given: str | None) -> tuple[str, list[str]]:
    """The critic the app grades with, and warnings to show.

    A run on the demo base is graded by ``demo-critic-eval``, the critic it never trained
    against; any other run by ``--critic``, else its own ``model.emonet`` (which flatters it:
    the page says so).
    """
    if given:
        spec = given
    elif info.base_model == DEMO_BASE:
        spec = DEMO_CRITIC
    else:
        spec = cfg.model.emonet
    warnings = []
    if spec == "random":
        warnings.append("the critic has RANDOM weights: its readings are meaningless")
    elif grades_itself(spec, cfg, info.run_dir is not None):
        warnings.append(SELF_GRADING_WARNING.format(spec=spec).replace("--emonet", "--critic"))
    return spec, warnings


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """One run's pipeline and one critic, loaded once, shared by every request of the app."""

    def __init__(
        self,
        model: str | Path | None = None,
        critic: str | None = None,
        device: str | None = None,
        data: str | Path | None = None,
    ) -> None:
        from controlnet_emo.models.emonet import build_emonet

        self.model = resolve_run(model)
        self.info = model_info(self.model)
        run_config = self.info.run_dir / "config.yaml" if self.info.run_dir else None
        has_config = run_config is not None and run_config.is_file()
        self.cfg = load_config(run_config) if has_config else Config()
        self.data = Path(data) if data is not None else self._data_root() if has_config else None
        self.critic_spec, self.warnings = critic_spec(self.info, self.cfg, critic)
        try:
            critic_net = build_emonet(self.critic_spec)
        except (ValueError, OSError) as err:
            raise AppError(f"--critic {self.critic_spec}: {err}") from None
        self.size = self.info.resolution
        self.defaults = Sampling.validation(self.cfg) if has_config else Sampling()
        self.pipe, self.info = load_pipeline(
            self.model, Sampling(scheduler="default"), device=device
        )
        self.critic = critic_net.to(self.pipe.device)
        self._schedulers = {"default": self.pipe.scheduler}
        self._scheduler = "default"
        self._lock = threading.Lock()  # one pipeline, many requests: one at a time
        self.held_out = self._held_out()
        for w in self.warnings:
            log.warning(w)

    @property
    def conditions(self) -> list[str]:
        return list(self.info.conditions)

    # -- inputs -> maps (3N, H, W) in [0, 1], in the model's condition order ------------------

    def _data_root(self) -> Path:
        """The run's ``data.root``; a relative one is relative to where training ran, which
        the run folder and its relative ``output_dir`` tell when the app starts elsewhere."""
        root = Path(self.cfg.data.root)
        out = Path(self.cfg.output_dir)
        if root.is_absolute() or root.exists() or out.is_absolute():
            return root
        run = self.info.run_dir.resolve()
        if run.parts[-len(out.parts) :] == out.parts:
            return run.parents[len(out.parts) - 1] / root
        return root

    def _held_out(self) -> list[HeldOut]:
        if self.data is None:
            return []
        if not (self.data / "metadata.jsonl").is_file():
            self.warnings.append(
                f"{self.data}: no prepared dataset here, so no held-out samples "
                "(pass --data PREPARED_DIR)"
            )
            return []
        cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, root=self.data))
        cfg.conditions = self.conditions
        records = held_out_records(cfg)[:GALLERY_SIZE]
        template = self.cfg.data.caption_template
        return [
            HeldOut(i, r, self.data, r.text or template_caption(template, r.expression))
            for i, r in enumerate(records)
        ]

    def held_out_maps(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A held-out sample's maps and its target photo (3, H, W), read as ``infer`` reads."""
        if not 0 <= index < len(self.held_out):
            raise AppError(f"no held-out sample #{index}")
        h = self.held_out[index]
        paths = {c: h.root / name for c, name in h.record.maps.items() if c in self.conditions}
        try:
            maps = load_condition_maps(self.info, self.size, **paths)
            target = load_map(h.root / h.record.file_name, self.size)
        except InferenceError as err:
            raise AppError(str(err)) from None
        return maps, target

    def upload_maps(
        self,
        flame: str | Path | None,
        depth: str | Path | None = None,
        skeleton: str | Path | None = None,
    ) -> torch.Tensor:
        """Uploaded map files (any size or mode: resized and converted as training did)."""
        given = {"flame": flame, "depth": depth, "skeleton": skeleton}
        given = {k: v for k, v in given.items() if v is not None}
        if not given:
            raise AppError("upload a FLAME render (depth and skeleton maps are optional)")
        for name, path in given.items():
            _check_image(path, f"the {name} upload")
        usable = {k: v for k, v in given.items() if k in self.conditions}
        if not usable:
            raise AppError(f"this model reads none of these maps (it reads {self._reads()})")
        try:
            return load_condition_maps(self.info, self.size, **usable)
        except InferenceError as err:
            raise AppError(str(err)) from None

    def photo_maps(self, photo: str | Path | None, flame: str | Path | None = None) -> torch.Tensor:
        """Depth and skeleton derived from a photo (``infer --reference``), with an optional
        FLAME render beside them."""
        if photo is None:
            raise AppError("upload a photo of a face to derive the depth and skeleton maps from")
        _check_image(photo, "the photo")
        if flame is not None:
            _check_image(flame, "the FLAME render")
        use_flame = flame if "flame" in self.conditions else None
        try:
            return load_condition_maps(self.info, self.size, flame=use_flame, reference=photo)
        except (InferenceError, OSError) as err:
            raise AppError(f"the photo: {err}") from None

    def codes_maps(
        self,
        flame_model: str | Path | None,
        codes: str | Path | None,
        expression: str,
        strength: float,
        landmark_embedding: str | Path | None = None,
        expression_codes: str | Path | None = None,
    ) -> torch.Tensor:
        """FLAME codes moved ``strength`` of the way to ``expression``'s class mean, rendered
        as ``controlnet-emo edit`` renders them (``inference/edit.py``)."""
        if not flame_model or not codes:
            raise AppError(
                "the FLAME path needs a FLAME model file (.pkl / .npz) and an EMOCA code "
                "folder (shape.npy, exp.npy, pose.npy, optional cam.npy)"
            )
        if not 0.0 <= float(strength) <= 1.0:
            raise AppError(f"strength {strength}: must be in [0, 1]")
        try:
            target = expression_index(expression)
            if expression_codes is None and self.data is not None:
                expression_codes = self.data / EXPRESSION_CODES
            means = ExpressionMeans.load(find_expression_codes(self.model, expression_codes))
            flame = FlameModel.from_file(flame_model)
            posed = pose_folder(flame, codes)
            edited = blend_expression(posed.codes, means, target, float(strength))
            skeleton = None
            if landmark_embedding and "skeleton" in self.conditions:
                embedding = LandmarkEmbedding.from_file(landmark_embedding)
                skeleton = landmark_skeleton(flame, embedding, posed, edited)
            render = draw(flame, posed, edited)
        except (EditError, CodesError, FlameModelError, OSError, ValueError) as err:
            raise AppError(f"FLAME codes: {err}") from None
        return condition_maps(render, self.conditions, self.size, skeleton)

    def demo_codes(self, index: int) -> tuple[str, str] | None:
        """The FLAME model and code folder ``demo --codes`` left for a held-out sample, if any."""
        from conditioners.prepare import codes_folder
        from controlnet_emo.synthetic.flame import FLAME_MODEL_FILE

        if self.data is None:
            return None
        raw = self.data.parent / "raw"
        if not (raw / FLAME_MODEL_FILE).is_file() or not 0 <= index < len(self.held_out):
            return None
        rel = Path(self.held_out[index].record.file_name).relative_to("images")
        folder = codes_folder(raw, str(rel))
        return (str(raw / FLAME_MODEL_FILE), str(folder)) if folder.is_dir() else None

    # -- drawing and reading -------------------------------------------------------------------

    def sampling(self, **changes: Any) -> Sampling:
        """The run's validation settings with the page's changes, checked against the model."""
        s = dataclasses.replace(self.defaults, **changes)
        s.scales = {k: float(v) for k, v in s.scales.items()}
        try:
            check_sampling(s, self.info)
        except InferenceError as err:
            raise AppError(str(err)) from None
        return s

    def draw(self, maps: torch.Tensor, prompt: str, s: Sampling) -> Image.Image:
        """One face at the model's resolution (``infer.generate``: the shared sampling path)."""
        with self._lock:
            self._use(s)
            try:
                return generate(self.pipe, self.info, maps, prompt, s)
            except InferenceError as err:
                raise AppError(str(err)) from None

    def _use(self, s: Sampling) -> None:
        """Put the pipeline in the request's sampler and map-guidance setting."""
        self.pipe.map_guidance = s.map_guidance
        if s.scheduler != self._scheduler:
            if s.scheduler not in self._schedulers:
                self.pipe.scheduler = self._schedulers["default"]
                set_scheduler(self.pipe, s.scheduler)
                self._schedulers[s.scheduler] = self.pipe.scheduler
            self.pipe.scheduler = self._schedulers[s.scheduler]
            self._scheduler = s.scheduler

    def read(self, images: Sequence[Image.Image | torch.Tensor]) -> list[Reading]:
        """The evaluation critic's reading of each face (``evaluate.read_faces``)."""
        batch = torch.stack([_tensor(im) for im in images])  # (B,3,H,W) in [0,1]
        with self._lock:
            out = read_faces(self.critic, batch)
        probs = out["expression_logits"].softmax(dim=1)  # (B,C)
        names = EXPRESSIONS[: probs.shape[1]]
        return [
            Reading(
                {n: float(p) for n, p in zip(names, row, strict=True)},
                float(out["valence"][i]),
                float(out["arousal"][i]),
            )
            for i, row in enumerate(probs)
        ]

    def strength_strip(
        self,
        maps: torch.Tensor,
        prompt: str,
        s: Sampling,
        strengths: Sequence[float] = STRENGTHS,
        progress: Progress | None = None,
    ) -> tuple[Image.Image, list[Reading]]:
        """One face per strength of the FLAME map (the scale of its condition, 0 = absent),
        same seed and prompt: how much the render decides the face."""
        name = "flame" if "flame" in self.conditions else self.conditions[0]
        faces = []
        for i, v in enumerate(strengths):
            if progress:
                progress(i / len(strengths), f"{name} x{v:g}")
            faces.append(
                self.draw(maps, prompt, dataclasses.replace(s, scales={**s.scales, name: v}))
            )
        reads = self.read(faces)
        tiles = [
            Panel(f, [f"{name} x{v:g}", _short(r)])
            for f, v, r in zip(faces, strengths, reads, strict=True)
        ]
        return labelled_grid([tiles], min_tile=SHOWN), reads

    def expression_strip(
        self, maps: torch.Tensor, s: Sampling, progress: Progress | None = None
    ) -> tuple[Image.Image, list[Reading]]:
        """One face per expression named in the prompt (the run's caption template), same maps
        and seed: how much the words move the face beside the render."""
        template = self.cfg.data.caption_template
        faces = []
        for i, word in enumerate(EXPRESSION_WORDS):
            if progress:
                progress(i / len(EXPRESSION_WORDS), word)
            faces.append(self.draw(maps, template_caption(template, i), s))
        reads = self.read(faces)
        tiles = [
            Panel(f, [f"'{w}'", _short(r)])
            for f, w, r in zip(faces, EXPRESSION_WORDS, reads, strict=True)
        ]
        return labelled_grid([tiles[:4], tiles[4:]], min_tile=SHOWN), reads

    def maps_picture(self, maps: torch.Tensor) -> Image.Image:
        """The maps a face was drawn from, side by side, labelled and upscaled."""
        panels = [Panel(maps[3 * i : 3 * i + 3], [c]) for i, c in enumerate(self.conditions)]
        return labelled_grid([panels], min_tile=SHOWN)

    def _reads(self) -> str:
        return ", ".join(self.conditions)


# ---------------------------------------------------------------------------------------------
# Pictures


def upscale(image: Image.Image | torch.Tensor, size: int = SHOWN) -> Image.Image:
    """Nearest-neighbour up to at least ``size`` px: every pixel of a small face stays
    visible, no detail is invented."""
    im = to_pil(image)
    if im.width >= size:
        return im
    k = -(-size // im.width)
    return im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)


def circumplex(points: Sequence[tuple[str, float, float, str]], size: int = 288) -> Image.Image:
    """Valence (x) and arousal (y) on Russell's circumplex: each (label, v, a, colour) a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size / 96, size / 96), dpi=96)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    theta = torch.linspace(0, 2 * torch.pi, 181)
    ax.plot(theta.cos(), theta.sin(), color="0.7", lw=1)
    ax.axhline(0, color="0.85", lw=0.8)
    ax.axvline(0, color="0.85", lw=0.8)
    for text, x, y in [("happy", 0.8, 0.25), ("sad", -0.8, -0.35), ("angry", -0.55, 0.75)]:
        ax.text(x, y, text, color="0.6", fontsize=7, ha="center")
    for label, v, a, colour in points:
        if v == v and a == a:  # NaN: unknown
            ax.scatter([v], [a], s=60, color=colour, label=label, edgecolor="black", zorder=3)
    ax.set(xlim=(-1.2, 1.2), ylim=(-1.2, 1.2), xlabel="valence", ylabel="arousal", aspect="equal")
    ax.tick_params(labelsize=7)
    if points:
        ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def reading_json(reading: Reading, indent: int | None = None, **extra: Any) -> str:
    """A reading as the JSON text the API returns (expression, probability, valence, arousal)."""
    return json.dumps(reading.as_dict() | extra, indent=indent)


# ---------------------------------------------------------------------------------------------
# Helpers


def _check_image(path: str | Path, what: str) -> None:
    """A readable image, or one line naming the upload (the temp path means nothing to a user)."""
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, ValueError, SyntaxError):
        raise AppError(
            f"{what} is not an image ({Path(path).name}); upload a PNG or JPEG"
        ) from None


def _tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.float()
    return torch.from_numpy(_array(image)).permute(2, 0, 1).float() / 255


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _short(r: Reading) -> str:
    return f"{r.expression} {r.probability:.2f}"
