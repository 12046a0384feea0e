"""``controlnet-emo pretrain-base``: the small Stable Diffusion the demo trains beside.

Why: a ControlNet beside a random base draws noise, so nothing shows that it follows its
render. This trains a real (small) SD on the synthetic faces, in two stages like SD itself:
a KL autoencoder, then a text-conditioned UNet with its CLIP text encoder on the latents.
The result is an ordinary diffusers pipeline folder in fp16 safetensors that ``load_sd``
reads like any hub folder; the package ships one as ``demo-face-base`` (models/shipped.py).

Faces come from seeds no demo or test uses, so every face the demo shows is held out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from controlnet_emo.atomic import set_usual_modes
from controlnet_emo.config import ConfigError, load_typed
from controlnet_emo.evaluation.structure import laplacian, laplacian_energy, to_grey
from controlnet_emo.models.sd import resolve_pretrained
from controlnet_emo.models.tiny import sd_pipeline, sd_training_scheduler, write_tiny_tokenizer
from controlnet_emo.pretrain.faces import FaceSet, caption_words, render_faces
from controlnet_emo.training.losses import diffusion_loss

log = logging.getLogger(__name__)


@dataclass
class BaseShape:
    resolution: int = 64
    vae_channels: list[int] = field(default_factory=lambda: [24, 48, 64])
    """One entry per VAE level: latents are resolution / 2^(levels-1) (64 px -> 16x16)."""
    latent_channels: int = 4
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Cross-attention on every level but the first (the 16x16 one is the costly one on CPU)."""
    unet_layers_per_block: int = 1
    unet_head_channels: int = 32
    """Channels per attention head. diffusers' UNet2DConditionModel reads its
    ``attention_head_dim`` as the number of heads (a legacy name), so the heads per level are
    given as channels // this; a plain 32 there made 32 heads of 2-4 channels, 1.4x slower."""
    text_width: int = 64
    text_layers: int = 2


@dataclass
class VaeStage:
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 1.0e-3
    kl_weight: float = 1.0e-6
    laplacian_weight: float = 0.0
    """An L1 on the images' Laplacians beside the pixel L1 (as the decoder stage's): pixel L1
    alone is satisfied by blur (BENCHMARKS.md, "Shipped demo base")."""


@dataclass
class UnetStage:
    steps: int = 4500
    batch_size: int = 32
    learning_rate: float = 8.0e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    """Empty captions this often, so classifier-free guidance works at inference."""
    snr_gamma: float = 5.0
    ema_decay: float = 0.999


@dataclass
class DecoderStage:
    steps: int = 0
    """Fine-tune the VAE decoder alone, the encoder frozen: the latents (and the UNet trained on
    them) stay valid, and the same latents decode to a sharper face. The first VAE stage's
    L1 reconstruction is satisfied by blur (its decodes keep 0.15 of the faces' Laplacian
    energy; BENCHMARKS.md, "Shipped demo base")."""
    batch_size: int = 32
    learning_rate: float = 5.0e-4
    laplacian_weight: float = 0.5
    """An L1 on the images' Laplacians beside the pixel L1: it asks for the edges."""


@dataclass
class PretrainBaseConfig:
    version: int = 1
    output_dir: str = "runs/base"
    seed: int = 1000
    """Face seeds: training faces use ``seed``, held-out faces ``seed + 1``."""
    n_train: int = 6000
    n_held_out: int = 256
    model: BaseShape = field(default_factory=BaseShape)
    vae: VaeStage = field(default_factory=VaeStage)
    decoder: DecoderStage = field(default_factory=DecoderStage)
    unet: UnetStage = field(default_factory=UnetStage)
    init_from: str | None = None
    """Start from a pretrained base (a folder or a shipped name such as demo-face-base) instead
    of random weights; a stage with 0 steps is then skipped, so one stage can be run again."""


def load_base_config(path: str | Path | None, overrides: list[str]) -> PretrainBaseConfig:
    cfg = load_typed(PretrainBaseConfig, path, overrides)
    levels = len(cfg.model.vae_channels)
    if cfg.model.resolution % 2 ** (levels - 1) or min(cfg.n_train, cfg.n_held_out) < 1:
        raise ConfigError("model.resolution must divide by the VAE's downsampling; n_* >= 1")
    head = cfg.model.unet_head_channels
    if head < 1 or any(c % head for c in cfg.model.unet_channels):
        raise ConfigError("model.unet_channels must divide by model.unet_head_channels (>= 1)")
    keys = (
        "vae.batch_size",
        "unet.batch_size",
        "decoder.batch_size",
        "decoder.steps",
        "unet.steps",
    )
    for key in keys:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < (0 if name == "steps" else 1):
            raise ConfigError(f"{key}: must be >= {0 if name == 'steps' else 1}")
    # A random base needs its autoencoder trained; the UNet may wait for a later run with
    # init_from, so the autoencoder can be checked before the long stage.
    if cfg.vae.steps < (0 if cfg.init_from else 1):
        raise ConfigError("vae.steps: must be >= 1 (>= 0 with init_from)")
    return cfg


