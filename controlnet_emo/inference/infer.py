"""Faces from FLAME renders: diffusers' ``StableDiffusionControlNetPipeline`` underneath.

Why diffusers: with ``map_guidance`` off, what ``controlnet-emo infer`` draws is what a diffusers
user gets from the same base, ControlNet, scheduler and seed (tested: bit for bit with the nets
in channels_last, the layout ``load_pipeline`` runs them in for speed; within one 8-bit level in
PyTorch's default layout), so results can be reproduced without this package. With it on (the default), the pipeline's
unconditional branch sees zeroed maps (``models/pipeline.py``: one overridden method). What we add
is the bookkeeping a 9-channel ControlNet needs: the maps are put in the order the model's
sidecar records (never the command-line order), resized the way training resized them, and
missing maps are zeros (what condition dropout trained for).

A stacked net gets one prepared (1, 3N, H, W) tensor in [0, 1]. diffusers' control image
processor leaves it alone (``do_normalize=False``; resize to the same size is the identity),
and with classifier-free guidance the pipeline duplicates it itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from controlnet_emo.atomic import atomic_write
from controlnet_emo.data.dataset import load_rgb as _load_training_map
from controlnet_emo.data.transforms import resize_center_crop
from controlnet_emo.export.model_info import (
    ExportError,
    ModelInfo,
    dtype_kwargs,
    load_controlnets,
    read_model_info,
)
from controlnet_emo.models.fast_paths import use_fast_paths
from controlnet_emo.models.sampling import SCHEDULERS, Sampling, SamplingError, sample
from controlnet_emo.pictures import Panel, labelled_grid, to_pil

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class InferenceError(ValueError):
    """A bad input to inference, as one line naming the file and what is wrong."""


# ---------------------------------------------------------------------------------------------
# Pipeline


def load_pipeline(
    model: str | Path,
    sampling: Sampling | None = None,
    base: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, ModelInfo]:
    """A diffusers ControlNet pipeline for a run folder, an exported ControlNet folder or one
    of our single files (its embedded metadata says the conditions and the base).

    ``sampling`` sets the pipeline's sampler and its guidance over the maps
    (``models/pipeline.py``; off is stock diffusers); the rest of it applies per call.

    The base comes from the run (config.yaml / sidecar / metadata) unless ``base`` overrides it. A tuned
    UNet saved with the run (``unet/`` or ``unet_lora/``) is loaded on top of the base.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from controlnet_emo.models.controlnet import controlnet_family
    from controlnet_emo.models.pipeline import PIPELINES
    from controlnet_emo.models.sd import SINGLE_FILE_SUFFIXES, resolve_pretrained

    sampling = sampling or Sampling()
    info = model_info(model)
    check_sampling(sampling, info)  # a typo fails before any model loads
    base = base or info.base_model
    if not base:
        raise InferenceError(f"{model}: no base model recorded with this ControlNet; pass --base")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    nets = _load_nets(model, info, dtype)
    controlnet = MultiControlNetModel(nets) if info.mode == "multi" else nets[0]
    # the net says its family (SDXL's takes added embeddings), and so which pipeline drives it
    family = controlnet_family(controlnet)
    pipeline_cls = PIPELINES[family]
    kwargs: dict[str, Any] = dict(controlnet=controlnet, **dtype_kwargs(dtype))
    if family == "sdxl":
        # its VAE overflows in fp16: diffusers' SDXL pipelines decode in fp32 (force_upcast)
        kwargs.update(add_watermarker=False)
    else:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if info.unet is not None:
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(info.unet, **dtype_kwargs(dtype))
    path = resolve_pretrained(base)
    try:
        if path.endswith(SINGLE_FILE_SUFFIXES):
            pipe = pipeline_cls.from_single_file(path, **kwargs)
        else:
            pipe = pipeline_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise InferenceError(
            f"base model {base!r}: cannot be loaded ({_first_line(err)})"
        ) from None
    if info.unet_lora is not None:
        pipe.load_lora_weights(str(info.unet_lora))
    set_scheduler(pipe, sampling.scheduler)
    pipe.map_guidance = sampling.map_guidance
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    use_fast_paths(pipe.device, pipe.unet, pipe.controlnet, pipe.vae)
    return pipe, info


def model_info(model: str | Path) -> ModelInfo:
    """read_model_info (a single file: its metadata), with its errors as InferenceError."""
    from controlnet_emo.export.formats import read_single_file

    try:
        if Path(model).is_file():
            return read_single_file(model)[0]
        return read_model_info(model)
    except ExportError as err:
        raise InferenceError(str(err)) from None


def _load_nets(model: str | Path, info: ModelInfo, dtype: torch.dtype | None) -> list[Any]:
    """The ControlNet(s) of a folder, or the one net of a single file (hash checked)."""
    from controlnet_emo.export.formats import load_single_file

    try:
        if Path(model).is_file():
            return [load_single_file(model, dtype)]
        return load_controlnets(info, dtype)
    except ExportError as err:
        raise InferenceError(str(err)) from None


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the sampler, keeping the base's noise schedule (``from_config``)."""
    import diffusers

    if name not in SCHEDULERS:
        raise InferenceError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    if SCHEDULERS[name] is not None:
        cls = getattr(diffusers, SCHEDULERS[name])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


