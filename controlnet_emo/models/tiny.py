"""Tiny random Stable Diffusion (SD 1.x and SDXL), built in code, for the demo and the tests.

It is saved as an ordinary diffusers pipeline folder and loaded back through the same
``load_sd`` path as a hub id, so tests exercise the real loading code. The VAE keeps SD's
8x downsampling because the ControlNet's hint encoder downsamples by 8 (FACTS.md).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Words the synthetic captions and prompts use; each becomes one BPE token.
_WORDS = (
    "a an the of photo close-up face portrait woman man person looking left right slightly "
    "neutral happy sad surprise surprised fear fearful disgust disgusted anger angry contempt "
    "smiling frowning open mouth eyes wide raised brows calm excited head tilted young old"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_tokenizer(folder: Path, words: tuple[str, ...] | list[str] = _WORDS) -> None:
    """A byte-level CLIP BPE vocabulary with whole-word merges for ``words``.

    Built offline from a vocab.json and merges.txt, as FACTS.md describes; every byte is in
    the vocabulary, so any text tokenizes (unknown words fall back to characters). The demo
    base passes every word its captions use, so each becomes one token.
    """
    chars = _byte_alphabet()
    vocab_tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab_tokens:
                vocab_tokens.append(pieces[0])
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def sd_training_scheduler():
    """SD 1.x's noise schedule (scaled-linear betas 0.00085..0.012, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def tiny_vae(**config):
    """The tiny VAE both tiny pipelines share: SD's 8x downsampling and 4 latent channels at
    test size; ``config`` adds to it (SDXL's scaling factor and fp32 upcast)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=128,
        **config,
    )


@contextmanager
def tokenizer_source(folder: Path) -> Iterator[Path]:
    """A scratch folder inside ``folder`` with the tiny tokenizer's files, removed once the
    pipeline (which saves its own copy) is written."""
    tok_dir = folder / "_tokenizer_src"
    write_tiny_tokenizer(tok_dir)
    try:
        yield tok_dir
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)


def sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline of parts built in code (no safety checker, as SD folders
    saved for training ship)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD pipeline folder (model_index.json + components)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    with tokenizer_source(folder) as tok_dir:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
        text_encoder.resize_token_embeddings(len(tokenizer))
        text_encoder.config.bos_token_id = tokenizer.bos_token_id
        text_encoder.config.eos_token_id = tokenizer.eos_token_id
        text_encoder.config.pad_token_id = tokenizer.pad_token_id
        pipe = sd_pipeline(vae, text_encoder, tokenizer, unet, sd_training_scheduler())
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def sdxl_pipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler):
    """A StableDiffusionXLPipeline of parts built in code (no watermarker, as SDXL folders
    saved for training ship)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL pipeline folder: SDXL's topology (two text encoders, the
    second with a projection; ``text_time`` added embeddings; no attention in the first down
    block; linear attention projections; 0.13025 VAE scaling), at test size.

    Why its own model: the SD 1.5 tiny cannot exercise SDXL's added conditions, its two
    tokenizers or the ``label_emb`` keys of an SDXL ControlNet's single file.
    """
    from diffusers import UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    hidden, pooled, time_dim = 32, 32, 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * hidden,  # both encoders' states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,  # time ids + text_embeds
        norm_num_groups=16,
    )
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)
    with tokenizer_source(folder) as tok_dir:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
        # SDXL's second tokenizer (OpenCLIP's) pads with "!" rather than the end token
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77, pad_token="!")
        encoders = []
        for cls in (CLIPTextModel, CLIPTextModelWithProjection):
            enc = cls(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=hidden,
                    intermediate_size=64,
                    num_hidden_layers=3,  # the penultimate layer is what SDXL reads
                    num_attention_heads=4,
                    max_position_embeddings=77,
                    projection_dim=pooled,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
            encoders.append(enc)
        pipe = sdxl_pipeline(vae, *encoders, tokenizer, tokenizer_2, unet, sd_training_scheduler())
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder
