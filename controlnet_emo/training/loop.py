"""The training run: setup, the optimizer-step loop, checkpoints, validation, final export.

Reads top to bottom like DiT's ``main()``: models, data, optimizer, resume, loop. The loss is
one call into ``step.compute_losses``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from controlnet_emo.config import Config, gradient_accumulation_steps
from controlnet_emo.data.dataset import (
    StreamSampler,
    class_balance_weights,
    collate,
    dataset_from_config,
    held_out_records,
    read_metadata,
)
from controlnet_emo.models.controlnet import build_controlnet
from controlnet_emo.models.fast_paths import use_fast_paths
from controlnet_emo.models.sd import load_sd, vae_dtype, vae_scale_factor
from controlnet_emo.models.text_cache import TextEmbeddingCache
from controlnet_emo.models.unet_tuning import configure_unet, save_unet
from controlnet_emo.training import checkpointing
from controlnet_emo.training.divergence import DivergedError, non_finite_terms
from controlnet_emo.training.step import TrainModels, compute_losses
from controlnet_emo.training.validation import sample_grid, validation_loss

log = logging.getLogger(__name__)


def train(cfg: Config) -> Path:
    """Train one run into ``cfg.output_dir``. On SIGTERM: finish the optimizer step, write a
    checkpoint and raise `checkpointing.Preempted` (``train.resume=latest`` continues it
    exactly); the previous SIGTERM handler is back in place when this returns or raises."""
    with checkpointing.stop_on_signal() as stop:
        return _train(cfg, stop)


def _train(cfg: Config, stop: checkpointing.StopRequest) -> Path:
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    check_dataset(cfg)  # a wrong data.root fails here, not after the base model loaded
    if cfg.loss.needs_decoder and cfg.loss.pixel.start_step >= cfg.train.max_steps:
        log.warning(
            "loss.pixel.start_step=%d >= train.max_steps=%d: the pixel and emotion terms "
            "never run in this run",
            cfg.loss.pixel.start_step,
            cfg.train.max_steps,
        )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")

    models, trainable, unet_trains = build_models(cfg, accelerator)
    controlnet = models.controlnet
    optimizer = make_optimizer(cfg, trainable)
    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.train.max_steps * accelerator.num_processes,
    )
    ema = make_ema(cfg, controlnet)
    if unet_trains:
        controlnet, models.sd.unet, optimizer, lr_scheduler = accelerator.prepare(
            controlnet, models.sd.unet, optimizer, lr_scheduler
        )
    else:
        controlnet, optimizer, lr_scheduler = accelerator.prepare(
            controlnet, optimizer, lr_scheduler
        )
    models.controlnet = controlnet
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    step = 0
    resume_from = checkpointing.resolve_resume(out, cfg.train.resume)
    if resume_from is not None:
        step = checkpointing.load_checkpoint(accelerator, resume_from)
        log.info("resumed from %s at step %d", resume_from, step)

    accum = accelerator.gradient_accumulation_steps
    train_iter = iter(make_loader(cfg, models, accelerator, start_batch=step * accum))
    val_batches, val_prompts = validation_data(cfg, models)
    metrics = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process, after_step=step)
    if cfg.train.report_to != "none":
        accelerator.init_trackers("controlnet-emo", config=flat_hparams(cfg))

    progress = tqdm(
        total=cfg.train.max_steps,
        initial=step,
        desc="train",
        disable=not accelerator.is_main_process,
    )
    opt = Optimization(
        optimizer,
        lr_scheduler,
        trainable,
        [controlnet, models.sd.unet] if unet_trains else [controlnet],
    )
    bad_streak = bad_total = 0
    while step < cfg.train.max_steps:
        if stop.requested(accelerator):  # between steps: the state is whole and resumable
            progress.close()
            checkpointing.checkpoint_and_stop(accelerator, cfg, step, stop.signum)
        t0 = time.perf_counter()
        totals, grad_norm, bad = optimizer_step(cfg, models, accelerator, train_iter, step, opt)
        step += 1
        bad_streak = bad_streak + 1 if bad else 0
        bad_total += bool(bad)
        if bad:
            log.warning("step %d skipped: not finite: %s", step, ", ".join(bad))
        if ema is not None:
            ema.step(accelerator.unwrap_model(controlnet).parameters())
        record = host_metrics(totals, grad_norm, accelerator)
        record.update(
            step=step,
            bad_steps=bad_total,
            lr=lr_scheduler.get_last_lr()[0],
            samples_per_s=cfg.train.total_batch_size / (time.perf_counter() - t0),
        )
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        if bad:
            record["skipped"] = bad
            metrics.write(record)
            if bad_streak >= cfg.train.max_bad_steps:
                progress.close()
                raise DivergedError(
                    f"training diverged: {bad_streak} steps in a row with non-finite "
                    f"{', '.join(bad)} (last at step {step}); weights were not updated by them, "
                    f"the last checkpoint in {out} is good; lower train.learning_rate"
                )
            continue

        if step % cfg.train.validate_every == 0 or step == cfg.train.max_steps:
            record.update(validate(cfg, models, accelerator, val_batches, val_prompts, step))
        metrics.write(record)
        accelerator.log(record, step=step)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
            checkpointing.save_checkpoint(accelerator, cfg, step, cfg.train.checkpoints_total_limit)
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize(cfg, accelerator, models, ema, step)
    accelerator.end_training()
    return out


@dataclass
class Optimization:
    """What one optimizer step updates: optimizer, LR schedule, the params and their modules."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    params: list
    modules: list


