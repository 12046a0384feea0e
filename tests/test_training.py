"""The training loop on a tiny random SD: it learns, resumes exactly, and keeps its files."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from controlnet_emo.config import load_config
from controlnet_emo.data.dataset import PreparedDataset, collate, read_metadata
from controlnet_emo.models.controlnet import build_controlnet
from controlnet_emo.models.sd import load_sd
from controlnet_emo.training import checkpointing
from controlnet_emo.training.loop import train
from controlnet_emo.training.step import TrainModels, compute_losses
from tests.conftest import CRITIC_TERMS, DEMO_CONFIG, tiny_overrides


def run(tmp_path, prepared, name, **extra):
    out = tmp_path / name
    cfg = load_config(DEMO_CONFIG, tiny_overrides(out, prepared, **extra))
    train(cfg)
    return out


def weights(run_dir, step):
    return load_file(run_dir / f"checkpoint-{step}" / "model.safetensors")


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(prepared):
    cfg = load_config(
        None, ["data.resolution=64", "loss.diffusion.snr_gamma=null", "loss.diffusion.kind=l2"]
    )
    sd = load_sd("tiny")
    controlnet = build_controlnet(cfg, sd.unet)
    sd.unet.requires_grad_(False)
    records = read_metadata(prepared, "train", cfg.conditions)[:2]
    ds = PreparedDataset(
        prepared, records, cfg.conditions, 64, sd.tokenizer, cfg.data.caption_template, train=False
    )
    batch = collate([ds[0], ds[1]])
    models = TrainModels(
        sd=sd, controlnet=controlnet, pixel_losses=None, weight_dtype=torch.float32
    )
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-3)

    def loss_now():
        with torch.no_grad():
            return float(compute_losses(models, batch, cfg, torch.Generator().manual_seed(0))[0])

    before = loss_now()
    for _ in range(15):
        loss, _ = compute_losses(models, batch, cfg, torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss_now() < 0.9 * before


def test_run_folder_layout_and_metrics(tmp_path, prepared):
    out = run(
        tmp_path, prepared, "run", **{"train.validate_every": 2, "train.report_to": "tensorboard"}
    )
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "controlnet/config.json",
        "controlnet.safetensors",
        "samples/step-2.png",
        "samples/step-4.png",
        "README.md",
    ):
        assert (out / name).exists(), name
    assert any((out / "logs").rglob("events.out.tfevents*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "loss/diffusion", "grad_norm", "lr", "samples_per_s"):
        assert all(key in r for r in rows), key
    assert "val/loss" in rows[1] and "val/loss" not in rows[0]
    assert load_config(out / "config.yaml").output_dir == str(out)


def test_bf16_training_draws_its_validation_samples(tmp_path, prepared, fresh_accelerator_state):
    """The fp32 ControlNet (accelerate returns its outputs in fp32) samples beside the bf16
    UNet: validation used to stop a bf16 run at its first sample grid."""
    out = run(
        tmp_path,
        prepared,
        "bf16",
        **{"train.mixed_precision": "bf16", "train.max_steps": 2, "train.validate_every": 2},
    )
    assert (out / "samples" / "step-2.png").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(rows[-1]["val/loss"])


def test_resume_continues_exactly(tmp_path, prepared):
    straight = run(tmp_path, prepared, "straight", **{"train.max_steps": 4})
    half = run(tmp_path, prepared, "half", **{"train.max_steps": 2})
    run(tmp_path, prepared, "half", **{"train.max_steps": 4, "train.resume": "latest"})
    a, b = weights(straight, 4), weights(half, 4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    steps = [json.loads(x)["step"] for x in (half / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_gradient_accumulation_matches_total_batch(tmp_path, prepared, fresh_accelerator_state):
    """total_batch_size 4 at batch_size 2: one optimizer step on the mean gradient of two
    micro-batches, as one AdamW step by hand on the same samples and noise gives; a loop
    that stepped on each micro-batch, or dropped one, ends elsewhere."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from controlnet_emo.training.loop import build_models, make_loader, step_generator

    flags = {"train.total_batch_size": 4, "train.max_steps": 1, "train.checkpoint_every": 1}
    out = run(tmp_path, prepared, "accum", **flags)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    trained = weights(out, 1)

    cfg = load_config(DEMO_CONFIG, tiny_overrides(tmp_path / "by_hand", prepared, **flags))
    set_seed(cfg.seed)  # what train() does before it builds the models
    models, params, _ = build_models(cfg, Accelerator(cpu=True))
    start = {k: v.detach().clone() for k, v in models.controlnet.state_dict().items()}
    loader = iter(make_loader(cfg, models, Accelerator(cpu=True), start_batch=0))
    micro = [next(loader) for _ in range(2)]  # the run's first two micro-batches, 2 each
    grads = []
    for m, batch in enumerate(micro):
        loss, _ = compute_losses(models, batch, cfg, step_generator(cfg.seed, 0, m, 0))
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))

    def one_step(*picked: int) -> dict[str, torch.Tensor]:
        models.controlnet.load_state_dict(start)
        for p, *g in zip(params, *(grads[i] for i in picked), strict=True):
            p.grad = None if g[0] is None else sum(g) / len(g)
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        t = cfg.train
        opt = torch.optim.AdamW(
            params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
        )
        opt.step()
        return {k: v.detach().clone() for k, v in models.controlnet.state_dict().items()}

    both, last_only = one_step(0, 1), one_step(1)
    assert trained.keys() == both.keys()

    def share_apart(a: dict, b: dict) -> float:
        """Share of weights more than a tenth of an Adam step (lr 1e-3) apart."""
        apart = sum(int(((a[k] - b[k]).abs() > 1e-4).sum()) for k in a)
        return apart / sum(v.numel() for v in a.values())

    # Adam's first step moves each weight by about lr * sign(gradient): where a gradient is
    # ~0 its sign is rounding (0.3 % of the zero convs' weights here); one micro-batch's
    # gradient alone points elsewhere for about a quarter of them.
    moved = [k for k in trained if (trained[k] - start[k]).abs().max() > 5e-4]
    assert any(k.startswith("controlnet_down_blocks") for k in moved)
    assert share_apart({k: trained[k] for k in moved}, {k: both[k] for k in moved}) < 0.02
    assert share_apart({k: last_only[k] for k in moved}, {k: both[k] for k in moved}) > 0.1


