"""Load the Stable Diffusion parts we train beside: from a hub id, a folder or a single file.

``tiny`` is not special-cased past this module's first lines: it is built once into a local
folder and then loaded exactly like a user's diffusers folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from controlnet_emo.models.shipped import shipped_path
from controlnet_emo.models.tiny import build_tiny_sd

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


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


def tiny_sd_folder(cache_dir: str | Path | None = None) -> Path:
    """Where the tiny random SD lives; built on first use (deterministic, seed 0)."""
    root = Path(cache_dir or os.environ.get("CONTROLNET_EMO_CACHE", "~/.cache/controlnet-emo"))
    folder = root.expanduser() / "tiny-sd-v1"
    if not (folder / "model_index.json").is_file():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        # build_tiny_sd seeds the global RNG: a run that builds it first must not start from
        # another ControlNet init than its resume, which finds it built (exact resume)
        with torch.random.fork_rng(devices=[]):
            build_tiny_sd(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_pretrained(spec: str) -> str:
    """'tiny' -> its local folder, a shipped name (models/shipped.py) -> its folder; anything
    else unchanged."""
    if spec == "tiny":
        return str(tiny_sd_folder())
    shipped = shipped_path(spec)
    return str(shipped) if shipped is not None else spec


def load_sd(spec: str, revision: str | None = None, variant: str | None = None) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    path = resolve_pretrained(spec)
    try:
        if path.endswith(SINGLE_FILE_SUFFIXES):
            if not Path(path).is_file():
                raise ModelLoadError(f"{path}: single-file checkpoint not found")
            pipe = StableDiffusionPipeline.from_single_file(path, safety_checker=None)
            parts = dict(
                tokenizer=pipe.tokenizer,
                text_encoder=pipe.text_encoder,
                vae=pipe.vae,
                unet=pipe.unet,
                scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            )
        else:
            parts = _load_folder_or_hub(path, revision, variant)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(missing_model_message(spec, err)) from err
    return SDComponents(source=spec, **parts)


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent cell: 8 for SD's VAE, 4 for the demo base's (diffusers' rule)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _load_folder_or_hub(path: str, revision: str | None, variant: str | None) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # fp32 whatever the files hold: the trainer casts frozen parts itself, and a ControlNet
    # made by ControlNetModel.from_unet copies the UNet's dtype (an fp16 folder such as the
    # shipped demo base would otherwise give an fp16 ControlNet to train).
    kw = dict(revision=revision)
    mw = dict(kw, variant=variant, torch_dtype=torch.float32)
    return dict(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=torch.float32, **kw
        ),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **mw),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **mw),
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
    )


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
