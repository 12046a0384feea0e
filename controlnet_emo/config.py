"""Typed run configuration: YAML recipe + ``--set dotted.key=value`` overrides.

Every value is checked against the dataclass field types and ranges *before* any model loads,
so a typo in a 10-hour recipe fails in the first second with the offending key named.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_VERSION = 1
CONDITION_NAMES = ("flame", "depth", "skeleton")
# diffusers.optimization.SchedulerType values (kept here so validation needs no heavy import)
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key."""


@dataclass
class ControlNetConfig:
    mode: Literal["stacked", "multi"] = "stacked"
    """stacked: one ControlNet with 3 hint channels per condition; multi: one 3-channel net each."""
    init: str = "from_unet"
    """from_unet (copy the UNet encoder, as the ControlNet paper does) or a path to a ControlNet."""
    hint_init: Literal["zero", "random"] = "zero"
    """The hint encoder's last conv: zero (the paper) or random. The residual zero convs alone
    keep a new ControlNet a no-op, and a random last conv lets the hint reach them from step 1."""


@dataclass
class ModelConfig:
    pretrained: str = "tiny"
    """Hub id, local diffusers folder, single .safetensors/.ckpt file, or 'tiny' (random, tests)."""
    revision: str | None = None
    variant: str | None = None
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    unet_trainable: Literal["none", "attention", "up_blocks", "lora"] = "none"
    lora_rank: int = 8
    emonet: str = "random"
    """Path to emonet_8.pth / emonet_5.pth, or 'random' (demo and tests only)."""
    lpips_net: Literal["vgg", "alex"] = "vgg"
    lpips_backbone: str = "pretrained"
    """pretrained (torchvision cache), random (tests only), or a path to the backbone weights."""
    decoder: str = "vae"
    """vae, taesd, or a path to a TAESD (AutoencoderTiny) folder."""
    attention: Literal["sdpa", "xformers"] = "sdpa"


@dataclass
class DataConfig:
    root: str = "runs/demo/data"
    resolution: int = 512
    max_samples: int | None = None
    balance_classes: bool = True
    caption_template: str = "a photo of a {expression} face"
    condition_dropout: float = 0.1
    """Per-condition probability of zeroing a map, so inference works with any subset."""
    caption_dropout: float = 0.0
    num_workers: int = 2
    cache_latents: bool = False
    """Encode every training image once (centre crop and its mirror image) and draw each
    step's posterior sample from the cached moments: no VAE encoder in the step. Flips are
    kept; random crops are not (the cache holds the centre crop). The file in
    ``output_dir/latent_cache/`` is reused by a later run only while the VAE and every image
    (name, size, modification time) are unchanged; otherwise it is encoded again."""
    cache_images: bool = False
    """Keep every decoded image (target and maps) in memory after its first read, so later
    epochs decode no files. Costs N x (1 + maps) x 3 x H x W x 4 bytes at the files' own size
    (the demo's 364 faces at 64 px: 72 MB) per data-loading process: for small datasets."""
    cache_text: bool = True
    """Encode each distinct caption once per run and reuse its text-encoder states (training
    and validation loss); identical to encoding every time."""
    hflip: bool = True
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class DiffusionLossConfig:
    weight: float = 0.92
    kind: Literal["l1", "l2"] = "l1"
    snr_gamma: float | None = 0.8
    timesteps: Literal["uniform", "cubic"] = "uniform"
    """cubic draws t = (1 - u^3) T, favouring high noise, where the layout is decided and a
    ControlNet's maps matter most (T2I-Adapter's schedule; diffusers' adapter trainer too)."""


@dataclass
class WeightConfig:
    weight: float = 0.0


@dataclass
class EmotionLossConfig:
    valence: float = 0.03
    arousal: float = 0.03
    expression: float = 0.02
    target: Literal["labels", "teacher"] = "labels"


@dataclass
class PixelSelectConfig:
    max_timestep: int = 1000
    """Only samples with t < max_timestep pay the decoder (low-noise steps carry the signal)."""
    samples_per_batch: int | None = None
    """At most this many samples per micro-batch pay the decoder (null: every eligible one);
    only they are decoded, except under train.compile, which always decodes this many (or
    whole chunks) and masks the shortfall out: static shapes, no recompiles."""
    start_step: int = 0
    """Pixel and emotion terms join after this many optimizer steps: before, the diffusion term
    alone teaches the ControlNet to use its maps, which the critic's gradient otherwise
    drowns early on (BENCHMARKS.md, "When the maps take hold")."""
    balance: float | None = None
    """Cap the pixel and emotion terms' gradient on the noise prediction at this multiple of
    the diffusion term's (VQGAN's adaptive weight, capped at 1): a decoded critic's gradient
    can be ten times the diffusion term's and undo the maps. null: the weights alone."""
    chunk_size: int | None = None
    """Decode and read the paying samples this many at a time (null: all at once); each chunk
    is checkpointed per decoder block, so a smaller chunk bounds the activations kept."""
    decoder_layout: Literal["auto", "channels_last", "contiguous"] = "auto"
    """Memory layout of the decoder (and its input) in the pixel path; auto follows
    train.channels_last. benchmarks/gpu.sh measures both on a GPU."""
    critic_layout: Literal["auto", "channels_last", "contiguous"] = "auto"
    """The same for LPIPS and the emotion critic."""