def test_checkpoints_are_pruned_and_complete(tmp_path, prepared):
    out = run(
        tmp_path,
        prepared,
        "prune",
        **{"train.max_steps": 6, "train.checkpoint_every": 1, "train.checkpoints_total_limit": 2},
    )
    assert [s for s, _ in checkpointing.list_checkpoints(out)] == [5, 6]
    # a save killed half-way leaves a temp folder that is never taken as the latest
    (out / ".checkpoint-7.tmp").mkdir()
    assert checkpointing.resolve_resume(out, "latest").name == "checkpoint-6"


def test_unet_lora_trains_and_is_saved(tmp_path, prepared):
    """LoRA B starts at zero: only an optimizer that updated the adapters leaves it non-zero,
    and only then does loading the file change what the UNet predicts."""
    from controlnet_emo.inference.infer import load_pipeline

    out = run(
        tmp_path,
        prepared,
        "lora",
        **{"model.unet_trainable": "lora", "model.lora_rank": 2, "train.max_steps": 2},
    )
    lora = load_file(out / "unet_lora" / "pytorch_lora_weights.safetensors")
    b = {k: v for k, v in lora.items() if "lora_B" in k or "lora.up" in k}
    assert b and len(b) == len(lora) // 2
    assert all(v.abs().max() > 0 for v in b.values())  # every adapter's B was updated

    pipe, info = load_pipeline(out, device="cpu")
    assert info.unet_lora == out / "unet_lora"
    base = load_sd("tiny").unet
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, base.config.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 77, base.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        plain = base(latents, 500, encoder_hidden_states=text).sample
        tuned = pipe.unet(latents, 500, encoder_hidden_states=text).sample
        pipe.unet.disable_adapters()
        off = pipe.unet(latents, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(off, plain)  # the same base underneath
    assert (tuned - plain).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["attention", "up_blocks"])
