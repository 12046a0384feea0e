"""Time one ControlNet training step, and its peak memory, for named loss variants.

Why: the pixel-space losses decode the predicted latent, and the SD VAE decoder costs ~3x the
UNet (FACTS.md); this script measures what each recipe really adds to a step, so recipe
choices rest on numbers. It mirrors the training loop: latents from ``vae.encode`` and text
from the text encoder (no grad), noise + ``add_noise``, ControlNet residuals into the frozen
UNet, ``diffusion_loss`` + ``PixelLosses``, backward, fused AdamW on the ControlNet only,
gradient checkpointing on UNet and ControlNet; the trainer's channels_last (CPU and CUDA) and
TF32 (CUDA), and ``Bench.set_compiled`` for ``train.compile`` (used by ``gpu_bench.py``).

Architectures: ``tiny`` (the test model), ``sd15`` (SD 1.5's UNet/VAE/CLIP-L/ControlNet
shapes, random weights, built in code: nothing is downloaded), ``sdxl`` (SDXL-base's: two
text encoders, ``text_time`` added conditions, 1024 px) and ``tiny-xl`` (the SDXL test model). Critics are random too
(EmoNet, LPIPS trunk, TAESD), which changes no cost.

Variants:
  latent_only      diffusion term only (the ControlNet baseline)
  research         configs/stableface_best.yaml: VAE decoder, LPIPS-vgg, EmoNet, every sample,
                   as one batch checkpointed per decoder block (the pixel path since issue 32)
  fast             configs/affectnet_fast.yaml with every term on (pixel_l1 too): TAESD,
                   LPIPS-alex, low-noise samples only, a fixed count per micro-batch
  research_nockpt  research without checkpointing of decoder and critics (what it buys)
  research_per_sample  research down the pixel path before issue 32: sample by sample, each
                   sample's decoder, LPIPS and EmoNet under their own checkpoint
  research_chunkN  research decoded and read N samples at a time (loss.pixel.chunk_size=N)
  research_nchw    research with decoder and critics in NCHW (loss.pixel.*_layout=contiguous)
  research_nchw_decoder  only the decoder in NCHW
  research_norm_fp32  research with every GroupNorm of the pixel path computed in fp32 and
                   cast back, what autocast does to it (the lever's "before"; equal in fp32)
  research_latent_lpips  research with loss.lpips.space=latent (LPL on decoder features)

Prints one JSON line per variant. ``step_s``: median time of one micro-step (forward +
backward of a micro-batch, gradients accumulating), the unit gradient accumulation repeats:
the recipes take 128-256 micro-batches per optimizer step, so the AdamW step
(``optimizer_s``) is amortised. ``cpu_s``: the process's CPU seconds per micro-step, steadier
than wall time on a shared CPU. Variants are timed in rounds (one micro-step of each per
round), so load drifting on a shared machine hits them alike.

Memory: ``resident_mb`` is what stays allocated between steps (weights, buffers, gradients,
optimizer state, the variant's critics); ``step_mem_mb`` the peak a micro-step adds on top
(activations, recomputation, transients): on CUDA from the allocator's peak, on CPU from the
profiler's allocation trace of the first warm-up step (RSS cannot say it: glibc keeps freed
blocks). ``peak_mem_mb`` is their sum, ``peak_mem_mb_per_sample`` that over the batch.
Ratios (``time_ratio``, ``cpu_time_ratio``, ``mem_per_sample_ratio``, ``step_mem_ratio``)
are to ``latent_only``. Never asserts on time.

    python benchmarks/train_step.py --arch sd15 --resolution 128 --batch 1 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlnet_emo.config import RECIPES, Config, load_config  # noqa: E402
from controlnet_emo.models.fast_paths import use_fast_paths  # noqa: E402
from controlnet_emo.models.tiny import sd_training_scheduler  # noqa: E402
from controlnet_emo.training.losses import PixelLosses, diffusion_loss, diffusion_target  # noqa: E402

VARIANTS = (
    "latent_only",
    "research",
    "fast",
    "research_nockpt",
    "research_per_sample",
    "research_chunkN",
    "research_nchw",
    "research_nchw_decoder",
    "research_norm_fp32",
    "research_latent_lpips",
)
RESEARCH_LEVERS = {  # variant -> its overrides of the research recipe
    "research_nchw": [
        "loss.pixel.decoder_layout=contiguous",
        "loss.pixel.critic_layout=contiguous",
    ],
    "research_nchw_decoder": ["loss.pixel.decoder_layout=contiguous"],
    "research_norm_fp32": [],
    "research_per_sample": [],
    "research_latent_lpips": ["loss.lpips.space=latent"],
}
_RANDOM_CRITICS = ["model.emonet=random", "model.lpips_backbone=random"]


# --- models ----------------------------------------------------------------------------------


SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
"""SD's VAE (84 M parameters); SDXL's has the same shape."""

CLIP_L = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
"""CLIP ViT-L/14's text encoder (123 M): SD 1.5's, and SDXL's first."""