# ---------------------------------------------------------------------------------------------
# The architecture


def build_base(shape: BaseShape, tokenizer_dir: Path, seed: int):
    """Random VAE, UNet, text encoder, the caption tokenizer and SD's training scheduler."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    write_tiny_tokenizer(tokenizer_dir, caption_words())
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    levels = len(shape.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(shape.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=shape.latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=shape.resolution,
        mid_block_add_attention=False,
    )
    n = len(shape.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=shape.resolution // 2 ** (levels - 1),
        in_channels=shape.latent_channels,
        out_channels=shape.latent_channels,
        block_out_channels=tuple(shape.unet_channels),
        layers_per_block=shape.unet_layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=shape.text_width,
        attention_head_dim=tuple(c // shape.unet_head_channels for c in shape.unet_channels),
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.text_width,
            intermediate_size=2 * shape.text_width,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return vae, unet, text_encoder, tokenizer, sd_training_scheduler()


def load_base(spec: str):
    """A pretrained base's parts in fp32, trainable: a folder or a shipped name."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(resolve_pretrained(spec))
    kw = {"torch_dtype": torch.float32}
    return (
        AutoencoderKL.from_pretrained(folder / "vae", **kw),
        UNet2DConditionModel.from_pretrained(folder / "unet", **kw),
        CLIPTextModel.from_pretrained(folder / "text_encoder", **kw),
        CLIPTokenizer.from_pretrained(folder / "tokenizer", model_max_length=77),
        DDPMScheduler.from_pretrained(folder / "scheduler"),
    )


# ---------------------------------------------------------------------------------------------
# Stage 1: the autoencoder


def train_vae(vae, faces: FaceSet, held: FaceSet, stage: VaeStage, seed: int) -> dict:
    """L1 reconstruction (+ ``laplacian_weight`` x L1 of the Laplacians) + a tiny KL (SD's
    recipe without the GAN); returns its figures."""
    g = torch.Generator().manual_seed(seed)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=g)).sample
        return (
            reconstruction_loss(recon, x, stage.laplacian_weight)
            + stage.kl_weight * post.kl().mean()
        )

    final = fit_autoencoder(vae, list(vae.parameters()), faces, stage, g, "pretrain vae", loss_of)
    return {"final_loss": final} | vae_figures(vae, held)


def train_decoder(vae, faces: FaceSet, held: FaceSet, stage: DecoderStage, seed: int) -> dict:
    """Decoder-only fine-tuning on posterior samples of the frozen encoder (what the UNet's
    latents are): pixel L1 + ``laplacian_weight`` x L1 of the Laplacians; returns figures."""
    g = torch.Generator().manual_seed(seed + 7)
    frozen = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    for p in frozen:
        p.requires_grad_(False)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        return reconstruction_loss(vae.decode(z).sample, x, stage.laplacian_weight)

    params = [p for p in vae.parameters() if p.requires_grad]
    final = fit_autoencoder(vae, params, faces, stage, g, "sharpen decoder", loss_of)
    for p in frozen:
        p.requires_grad_(True)
    return {"final_loss": final} | vae_figures(vae, held)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, laplacian_weight: float):
    """Pixel L1, plus L1 of the Laplacians: the second asks for the edges blur leaves out."""
    loss = F.l1_loss(recon, x)
    if laplacian_weight:
        loss = loss + laplacian_weight * F.l1_loss(laplacian(recon), laplacian(x))
    return loss


def fit_autoencoder(vae, params: list, faces: FaceSet, stage, g, desc: str, loss_of) -> float:
    """The autoencoder stages' loop: random batches of faces in [-1,1], AdamW under a
    one-cycle schedule, gradients clipped at 1; returns the mean loss of the last 50 steps."""
    opt = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, stage.learning_rate, total_steps=stage.steps, pct_start=0.05
    )
    vae.train()
    losses = []
    for _ in tqdm(range(stage.steps), desc=desc, unit="step"):
        idx = torch.randint(len(faces), (stage.batch_size,), generator=g)
        loss = loss_of(faces.float_images(idx) * 2 - 1)  # faces (B,3,R,R) in [-1,1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    return float(np.mean(losses[-50:]))