@dataclass
class LpipsConfig:
    weight: float = 0.08
    space: Literal["pixel", "latent"] = "pixel"
    """pixel: LPIPS on the decoded images (the research recipe). latent: an LPL-style term
    (Berrada et al. 2025) on the frozen VAE decoder's mid- and up-block features of the
    prediction against those of the real latent, each normalised per channel by the real
    one's statistics; it never decodes to pixels and needs model.decoder: vae."""


@dataclass
class LossConfig:
    diffusion: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    pixel_l1: WeightConfig = field(default_factory=WeightConfig)
    lpips: LpipsConfig = field(default_factory=LpipsConfig)
    emotion: EmotionLossConfig = field(default_factory=EmotionLossConfig)
    landmarks: WeightConfig = field(default_factory=WeightConfig)
    """The critic's 68 landmarks on the decoded prediction against its landmarks on the real
    image (mean L1 of soft-argmax positions, in fractions of the face crop): a reward for
    following the render's geometry (ControlNet++'s consistency loss, with the critic's
    landmark heads as the condition extractor). 0 = off."""
    pixel: PixelSelectConfig = field(default_factory=PixelSelectConfig)

    KEYS = {  # term -> its dotted config key (what an error message names)
        "diffusion": "loss.diffusion.weight",
        "pixel_l1": "loss.pixel_l1.weight",
        "lpips": "loss.lpips.weight",
        "valence": "loss.emotion.valence",
        "arousal": "loss.emotion.arousal",
        "expression": "loss.emotion.expression",
        "landmarks": "loss.landmarks.weight",
    }
    CRITIC_TERMS = ("valence", "arousal", "expression", "landmarks")
    """The terms the emotion critic (EmoNet or a face critic) reads off the prediction."""

    @property
    def needs_decoder(self) -> bool:
        return any(w > 0 for term, w in self.weights().items() if term != "diffusion")

    @property
    def needs_critic(self) -> bool:
        return any(self.weights()[term] > 0 for term in self.CRITIC_TERMS)

    def weights(self) -> dict[str, float]:
        """Flat term -> weight map (what metrics and model metadata report)."""
        e = self.emotion
        return {
            "diffusion": self.diffusion.weight,
            "pixel_l1": self.pixel_l1.weight,
            "lpips": self.lpips.weight,
            "valence": e.valence,
            "arousal": e.arousal,
            "expression": e.expression,
            "landmarks": self.landmarks.weight,
        }


@dataclass
class TrainConfig:
    batch_size: int = 4
    total_batch_size: int = 1024
    """Accumulation = total / (batch_size * processes)."""
    learning_rate: float = 5.0e-6
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    max_bad_steps: int = 10
    """Stop after this many optimizer steps in a row whose loss or gradient was not finite
    (each is skipped: no update); the last checkpoint stays the last good one."""
    max_steps: int = 1000
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    gradient_checkpointing: bool = True
    """Recompute activations in backward: the UNet's and ControlNet's blocks, and the pixel
    path's decoder blocks and critics (across the batch, or ``loss.pixel.chunk_size``). Off for
    small models, where memory is cheap."""
    compile: bool = False
    """torch.compile the UNet and ControlNet, and the pixel path's decoder, LPIPS and critic
    (static shapes): faster steps after a compile of a minute or more at start; worth it for
    long GPU runs."""
    channels_last: bool = True
    """UNet, VAE, ControlNet and critics in channels_last on CPU and CUDA, oneDNN's and
    cuDNN's fastest conv kernels (the demo's CPU steps 1.12-1.4x; BENCHMARKS.md, "Training
    step"). False keeps PyTorch's default layout, for a machine where that measures faster
    (``benchmarks/layout_speed.py``)."""
    use_8bit_adam: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    resume: str | None = None
    validate_every: int = 250
    validation_samples: int = 4
    validation_steps: int = 20
    validation_guidance_scale: float = 7.5
    """Classifier-free guidance of the validation grids (and the demo's infer / evaluate)."""
    validation_map_guidance: bool = True
    """The guidance is over the maps too (``models/pipeline.py``; ``infer --map-guidance``)."""
    report_to: str = "tensorboard"


@dataclass
class PrepareConfig:
    val_fraction: float = 0.05
    max_samples: int | None = None
    balance_classes: bool = False
    max_size: int = 1024
    """Originals larger than this (longest side) are downscaled before the maps are made."""
    min_size: int = 64
    """Images smaller than this (shortest side) are skipped as too small."""
    captions: str | None = None
    """A captions .json/.jsonl; default: captions.json(l) in the raw folder if present."""


@dataclass
class FlameConfig:
    source: Literal["auto", "render", "codes"] = "auto"
    """render: EMOCA's geometry_detail/ render re-canvased; codes: RAW/codes/ rendered with
    flame.model straight on the original canvas; auto: codes when RAW/codes/ has every
    selected sample's codes and a FLAME model is known, else render."""
    model: str | None = None
    """FLAME model file (.pkl / .npz, licence-gated: https://flame.is.tue.mpg.de); null:
    RAW/flame_model.npz or .pkl when there (``synth --codes`` writes the synthetic one)."""
    min_match: float = 0.8
    """Below this match score (re-canvas correlation, or the camera fit's silhouette IoU for
    codes without cam.npy) a sample is a reported skip."""
    crop_scale: float = 1.25
    """EMOCA's crop rule: square side = crop_scale x the longer side of the face box."""
    box_threshold: float = 0.8
    """A crop-rule transform scoring at least this is trusted without registration."""


@dataclass
class DepthConfig:
    model: str = "auto"
    """auto: the maps under RAW/depth/ when every selected sample has one, else ZoeDepth
    (Intel/zoedepth-nyu-kitti); 'precomputed' (RAW/depth/ only; a missing map is a skip);
    'tiny'; 'flame' (the z-buffer of the FLAME render, flame.source codes); or the hub id /
    local folder of any AutoModelForDepthEstimation."""
    batch_size: int = 8
    bits: Literal[8, 16] = 16
    input_size: int = 512
    """Images are reflect-padded to a square of this side for the model, so any shapes batch."""
    allow_download: bool = False
    """Fetch missing hub weights; off by default so prepare never touches the network."""


@dataclass
class SkeletonConfig:
    source: Literal["auto", "annotations", "fan"] = "auto"
    """auto: the annotation's 68 landmarks when present, else face-alignment's 2D FAN."""
    min_score: float = 0.0
    """Mean FAN landmark confidence below which the sample is skipped as 'no face'."""