def build_sd15() -> dict:
    """SD 1.5's component shapes with random weights (UNet 860M, VAE 84M, CLIP-L text 123M)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults are SD1.5's
    vae = AutoencoderKL(**SD_VAE, sample_size=512, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=sd_training_scheduler())


def build_shipped(name: str) -> dict:
    """A tiny base built in code (``tiny``, ``tiny-xl``), loaded as a hub folder is."""
    from controlnet_emo.models.sd import load_sd

    sd = load_sd(name)
    parts = dict(unet=sd.unet, vae=sd.vae, text_encoder=sd.text_encoder, scheduler=sd.scheduler)
    if sd.text_encoder_2 is not None:
        parts["text_encoder_2"] = sd.text_encoder_2
    return parts


SDXL_BASE_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280 pooled text
)
"""SDXL-base 1.0's UNet config (the keys that differ from diffusers' defaults): 2.57 B params."""


def build_sdxl(device: str | torch.device = "cpu") -> dict:
    """SDXL-base's component shapes with random weights, initialised on ``device`` (a 2.6 B
    UNet is slow to initialise on a CPU): UNet, VAE (SD's shape, 0.13025 scaling), CLIP-L and
    OpenCLIP bigG with projection."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
        vae = AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                max_position_embeddings=77,
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                hidden_act="gelu",
                projection_dim=1280,
            )
        )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        scheduler=sd_training_scheduler(),
    )


ARCHS = {
    "sd15": build_sd15,
    "tiny": partial(build_shipped, "tiny"),
    "sdxl": build_sdxl,
    "tiny-xl": partial(build_shipped, "tiny-xl"),
}


