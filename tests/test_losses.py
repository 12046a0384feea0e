"""Loss terms: exact values on hand-made inputs, min-SNR against its formula, which samples pay
the decoder, and the gradient path from the emotion critic back into the ControlNet."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler
from torch.utils.checkpoint import checkpoint

from controlnet_emo.config import load_config
from controlnet_emo.training.losses import (
    PixelLosses,
    diffusion_loss,
    diffusion_target,
    gradient_balance,
    masked_mean,
    min_snr_weights,
    predict_x0,
    select_pixel_samples,
    soft_landmarks,
    to_emonet_input,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.filterwarnings("ignore:EmoNet has random weights")

OFF = {
    "loss.diffusion.weight": 0,
    "loss.pixel_l1.weight": 0,
    "loss.lpips.weight": 0,
    "loss.emotion.valence": 0,
    "loss.emotion.arousal": 0,
    "loss.emotion.expression": 0,
    "loss.landmarks.weight": 0,
}


def _cfg(**on):
    """A config with every term off except those given (dotted keys with '__' for '.')."""
    values = dict(OFF)
    values.update({k.replace("__", "."): v for k, v in on.items()})
    values.setdefault("model.lpips_backbone", "random")
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """SD's training schedule (scaled-linear betas 0.00085..0.012 over 1000 steps)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


# --- latent-space terms ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_x0_prediction_inverts_the_noising(kind):
    scheduler = _scheduler(kind)
    torch.manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([0, 250, 600, 999])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    exact = diffusion_target(latents, noise, timesteps, scheduler)  # the perfect model output
    assert torch.allclose(predict_x0(noisy, exact, timesteps, scheduler), latents, atol=1e-4)


def test_diffusion_target_is_noise_or_velocity():
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert torch.equal(diffusion_target(latents, noise, t, _scheduler()), noise)
    a = _scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * latents
    v = diffusion_target(latents, noise, t, _scheduler("v_prediction"))
    assert torch.allclose(v, velocity, atol=1e-6)


def test_min_snr_weights_match_the_formula_and_facts():
    scheduler = _scheduler()
    t = torch.arange(1000)
    a = scheduler.alphas_cumprod.double()
    snr = a / (1 - a)
    w = min_snr_weights(scheduler, t, 0.8).double()
    assert torch.allclose(w, torch.clamp(snr, max=0.8) / snr, rtol=1e-5)
    first_one = int(torch.nonzero(w >= 1 - 1e-6)[0])
    assert 380 <= first_one <= 395  # FACTS.md: 1 for t >= ~388
    assert (w[first_one:] > 1 - 1e-6).all() and (w[:first_one] < 1).all()
    assert w[0] == pytest.approx(0.0007, abs=1e-4)
    assert w.mean() == pytest.approx(0.74, abs=0.01)
    wv = min_snr_weights(_scheduler("v_prediction"), t, 0.8).double()
    assert torch.allclose(wv, torch.clamp(snr, max=0.8) / (snr + 1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_diffusion_loss_value(kind):
    scheduler = _scheduler()
    pred, target = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0, 500])
    per = torch.tensor([2.0, 2.0]) if kind == "l1" else torch.tensor([4.0, 4.0])
    assert diffusion_loss(pred, target, t, scheduler, kind).item() == pytest.approx(per.mean())
    w = min_snr_weights(scheduler, t, 0.8)
    got = diffusion_loss(pred, target, t, scheduler, kind, snr_gamma=0.8)
    assert got.item() == pytest.approx((per * w).mean().item(), rel=1e-6)


# --- sample selection and helpers ------------------------------------------------------------