@dataclass
class Config:
    version: int = CONFIG_VERSION
    output_dir: str = "runs/demo"
    seed: int = 0
    conditions: list[str] = field(default_factory=lambda: list(CONDITION_NAMES))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    flame: FlameConfig = field(default_factory=FlameConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    skeleton: SkeletonConfig = field(default_factory=SkeletonConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Loading and checking


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from an optional YAML file plus ``key=value`` overrides, then validate."""
    cfg = load_typed(Config, path, overrides)
    validate(cfg)
    return cfg


RECIPES = Path(__file__).resolve().parent / "configs"
"""The shipped recipes, inside the package so a non-editable install finds them too."""


def recipe_names() -> list[str]:
    """Names ``--config`` accepts without a path (``demo``, ``stableface_best``, ...)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file from a path, or from a shipped recipe's name (``--config demo``).

    Why: after ``pip install controlnet-emo`` there is no ``configs/`` folder beside the user,
    so a name is the only spelling that works from any directory.
    """
    given = Path(path)
    if given.is_file():
        return given
    shipped = RECIPES / (given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml")
    if given.parent == Path(".") or given.parts[:1] == ("configs",):
        if shipped.is_file():
            return shipped
    raise ConfigError(
        f"config file not found: {given} (shipped recipes by name: {', '.join(recipe_names())})"
    )


def load_typed(cls: type, path: str | Path | None, overrides: list[str] | None) -> Any:
    """Any config dataclass from YAML + overrides, with the type checks ``load_config`` has.

    Why generic: the pretraining commands have their own small schemas and must reject a
    mistyped key exactly as a training recipe does.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    return _build(cls, raw, "")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML) onto a nested dict."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key '{key}' (known here: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in data}
    return cls(**kwargs)


_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off/yes/on as a bool
            spelled = [w for w in _BOOL_WORDS[value] if w in choices]
            value = spelled[0] if spelled else value
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    """Ranges and cross-field rules that types cannot express."""
    if cfg.version != CONFIG_VERSION:
        raise ConfigError(
            f"version: {cfg.version} is not supported (this build reads {CONFIG_VERSION})"
        )
    if not cfg.conditions:
        raise ConfigError("conditions: at least one condition is needed")
    for name in cfg.conditions:
        if name not in CONDITION_NAMES:
            raise ConfigError(
                f"conditions: unknown condition {name!r} (known: {', '.join(CONDITION_NAMES)})"
            )
    if len(set(cfg.conditions)) != len(cfg.conditions):
        raise ConfigError("conditions: a condition is listed twice")
    for term, weight in cfg.loss.weights().items():
        if weight < 0:
            raise ConfigError(f"{LossConfig.KEYS[term]}: weight must be >= 0, got {weight}")
    if sum(cfg.loss.weights().values()) <= 0:
        raise ConfigError("loss: every term has weight 0; nothing would be trained")
    if cfg.loss.diffusion.snr_gamma is not None and cfg.loss.diffusion.snr_gamma <= 0:
        raise ConfigError("loss.diffusion.snr_gamma: must be > 0 or null")
    positive = {
        "train.batch_size": cfg.train.batch_size,
        "train.total_batch_size": cfg.train.total_batch_size,
        "train.max_steps": cfg.train.max_steps,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.validate_every": cfg.train.validate_every,
        "data.resolution": cfg.data.resolution,
        "model.lora_rank": cfg.model.lora_rank,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if cfg.train.total_batch_size % cfg.train.batch_size:
        raise ConfigError(
            f"train.total_batch_size: {cfg.train.total_batch_size} is not divisible by "
            f"train.batch_size {cfg.train.batch_size}"
        )
    if cfg.data.resolution % 8:
        raise ConfigError(f"data.resolution: must be a multiple of 8, got {cfg.data.resolution}")
    for key in ("data.condition_dropout", "data.caption_dropout", "prepare.val_fraction"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {value}")
    if cfg.train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate: must be > 0, got {cfg.train.learning_rate}")
    if not 0 < cfg.loss.pixel.max_timestep <= 1000:
        raise ConfigError("loss.pixel.max_timestep: must be in (0, 1000]")
    if cfg.loss.pixel.start_step < 0:
        raise ConfigError(f"loss.pixel.start_step: {cfg.loss.pixel.start_step}, must be >= 0")
    _check_first_steps_train(cfg.loss)
    if cfg.loss.pixel.balance is not None and not cfg.loss.pixel.balance > 0:
        raise ConfigError(f"loss.pixel.balance: {cfg.loss.pixel.balance}, must be > 0 or null")
    n = cfg.loss.pixel.samples_per_batch
    if n is not None and not 0 < n <= cfg.train.batch_size:
        raise ConfigError(
            f"loss.pixel.samples_per_batch: must be in [1, train.batch_size], got {n}"
        )
    chunk = cfg.loss.pixel.chunk_size
    if chunk is not None and chunk < 1:
        raise ConfigError(f"loss.pixel.chunk_size: must be >= 1 or null, got {chunk}")
    if cfg.loss.lpips.space == "latent" and cfg.model.decoder != "vae":
        raise ConfigError(
            "loss.lpips.space: latent reads the SD VAE decoder's features; "
            f"model.decoder is {cfg.model.decoder!r} (set it to vae)"
        )
    if cfg.train.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(
            f"train.lr_scheduler: {cfg.train.lr_scheduler!r} is not one of "
            f"{', '.join(LR_SCHEDULERS)}"
        )
    limit = cfg.train.checkpoints_total_limit
    if limit is not None and limit < 1:
        raise ConfigError(f"train.checkpoints_total_limit: must be >= 1 or null, got {limit}")
    if cfg.train.resume not in (None, "latest") and not Path(cfg.train.resume).is_dir():
        raise ConfigError(
            f"train.resume: {cfg.train.resume} is not 'latest' or a checkpoint folder"
        )


def _check_first_steps_train(loss: LossConfig) -> None:
    """Every optimizer step needs at least one active term: the pixel and emotion terms wait
    for ``loss.pixel.start_step``, so with the diffusion term off the steps before it would
    have nothing to backpropagate (a crash at step 0, not a slow start)."""
    start = loss.pixel.start_step
    if loss.diffusion.weight == 0 and start > 0:
        raise ConfigError(
            f"loss.diffusion.weight is 0 and loss.pixel.start_step is {start}: steps 0-{start - 1} "
            "would have no active loss term; give loss.diffusion.weight a weight > 0 "
            "or set loss.pixel.start_step=0"
        )


def gradient_accumulation_steps(cfg: Config, num_processes: int) -> int:
    """total_batch_size / (batch_size * processes), refusing a total that does not divide."""
    per_step = cfg.train.batch_size * num_processes
    if cfg.train.total_batch_size % per_step:
        raise ConfigError(
            f"train.total_batch_size: {cfg.train.total_batch_size} is not divisible by "
            f"batch_size {cfg.train.batch_size} x {num_processes} processes"
        )
    return cfg.train.total_batch_size // per_step