def optimizer_step(
    cfg: Config,
    models: TrainModels,
    accelerator: Accelerator,
    train_iter,
    step: int,
    opt: Optimization,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, list[str]]:
    """One optimizer step over ``accum`` micro-batches; returns mean terms, grad norm and the
    names of what was not finite (then the update was skipped on every process)."""
    accum = accelerator.gradient_accumulation_steps
    totals: dict[str, torch.Tensor] = {}
    grad_norm, bad = None, []
    for micro in range(accum):
        batch = next(train_iter)
        text = models.encode_text(batch.input_ids) if models.text_cache is not None else None
        batch = batch.to(accelerator.device)
        g = step_generator(cfg.seed, step, micro, accelerator.process_index)
        with accelerator.accumulate(*opt.modules):
            loss, terms = compute_losses(models, batch, cfg, g, text, step)
            accelerator.backward(loss)
            for k, v in {"loss": loss, **{f"loss/{t}": x for t, x in terms.items()}}.items():
                totals[k] = totals.get(k, 0.0) + v.detach() / accum
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(opt.params, cfg.train.max_grad_norm)
                bad = non_finite_terms(totals, grad_norm, accelerator)
                if not bad:
                    opt.optimizer.step()
                    opt.lr_scheduler.step()
            opt.optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm, bad


def host_metrics(
    totals: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, accelerator: Accelerator
) -> dict[str, float]:
    """The step's terms (mean over processes) and grad norm as floats, in one device-to-host
    copy: a float() per tensor would stall the GPU queue once per term."""
    names = [*totals, "grad_norm"]
    norm = grad_norm if grad_norm is not None else torch.tensor(float("nan"))
    values = [*totals.values(), norm]
    stacked = torch.stack([torch.as_tensor(v, device=accelerator.device).float() for v in values])
    stacked = accelerator.reduce(stacked, "mean")
    return dict(zip(names, stacked.tolist(), strict=True))


def step_generator(*keys: int) -> torch.Generator:
    """A generator seeded by (seed, step, micro-step, rank): same numbers after a resume."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed % 2**63)


def make_accelerator(cfg: Config) -> Accelerator:
    out = Path(cfg.output_dir)
    precision = cfg.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        log.warning("train.mixed_precision=fp16 needs a GPU; training in fp32 on CPU")
        precision = "no"
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # else torchrun's processes each train alone on CPU
        mixed_precision=precision,
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    # Accumulation follows from the process count, known only once the Accelerator exists.
    accelerator.gradient_accumulation_steps = gradient_accumulation_steps(
        cfg, accelerator.num_processes
    )
    return accelerator


def check_dataset(cfg: Config) -> None:
    """The training split's metadata parses and is not empty (ConfigError naming the file)."""
    from controlnet_emo.config import ConfigError

    path = Path(cfg.data.root) / "metadata.jsonl"
    try:
        records = read_metadata(cfg.data.root, cfg.data.train_split, cfg.conditions)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.root: {err}") from None
    if not records:
        raise ConfigError(f"data.root: {path} has no samples in split {cfg.data.train_split!r}")