@torch.no_grad()
def vae_figures(vae, held: FaceSet) -> dict:
    """Held-out PSNR and sharpness: the reconstructions' mean Laplacian energy over the
    faces' (1.0 = as sharp as the faces)."""
    x = held.float_images(torch.arange(len(held)))  # (N,3,R,R) in [0,1]
    recon = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2
    whole = torch.ones(len(held), 1, x.shape[-2], x.shape[-1], dtype=torch.bool)
    sharp = [float(laplacian_energy(to_grey(img, x.shape[-1]), whole).mean()) for img in (recon, x)]
    return {"held_out_psnr_db": vae_psnr(vae, held), "held_out_sharpness": sharp[0] / sharp[1]}


@torch.no_grad()
def vae_psnr(vae, faces: FaceSet, batch_size: int = 64) -> float:
    """PSNR (dB, images in [0,1]) of decode(encode(x).mode) over a set, as one MSE."""
    sq, count = 0.0, 0
    for start in range(0, len(faces), batch_size):
        x = faces.float_images(torch.arange(start, min(start + batch_size, len(faces))))
        recon = vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample
        sq += float(((recon.clamp(-1, 1) + 1) / 2 - x).square().sum())
        count += x.numel()
    return float(10 * np.log10(1.0 / (sq / count)))


