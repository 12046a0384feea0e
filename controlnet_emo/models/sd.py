"""Load the Stable Diffusion parts we train beside: from a hub id, a folder or a single file.

Two families: ``sd`` (SD 1.x / 2.x: one CLIP text encoder) and ``sdxl`` (two text encoders
and added conditions), told apart by the UNet's config (``addition_embed_type ==
"text_time"``), never by the model's name. ``tiny`` and ``tiny-xl`` are not special-cased past
this module's first lines: each is built once into a local folder and then loaded exactly like
a user's diffusers folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from controlnet_emo.models.shipped import shipped_path
from controlnet_emo.models.text_cache import text_encoders_of, tokenizers_of
from controlnet_emo.models.tiny import build_tiny_sd, build_tiny_sdxl

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL"}
TINY = {"tiny": ("tiny-sd-v1", build_tiny_sd), "tiny-xl": ("tiny-sdxl-v1", build_tiny_sdxl)}
# Pipelines with a transformer where SD has a UNet: their ControlNets are other models.
_TRANSFORMER_PIPELINES = ("StableDiffusion3", "Flux", "PixArt", "Sana", "AuraFlow", "HunyuanDiT")


class ModelLoadError(RuntimeError):
    """A base model that cannot be found or read; the message says what to do."""


@dataclass
class SDComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    source: str
    """What the user asked for (hub id / path / 'tiny'); written into exports' metadata."""
    family: str = "sd"
    """'sd' or 'sdxl' (``FAMILIES``), read from the UNet's config."""
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    """SDXL's second (OpenCLIP bigG, projected) tokenizer and text encoder; None for SD."""

    @property
    def tokenizers(self) -> list:
        """Every tokenizer the UNet's text conditioning needs, in the pipeline's order."""
        return tokenizers_of(self)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """Every frozen text encoder, in the order of ``tokenizers``."""
        return text_encoders_of(self)


def unet_family(unet_config: object) -> str:
    """'sdxl' when the UNet takes SDXL's added text/time embeddings, else 'sd'."""
    get = unet_config.get if isinstance(unet_config, dict) else unet_config.__dict__.get
    return "sdxl" if get("addition_embed_type") == "text_time" else "sd"


def unsupported_family_message(spec: str, what: str) -> str:
    """One line naming the supported families, for a base whose ControlNet is another model."""
    names = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
    return f"{spec}: {what} is not supported; model.pretrained must be one of: {names}"


