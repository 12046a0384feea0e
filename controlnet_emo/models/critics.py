"""Frozen critics for the pixel-space losses: LPIPS and the latent decoder.

Everything here is loaded offline and frozen. Nothing downloads: a missing file is an error
that names the file and where to put it, because a training job that silently fetches (or
silently falls back to random weights) wastes the run. EmoNet lives in ``models/emonet.py``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

TAESD_HUB_ID = "madebyollin/taesd"

Checkpointing = Literal["none", "blocks"]


# ---------------------------------------------------------------------------------------------
# LPIPS


def _backbone_weights(net: str):
    """torchvision's weight entry for the LPIPS trunk: it names the file and its URL."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    table = {"vgg": VGG16_Weights.IMAGENET1K_V1, "alex": AlexNet_Weights.IMAGENET1K_V1}
    if net not in table:
        raise ValueError(f"LPIPS net {net!r}: expected one of {', '.join(table)}")
    return table[net]


def lpips_backbone_file(net: str) -> Path:
    """Where torchvision keeps the LPIPS trunk (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    url = _backbone_weights(net).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def missing_lpips_message(net: str) -> str:
    """Where the LPIPS trunk comes from (the loader and ``controlnet-emo doctor`` say it)."""
    path, url = lpips_backbone_file(net), _backbone_weights(net).url
    return (
        f"LPIPS-{net} needs its torchvision trunk {path.name}, which is not in "
        f"torchvision's cache ({path.parent}). Fetch it on a machine with network "
        f"({url}) and put it at {path} (set TORCH_HOME to move the cache), or set "
        f"model.lpips_backbone to the file's path."
    )


def load_lpips(net: str, backbone: str):
    """LPIPS (``lpips`` package) with its trunk from torchvision's cache, a file, or random.

    The package's own linear heads ship in its wheel; only the ImageNet trunk is external.
    We always build the trunk random (``pnet_rand=True``, which never downloads) and then load
    the trunk weights ourselves, so 'pretrained' and a path take the same offline code path.
    Returns a frozen, eval-mode ``lpips.LPIPS`` that takes two (B,3,H,W) images in [-1,1].
    """
    import lpips

    if backbone == "pretrained":
        path = lpips_backbone_file(net)
        if not path.is_file():
            raise FileNotFoundError(missing_lpips_message(net))
    elif backbone == "random":
        path = None
    else:
        path = Path(backbone)
        if not path.is_file():
            raise FileNotFoundError(f"model.lpips_backbone: {backbone} is not a file")

    with warnings.catch_warnings():  # torchvision's 'pretrained=' deprecation, lpips' prints
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if path is None:
        logger.warning(
            "LPIPS-%s has a RANDOM trunk (model.lpips_backbone=random): the LPIPS loss is "
            "meaningless; use this for tests only.",
            net,
        )
    else:
        _load_trunk(model.net, path)
    model.requires_grad_(False)
    return model.eval()


def _load_trunk(trunk: nn.Module, path: Path) -> None:
    """Copy a torchvision state dict (``features.<i>.*``) into lpips' ``slice<k>.<i>.*``.

    lpips keeps torchvision's layer index as the module name inside each slice, so the map is
    a rename; every trunk parameter must be found, or the file is the wrong network.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    wanted = trunk.state_dict()
    loaded = {}
    for key, ref in wanted.items():
        source = "features." + key.split(".", 1)[1]  # slice3.6.weight -> features.6.weight
        tensor = state.get(source)
        if tensor is None or tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(
                f"{path}: not a torchvision {type(trunk).__name__} state dict "
                f"({source} missing or of the wrong shape)"
            )
        loaded[key] = tensor
    trunk.load_state_dict(loaded, strict=True)


# ---------------------------------------------------------------------------------------------
# Decoder