@torch.no_grad()
def encode_moments(vae, faces: FaceSet, batch_size: int = 128) -> torch.Tensor:
    """(N,2C,h,w) posterior mean and std of every face (sampled per step, as SD trains)."""
    out = []
    for start in tqdm(range(0, len(faces), batch_size), desc="encode latents", leave=False):
        x = faces.float_images(torch.arange(start, min(start + batch_size, len(faces))))
        d = vae.encode(x * 2 - 1).latent_dist
        out.append(torch.cat([d.mean, d.std], dim=1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder


def train_unet(
    unet, text_encoder, tokenizer, scheduler, moments, faces: FaceSet, stage: UnetStage, seed
) -> dict:
    """Epsilon-prediction MSE with min-SNR weights (diffusers' compute_snr), EMA of the
    weights (diffusers' EMAModel), caption dropout for classifier-free guidance."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(seed)
    ids = tokenizer(faces.captions, padding="max_length", truncation=True, return_tensors="pt")
    ids = ids.input_ids  # (N,77)
    empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids  # (1,77)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=0.01)
    lr = get_scheduler(
        "cosine", opt, num_warmup_steps=stage.warmup_steps, num_training_steps=stage.steps
    )
    ema = EMAModel(params, decay=stage.ema_decay, use_ema_warmup=True, power=0.75)
    unet.train()
    text_encoder.train()
    losses = []
    for _ in tqdm(range(stage.steps), desc="pretrain unet", unit="step"):
        idx = torch.randint(len(faces), (stage.batch_size,), generator=g)
        mean, std = moments[idx].chunk(2, dim=1)
        latents = mean + std * torch.randn(mean.shape, generator=g)  # (B,C,h,w)
        drop = torch.rand(len(idx), generator=g) < stage.caption_dropout
        tokens = torch.where(drop[:, None], empty, ids[idx])
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        text = text_encoder(tokens, return_dict=False)[0]  # (B,77,D)
        pred = unet(noisy, t, encoder_hidden_states=text, return_dict=False)[0]
        loss = diffusion_loss(pred, noise, t, scheduler, "l2", stage.snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    return {"final_loss": float(np.mean(losses[-100:]))}


@torch.no_grad()
def held_out_diffusion_loss(unet, text_encoder, tokenizer, scheduler, moments, faces) -> float:
    """Unweighted epsilon MSE on held-out faces at fixed noise and timesteps (comparable)."""
    g = torch.Generator().manual_seed(0)
    ids = tokenizer(faces.captions, padding="max_length", truncation=True, return_tensors="pt")
    latents = moments.chunk(2, dim=1)[0]
    noise = torch.randn(latents.shape, generator=g)
    t = torch.linspace(0, scheduler.config.num_train_timesteps - 1, len(faces)).long()
    noisy = scheduler.add_noise(latents, noise, t)
    text = text_encoder(ids.input_ids, return_dict=False)[0]
    pred = unet(noisy, t, encoder_hidden_states=text, return_dict=False)[0]
    return float(F.mse_loss(pred, noise))


# ---------------------------------------------------------------------------------------------
# The command


def pretrain_base(cfg: PretrainBaseConfig) -> Path:
    """The stages (autoencoder, decoder sharpening, UNet; each skipped at 0 steps), then
    ``OUT/model/`` (fp16 diffusers pipeline + pretrain_report.json) and ``OUT/samples.png``
    (held-out prompts: real faces over generated ones)."""
    out = Path(cfg.output_dir)
    model_dir = out / "model"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    t0 = time.perf_counter()
    res = cfg.model.resolution
    faces = render_faces(cfg.n_train, res, cfg.seed, "render training faces")
    held = render_faces(cfg.n_held_out, res, cfg.seed + 1, "render held-out faces")
    if cfg.init_from:
        vae, unet, text_encoder, tokenizer, scheduler = load_base(cfg.init_from)
    else:
        vae, unet, text_encoder, tokenizer, scheduler = build_base(
            cfg.model, out / "tokenizer", cfg.seed
        )
    timings = {"render_s": time.perf_counter() - t0}
    report: dict = {}
    if cfg.init_from:  # what the starting point was, with its own report
        earlier = Path(resolve_pretrained(cfg.init_from)) / "pretrain_report.json"
        report["init_from"] = {"spec": cfg.init_from}
        if earlier.is_file():
            report["init_from"]["report"] = json.loads(earlier.read_text())

    t = time.perf_counter()
    moments = None  # (N,2C,h,w) of the unscaled latents; the decoder stage leaves them be
    if cfg.vae.steps:
        report["vae"] = train_vae(vae, faces, held, cfg.vae, cfg.seed)
        moments = encode_moments(vae, faces)
        # SD's convention: latents scaled to unit variance (SD 1.x's 0.18215 was found so).
        vae.register_to_config(scaling_factor=float(1.0 / moments.chunk(2, dim=1)[0].std()))
    if cfg.decoder.steps:  # the encoder, the latents and their scale stay as they are
        report["decoder"] = train_decoder(vae, faces, held, cfg.decoder, cfg.seed)
    timings["vae_s"] = time.perf_counter() - t
    scaling = float(vae.config.scaling_factor)

    t = time.perf_counter()
    if cfg.unet.steps:
        moments = encode_moments(vae, faces) if moments is None else moments
        report["unet"] = train_unet(  # the scaled latents' mean and std, as the UNet sees them
            unet, text_encoder, tokenizer, scheduler, moments * scaling, faces, cfg.unet, cfg.seed
        )
    elif not cfg.init_from:
        log.warning(
            "unet.steps=0: the UNet is untrained; train it with --set init_from=%s "
            "--set vae.steps=0 --set decoder.steps=0",
            model_dir,
        )
    timings["unet_s"] = time.perf_counter() - t
    report.setdefault("unet", {})["held_out_eps_mse"] = held_out_diffusion_loss(
        unet, text_encoder, tokenizer, scheduler, encode_moments(vae, held) * scaling, held
    )

    pipe = sd_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    write_samples(pipe, held, out / "samples.png")
    timings["total_s"] = time.perf_counter() - t0
    report |= {
        "latent_scaling_factor": scaling,
        "seconds": timings,
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))
        },
        "machine": machine_description(),
        "command": " ".join(["controlnet-emo", *sys.argv[1:]]),
        "config": dataclasses.asdict(cfg),
    }
    pipe.to(torch.float16).save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2))
    set_usual_modes(model_dir)
    figures = {k: report[k] for k in ("vae", "decoder", "unet") if k in report}
    log.info("pretrained base written to %s: %s", model_dir, json.dumps(figures))
    return model_dir


@torch.no_grad()
def write_samples(pipe, held: FaceSet, path: Path, n: int = 8, steps: int = 20) -> None:
    """Held-out captions: the real faces (top row) over what the base draws for them."""
    from diffusers import UniPCMultistepScheduler
    from PIL import Image

    sampler = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(sampler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    images = pipe(
        held.captions[:n],
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=gens,
        output_type="np",
    ).images  # (n,R,R,3) in [0,1]
    pipe.scheduler = sampler
    real = held.images[:n].permute(0, 2, 3, 1).numpy()
    fake = (np.asarray(images) * 255).round().astype(np.uint8)
    sheet = np.concatenate([np.concatenate(list(real), 1), np.concatenate(list(fake), 1)], 0)
    Image.fromarray(sheet).save(path)


def machine_description() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