def tiny_sd_folder(cache_dir: str | Path | None = None, name: str = "tiny") -> Path:
    """Where a tiny random base ('tiny': SD, 'tiny-xl': SDXL) lives; built on first use
    (deterministic, seed 0)."""
    subfolder, build = TINY[name]
    root = Path(cache_dir or os.environ.get("CONTROLNET_EMO_CACHE", "~/.cache/controlnet-emo"))
    folder = root.expanduser() / subfolder
    if not (folder / "model_index.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        # the builders seed the global RNG: a run that builds it first must not start from
        # another ControlNet init than its resume, which finds it built (exact resume)
        with torch.random.fork_rng(devices=[]):
            build(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_pretrained(spec: str) -> str:
    """'tiny' / 'tiny-xl' -> its local folder, a shipped name (models/shipped.py) -> its
    folder; anything else unchanged."""
    if spec in TINY:
        return str(tiny_sd_folder(name=spec))
    shipped = shipped_path(spec)
    return str(shipped) if shipped is not None else spec


def load_sd(spec: str, revision: str | None = None, variant: str | None = None) -> SDComponents:
    """Load tokenizer(s), text encoder(s), VAE, UNet and the training noise scheduler of an
    SD or SDXL base; an SD3 / FLUX base is a ModelLoadError naming the supported families."""
    path = resolve_pretrained(spec)
    try:
        if path.endswith(SINGLE_FILE_SUFFIXES):
            parts = _load_single_file(spec, path)
        else:
            parts = _load_folder_or_hub(spec, path, revision, variant)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(missing_model_message(spec, err)) from err
    return SDComponents(source=spec, family=unet_family(parts["unet"].config), **parts)


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell: 8 for SD's VAE, 4 for the demo base's (diffusers' rule)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _load_single_file(spec: str, path: str) -> dict:
    """An original-layout checkpoint; its keys say the family (SDXL's second text encoder
    sits under ``conditioner.embedders.1``), then diffusers' own single-file loader reads it."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if not Path(path).is_file():
        raise ModelLoadError(f"{path}: single-file checkpoint not found")
    family = single_file_family(spec, path)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_single_file(path, add_watermarker=False)
        extra = dict(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)
    else:
        pipe = StableDiffusionPipeline.from_single_file(path, safety_checker=None)
        extra = {}
    return dict(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        **extra,
    )


def single_file_family(spec: str, path: str) -> str:
    """'sd' or 'sdxl' from a single file's key names (a .ckpt is taken as SD: reading its
    keys means unpickling the whole file)."""
    if not path.endswith(".safetensors"):
        return "sd"
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "sd"
    raise ModelLoadError(
        unsupported_family_message(spec, "a single file with no SD / SDXL UNet keys")
    )


def check_pipeline_family(spec: str, path: str, revision: str | None = None) -> None:
    """Refuse an SD3 / FLUX-style pipeline (a ``transformer/`` where SD has ``unet/``) before
    any weights load; the loader and ``controlnet-emo doctor`` say the same."""
    from diffusers import DiffusionPipeline

    folder = Path(path)
    if folder.is_dir() and not (folder / "model_index.json").is_file():
        index = {p.name: None for p in folder.iterdir() if p.is_dir()}  # parts, by folder
    else:
        index = dict(DiffusionPipeline.load_config(path, revision=revision))
    name = str(index.get("_class_name", ""))
    if "transformer" in index or name.startswith(_TRANSFORMER_PIPELINES) or "unet" not in index:
        raise ModelLoadError(unsupported_family_message(spec, f"a {name or 'pipeline'} (no UNet)"))


def _load_folder_or_hub(spec: str, path: str, revision: str | None, variant: str | None) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_pipeline_family(spec, path, revision)
    # fp32 whatever the files hold: the trainer casts frozen parts itself, and a ControlNet
    # made by ControlNetModel.from_unet copies the UNet's dtype (an fp16 folder such as the
    # shipped demo base would otherwise give an fp16 ControlNet to train).
    kw = dict(revision=revision)
    mw = dict(kw, variant=variant, torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **mw)
    parts = dict(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=torch.float32, **kw
        ),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **mw),
        unet=unet,
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
    )
    if unet_family(unet.config) == "sdxl":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", dtype=torch.float32, **kw
        )
    return parts


def vae_dtype(sd: SDComponents, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the frozen VAE runs in: the training's weight dtype, except SDXL's VAE in
    fp16, which overflows (NaN latents and images): fp32 then, unless the VAE says it is an
    fp16-fixed one (``force_upcast: false``), as diffusers' SDXL pipelines decide."""
    upcast = getattr(sd.vae.config, "force_upcast", True)
    if sd.family == "sdxl" and weight_dtype == torch.float16 and upcast:
        return torch.float32
    return weight_dtype


def looks_like_path(spec: str) -> bool:
    """'/x', './x', '~/x', 'C:\\x', 'a/b/c' are paths; a hub id is 'org/name' or 'name'."""
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def missing_model_message(spec: str, err: Exception | str | None = None) -> str:
    """What to do about a base model that cannot be read: a missing local path is a path, a
    hub id is a cache miss with its download command. ``err`` (the loader's error, or what
    ``controlnet-emo doctor`` found) is appended; the loader and the doctor say the same."""
    if isinstance(err, Exception):
        err = f"{type(err).__name__}: {str(err)[:200]}"
    if Path(spec).exists():
        return f"{spec}: not a readable Stable Diffusion folder or file ({err})"
    if looks_like_path(spec):
        return f"{spec}: no such file or folder (model.pretrained names a local path)"
    return (
        f"base model {spec!r} is not a local folder and is not in the Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}). Fetch it on a machine with "
        f"network (`huggingface-cli download {spec}`) or set model.pretrained to a local "
        f"diffusers folder or .safetensors file." + (f" ({err})" if err else "")
    )