def random_taesd(folder: Path) -> str:
    """TAESD's architecture (diffusers' AutoencoderTiny defaults), random, saved as a folder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(folder)
    return str(folder)


def variant_config(
    name: str, batch: int, taesd: str, extra: list[str] | None = None
) -> tuple[Config, str]:
    """A variant's config (a shipped recipe, random critics) and its pixel checkpointing;
    ``extra``: overrides for every variant (``gpu_bench.py --dry-run``'s small critic)."""
    fit = [f"train.batch_size={batch}", f"train.total_batch_size={batch}"]

    def load(recipe: str, over: list[str]) -> Config:
        return load_config(RECIPES / recipe, over + (extra or []))  # extra wins

    if name == "latent_only":
        off = [
            "loss.lpips.weight=0",
            "loss.emotion.valence=0",
            "loss.emotion.arousal=0",
            "loss.emotion.expression=0",
        ]
        return load("stableface_best.yaml", fit + off), "full"
    if name in ("research", "research_nockpt"):
        cfg = load("stableface_best.yaml", fit + _RANDOM_CRITICS)
        return cfg, "none" if name == "research_nockpt" else "full"
    if name in RESEARCH_LEVERS or name.removeprefix("research_chunk").isdigit():
        chunk = [f"loss.pixel.chunk_size={name.removeprefix('research_chunk')}"]
        over = RESEARCH_LEVERS[name] if name in RESEARCH_LEVERS else chunk
        cfg = load("stableface_best.yaml", fit + _RANDOM_CRITICS + over)
        return cfg, "full"
    if name == "fast":
        fast = load_config(RECIPES / "affectnet_fast.yaml")
        n = min(fast.loss.pixel.samples_per_batch or batch, batch)
        over = (
            fit
            + _RANDOM_CRITICS
            + [
                f"model.decoder={taesd}",
                "loss.pixel_l1.weight=0.05",
                f"loss.pixel.samples_per_batch={n}",
            ]
        )
        return load("affectnet_fast.yaml", over), "full"
    raise SystemExit(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")


class PerSamplePixelLosses(PixelLosses):
    """The pixel path before issue 32, for comparison only: every sample decoded and read on
    its own (chunks of one), its decoder under a checkpoint of its own around the per-block
    ones (so the decoder's forward runs three times), LPIPS and EmoNet under one each."""

    def __init__(self, cfg: Config, vae: torch.nn.Module):
        super().__init__(cfg, vae)
        self.chunk_size = 1

    def _decode(self, x0: torch.Tensor):
        if self.checkpointing == "full" and torch.is_grad_enabled():
            return checkpoint(lambda x: PixelLosses._decode(self, x), x0, use_reentrant=False)
        return super()._decode(x0)


def _groupnorm_fp32(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    weight = None if self.weight is None else self.weight.float()
    bias = None if self.bias is None else self.bias.float()
    return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


@contextmanager
def groupnorm_in_fp32(module: torch.nn.Module | None):
    """Every GroupNorm under ``module`` computed in fp32 with a cast each way, as autocast
    runs it on CUDA (the ``research_norm_fp32`` variant); restored on exit."""
    norms = (
        [] if module is None else [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    )
    for m in norms:
        m.forward = types.MethodType(_groupnorm_fp32, m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


# --- memory ----------------------------------------------------------------------------------


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def cpu_step_peak_mb(fn) -> float:
    """Peak of live tensor bytes (CPU allocator) added during ``fn()``, from the profiler.

    Process RSS cannot say this: glibc keeps freed blocks, so RSS does not follow tensors.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        n
        for n in _walk(prof.profiler.kineto_results.experimental_event_tree())
        if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"
    ]
    if not events:
        return 0.0
    events.sort(key=lambda n: n.start_time_ns)
    first = events[0].extra_fields
    base = first.total_allocated - first.alloc_size
    return max(n.extra_fields.total_allocated - base for n in events) / 2**20


def resident_mb(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> float:
    """Bytes held between steps: weights, buffers, gradients and optimizer state (each storage
    once, so the VAE shared by the decoder counts once)."""
    seen: set[int] = set()
    total = 0
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [p.grad for m in modules for p in m.parameters()]
    tensors += [v for state in optimizer.state.values() for v in state.values()]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total / 2**20


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the step --------------------------------------------------------------------------------


class Bench:
    def __init__(self, parts: dict, device: torch.device, dtype: torch.dtype, resolution: int):
        from diffusers import ControlNetModel

        self.device, self.dtype, self.resolution = device, dtype, resolution
        self.scheduler = parts["scheduler"]
        self.vae, self.unet = parts["vae"], parts["unet"]
        self.text_encoder = parts["text_encoder"]
        self.text_encoder_2 = parts.get("text_encoder_2")  # SDXL's second encoder
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_channels=9)
        for frozen in (self.vae, self.unet, *self.text_encoders):
            frozen.requires_grad_(False).to(device, dtype)
        self.unet.enable_gradient_checkpointing()
        self.controlnet.to(device).train().enable_gradient_checkpointing()
        # the trainer's layouts and TF32 (training/loop.py)
        self.channels_last = use_fast_paths(device, self.unet, self.vae, self.controlnet)
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=1e-5, fused=True)
        self.eager = (self.unet, self.controlnet)
        for p in self.controlnet.parameters():  # resident from the start, as after step one
            p.grad = torch.zeros_like(p)
        self.generator = torch.Generator(device).manual_seed(0)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """The UNet's text states and, for SDXL, its ``added_cond_kwargs`` (as the trainer:
        ``text_cache.encode_captions``, ``controlnet.added_conditions``; time ids of an
        uncropped square image at the bench's resolution)."""
        from controlnet_emo.models.controlnet import added_conditions
        from controlnet_emo.models.text_cache import encode_captions

        if self.text_encoder_2 is None:
            return self.text_encoder(input_ids)[0], None
        ids = torch.stack([input_ids, input_ids], dim=1)  # (B,2,77): one row per tokenizer
        text = encode_captions(self.text_encoders, ids, self.dtype)
        r = self.resolution
        time_ids = torch.tensor([r, r, 0, 0, r, r], device=self.device, dtype=self.dtype)
        return text.hidden, added_conditions(text.pooled, time_ids.expand(len(ids), 6))

    def batch(self, b: int) -> dict:
        g, dev, r = self.generator, self.device, self.resolution
        return dict(
            pixel_values=torch.rand(b, 3, r, r, generator=g, device=dev) * 2 - 1,
            cond=torch.rand(b, 9, r, r, generator=g, device=dev),
            input_ids=torch.randint(
                0,
                49000
                if self.text_encoder.config.vocab_size > 49000
                else self.text_encoder.config.vocab_size - 1,
                (b, 77),
                generator=g,
                device=dev,
            ),
            expression=torch.randint(0, 8, (b,), generator=g, device=dev),
            valence=torch.rand(b, generator=g, device=dev) * 2 - 1,
            arousal=torch.rand(b, generator=g, device=dev) * 2 - 1,
        )

    def micro_step(self, cfg: Config, losses: PixelLosses, b: int) -> dict[str, float]:
        """Forward + backward of one micro-batch; gradients accumulate as in the loop."""
        batch, vae, sched = self.batch(b), self.vae, self.scheduler
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(self.dtype)).latent_dist
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = ((dist.sample(self.generator) - shift) * vae.config.scaling_factor).float()
            text, added = self.encode_text(batch["input_ids"])
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        t = torch.randint(
            0, sched.config.num_train_timesteps, (b,), generator=self.generator, device=self.device
        )
        noisy = sched.add_noise(latents, noise, t)
        # As in the trainer: autocast wraps only the trained ControlNet (accelerate's prepare
        # does that); the frozen UNet, decoder and critics run in their own dtype. Under
        # autocast every GroupNorm would run in fp32 with a cast each way (BENCHMARKS.md,
        # "GPU benchmark": the profile of the research step).
        autocast = torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )
        with autocast:
            down, mid = self.controlnet(
                noisy,
                t,
                encoder_hidden_states=text,
                controlnet_cond=batch["cond"],
                added_cond_kwargs=added,
                return_dict=False,
            )
        pred = self.unet(
            noisy.to(self.dtype),
            t,
            text,
            down_block_additional_residuals=[d.to(self.dtype) for d in down],
            mid_block_additional_residual=mid.to(self.dtype),
            added_cond_kwargs=added,
        ).sample
        d = cfg.loss.diffusion
        target = diffusion_target(latents, noise, t, sched)
        terms = {"diffusion": diffusion_loss(pred, target, t, sched, d.kind, d.snr_gamma)}
        norms = groupnorm_in_fp32(losses) if getattr(losses, "norm_fp32", False) else nullcontext()
        with norms:
            pixel_terms = losses(
                noisy,
                pred,
                t,
                sched,
                batch["pixel_values"],
                latents,
                batch["expression"],
                batch["valence"],
                batch["arousal"],
            )
        terms.update(pixel_terms)
        weights = cfg.loss.weights()
        sum(weights[k] * v.float() for k, v in terms.items()).backward()
        return {k: v.item() for k, v in terms.items()}

    def set_compiled(self, on: bool, backend: str = "inductor") -> None:
        """Run the UNet and ControlNet through torch.compile (static shapes), as
        ``train.compile`` does, or eagerly; the compiled wrappers share the eager weights.
        (The pixel path has its own: ``PixelLosses.set_compiled``.)"""
        if not on:
            self.unet, self.controlnet = self.eager
            return
        if not hasattr(self, "_compiled"):
            self._compiled = tuple(
                torch.compile(m, dynamic=False, backend=backend) for m in self.eager
            )
        self.unet, self.controlnet = self._compiled

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # grads stay resident: see module doc

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def build(self, variant: Variant, b: int) -> None:
        kind = PerSamplePixelLosses if variant.name == "research_per_sample" else PixelLosses
        variant.losses = (
            kind(variant.cfg, self.vae)
            .to(self.device)
            .critics_to(self.dtype, channels_last=self.channels_last)
        )
        variant.losses.norm_fp32 = variant.name == "research_norm_fp32"
        if variant.losses.decoder is not None:
            variant.losses.decoder.to(self.dtype)
        variant.batch = b

    def prepare(self, variant: Variant) -> None:
        """The variant's settings on what the variants share (the VAE's checkpointing flags
        and its decoder's layout)."""
        variant.losses.set_checkpointing(variant.checkpointing)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.vae.decoder.to(memory_format=layout)
        variant.losses.critics_to(self.dtype, channels_last=self.channels_last)

    def timed_step(self, variant: Variant) -> None:
        self.prepare(variant)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start, cpu_start = time.perf_counter(), time.process_time()
        variant.terms = self.micro_step(variant.cfg, variant.losses, variant.batch)
        self._sync()
        variant.times.append(time.perf_counter() - start)
        variant.cpu_times.append(time.process_time() - cpu_start)
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            variant.step_mem_mb = max(variant.step_mem_mb, (peak - base) / 2**20)

    def run(self, variants: list[Variant], warmup: int, steps: int) -> list[dict]:
        """Warm up, then time in rounds (one micro-step of each variant per round), so that
        load drifting on a shared machine hits every variant alike."""
        for i in range(warmup):
            for v in variants:
                if i == 0 and self.device.type == "cpu":  # profiled: memory, not timing
                    self.prepare(v)
                    v.step_mem_mb = cpu_step_peak_mb(
                        lambda v=v: self.micro_step(v.cfg, v.losses, v.batch)
                    )
                else:
                    self.timed_step(v)
                v.times.clear()
                v.cpu_times.clear()
            self.optimizer_step()
        optimizer_times = []
        for _ in range(steps):
            for v in variants:
                self.timed_step(v)
            start = time.perf_counter()
            self.optimizer_step()
            self._sync()
            optimizer_times.append(time.perf_counter() - start)
        shared = [self.unet, self.vae, *self.text_encoders, self.controlnet]
        for v in variants:
            v.resident_mb = resident_mb([*shared, v.losses], self.optimizer)
        rows = [v.row(statistics.median(optimizer_times)) for v in variants]
        if self.device.type == "cpu":
            for row in rows:
                row["process_peak_rss_mb"] = round(peak_rss_mb(), 1)  # all variants together
        return rows


@dataclass
class Variant:
    name: str
    cfg: Config
    checkpointing: str
    losses: PixelLosses | None = None
    batch: int = 1
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    step_mem_mb: float = 0.0
    resident_mb: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)

    def row(self, optimizer_s: float) -> dict:
        on = bool(self.losses.terms)
        return dict(
            variant=self.name,
            step_s=round(statistics.median(self.times), 4),
            step_s_all=[round(x, 3) for x in self.times],
            cpu_s=round(statistics.median(self.cpu_times), 3),
            optimizer_s=round(optimizer_s, 3),
            resident_mb=round(self.resident_mb, 1),
            step_mem_mb=round(self.step_mem_mb, 1),
            peak_mem_mb=round(self.resident_mb + self.step_mem_mb, 1),
            peak_mem_mb_per_sample=round((self.resident_mb + self.step_mem_mb) / self.batch, 1),
            terms=sorted(self.terms),
            decoder=self.cfg.model.decoder if on else None,
            pixel_checkpointing=self.checkpointing if on else None,
        )


# --- entry -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--variants",
        default="latent_only,research,fast",
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed micro-steps, gradients accumulating (the median is reported)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every variant (e.g. model.emonet=demo-critic-train)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="default: bf16 on CUDA, fp32 on CPU",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        taesd = random_taesd(Path(tmp) / "taesd")
        configs = {n: variant_config(n, args.batch, taesd, args.set) for n in names}  # typos
        bench = Bench(ARCHS[args.arch](), device, dtype, args.resolution)
        variants = [Variant(n, *configs[n]) for n in names]
        for v in variants:
            bench.build(v, args.batch)
        rows = bench.run(variants, args.warmup, args.steps)
    base = next((r for r in rows if r["variant"] == "latent_only"), None)
    for row in rows:
        if base is not None:
            row["time_ratio"] = round(row["step_s"] / base["step_s"], 2)
            row["cpu_time_ratio"] = round(row["cpu_s"] / base["cpu_s"], 2)
            row["mem_per_sample_ratio"] = round(
                row["peak_mem_mb_per_sample"] / base["peak_mem_mb_per_sample"], 2
            )
            row["step_mem_ratio"] = round(row["step_mem_mb"] / max(base["step_mem_mb"], 1e-9), 2)
        row.update(
            arch=args.arch,
            resolution=args.resolution,
            batch=args.batch,
            device=str(device),
            precision=precision,
            threads=torch.get_num_threads(),
            overrides=args.set,
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