def test_selection_picks_only_payers_low_noise_first_in_batch_order():
    t = torch.tensor([900, 100, 700, 50])
    index, keep = select_pixel_samples(t, max_timestep=400, count=3)
    assert index.tolist() == [1, 3] and keep.all()  # only the two that pay are decoded
    index, keep = select_pixel_samples(t, max_timestep=800, count=2)
    assert index.tolist() == [1, 2] and keep.all()  # the count caps the payers
    index, keep = select_pixel_samples(t, max_timestep=None, count=None)
    assert index.tolist() == [0, 1, 2, 3] and keep.all()
    index, keep = select_pixel_samples(t, max_timestep=10, count=2)
    assert index.shape == (0,) and keep.shape == (0,)


def test_selection_pads_to_static_shapes_for_compiled_code():
    t = torch.tensor([900, 100, 700, 50, 20])
    index, keep = select_pixel_samples(t, max_timestep=400, count=3, pad_to=3)
    assert index.tolist() == [1, 3, 4] and keep.all()
    index, keep = select_pixel_samples(t, max_timestep=60, count=3, pad_to=3)
    assert index.tolist() == [3, 4, 0] and keep.tolist() == [True, True, False]
    index, keep = select_pixel_samples(t, max_timestep=400, count=None, pad_to=2)
    assert index.tolist() == [1, 3, 4, 0] and keep.tolist() == [True] * 3 + [False]
    index, keep = select_pixel_samples(t, max_timestep=400, count=None, pad_to=5)
    assert index.shape == (5,) and keep.sum() == 3  # at most the batch
    assert select_pixel_samples(t, max_timestep=10, count=None, pad_to=2)[0].numel() == 0


def test_gradient_balance_caps_the_weaker_pull_only():
    """A term ten times the anchor's pull is scaled to ``ratio`` of it; a weak one is kept."""
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    anchor = pred.pow(2).sum()  # gradient 2 * pred
    strong = 20 * pred.pow(2).sum()  # gradient 40 * pred: 20x the anchor's
    assert gradient_balance(anchor, strong, pred, 0.5).item() == pytest.approx(0.5 / 20)
    assert gradient_balance(anchor, 0.1 * anchor, pred, 0.5).item() == 1.0
    factor = gradient_balance(anchor, strong, pred, 1.0)
    assert not factor.requires_grad
    (g,) = torch.autograd.grad(anchor + factor * strong, pred)
    assert torch.allclose(
        g, 2 * (2 * pred), atol=1e-5
    )  # the scaled term pulls as hard as the anchor


def test_masked_mean_ignores_masked_samples_even_if_not_finite():
    per = torch.tensor([1.0, float("inf"), 3.0], requires_grad=True)
    keep = torch.tensor([True, False, True])
    value = masked_mean(per, keep)
    assert value.item() == 2.0
    value.backward()
    assert per.grad.tolist() == [0.5, 0.0, 0.5]
    assert masked_mean(per, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_emonet_input_is_unit_range_at_256():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 512, 512)
    y = to_emonet_input(x)
    assert y.shape == (1, 3, 256, 256)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0]))


# --- pixel and emotion terms on the tiny SD --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from controlnet_emo.models.sd import load_sd

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONTROLNET_EMO_CACHE", str(tmp_path_factory.mktemp("cache")))
        sd = load_sd("tiny")
    for part in (sd.vae, sd.unet, sd.text_encoder):
        part.requires_grad_(False).eval()
    return sd