# ---------------------------------------------------------------------------------------------
# Condition maps


def load_condition_maps(
    info: ModelInfo,
    size: int,
    flame: str | Path | None = None,
    depth: str | Path | None = None,
    skeleton: str | Path | None = None,
    reference: str | Path | None = None,
) -> torch.Tensor:
    """(3N, size, size) in [0, 1], in the model's condition order; a missing map is zeros.

    ``reference``: a photo from which the depth and skeleton maps the model needs (and that
    were not given) are derived with the same conditioners that prepared the training data.
    """
    given = {"flame": flame, "depth": depth, "skeleton": skeleton}
    for name, path in given.items():
        if path is not None and name not in info.conditions:
            raise InferenceError(
                f"{path}: this model has no {name!r} condition (it was trained on "
                f"{', '.join(info.conditions)})"
            )
    maps = {name: load_map(path, size) for name, path in given.items() if path is not None}
    if reference is not None:
        need = [c for c in ("depth", "skeleton") if c in info.conditions and c not in maps]
        maps.update(reference_maps(reference, size, need, info.depth_model))
    if not maps:
        raise InferenceError(
            "no condition map given (pass --flame, --depth, --skeleton or --reference)"
        )
    _warn_on_aspect_mismatch({n: p for n, p in given.items() if p is not None})
    zeros = torch.zeros(3, size, size)
    return torch.cat([maps.get(name, zeros) for name in info.conditions])  # (3N,H,W)


def load_map(path: str | Path, size: int) -> torch.Tensor:
    """One map file -> (3, size, size) in [0, 1], read and resized exactly as training does.

    Grey, 16-bit, palette and RGBA files are converted (grey replicated to RGB, alpha
    dropped); any size is resized (shortest side, antialiased bilinear) and centre-cropped.
    """
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"{path}: no such file")
    if path.is_dir():
        raise InferenceError(f"{path}: is a folder, expected an image file")
    try:
        img = _load_training_map(path)  # (3,H,W) in [0,1]
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError is OSError
        raise InferenceError(f"{path}: not a readable image ({_first_line(err)})") from None
    return resize_center_crop(img, size).contiguous()


def reference_maps(
    reference: str | Path, size: int, need: list[str], depth_model: str
) -> dict[str, torch.Tensor]:
    """Depth / skeleton maps derived from a photo (conditioners imported only when asked)."""
    if not need:
        return {}
    from conditioners.io import ImageError, load_rgb

    try:
        photo, _ = load_rgb(reference)  # (H,W,3) uint8
    except ImageError as err:
        raise InferenceError(f"{reference}: {err}") from None
    out: dict[str, torch.Tensor] = {}
    if "depth" in need:
        from conditioners.depth import DepthConditioner

        try:
            depth = DepthConditioner(depth_model)([photo])[0]  # (H,W) in [0,1]
        except OSError as err:
            raise InferenceError(f"{reference}: depth model: {_first_line(err)}") from None
        out["depth"] = torch.from_numpy(np.asarray(depth, np.float32))[None].repeat(3, 1, 1)
    if "skeleton" in need:
        from conditioners.skeleton import SkeletonConditioner

        try:
            drawn = SkeletonConditioner()(photo)  # (H,W,3) uint8
        except (OSError, ValueError) as err:
            raise InferenceError(f"{reference}: skeleton: {_first_line(err)}") from None
        out["skeleton"] = torch.from_numpy(np.ascontiguousarray(drawn)).permute(2, 0, 1) / 255.0
    return {k: resize_center_crop(v.float().clamp(0, 1), size) for k, v in out.items()}


def _warn_on_aspect_mismatch(paths: dict[str, str | Path]) -> None:
    ratios = {}
    for name, path in paths.items():
        with Image.open(path) as im:
            ratios[name] = im.width / im.height
    if ratios and max(ratios.values()) - min(ratios.values()) > 0.01:
        log.warning(
            "condition maps differ in aspect ratio (%s): their centre crops will not line up",
            ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
        )


# ---------------------------------------------------------------------------------------------
# Generation


def generate(
    pipe: Any, info: ModelInfo, maps: torch.Tensor, prompt: str, s: Sampling
) -> Image.Image:
    """One image from prepared maps (3N, H, W), drawn by the shared sampling path."""
    want = 3 * len(info.conditions)
    if maps.ndim != 3 or maps.shape[0] != want:
        raise InferenceError(
            f"maps have shape {tuple(maps.shape)}; this model needs ({want}, H, W)"
        )
    check_sampling(s, info)
    face = sample(pipe, info.conditions, info.mode, maps[None], [prompt], [s.seed], s)[0]
    return to_pil(face)


def check_sampling(s: Sampling, info: ModelInfo) -> None:
    """Sampling.check, with its errors as InferenceError (one line, exit 2)."""
    try:
        s.check(info.conditions)
    except SamplingError as err:
        raise InferenceError(str(err)) from None