def test_partial_unet_tuning_saves_a_unet(tmp_path, prepared, mode):
    """unet/ holds the base UNet with exactly the tuned part trained, and loads back as the
    run's UNet."""
    from diffusers import UNet2DConditionModel

    from controlnet_emo.inference.infer import load_pipeline
    from controlnet_emo.models.unet_tuning import SELECTORS

    out = run(tmp_path, prepared, mode, **{"model.unet_trainable": mode, "train.max_steps": 2})
    base = load_sd("tiny").unet.state_dict()
    saved = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert saved.keys() == base.keys()
    tuned = {k for k in base if SELECTORS[mode](k)}
    changed = {k for k in base if not torch.equal(saved[k], base[k])}
    assert 0 < len(tuned) < len(base)
    assert changed <= tuned  # the frozen rest is the base, bit for bit
    assert len(changed) > 0.9 * len(tuned)  # (zero biases without a gradient stay zero)
    pipe, info = load_pipeline(out, device="cpu")
    assert info.unet == out / "unet"
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, saved[k]), k


RECORD_DRAWS = """
import json, os, sys
from controlnet_emo.cli.main import main
from controlnet_emo.data.dataset import PreparedDataset

drawn = []  # (index, draw key) of every training sample this process loads
load = PreparedDataset.__getitem__
PreparedDataset.__getitem__ = lambda self, item: (
    drawn.append(list(item)) if self.train else None
) or load(self, item)
code = main(["train", *sys.argv[1:]])
with open(os.path.join(os.environ["DRAWS"], os.environ.get("RANK", "0") + ".json"), "w") as f:
    json.dump(drawn, f)
sys.exit(code)
"""


def test_two_processes_share_the_work(tmp_path, prepared):
    """DDP over gloo on CPU, launched as `accelerate launch`/torchrun would on GPUs: the two
    ranks draw disjoint samples whose union is what one process with accumulation draws, and
    both take the same two Adam steps. (Not to the same weights: the loop seeds the noise by
    (step, micro-step, rank), so rank 1's noise is not the one process's second micro-batch's.)"""
    import os
    import subprocess
    import sys

    # built here, once: two ranks building the tiny base into an empty cache at once race
    start = build_controlnet(load_config(DEMO_CONFIG), load_sd("tiny").unet).state_dict()
    script = tmp_path / "record_draws.py"
    script.write_text(RECORD_DRAWS)
    flags = {"train.total_batch_size": 4, "train.max_steps": 2, "train.ema": False}
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    args = [f"--set={o}" for o in tiny_overrides(tmp_path / "ddp", prepared, **flags)]
    (tmp_path / "draws").mkdir()
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(
        [sys.executable, *launch, "--config", str(DEMO_CONFIG), *args],
        env={**env, "DRAWS": str(tmp_path / "draws")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / "draws" / f"{r}.json").read_text()) for r in (0, 1))
    rank0, rank1 = [tuple(d) for d in rank0], [tuple(d) for d in rank1]

    one: list[tuple[int, int]] = []  # the same recipe in this one process, accumulating 2
    load = PreparedDataset.__getitem__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            PreparedDataset,
            "__getitem__",
            lambda self, item: (
                (one.append(tuple(item)) if self.train else None) or load(self, item)
            ),
        )
        run(tmp_path, prepared, "one", **flags)
    assert len(rank0) == len(rank1) == 4  # 2 steps x batch 2 on each rank
    assert not {i for i, _ in rank0} & {i for i, _ in rank1}  # disjoint samples
    for step in range(2):  # each step, the ranks' samples are the one process's 2 micro-batches
        both = rank0[2 * step : 2 * step + 2] + rank1[2 * step : 2 * step + 2]
        assert sorted(both) == sorted(one[4 * step : 4 * step + 4])
    ckpt = tmp_path / "ddp" / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    ddp, single = weights(tmp_path / "ddp", 2), weights(tmp_path / "one", 2)
    assert ddp.keys() == single.keys() == start.keys()
    zero_convs = [k for k in ddp if k.startswith(("controlnet_down_blocks", "controlnet_mid"))]
    for k in zero_convs:  # two Adam steps away from zero, as in the one-process run
        assert start[k].abs().max() == 0 and 1e-3 < ddp[k].abs().max() < 2.1e-3, k
        assert 1e-3 < single[k].abs().max() < 2.1e-3, k