def _batch(sd, b: int = 2, size: int = 64, seed: int = 0):
    """Real images, their latents, and an exact epsilon prediction (so x0_hat == x0)."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        latents = sd.vae.encode(pixel_values).latent_dist.mean * sd.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.tensor([20, 700, 300, 900][:b])
    noisy = sd.scheduler.add_noise(latents, noise, timesteps)
    labels = dict(
        expression=torch.tensor([1, -1, 3, 0][:b]),
        valence=torch.tensor([0.5, float("nan"), -0.2, 0.1][:b]),
        arousal=torch.tensor([-0.3, 0.2, float("nan"), 0.4][:b]),
    )
    return dict(
        noisy_latents=noisy,
        model_pred=noise,
        timesteps=timesteps,
        scheduler=sd.scheduler,
        pixel_values=pixel_values,
        latents=latents,
        **labels,
    )


def test_weight_zero_builds_and_returns_nothing(tiny_sd):
    losses = PixelLosses(_cfg(loss__diffusion__weight=1), tiny_sd.vae)
    assert losses.terms == () and losses.decoder is None
    assert losses.lpips is None and losses.emonet is None
    assert losses(**_batch(tiny_sd)) == {}
    only_l1 = PixelLosses(_cfg(loss__pixel_l1__weight=1), tiny_sd.vae)
    assert only_l1.terms == ("pixel_l1",) and only_l1.lpips is None and only_l1.emonet is None


def test_identical_images_give_zero_l1_and_lpips(tiny_sd):
    losses = PixelLosses(
        _cfg(loss__pixel_l1__weight=1, loss__lpips__weight=1, model__lpips_net="alex"), tiny_sd.vae
    )
    batch = _batch(tiny_sd)
    with torch.no_grad():  # the real image is the VAE's own reconstruction: x0_hat == x0
        batch["pixel_values"] = losses.decoder(batch["latents"])
        terms = losses(**batch)
        assert set(terms) == {"pixel_l1", "lpips"}
        assert terms["pixel_l1"].item() == pytest.approx(0.0, abs=1e-4)
        assert terms["lpips"].item() == pytest.approx(0.0, abs=1e-6)
        batch["pixel_values"] = batch["pixel_values"] + 0.5  # every pixel off by 0.5
        assert losses(**batch)["pixel_l1"].item() == pytest.approx(0.5, abs=1e-4)


def test_taesd_compares_with_its_own_decoding_of_the_real_latent(tiny_sd, tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4,
        num_encoder_blocks=(1,) * 4,
        num_decoder_blocks=(1,) * 4,
    ).save_pretrained(tmp_path / "taesd")
    losses = PixelLosses(
        _cfg(loss__pixel_l1__weight=1, model__decoder=str(tmp_path / "taesd")), tiny_sd.vae
    )
    with torch.no_grad():  # exact prediction: zero although the real image is unrelated noise
        assert losses(**_batch(tiny_sd))["pixel_l1"].item() == pytest.approx(0.0, abs=1e-4)


def test_checkpointing_modes_give_the_same_gradient(tiny_sd):
    torch.manual_seed(0)  # a random LPIPS trunk can be ill-conditioned; keep this one fixed
    losses = PixelLosses(
        _cfg(loss__pixel_l1__weight=1, loss__lpips__weight=1, model__lpips_net="alex"), tiny_sd.vae
    )
    assert losses.checkpointing == "full" and tiny_sd.vae.decoder.gradient_checkpointing
    batch = _batch(tiny_sd, b=3)
    batch["model_pred"] = batch["model_pred"] + 0.3 * torch.randn_like(batch["model_pred"])
    grads, values = {}, {}
    for mode in ("none", "blocks", "full"):
        losses.set_checkpointing(mode)
        pred = batch["model_pred"].clone().requires_grad_(True)
        terms = losses(**{**batch, "model_pred": pred})
        (terms["pixel_l1"] + terms["lpips"]).backward()
        grads[mode], values[mode] = pred.grad, {k: v.item() for k, v in terms.items()}
    assert grads["none"].abs().sum() > 0
    for mode in ("blocks", "full"):
        assert values[mode] == pytest.approx(values["none"], rel=1e-5)
        assert torch.allclose(grads[mode], grads["none"], atol=1e-6)
    losses.set_checkpointing("full")


def _per_sample_reference(losses, **batch) -> dict[str, torch.Tensor]:
    """The pixel path before issue 32, kept only here as the reference: a fixed count of
    samples (the payers first, padding masked out), each sample's decoder, LPIPS and EmoNet
    run alone, each under its own checkpoint (the decoder's per-block ones inside)."""
    t, b = batch["timesteps"], batch["timesteps"].shape[0]
    n = b if losses.samples_per_batch is None else min(losses.samples_per_batch, b)
    eligible = t < losses.max_timestep
    index = torch.argsort((~eligible).long() * b + torch.arange(b))[:n]
    keep = eligible[index]
    x0 = predict_x0(
        batch["noisy_latents"][index], batch["model_pred"][index], t[index], batch["scheduler"]
    )
    with torch.no_grad():
        reference = batch["pixel_values"][index].float()
        labels = (batch[k][index] for k in ("expression", "valence", "arousal"))
        goals = losses._emotion_goals(reference, *labels)

    def lpips(image, ref):
        return losses.lpips(image, ref).flatten()

    def emonet(image):
        out = losses.emonet(to_emonet_input(image))
        return out["expression"], out["valence"], out["arousal"], soft_landmarks(out["heatmap"])

    rows = []
    for i in range(n):
        image = checkpoint(losses.decoder, x0[i : i + 1], use_reentrant=False)
        ref = reference[i : i + 1]
        v_goal, a_goal, e_goal, p_goal = (g[i : i + 1] for g in goals)
        expression, valence, arousal, points = checkpoint(emonet, image, use_reentrant=False)
        rows.append(
            dict(
                pixel_l1=(image - ref).abs().mean(dim=(1, 2, 3)),
                lpips=checkpoint(lpips, image, ref, use_reentrant=False),
                valence=(valence - v_goal).abs(),
                arousal=(arousal - a_goal).abs(),
                expression=F.cross_entropy(expression, e_goal, reduction="none"),
                landmarks=(points - p_goal).abs().mean(dim=(1, 2)),
            )
        )
    return {k: masked_mean(torch.cat([r[k] for r in rows]), keep) for k in losses.terms}


def _controlled_batch(sd, b: int = 4):
    """A batch whose prediction comes from a ControlNet (zero convs re-initialised so that
    gradient reaches all of it), and that ControlNet."""
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_channels=9)
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.05)
    torch.nn.init.normal_(controlnet.controlnet_cond_embedding.conv_out.weight, std=0.05)
    batch = _batch(sd, b=b)
    ids = sd.tokenizer(
        ["a photo of a face"] * b, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = sd.text_encoder(ids)[0]
    noisy, t = batch["noisy_latents"], batch["timesteps"]
    down, mid = controlnet(
        noisy, t, text, controlnet_cond=torch.rand(b, 9, 64, 64), return_dict=False
    )
    pred = sd.unet(
        noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    return {**batch, "model_pred": pred}, controlnet


ALL_TERMS = dict(
    loss__pixel_l1__weight=1,
    loss__lpips__weight=1,
    model__lpips_net="alex",
    model__emonet="demo-critic-train",  # the shipped small critic: quick, and trained
    loss__emotion__valence=1,
    loss__emotion__arousal=1,
    loss__emotion__expression=1,
    loss__landmarks__weight=1,
)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_batched_pixel_path_matches_the_per_sample_one(tiny_sd, chunk_size):
    """Values and gradients (on the prediction and on the ControlNet's weights) of the batch
    path, all at once or in chunks, are those of the old sample-by-sample path, in fp32."""
    torch.manual_seed(0)
    cfg = _cfg(
        **ALL_TERMS, loss__pixel__max_timestep=800, loss__pixel__chunk_size=chunk_size or "null"
    )
    losses = PixelLosses(cfg, tiny_sd.vae)
    assert losses.checkpointing == "full" and losses.chunk_size == chunk_size
    batch, controlnet = _controlled_batch(tiny_sd)  # timesteps 20, 700, 300, 900: 3 pay
    pred = batch["model_pred"]
    params = [p for p in controlnet.parameters()]
    results = {}
    # oneDNN picks other conv kernels for one sample than for three, which moves the random
    # EmoNet's input gradient by ~0.1 %; ATen's own kernels compute each sample alike.
    with torch.backends.mkldnn.flags(enabled=False):
        for name, path in (("batched", losses), ("per_sample", _per_sample_reference)):
            terms = path(**batch) if name == "batched" else path(losses, **batch)
            assert set(terms) == set(losses.terms)
            total = sum(terms.values())
            grads = torch.autograd.grad(total, [pred, *params], retain_graph=True)
            results[name] = ({k: v.item() for k, v in terms.items()}, grads)
    (values, grads), (ref_values, ref_grads) = results["batched"], results["per_sample"]
    assert values == pytest.approx(ref_values, rel=1e-6, abs=1e-8)
    assert grads[0].abs().sum() > 0 and grads[0][3].abs().sum() == 0  # t=900 does not pay
    assert all(g.abs().sum() > 0 for g in grads[1:5])
    errors = [
        float((g - w).norm() / w.norm().clamp(min=1e-12))
        for g, w in zip(grads, ref_grads, strict=True)
    ]
    # relative to each gradient's norm: under 1e-5 on one thread, ~1e-4 on two (the threads
    # split the reductions differently); a wrong sample or mask errs by order 1
    assert max(errors) < 1e-3, max(errors)


def test_bf16_pixel_path_is_close_to_fp32_and_norms_in_bf16(tiny_sd):
    """The frozen decoder and critics cast to bf16 run in bf16 end to end, even inside the
    caller's autocast (no GroupNorm in fp32), and give the fp32 path's terms to bf16 accuracy."""
    import copy

    torch.manual_seed(0)
    # EmoNet, not the shipped face critic: that one resizes its input with antialiasing,
    # which the CPU has no bf16 kernel for (CUDA has).
    cfg = _cfg(**{**ALL_TERMS, "model__emonet": "random"})
    batch = _batch(tiny_sd, b=2)
    batch["model_pred"] = batch["model_pred"] + 0.3 * torch.randn_like(batch["model_pred"])
    fp32 = PixelLosses(cfg, tiny_sd.vae)
    vae16 = copy.deepcopy(tiny_sd.vae).to(torch.bfloat16)
    bf16 = PixelLosses(cfg, vae16).critics_to(torch.bfloat16)
    bf16.lpips.load_state_dict(fp32.lpips.state_dict())  # the same random critics
    bf16.emonet.load_state_dict(fp32.emonet.state_dict())
    norms = [m for m in bf16.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 5  # the decoder's and the critic's
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in norms]
    pred = batch["model_pred"].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = bf16(**{**batch, "model_pred": pred})
    sum(low.values()).backward()
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    with torch.no_grad():
        high = fp32(**batch)
    for name, value in high.items():
        assert low[name].dtype == torch.float32
        assert low[name].item() == pytest.approx(value.item(), rel=0.05, abs=0.01), name


def test_latent_lpips_reads_decoder_features_without_decoding(tiny_sd):
    """LPL in the decoder's feature space: zero for the real latent, positive off it, with
    gradient to the prediction, and no pixel ever decoded when no other term needs it."""
    losses = PixelLosses(_cfg(loss__lpips__weight=1, loss__lpips__space="latent"), tiny_sd.vae)
    assert losses.latent_lpips and losses.lpips is None and not losses.needs_image
    head = tiny_sd.vae.decoder.conv_out
    calls = []
    hook = head.register_forward_hook(lambda *args: calls.append(1))
    batch = _batch(tiny_sd, b=3)  # the exact prediction: x0_hat == x0
    try:
        same = losses(**batch)["lpips"]
        pred = (batch["model_pred"] + 0.3 * torch.randn_like(batch["model_pred"])).requires_grad_()
        off = losses(**{**batch, "model_pred": pred})["lpips"]
        off.backward()
    finally:
        hook.remove()
    assert not calls  # never decoded to pixels
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert off.item() > 1e-3
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_latent_lpips_shares_the_decode_with_the_pixel_terms(tiny_sd):
    """With a pixel term beside it, the image comes from the same feature pass and is the
    decoder's own (pixel L1 as without the latent LPIPS)."""
    batch = _batch(tiny_sd, b=2)
    batch["model_pred"] = batch["model_pred"] + 0.3 * torch.randn_like(batch["model_pred"])
    both = PixelLosses(
        _cfg(loss__pixel_l1__weight=1, loss__lpips__weight=1, loss__lpips__space="latent"),
        tiny_sd.vae,
    )
    alone = PixelLosses(_cfg(loss__pixel_l1__weight=1), tiny_sd.vae)
    with torch.no_grad():
        shared, plain = both(**batch), alone(**batch)
    assert both.needs_image and shared["lpips"].item() > 0
    assert shared["pixel_l1"].item() == pytest.approx(plain["pixel_l1"].item(), rel=1e-5)


def test_layouts_change_no_value(tiny_sd):
    """The decoder and critics in either memory layout give the same terms."""
    import copy

    batch = _batch(tiny_sd, b=2)
    values = {}
    for layout in ("channels_last", "contiguous"):
        vae = copy.deepcopy(tiny_sd.vae).to(memory_format=torch.channels_last)
        cfg = _cfg(
            **ALL_TERMS,
            loss__pixel__decoder_layout=layout,
            loss__pixel__critic_layout=layout,
        )
        torch.manual_seed(0)
        losses = PixelLosses(cfg, vae).critics_to(torch.float32, channels_last=True)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=fmt)
        assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            values[layout] = {k: v.item() for k, v in losses(**batch).items()}
    assert values["contiguous"] == pytest.approx(values["channels_last"], rel=1e-4, abs=1e-6)


def _compiled_matches_eager(sd, backend: str) -> None:
    """Values and gradients of the compiled pixel path against eager; the gradient is taken
    twice, the first time retaining the graph, as ``gradient_balance`` does."""
    torch.manual_seed(0)
    losses = PixelLosses(_cfg(**ALL_TERMS, loss__pixel__max_timestep=800), sd.vae)
    batch = _batch(sd, b=3)
    grads, values = [], []
    for compiled in (False, True):
        losses.set_compiled(compiled, backend=backend)
        pred = (batch["model_pred"] + 0.1).requires_grad_(True)
        terms = losses(**{**batch, "model_pred": pred})
        total = sum(terms.values())
        (first,) = torch.autograd.grad(total, pred, retain_graph=True)
        total.backward()
        assert torch.equal(pred.grad, first)
        grads.append(pred.grad)
        values.append({k: v.item() for k, v in terms.items()})
    assert set(losses.compiled) == {"decoder", "lpips", "emonet"}
    assert values[1] == pytest.approx(values[0], rel=1e-4, abs=1e-6)
    error = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert error < 1e-3, float(error)  # inductor fuses and reorders sums


def test_compiled_pixel_path_traces_and_matches_eager(tiny_sd):
    """dynamo traces decoder (with its block checkpoints), LPIPS and the critic; the 'eager'
    backend keeps this quick on the CPU (inductor: the GPU test below)."""
    _compiled_matches_eager(tiny_sd, "eager")


@pytest.mark.gpu
def test_inductor_compiled_pixel_path_matches_eager(tiny_sd):
    """``train.compile``'s inductor build of the pixel path gives the eager values."""
    _compiled_matches_eager(tiny_sd, "inductor")


def test_only_low_noise_samples_count(tiny_sd):
    losses = PixelLosses(
        _cfg(
            loss__pixel_l1__weight=1, loss__pixel__max_timestep=10, loss__pixel__samples_per_batch=1
        ),
        tiny_sd.vae,
    )
    batch = _batch(tiny_sd)  # timesteps 20 and 700: none eligible -> 0, still differentiable
    batch["model_pred"] = batch["model_pred"].clone().requires_grad_(True)
    value = losses(**batch)["pixel_l1"]
    assert value.item() == 0.0
    value.backward()
    assert batch["model_pred"].grad is not None and batch["model_pred"].grad.abs().sum() == 0


def test_emotion_terms_against_labels_and_teacher(tiny_sd):
    cfg = _cfg(loss__emotion__valence=1, loss__emotion__arousal=1, loss__emotion__expression=1)
    losses = PixelLosses(cfg, tiny_sd.vae)
    assert losses.decoder is not None and losses.lpips is None
    batch = _batch(tiny_sd)
    with torch.no_grad():
        terms = losses(**batch)
        image = losses.decoder(batch["latents"])  # what the exact prediction decodes to
        pred = losses.emonet(to_emonet_input(image))
        teacher = losses.emonet(to_emonet_input(batch["pixel_values"]))
    assert set(terms) == {"valence", "arousal", "expression"}
    # sample 0 has labels; sample 1's valence and expression fall back to the teacher
    v_goal = torch.tensor([0.5, teacher["valence"][1].item()])
    a_goal = torch.tensor([-0.3, 0.2])
    assert terms["valence"].item() == pytest.approx(
        (pred["valence"] - v_goal).abs().mean().item(), rel=1e-4, abs=1e-5
    )
    assert terms["arousal"].item() == pytest.approx(
        (pred["arousal"] - a_goal).abs().mean().item(), rel=1e-4, abs=1e-5
    )
    logp = pred["expression"].log_softmax(1)
    ce0 = -logp[0, 1]
    ce1 = -(teacher["expression"][1].softmax(0) * logp[1]).sum()
    assert terms["expression"].item() == pytest.approx(((ce0 + ce1) / 2).item(), rel=1e-4)


def test_teacher_target_is_zero_for_a_perfect_prediction(tiny_sd):
    cfg = _cfg(
        loss__emotion__valence=1,
        loss__emotion__arousal=1,
        loss__emotion__target="teacher",
        loss__pixel__samples_per_batch=1,
    )
    losses = PixelLosses(cfg, tiny_sd.vae)
    batch = _batch(tiny_sd)
    with torch.no_grad():
        batch["pixel_values"] = losses.decoder(batch["latents"])
        terms = losses(**batch)
    assert terms["valence"].item() == pytest.approx(0.0, abs=1e-3)
    assert terms["arousal"].item() == pytest.approx(0.0, abs=1e-3)


def test_soft_landmarks_find_each_peak():
    """A sharp peak per landmark at a known cell reads as that cell's centre (in fractions)."""
    heatmap = torch.full((1, 2, 64, 64), -1.0)  # negative background: ignored
    heatmap[0, 0, 10, 40] = 5.0  # landmark 0 at row 10, column 40
    heatmap[0, 1, 63, 0] = 1.0
    points = soft_landmarks(heatmap)
    assert points[0, 0].tolist() == pytest.approx([40.5 / 64, 10.5 / 64])
    assert points[0, 1].tolist() == pytest.approx([0.5 / 64, 63.5 / 64])


def test_landmark_term_is_zero_on_the_reference_and_grows_with_a_shift(tiny_sd):
    """The term reads the critic's landmarks on the prediction against those on the real image:
    nothing when the prediction decodes to the real image, more when the face moves."""
    cfg = _cfg(loss__landmarks__weight=1)
    losses = PixelLosses(cfg, tiny_sd.vae)
    assert losses.terms == ("landmarks",) and losses.emonet is not None
    batch = _batch(tiny_sd)
    with torch.no_grad():
        batch["pixel_values"] = losses.decoder(batch["latents"])
        same = losses(**batch)["landmarks"].item()
        batch["pixel_values"] = batch["pixel_values"].roll(16, dims=-1)  # a quarter-width move
        moved = losses(**batch)["landmarks"].item()
    assert same == pytest.approx(0.0, abs=1e-5)
    assert moved > same + 1e-3


def test_emotion_gradient_reaches_the_controlnet(tiny_sd):
    sd = tiny_sd
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_channels=9)
    zero_convs = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    for conv in zero_convs:  # zero-init output convs block gradient to all but themselves
        torch.nn.init.normal_(conv.weight, std=0.05)
    cfg = _cfg(
        loss__emotion__valence=0.03,
        loss__emotion__arousal=0.03,
        loss__emotion__expression=0.02,
        loss__landmarks__weight=0.02,
        loss__pixel__samples_per_batch=1,
    )
    losses = PixelLosses(cfg, sd.vae)
    batch = _batch(sd)
    ids = sd.tokenizer(
        ["a photo of a happy face"] * 2,
        padding="max_length",
        max_length=sd.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        text = sd.text_encoder(ids)[0]
    noisy, t = batch["noisy_latents"], batch["timesteps"]
    down, mid = controlnet(
        noisy,
        t,
        encoder_hidden_states=text,
        controlnet_cond=torch.rand(2, 9, 64, 64),
        return_dict=False,
    )
    batch["model_pred"] = sd.unet(
        noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    terms = losses(**batch)
    assert set(terms) == {"valence", "arousal", "expression", "landmarks"}
    weights = cfg.loss.weights()
    sum(weights[k] * v for k, v in terms.items()).backward()
    grad = controlnet.controlnet_cond_embedding.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(c.weight.grad.abs().sum() > 0 for c in zero_convs)
    assert all(p.grad is None for p in losses.parameters())  # critics stay frozen


# --- recipes ---------------------------------------------------------------------------------


def test_research_recipe_parses_as_the_research():
    cfg = load_config(CONFIGS / "stableface_best.yaml")
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.model.emonet.startswith("SET-ME") and cfg.data.root.startswith("SET-ME")
    assert cfg.conditions == ["flame", "depth", "skeleton"]
    assert cfg.model.controlnet.mode == "stacked"
    assert (cfg.model.lpips_net, cfg.model.decoder) == ("vgg", "vae")
    assert cfg.loss.weights() == {
        "diffusion": 0.92,
        "pixel_l1": 0.0,
        "lpips": 0.08,
        "valence": 0.03,
        "arousal": 0.03,
        "expression": 0.02,
        "landmarks": 0.0,
    }
    assert (cfg.loss.diffusion.kind, cfg.loss.diffusion.snr_gamma) == ("l1", 0.8)
    assert cfg.loss.pixel.max_timestep == 1000 and cfg.loss.pixel.samples_per_batch is None
    assert cfg.data.resolution == 512 and cfg.train.learning_rate == 5e-6
    assert (cfg.train.batch_size, cfg.train.total_batch_size) == (4, 1024)


def test_fast_recipe_parses_with_its_cost_choices():
    cfg = load_config(CONFIGS / "affectnet_fast.yaml")
    assert (cfg.model.lpips_net, cfg.model.decoder) == ("alex", "taesd")
    assert cfg.loss.pixel.max_timestep < 1000 and cfg.loss.pixel.samples_per_batch
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.loss.needs_decoder


def test_cubic_timesteps_favour_high_noise_and_stay_in_range():
    from controlnet_emo.training.step import sample_timesteps

    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, "uniform", g)
    cubic = sample_timesteps(20000, 1000, "cubic", g)
    assert int(cubic.min()) >= 0 and int(cubic.max()) <= 999
    # t >= 500 exactly when u**3 <= 0.5: a probability of 0.5 ** (1/3) = 0.79.
    assert abs(float((cubic >= 500).float().mean()) - 0.5 ** (1 / 3)) < 0.02
    assert abs(float((uniform >= 500).float().mean()) - 0.5) < 0.02