def save_png(image: Image.Image, path: str | Path, settings: dict[str, Any]) -> Path:
    """Save as PNG with the settings in text chunks (one per key, a JSON one, and A1111's)."""
    path = Path(path)
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("controlnet_emo", json.dumps(settings, default=str))
    info.add_text("parameters", _a1111_parameters(settings, image.size))
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def _a1111_parameters(s: dict[str, Any], size: tuple[int, int]) -> str:
    """The ``parameters`` chunk A1111 and many image browsers show."""
    lines = [str(s.get("prompt", ""))]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    fields = {
        "Steps": s.get("steps"),
        "Sampler": s.get("scheduler"),
        "CFG scale": s.get("guidance_scale"),
        "Map guidance": s.get("map_guidance"),
        "Seed": s.get("seed"),
        "Size": f"{size[0]}x{size[1]}",
        "Model": s.get("base"),
        "ControlNet": s.get("model"),
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def condition_sheet(info: ModelInfo, maps: torch.Tensor, image: Image.Image) -> Image.Image:
    """conditions | result, side by side, each panel labelled and shown at a readable size."""
    panels = [Panel(maps[3 * i : 3 * i + 3], [name]) for i, name in enumerate(info.conditions)]
    return labelled_grid([[*panels, Panel(image, ["result"])]])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# The ``infer`` entry point


def infer(
    model: str | Path,
    flame: str | Path,
    prompt: str,
    out: str | Path,
    sampling: Sampling | None = None,
    *,
    depth: str | Path | None = None,
    skeleton: str | Path | None = None,
    reference: str | Path | None = None,
    depth_model: str | None = None,
    base: str | None = None,
    resolution: int | None = None,
    sheet: bool = False,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Generate one image (``flame`` a file) or one per file (``flame`` a folder).

    Folder mode: ``depth`` / ``skeleton`` / ``reference`` are folders too, matched by file
    stem; every image uses the same seed, so differences come from the conditions alone.
    Every input is checked before the model loads: a bad file fails in the first second.
    """
    from tqdm.auto import tqdm

    s = sampling or Sampling()
    info = model_info(model)
    info.depth_model = depth_model or info.depth_model
    size = resolution or info.resolution
    jobs = _jobs(Path(flame), Path(out), depth, skeleton, reference)
    check_sampling(s, info)
    prepared = [(dst, load_condition_maps(info, size, **src)) for dst, src in jobs]
    pipe, info = load_pipeline(model, s, base, device, dtype)
    settings = {
        "prompt": prompt,
        **s.record(),
        "model": str(model),
        "base": base or info.base_model,
        "conditions": info.conditions,
        "resolution": size,
        "software": "controlnet-emo",
    }
    written = []
    for (dst, maps), (_, src) in tqdm(
        list(zip(prepared, jobs, strict=True)), desc="infer", unit="img", disable=len(prepared) == 1
    ):
        image = generate(pipe, info, maps, prompt, s)
        inputs = {k: str(v) for k, v in src.items() if v is not None}
        written.append(save_png(image, dst, {**settings, "inputs": inputs}))
        if sheet:
            sheet_path = dst.with_name(f"{dst.stem}_sheet.png")
            written.append(
                save_png(
                    condition_sheet(info, maps, image), sheet_path, {**settings, "inputs": inputs}
                )
            )
    return written


def _jobs(
    flame: Path, out: Path, depth: Any, skeleton: Any, reference: Any
) -> list[tuple[Path, dict[str, Path | None]]]:
    """(output path, map paths) per image, checking that every file exists."""
    extra = {"depth": depth, "skeleton": skeleton, "reference": reference}
    if not flame.exists():
        raise InferenceError(f"{flame}: no such file or folder")
    if flame.is_file():
        for name, path in extra.items():
            if path is not None and Path(path).is_dir():
                raise InferenceError(f"{path}: --{name} is a folder but --flame is one file")
        dst = out / f"{flame.stem}.png" if out.is_dir() else out
        return [(dst, {"flame": flame, **{k: _opt(v) for k, v in extra.items()}})]
    if out.exists() and not out.is_dir():
        raise InferenceError(f"{out}: --flame is a folder, so --out must be a folder")
    files = sorted(
        p
        for p in flame.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise InferenceError(f"{flame}: no images in this folder")
    folders = {k: Path(v) for k, v in extra.items() if v is not None}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise InferenceError(f"{folder}: --{name} must be a folder when --flame is one")
    jobs = []
    for f in files:
        src: dict[str, Path | None] = {
            "flame": f,
            "depth": None,
            "skeleton": None,
            "reference": None,
        }
        for name, folder in folders.items():
            src[name] = _match_stem(folder, f.stem, name)
        jobs.append((out / f"{f.stem}.png", src))
    return jobs


def _match_stem(folder: Path, stem: str, name: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise InferenceError(f"{folder}: no {name} image named {stem}.* to pair with the FLAME render")


def _opt(path: Any) -> Path | None:
    return Path(path) if path is not None else None