def build_models(cfg: Config, accelerator: Accelerator) -> tuple[TrainModels, list, bool]:
    """Base SD (frozen unless asked), ControlNet(s), pixel critics; returns trainable params."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    sd = load_sd(cfg.model.pretrained, cfg.model.revision, cfg.model.variant)
    controlnet = build_controlnet(cfg, sd.unet, vae_scale_factor(sd.vae))
    unet_params = configure_unet(sd.unet, cfg.model.unet_trainable, cfg.model.lora_rank)
    unet_trains = bool(unet_params)
    sd.vae.requires_grad_(False)
    for encoder in sd.text_encoders:
        encoder.requires_grad_(False)
    controlnet.train()
    if cfg.train.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        sd.unet.enable_gradient_checkpointing()
    if cfg.model.attention == "xformers":
        sd.unet.enable_xformers_memory_efficient_attention()
        controlnet.enable_xformers_memory_efficient_attention()
    device = accelerator.device
    move(sd.vae, device, vae_dtype(sd, weight_dtype))  # SDXL's VAE: never fp16
    for encoder in sd.text_encoders:
        move(encoder, device, weight_dtype)
    move(sd.unet, device, torch.float32 if unet_trains else weight_dtype)
    controlnet.to(device)
    channels_last = use_fast_paths(
        device, sd.unet, sd.vae, controlnet, channels_last=cfg.train.channels_last
    )
    pixel = None
    if cfg.loss.needs_decoder:
        from controlnet_emo.training.losses import PixelLosses

        pixel = (
            PixelLosses(cfg, sd.vae)
            .to(device)
            .critics_to(weight_dtype, channels_last=channels_last)
        )
    params = [*controlnet.parameters(), *unet_params]  # before compile wraps the modules
    if cfg.train.compile:
        sd.unet = torch.compile(sd.unet, dynamic=False)
        controlnet = torch.compile(controlnet, dynamic=False)
    models = TrainModels(
        sd=sd,
        controlnet=controlnet,
        pixel_losses=pixel,
        weight_dtype=weight_dtype,
        text_cache=TextEmbeddingCache(sd.text_encoders, weight_dtype)
        if cfg.data.cache_text
        else None,
    )
    return models, params, unet_trains


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, naming the dtype only when it changes: diffusers 0.42
    warns on every ``to(dtype)`` of a model whose list of float32-only modules is empty
    (an empty list is not None), which printed two false alarms at the top of every run."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def make_optimizer(cfg: Config, params: list) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = dict(
        lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay
    )
    if t.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(
                "train.use_8bit_adam needs bitsandbytes: pip install 'controlnet-emo[bnb]'"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    # The fused kernel updates every tensor in one pass (CPU and CUDA): no per-parameter
    # Python loop, the step diffusers' example pays with the default for-loop AdamW.
    return torch.optim.AdamW(params, fused=True, **kwargs)


def make_ema(cfg: Config, controlnet: torch.nn.Module):
    if not cfg.train.ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(controlnet.parameters(), decay=cfg.train.ema_decay, foreach=True)


def make_loader(
    cfg: Config, models: TrainModels, accelerator: Accelerator, start_batch: int
) -> DataLoader:
    records = read_metadata(cfg.data.root, cfg.data.train_split, cfg.conditions)
    records = records[: cfg.data.max_samples] if cfg.data.max_samples else records
    moments = cached_latents(cfg, models, accelerator, records) if cfg.data.cache_latents else None
    dataset = dataset_from_config(
        cfg,
        records,
        models.sd.tokenizers,
        train=True,
        latent_moments=moments,
        load_target=moments is None or cfg.loss.needs_decoder,  # else nothing reads it
    )
    sampler = StreamSampler(
        len(dataset),
        cfg.train.batch_size,
        cfg.seed,
        weights=class_balance_weights(records) if cfg.data.balance_classes else None,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        start_batch=start_batch,
    )
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",  # then batch.to() need not wait
        worker_init_fn=checkpointing.ignore_stop_signals,
    )


def cached_latents(
    cfg: Config, models: TrainModels, accelerator: Accelerator, records: list
) -> torch.Tensor:
    """VAE posteriors of the (centre-cropped) training images, encoded once by the main process."""
    from controlnet_emo.data.latent_cache import (
        cache_key,
        cache_path,
        encode_moments,
        load_or_build,
    )

    folder = Path(cfg.output_dir) / "latent_cache"
    path = cache_path(folder, cfg.data.train_split, cfg.data.resolution, cfg.data.hflip)
    plain = dataset_from_config(cfg, records, models.sd.tokenizers, train=False)
    m = cfg.model
    vae = f"{m.pretrained}@{m.revision}/{m.variant}/{vae_dtype(models.sd, models.weight_dtype)}"
    key = cache_key(vae, Path(cfg.data.root), [r.file_name for r in records])

    def build() -> torch.Tensor:
        return encode_moments(
            plain,
            models.sd.vae,
            cfg.train.batch_size,
            accelerator.device,
            vae_dtype(models.sd, models.weight_dtype),
            accelerator.is_main_process,
            mirrored=cfg.data.hflip,
        )

    if accelerator.is_main_process:
        load_or_build(path, build, key)
    accelerator.wait_for_everyone()
    return load_or_build(path, build, key)


def validation_data(cfg: Config, models: TrainModels) -> tuple[list, list[str]]:
    """Fixed validation batches (val split, else the first train samples) and their prompts."""
    records = held_out_records(cfg)[: cfg.train.validation_samples]
    dataset = dataset_from_config(cfg, records, models.sd.tokenizers, train=False)
    batches = [
        collate([dataset[i] for i in range(j, min(j + cfg.train.batch_size, len(dataset)))])
        for j in range(0, len(dataset), cfg.train.batch_size)
    ]
    return batches, [dataset.caption(r) for r in records]


def validate(
    cfg: Config,
    models: TrainModels,
    accelerator: Accelerator,
    batches: list,
    prompts: list[str],
    step: int,
) -> dict[str, float]:
    controlnet = accelerator.unwrap_model(models.controlnet)
    controlnet.eval()
    scores = validation_loss(models, batches, cfg, accelerator.device)
    if accelerator.is_main_process:
        first = batches[0]
        sample_grid(
            models,
            controlnet,
            first,
            prompts[: len(first)],
            cfg,
            Path(cfg.output_dir) / "samples" / f"step-{step}.png",
        )
    controlnet.train()
    return scores


def finalize(cfg: Config, accelerator: Accelerator, models: TrainModels, ema, step: int) -> None:
    """controlnet/ (diffusers), controlnet.safetensors (original layout), tuned UNet, card."""
    from controlnet_emo.export.formats import export_run, save_diffusers
    from controlnet_emo.export.model_card import write_model_card

    out = Path(cfg.output_dir)
    controlnet = accelerator.unwrap_model(models.controlnet)
    if ema is not None:
        ema.copy_to(controlnet.parameters())
    save_diffusers(controlnet, out, info=model_info(cfg, step))
    save_unet(accelerator.unwrap_model(models.sd.unet), cfg.model.unet_trainable, out)
    export_run(out, "multi" if cfg.model.controlnet.mode == "multi" else "single-file")
    write_model_card(out, cfg, step)


def model_info(cfg: Config, step: int) -> dict:
    return {
        "conditions": cfg.conditions,
        "mode": cfg.model.controlnet.mode,
        "base_model": cfg.model.pretrained,
        "resolution": cfg.data.resolution,
        "steps": step,
    }


def flat_hparams(cfg: Config) -> dict:
    """TensorBoard's hparams take scalars only: flatten and stringify what is not."""
    flat: dict = {}

    def walk(prefix: str, node) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk("", cfg.to_dict())
    return flat


class MetricsLog:
    """metrics.jsonl, one object per optimizer step; on resume, later lines are dropped."""

    def __init__(self, path: Path, enabled: bool, after_step: int = 0):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= after_step
            ]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
