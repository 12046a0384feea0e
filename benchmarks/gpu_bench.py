"""The GPU benchmark behind ``benchmarks/gpu.sh``: train-step throughput, peak memory and MFU.

Why: GPU time is lent in short slots, so the whole check is one prepared run that fits its
slot and writes everything as JSON. For each loss variant (``latent_only``, ``fast``,
``research``; see ``train_step.py``) at 512 px in bf16 with SD 1.5 shapes (random weights,
built in code: nothing downloads), it times the micro-step at batch 8 and at the largest
batch that fits (doubling, then bisection, on out-of-memory), eager and under torch.compile,
and reports samples/s, peak memory and the model FLOPs utilisation against the *counted*
FLOPs of FACTS.md (not a profiler's count):

    latent_only  2.3 TFLOP per sample (forward + backward, 512 px)
    research     7.9 TFLOP per sample (VAE decoder + LPIPS-vgg + EmoNet on every sample)
    fast         2.3 + the decoded share x (TAESD 3 x 0.141 + LPIPS-alex 3 x 0.007
                 + EmoNet 3 x 0.034) TFLOP

The research recipe's speed levers (issue 32) are variants of it (``train_step.py``):
``research_per_sample`` (the pixel path before: sample by sample), ``research_chunkN``,
``research_nchw`` / ``research_nchw_decoder`` (layouts), ``research_norm_fp32`` (GroupNorm as
autocast runs it), ``research_latent_lpips``; they are timed at ``--batch`` only (the
``--largest-variants`` also at the largest batch that fits, eager). Compiled modes: ``compiled``
(UNet, ControlNet and the pixel path, as ``train.compile``) and ``compiled_pixel`` (the pixel
path alone, UNet and ControlNet eager); a compiled row's ``compile_s`` is its first step's
time over a warm one's.

A time budget (``--budget-s``) skips what would not finish, and says so in the JSON.
``--dry-run`` runs the same code on the CPU with the tiny model at 64 px in fp32 (batch 2,
the largest-batch search capped at 4, 2 timed steps, compile with the ``eager`` backend:
dynamo's tracing without code generation, the shipped small face critic for EmoNet). The
``fast`` variant decodes its recipe's fixed count per micro-batch (capped by the batch), at
every batch size. ``--profile VARIANT`` adds the ops with the most device time in one of its
micro-steps (``profile`` in the JSON). ``--sdxl-variants`` adds, after everything else, those
variants on SDXL-base's shapes at 1024 px (``train_step.SDXL_BASE_UNET``: two text encoders,
``text_time``; bf16, random weights) at each of ``--sdxl-batches`` (rows with ``arch: sdxl``;
the dry run: tiny-xl at 64 px).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import ARCHS, Bench, Variant, random_taesd, variant_config  # noqa: E402

TFLOP_PER_SAMPLE = {"latent_only": 2.3, "research": 7.9}
FAST_DECODED_TFLOP = 3 * (0.141 + 0.007 + 0.034)
PEAK_TFLOPS = {"H100": 800.0, "H200": 800.0, "A100": 312.0}  # dense bf16 (FACTS.md, H100)


def tflop_per_sample(variant: Variant) -> float | None:
    """Counted training FLOPs of one sample at 512 px (FACTS.md): the research levers do the
    research's work (the latent LPIPS other work, not counted: None)."""
    if variant.name == "fast":
        share = (variant.cfg.loss.pixel.samples_per_batch or variant.batch) / variant.batch
        return TFLOP_PER_SAMPLE["latent_only"] + share * FAST_DECODED_TFLOP
    if variant.name == "research_latent_lpips":
        return None
    if variant.name.startswith("research"):
        return TFLOP_PER_SAMPLE["research"]
    return TFLOP_PER_SAMPLE[variant.name]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset (None on CPU: see train_step.py)."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def fits(bench: Bench, variant: Variant, batch: int) -> bool:
    """One micro-step at ``batch`` runs without running out of memory."""
    variant.batch = batch
    try:
        bench.micro_step(variant.cfg, variant.losses, batch)
        sync(bench.device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        bench.optimizer.zero_grad(set_to_none=False)
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(bench: Bench, variant: Variant, start: int, cap: int) -> int:
    """Largest batch <= cap that fits: double from ``start``, then bisect the last gap."""
    good, bad = 0, cap + 1
    b = start
    while b <= cap and fits(bench, variant, b):
        good, b = b, b * 2
    bad = min(bad, b)
    while bad - good > 1 and good:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(bench, variant, mid) else (good, mid)
    return good


def measure(
    bench: Bench,
    variant: Variant,
    batch: int,
    steps: int,
    peak: float | None,
    counted: bool = True,
) -> dict:
    """Warm up (compiling, when on), then time ``steps`` micro-steps."""
    device, variant.batch = bench.device, batch
    start = time.perf_counter()
    bench.micro_step(variant.cfg, variant.losses, batch)
    sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        bench.micro_step(variant.cfg, variant.losses, batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    bench.optimizer.zero_grad(set_to_none=False)
    step_s = statistics.median(times)
    rate = batch / step_s
    flops = tflop_per_sample(variant) if counted else None  # counted for SD 1.5 at 512 px
    return dict(
        samples_per_s=round(rate, 2),
        step_s=round(step_s, 4),
        first_step_s=round(warmup_s, 2),
        peak_mem_mb=None if peak_mb(device) is None else round(peak_mb(device), 1),
        tflop_per_sample=None if flops is None else round(flops, 3),
        mfu=None if peak is None or flops is None else round(rate * flops / peak, 4),
    )


def profile_step(bench: Bench, variant: Variant, batch: int, top: int = 15) -> list[dict]:
    """Where one warm micro-step's time goes: the ops with the most self device time (CPU
    time on a dry run), so the next speed-up starts from a measurement."""
    from torch.profiler import ProfilerActivity, profile

    cuda = bench.device.type == "cuda"
    variant.batch = batch
    bench.micro_step(variant.cfg, variant.losses, batch)  # warm: allocator, cuDNN autotuning
    sync(bench.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        bench.micro_step(variant.cfg, variant.losses, batch)
        sync(bench.device)
    bench.optimizer.zero_grad(set_to_none=False)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    # On CUDA both an op and the kernels it launched carry its device time: the share is of
    # the kernels' total, the step's real device time, so an op's and its kernels' agree.
    timed = [e for e in events if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, key) for e in timed) or 1.0
    return [
        dict(
            op=e.key,
            ms=round(getattr(e, key) / 1e3, 2),
            share=round(getattr(e, key) / total, 3),
            calls=e.count,
        )
        for e in events[:top]
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 64 px, fp32")
    p.add_argument("--variants", default="latent_only,fast,research")
    p.add_argument(
        "--compile-variants", default=None, help="those also timed compiled (default: all)"
    )
    p.add_argument(
        "--compile-pixel-variants",
        default="",
        help="those also timed with only the pixel path compiled (UNet, ControlNet eager)",
    )
    p.add_argument(
        "--largest-variants",
        default=None,
        help="those also timed at the largest batch that fits (default: all)",
    )
    p.add_argument(
        "--profile", default=None, help="a variant whose micro-step is profiled at --batch"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-batch-cap", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=330.0, help="skip what starts later")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: by GPU name")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument(
        "--sdxl-variants",
        default="",
        help="after everything else: these also on SDXL-base shapes at 1024 px (dry run: "
        "tiny-xl at 64 px), at each --sdxl-batches",
    )
    p.add_argument("--sdxl-batches", default="1,2,4")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="cap the GPU memory this process may take (80: an H100's, on a larger card)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    arch, resolution = ("tiny", 64) if dry else ("sd15", 512)
    dtype = torch.float32 if dry else torch.bfloat16
    batch, cap = (2, 4) if dry else (args.batch, args.max_batch_cap)
    steps = 2 if dry else args.steps
    backend = "eager" if dry else "inductor"
    peak = peak_tflops(device, args.peak_tflops)
    if args.memory_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gb * 2**30 / total))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    compiled_names = names if args.compile_variants is None else args.compile_variants.split(",")
    pixel_names = [v for v in args.compile_pixel_variants.split(",") if v]
    largest_names = names if args.largest_variants is None else args.largest_variants.split(",")
    rows, skipped, largest = [], [], {}
    result = dict(
        rows=rows,
        skipped=skipped,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        arch=arch,
        resolution=resolution,
        precision=str(dtype).removeprefix("torch."),
        peak_tflops=peak,
        memory_cap_gb=args.memory_gb if device.type == "cuda" else None,
        dry_run=dry,
        torch=torch.__version__,
        wall_s=0.0,
    )

    def save() -> str:
        """The JSON so far, also to ``--out``: a run killed at its time limit keeps its rows."""
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        text = json.dumps(result)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return text

    with tempfile.TemporaryDirectory() as tmp:
        taesd = random_taesd(Path(tmp) / "taesd")
        bench = Bench(ARCHS[arch](), device, dtype, resolution)
        extra = ["model.emonet=demo-critic-train"] if dry else None  # EmoNet is slow on CPU
        variants = [Variant(n, *variant_config(n, batch, taesd, extra)) for n in names]
        for v in variants:
            bench.build(v, batch)
        plan = [(v, "eager") for v in variants]  # eager first: the must-have
        plan += [(v, "profile") for v in variants if v.name == args.profile]
        plan += [(v, "compiled_pixel") for v in variants if v.name in pixel_names]
        plan += [(v, "compiled") for v in variants if v.name in compiled_names]
        for v, mode in plan:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"{v.name} {mode}: over the time budget")
                continue
            try:
                bench.prepare(v)  # its checkpointing and decoder layout on the shared VAE
                bench.set_compiled(mode == "compiled", backend)
                v.losses.set_compiled(mode in ("compiled", "compiled_pixel"), backend)
                if mode == "profile":
                    ops = profile_step(bench, v, batch)
                    result["profile"] = dict(variant=v.name, batch=batch, ops=ops)
                    continue
                sizes = {"batch": batch}  # compiled: one compile per shape, batch only
                if v.name in largest_names and mode == "eager":
                    if v.name not in largest:  # searched eagerly; compiled runs re-trace
                        largest[v.name] = largest_batch(bench, v, batch, cap)
                    sizes["largest"] = largest[v.name]
                for label, b in sizes.items():
                    if b < 1:
                        raise RuntimeError(f"{label}: batch {batch} does not fit")
                    row = dict(variant=v.name, compile=mode, batch=b, batch_kind=label)
                    row.update(measure(bench, v, b, steps, peak))
                    if mode != "eager":
                        row["compile_s"] = round(row["first_step_s"] - row["step_s"], 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            except Exception as err:  # one failing variant (a compiler error) keeps the others
                skipped.append(f"{v.name} {mode}: {type(err).__name__}: {err}"[:500])
                print(skipped[-1], file=sys.stderr, flush=True)
            finally:
                v.losses.set_compiled(False)
                save()
        sdxl_names = [n for n in args.sdxl_variants.split(",") if n]
        if sdxl_names:
            bench = variants = plan = v = None  # SD 1.5's weights leave before SDXL's
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batches = [int(b) for b in args.sdxl_batches.split(",") if b]
            sdxl_rows(result, args, t_start, device, dtype, peak, sdxl_names, batches, taesd, extra)
            save()
    print(save(), flush=True)
    return result


def sdxl_rows(
    result: dict,
    args: argparse.Namespace,
    t_start: float,
    device: torch.device,
    dtype: torch.dtype,
    peak: float | None,
    names: list[str],
    batches: list[int],
    taesd: str,
    extra: list[str] | None,
) -> None:
    """SDXL-base's shapes (random weights, both text encoders, ``text_time`` added
    conditions) at 1024 px, eager, each variant at each batch; rows carry ``arch: sdxl``. A
    batch that runs out of memory is recorded in ``skipped`` and the larger ones are not
    tried. The dry run: tiny-xl at 64 px. Rows report no MFU: their FLOPs are not counted."""
    from train_step import ARCHS

    dry = device.type == "cpu"
    arch, resolution = ("tiny-xl", 64) if dry else ("sdxl", 1024)
    skipped, rows = result["skipped"], result["rows"]
    if time.perf_counter() - t_start > args.budget_s:
        skipped.append(f"sdxl {','.join(names)}: over the time budget")
        return
    start = time.perf_counter()
    parts = ARCHS[arch]() if dry else ARCHS[arch](device)
    bench = Bench(parts, device, dtype, resolution)
    result["sdxl"] = dict(
        arch=arch, resolution=resolution, build_s=round(time.perf_counter() - start, 1)
    )
    steps = 2 if dry else args.steps
    for name in names:
        variant = Variant(name, *variant_config(name, batches[0], taesd, extra))
        bench.build(variant, batches[0])
        bench.prepare(variant)
        for b in batches:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"sdxl {name} batch {b}: over the time budget")
                continue
            try:
                row = dict(variant=name, arch=arch, resolution=resolution, compile="eager")
                row.update(batch=b, batch_kind="sdxl")
                row.update(measure(bench, variant, b, steps, peak, counted=False))
                rows.append(row)
                print(json.dumps(row), flush=True)
            except torch.OutOfMemoryError:
                skipped.append(f"sdxl {name} batch {b}: out of memory")
                bench.optimizer.zero_grad(set_to_none=False)
                torch.cuda.empty_cache()
                break
            except Exception as err:
                skipped.append(f"sdxl {name} batch {b}: {type(err).__name__}: {err}"[:500])
                print(skipped[-1], file=sys.stderr, flush=True)
                break
        variant.losses = None


if __name__ == "__main__":
    main()