class LatentDecoder(nn.Module):
    """Decode *scaled* latents (what the UNet sees) into (B,3,H,W) images in about [-1,1].

    Unscaling uses the autoencoder's own config (``z / scaling_factor + shift_factor``), never
    a hard-coded 0.18215: the SD VAE has 0.18215, SD2/SDXL-family VAEs others, TAESD works on
    the already-scaled latents (its scaling_factor is 1.0), and some VAEs add a shift.

    ``decodes_reference`` says how the loss should get its target image: TAESD's output has its
    own colour and detail bias, so its prediction is compared with TAESD's decoding of the real
    latent (the bias cancels); the SD VAE reconstructs closely enough to compare with the
    real image, as the research recipe does.

    Checkpointing: ``set_checkpointing('blocks')`` turns on the autoencoder's own gradient
    checkpointing, which ``vae.decode`` honours in diffusers 0.42 (the SD VAE's Decoder.forward
    checkpoints mid_block and each up_block when grad is enabled; TAESD's DecoderTiny wraps its
    whole layer stack in one checkpoint). ``PixelLosses`` adds a per-sample checkpoint around
    decoder + critics on top (its 'full' mode).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        decodes_reference: bool,
        checkpointing: Checkpointing = "blocks",
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.decodes_reference = decodes_reference
        config = autoencoder.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.set_checkpointing(checkpointing)

    @property
    def checkpoints_per_block(self) -> bool:
        """False for TAESD, whose own checkpoint spans the whole decoder."""
        from diffusers import AutoencoderTiny

        return not isinstance(self.autoencoder, AutoencoderTiny)

    def set_checkpointing(self, mode: Checkpointing) -> None:
        """'blocks': the autoencoder's own checkpointing on; 'none': off.

        On the shared SD VAE the flag also reaches the encoder, which the training loop only
        runs under no_grad, where diffusers skips checkpointing.
        """
        if mode not in ("none", "blocks"):
            raise ValueError(f"decoder checkpointing {mode!r}: expected none or blocks")
        if mode == "blocks":
            self.autoencoder.enable_gradient_checkpointing()
        elif self.autoencoder.is_gradient_checkpointing:
            self.autoencoder.disable_gradient_checkpointing()
        self.checkpointing = mode

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) scaled latents -> (B,3,8h,8w) images, differentiable w.r.t. the latents."""
        param = next(self.autoencoder.parameters())
        z = latents / self.scaling_factor + self.shift_factor
        z = z.to(param.dtype)  # decode in the training precision the loop cast the VAE to
        # In that dtype end to end, even under a caller's autocast, which would run each
        # GroupNorm in fp32 and cast every activation both ways (the trainer calls it without).
        with torch.autocast(z.device.type, enabled=False):
            return self.autoencoder.decode(z).sample


def load_decoder(
    spec: str, vae: nn.Module, checkpointing: Checkpointing = "blocks"
) -> LatentDecoder:
    """The pixel-loss decoder: 'vae' (the SD VAE itself), 'taesd' (hub cache) or a TAESD folder.

    'taesd' is read from the Hugging Face cache only (``local_files_only``): a decoder for a
    loss term must not be fetched halfway into a job, so a missing one is a clear error.
    """
    if spec == "vae":
        return LatentDecoder(vae, decodes_reference=False, checkpointing=checkpointing)

    if spec == "taesd":
        try:
            tiny = _from_pretrained_tiny(TAESD_HUB_ID, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(missing_taesd_message(err)) from err
    else:
        if not Path(spec).is_dir():
            raise FileNotFoundError(
                f"model.decoder: {spec!r} is not 'vae', 'taesd' or an AutoencoderTiny folder"
            )
        tiny = _from_pretrained_tiny(spec)
    _check_latent_channels(tiny, vae, spec)
    tiny.requires_grad_(False)
    param = next(vae.parameters())
    tiny.to(param.device, param.dtype)
    return LatentDecoder(tiny.eval(), decodes_reference=True, checkpointing=checkpointing)


def missing_taesd_message(err: Exception | str | None = None) -> str:
    """How to get TAESD onto an offline machine (the loader and ``controlnet-emo doctor``)."""
    return (
        f"model.decoder=taesd: {TAESD_HUB_ID} is not in the Hugging Face cache. "
        f"Fetch it on a machine with network (`huggingface-cli download {TAESD_HUB_ID}`)"
        f" or set model.decoder to a local AutoencoderTiny folder." + (f" ({err})" if err else "")
    )


def _from_pretrained_tiny(name: str, **kwargs) -> nn.Module:
    from diffusers import AutoencoderTiny

    with warnings.catch_warnings():  # diffusers passes a deprecated hub argument
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return AutoencoderTiny.from_pretrained(name, **kwargs)


def _check_latent_channels(tiny: nn.Module, vae: nn.Module, spec: str) -> None:
    ours, theirs = tiny.config.latent_channels, vae.config.latent_channels
    if ours != theirs:
        raise ValueError(
            f"model.decoder={spec}: it decodes {ours}-channel latents but the base model's "
            f"VAE makes {theirs}-channel ones (use the TAESD made for this base model)"
        )