def test_cached_latents_train_like_on_the_fly(tmp_path, prepared):
    """Cached posteriors + the same noise: the same latents as encoding each step (no aug)."""
    from controlnet_emo.data.latent_cache import encode_moments
    from controlnet_emo.training.step import encode_latents

    cfg = load_config(DEMO_CONFIG, ["data.resolution=64"])
    sd = load_sd("tiny")
    records = read_metadata(prepared, "train", cfg.conditions)[:3]
    plain = PreparedDataset(
        prepared, records, cfg.conditions, 64, sd.tokenizer, "{expression}", train=False
    )
    moments = encode_moments(plain, sd.vae, 2, torch.device("cpu"), torch.float32, False)
    cached = PreparedDataset(
        prepared,
        records,
        cfg.conditions,
        64,
        sd.tokenizer,
        "{expression}",
        train=True,
        hflip=False,  # flips: tests/test_caches.py
        latent_moments=moments,
    )
    b_plain = collate([plain[i] for i in range(3)])
    b_cached = collate([cached[(i, i)] for i in range(3)])
    assert b_cached.latent_moments.shape == (3, 8, 8, 8)
    torch.testing.assert_close(b_cached.pixel_values, b_plain.pixel_values)  # centre crop
    a = encode_latents(sd, b_plain, torch.Generator().manual_seed(0), torch.float32)
    b = encode_latents(sd, b_cached, torch.Generator().manual_seed(0), torch.float32)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    out = run(tmp_path, prepared, "cached", **{"data.cache_latents": True, "train.max_steps": 2})
    assert (out / "latent_cache" / "train-64-mirrored.safetensors").is_file()


@pytest.mark.parametrize("recipe", ["stableface_best.yaml", "affectnet_fast.yaml", "demo.yaml"])
def test_recipes_train_a_few_steps_with_tiny_models(tmp_path, prepared, recipe):
    """Each shipped recipe, with tiny stand-ins for its weights, runs and logs every term."""
    from tests.test_critics import _tiny_taesd_folder

    out = tmp_path / recipe
    stand_ins = {
        "model.pretrained": "tiny",
        "model.emonet": "random",
        "model.lpips_backbone": "random",
        "train.mixed_precision": "no",
        "train.max_steps": 2,
        "loss.pixel.start_step": 0,  # a recipe may hold its pixel terms back
    }
    cfg = load_config(
        DEMO_CONFIG.parent / recipe, tiny_overrides(out, prepared, keep_losses=True, **stand_ins)
    )
    if cfg.model.decoder == "taesd":
        cfg.model.decoder = _tiny_taesd_folder(tmp_path / "taesd")
    train(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {f"loss/{k}" for k, w in cfg.loss.weights().items() if w > 0}
    assert expected <= rows[-1].keys()
    assert all(math.isfinite(rows[-1][k]) for k in expected)


def test_a_diverging_run_stops_with_one_line_and_finite_weights(tmp_path, prepared, capsys):
    """lr 1e8: the weights blow up, later losses are NaN; those steps are skipped, counted,
    and after train.max_bad_steps in a row the run stops (exit 3) with its weights finite."""
    from controlnet_emo.cli.main import main

    out = tmp_path / "run"
    over = tiny_overrides(
        out,
        prepared,
        **{
            "train.learning_rate": 1e8,
            "train.max_steps": 15,
            "train.max_bad_steps": 3,
            "train.checkpoint_every": 1,
        },
    )
    code = main(["train", "--config", str(DEMO_CONFIG), *[f"--set={o}" for o in over]])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 3 and len(errors) == 1 and "diverged" in errors[0]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) >= 3 and skipped[-1]["bad_steps"] >= 3 and rows[-1]["step"] < 15
    from safetensors.torch import load_file

    checkpoints = list(out.glob("checkpoint-*"))
    assert checkpoints  # the last good step's
    for ckpt in checkpoints:
        state = load_file(ckpt / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in state.values()), ckpt


def test_pixel_terms_join_at_their_start_step(tmp_path, prepared):
    """Diffusion alone for the first loss.pixel.start_step steps, then pixel L1 too."""
    out = tmp_path / "late"
    overrides = tiny_overrides(out, prepared, **{"train.max_steps": 3})
    overrides += ["loss.pixel_l1.weight=0.5", "loss.pixel.start_step=2"]
    train(load_config(DEMO_CONFIG, overrides))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ["loss/pixel_l1" in r for r in rows] == [False, False, True]
    assert all("loss/diffusion" in r for r in rows)


def test_balanced_pixel_terms_are_scaled_and_logged(tmp_path, prepared):
    """loss.pixel.balance: the pixel term's pull is capped, and the factor is in metrics."""
    out = tmp_path / "balanced"
    overrides = tiny_overrides(out, prepared, **{"train.max_steps": 2})
    overrides += ["loss.pixel_l1.weight=1000", "loss.pixel.start_step=0", "loss.pixel.balance=0.1"]
    train(load_config(DEMO_CONFIG, overrides))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss/pixel_scale"] for r in rows]
    assert all(0 < s < 1 for s in scales), scales  # at weight 1000, L1 outpulls diffusion


@pytest.mark.parametrize("checkpointing, mode", [(True, "full"), (False, "none")])
def test_the_pixel_path_recomputes_in_backward_only_with_gradient_checkpointing(
    tmp_path, prepared, checkpointing, mode
):
    """A small model with checkpointing off should not pay the decoder and critic twice."""
    from accelerate import Accelerator

    from controlnet_emo.training.loop import build_models

    flag = {**CRITIC_TERMS, "train.gradient_checkpointing": checkpointing}
    overrides = tiny_overrides(tmp_path, prepared, keep_losses=True, **flag)
    models, _, _ = build_models(load_config(DEMO_CONFIG, overrides), Accelerator(cpu=True))
    assert models.pixel_losses.checkpointing == mode


def test_channels_last_changes_the_layout_not_the_training(tmp_path, prepared):
    """train.channels_last (on by default, CPU too) is a speed choice: the same weights."""
    from accelerate import Accelerator

    from controlnet_emo.training.loop import build_models

    runs = {}
    for on in (True, False):
        flag = {"train.channels_last": on, "train.max_steps": 2, "train.checkpoint_every": 2}
        overrides = tiny_overrides(tmp_path / str(on), prepared, keep_losses=True, **flag)
        models, _, _ = build_models(load_config(DEMO_CONFIG, overrides), Accelerator(cpu=True))
        conv = models.sd.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == on
        runs[on] = run(tmp_path, prepared, f"layout-{on}", keep_losses=True, **flag)
    new, old = weights(runs[True], 2), weights(runs[False], 2)
    assert new.keys() == old.keys()
    for key in new:  # a tenth of one Adam step (lr 1e-3): rounding, not another result
        torch.testing.assert_close(new[key], old[key], rtol=1e-3, atol=1e-4)


def test_model_files_of_a_run_are_readable_by_others_under_umask_022(tmp_path, prepared):
    """safetensors writes 0600; a colleague or a ComfyUI running as another user must still
    read the ControlNet a run leaves (0o666 / 0o777 less the umask, as open() and mkdir give)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = run(tmp_path, prepared, "run", **{"train.max_steps": 1, "train.checkpoint_every": 1})
    finally:
        os.umask(old)
    files = [out / "controlnet.safetensors", out / "README.md", *(out / "controlnet").iterdir()]
    files += [p for p in (out / "checkpoint-1").rglob("*") if p.is_file()]  # resumable by others
    assert out / "controlnet" / "diffusion_pytorch_model.safetensors" in files
    assert out / "checkpoint-1" / "model.safetensors" in files
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert stat.S_IMODE((out / "controlnet").stat().st_mode) == 0o755
