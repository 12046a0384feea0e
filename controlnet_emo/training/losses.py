"""Loss terms as pure functions of tensors, testable on CPU without any model.

The training step calls ``diffusion_loss`` for the latent term and ``PixelLosses`` (which owns
the frozen critics) for the pixel-space terms; each returns unweighted values so that every
term is logged on its own and weighted in one place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch.utils.checkpoint import checkpoint

from controlnet_emo.config import Config


def diffusion_target(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, scheduler
) -> torch.Tensor:
    """What the UNet is trained to output: the noise (epsilon) or the velocity (v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR weights (Hang et al. 2023), diffusers' current form (FACTS.md).

    epsilon: min(SNR, g) / SNR; v-prediction: min(SNR, g) / (SNR + 1).
    """
    snr = compute_snr(scheduler, timesteps)  # (B,)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    kind: str = "l1",
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """mean_b( snr_w(t_b) * D(pred_b, target_b) ), D = mean abs or mean squared error."""
    err = model_pred.float() - target.float()
    per_elem = err.abs() if kind == "l1" else err.pow(2)
    per_sample = per_elem.mean(dim=tuple(range(1, per_elem.ndim)))  # (B,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma).to(per_sample)
    return per_sample.mean()


def gradient_balance(
    anchor: torch.Tensor, other: torch.Tensor, wrt: torch.Tensor, ratio: float
) -> torch.Tensor:
    """A detached factor in (0, 1]: ``other * factor`` pulls on ``wrt`` at most ``ratio`` times
    as hard as ``anchor`` does (gradient norms). Measured on the network's output rather than
    its weights, so it costs one backward through the loss heads, not through the UNet."""
    g_anchor, g_other = (
        torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)[0]
        for loss in (anchor, other)
    )
    if g_anchor is None or g_other is None:
        return torch.ones((), device=wrt.device)
    factor = ratio * g_anchor.norm() / g_other.norm().clamp(min=1e-12)
    return factor.clamp(max=1.0).detach()


def predict_x0(
    noisy_latents: torch.Tensor, model_pred: torch.Tensor, timesteps: torch.Tensor, scheduler
) -> torch.Tensor:
    """The clean latent implied by the model output at each sample's timestep.

    epsilon: x0 = (x_t - sqrt(1-a) eps) / sqrt(a); v: x0 = sqrt(a) x_t - sqrt(1-a) v.
    """
    alphas = scheduler.alphas_cumprod.to(noisy_latents.device, torch.float32)[timesteps]
    a = alphas.view(-1, *([1] * (noisy_latents.ndim - 1)))  # (B,1,1,1)
    x_t, pred = noisy_latents.float(), model_pred.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * pred
    raise ValueError(f"unsupported prediction_type {kind!r}")


# ---------------------------------------------------------------------------------------------
# Pixel-space terms


def select_pixel_samples(
    timesteps: torch.Tensor, max_timestep: int | None, count: int | None, pad_to: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples of a micro-batch pay the decoder, decided before anything is decoded.

    The payers are the samples with t < max_timestep (None: every sample), in batch order, at
    most ``count`` (None: all of them); timesteps and batch order are already random, so this
    is an unbiased pick and draws no RNG, which keeps resumes exact. With ``pad_to`` 1 only
    the payers are returned (their number is read back from the device: one sync, none when
    ``max_timestep`` is None). A larger ``pad_to`` rounds that number up to a multiple of it
    (at most the batch) with non-payers masked out by ``keep``: the few shapes compiled code
    needs. Returns (index (n,) long, keep (n,) bool); n may be 0.
    """
    b = timesteps.shape[0]
    limit = b if count is None else min(count, b)
    if max_timestep is None:
        eligible = torch.ones_like(timesteps, dtype=torch.bool)
        paying = limit
    else:
        eligible = timesteps < max_timestep  # (B,)
        paying = min(limit, int(eligible.sum()))
    n = min(b, -(-paying // pad_to) * pad_to)
    position = torch.arange(b, device=timesteps.device)
    order = torch.argsort((~eligible).long() * b + position)  # eligible first, stable
    index = order[:n]
    return index, torch.arange(n, device=timesteps.device) < paying


def masked_mean(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over kept samples; 0 (still in the graph) when none is kept."""
    per_sample = torch.where(keep, per_sample, torch.zeros_like(per_sample))
    return per_sample.sum() / keep.sum().clamp(min=1)


def to_emonet_input(images: torch.Tensor, size: int = 256) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> (B,3,256,256) in [0,1], what EmoNet was trained on.

    No clamp: clamping would zero the gradient of every saturated pixel. Downscaling is
    antialiased (EmoNet's own resize is not, and would alias a 512 px face).
    """
    x = (images + 1) / 2
    if x.shape[-2:] != (size, size):
        antialias = x.shape[-1] > size
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
        )
    return x


def soft_landmarks(heatmap: torch.Tensor) -> torch.Tensor:
    """(B,K,h,w) heatmaps -> (B,K,2) expected (x, y) in fractions of the grid, differentiable.

    Why soft: the argmax that ``metrics.heatmap_landmarks`` reads sends no gradient. Negative
    heatmap values are dropped, so EmoNet's unnormalised heatmaps and the shipped critics'
    softmax ones both become a distribution over the grid.
    """
    b, k, h, w = heatmap.shape
    weight = heatmap.float().clamp(min=0).flatten(2)  # (B,K,h*w)
    weight = weight / weight.sum(dim=2, keepdim=True).clamp(min=1e-12)
    ys, xs = torch.meshgrid(
        (torch.arange(h, device=heatmap.device) + 0.5) / h,
        (torch.arange(w, device=heatmap.device) + 0.5) / w,
        indexing="ij",
    )
    grid = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (h*w, 2)
    return weight @ grid  # (B,K,2)


def frozen_forward(module: torch.nn.Module, *inputs: torch.Tensor, run: Callable | None = None):
    """``module(*inputs)`` in the module's own dtype, outside any autocast; ``run``: what to
    call instead of ``module`` (its compiled form).

    Why: a frozen critic cast to bf16 / fp16 must run in that dtype end to end. Under autocast
    some ops return fp32 (nearest upsampling in EmoNet's hourglass), and the next BatchNorm,
    cast to bf16, then refuses its fp32 input. Gradients still flow to the inputs.
    """
    dtype = next(module.parameters()).dtype
    with torch.autocast(inputs[0].device.type, enabled=False):
        return (run or module)(*(x.to(dtype) for x in inputs))


def decoder_features(
    decoder: torch.nn.Module, latents: torch.Tensor, checkpointed: bool, image: bool
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The SD VAE decoder's mid-block and up-block outputs for scaled latents, checkpointed
    per block across the batch when asked, and the decoded image from the last of them when
    ``image`` (the decoder's own head: norm, SiLU, conv). What diffusers' ``Decoder.forward``
    runs, block by block, in the decoder's dtype outside any autocast (as ``LatentDecoder``).
    ``decoder`` is a ``LatentDecoder`` around an ``AutoencoderKL``.
    """
    autoencoder = decoder.autoencoder
    blocks = autoencoder.decoder
    dtype = next(autoencoder.parameters()).dtype
    z = (latents / decoder.scaling_factor + decoder.shift_factor).to(dtype)
    keep_graph = checkpointed and torch.is_grad_enabled()
    with torch.autocast(z.device.type, enabled=False):
        if autoencoder.post_quant_conv is not None:
            z = autoencoder.post_quant_conv(z)
        h = blocks.conv_in(z)
        features = []
        for block in (blocks.mid_block, *blocks.up_blocks):
            h = checkpoint(block, h, None, use_reentrant=False) if keep_graph else block(h, None)
            features.append(h)
        if not image:
            return features, None
        return features, blocks.conv_out(blocks.conv_act(blocks.conv_norm_out(h)))


def feature_distance(
    prediction: list[torch.Tensor], target: list[torch.Tensor], eps: float = 1e-6
) -> torch.Tensor:
    """(m,) LPL distance: per layer, both feature maps standardised per sample and channel by
    the target's spatial mean and std (LPL's 'shared' normalisation), then the mean squared
    difference; layers weigh the same. Zero for identical features, in fp32."""
    per_layer = []
    for f, t in zip(prediction, target, strict=True):
        f, t = f.float(), t.float()
        std = t.std(dim=(2, 3), keepdim=True).clamp(min=eps)  # the mean cancels in f - t
        per_layer.append(((f - t) / std).pow(2).mean(dim=(1, 2, 3)))
    return torch.stack(per_layer, dim=1).mean(dim=1)


_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def _without_donated_buffers(compiled: Callable) -> Callable:
    """``compiled`` built and run without AOTAutograd's donated buffers: their backward
    refuses ``retain_graph=True``, which ``gradient_balance`` (``loss.pixel.balance``) needs
    to differentiate the terms before the step's own backward."""
    import torch._functorch.config as functorch_config

    def run(*args):
        with functorch_config.patch(donated_buffer=False):
            return compiled(*args)

    return run


class PixelLosses(torch.nn.Module):
    """Frozen critics + decoder; returns the unweighted pixel-space terms that are enabled.

    Only what some term with weight > 0 needs is built: with every pixel/emotion weight 0 this
    module holds nothing and returns {}. Terms, each a mean over the samples that pay
    (``select_pixel_samples``):

    - ``pixel_l1``: mean |img_hat - ref| in [-1,1] (per image, never batch-normalised);
    - ``lpips``: LPIPS(img_hat, ref), inputs in [-1,1]; with ``loss.lpips.space: latent`` the
      LPL distance between the decoder's features of x0_hat and of x0 (``feature_distance``),
      with no decode to pixels unless another term needs the image;
    - ``valence``, ``arousal``: |EmoNet(img_hat) - target|;
    - ``expression``: cross-entropy of EmoNet(img_hat)'s logits against a target distribution;
    - ``landmarks``: mean L1 between EmoNet's soft-argmax landmarks on img_hat and on ref
      (fractions of the crop): the render's geometry, read back off the prediction.

    ``ref`` is the real image for the SD VAE decoder and the decoder's own decoding of the real
    latent for TAESD (so its bias cancels). Emotion targets: with ``target: labels`` a sample's
    labels are used where known, and EmoNet on ``ref`` (no grad) stands in where a label is
    unknown (valence/arousal NaN, expression -1 or outside EmoNet's classes), as DESIGN.md
    says; with ``target: teacher`` EmoNet on ``ref`` is always the target. The expression
    target is one-hot for a label and the teacher's softmax otherwise (soft distillation: its
    minimum is the teacher's entropy, not 0).

    Batch work: the samples that pay are chosen first, and only they are decoded and read,
    all at once or ``loss.pixel.chunk_size`` at a time. Checkpointing ('full', the default
    with ``train.gradient_checkpointing``, else 'none'): each decoder block (the SD VAE's mid
    and up blocks; TAESD's whole stack) under its own checkpoint across the chunk, and LPIPS
    and EmoNet each under one; backward recomputes one block or critic at a time. 'blocks' is
    the decoder's checkpointing alone, 'none' keeps everything.

    Precision and layout: the decoder runs in the VAE's dtype and the critics in the one
    ``critics_to`` gives them, outside any autocast (so their GroupNorms never run in fp32 with
    a cast each way); ``loss.pixel.decoder_layout`` / ``critic_layout`` choose their memory
    layout. ``set_compiled`` (``train.compile``) runs decoder, LPIPS and EmoNet through
    ``torch.compile`` with static shapes.
    """

    def __init__(self, cfg: Config, vae: torch.nn.Module, checkpointing: str | None = None):
        super().__init__()
        from controlnet_emo.models.critics import load_decoder, load_lpips
        from controlnet_emo.models.emonet import build_emonet

        weights = cfg.loss.weights()
        self.terms = tuple(k for k, w in weights.items() if k != "diffusion" and w > 0)
        self.max_timestep = cfg.loss.pixel.max_timestep
        self.samples_per_batch = cfg.loss.pixel.samples_per_batch
        self.chunk_size = cfg.loss.pixel.chunk_size
        self.target = cfg.loss.emotion.target
        self.latent_lpips = "lpips" in self.terms and cfg.loss.lpips.space == "latent"
        self.needs_image = any(t != "lpips" for t in self.terms) or (
            "lpips" in self.terms and not self.latent_lpips
        )
        self.decoder = load_decoder(cfg.model.decoder, vae) if self.terms else None
        self.lpips = (
            load_lpips(cfg.model.lpips_net, cfg.model.lpips_backbone)
            if "lpips" in self.terms and not self.latent_lpips
            else None
        )
        self.emonet = build_emonet(cfg.model.emonet) if cfg.loss.needs_critic else None
        self.requires_grad_(False)  # all critics frozen; the graph still reaches model_pred
        self.layouts = {
            "decoder": cfg.loss.pixel.decoder_layout,
            "critics": cfg.loss.pixel.critic_layout,
        }
        self._formats: dict[str, torch.memory_format] = {}
        # Unless told otherwise, follow train.gradient_checkpointing like the UNet: recomputing
        # the decoder and critics in backward buys memory a small model does not need (the
        # demo's emotion step costs 1.4x with it on the CPU).
        default = "full" if cfg.train.gradient_checkpointing else "none"
        self.set_checkpointing(checkpointing or default)
        self.set_compiled(cfg.train.compile)

    def set_checkpointing(self, mode: str) -> None:
        """'full' (decoder blocks and critics, see the class doc), 'blocks' or 'none'."""
        if mode not in ("none", "blocks", "full"):
            raise ValueError(f"checkpointing {mode!r}: expected none, blocks or full")
        self.checkpointing = mode
        if self.decoder is not None:
            self.decoder.set_checkpointing("none" if mode == "none" else "blocks")

    def set_compiled(self, on: bool, backend: str = "inductor") -> None:
        """Decoder, LPIPS and EmoNet through ``torch.compile`` (static shapes) or eager. The
        compiled wrappers share the modules' weights and are not submodules (state_dict and
        ``to`` see the originals); compilation happens at their first call."""
        self.compiled: dict[str, Callable] = {}
        if not on:
            return
        parts = {n: getattr(self, n) for n in ("decoder", "lpips", "emonet")}
        if self.latent_lpips:
            parts["features"] = decoder_features
        for name, part in parts.items():
            if part is not None:
                self.compiled[name] = _without_donated_buffers(
                    torch.compile(part, dynamic=False, backend=backend)
                )

    def _call(self, name: str) -> Callable:
        """The named part, compiled when ``set_compiled`` is on."""
        if name in self.compiled:
            return self.compiled[name]
        return decoder_features if name == "features" else getattr(self, name)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        model_pred: torch.Tensor,
        timesteps: torch.Tensor,
        scheduler,
        pixel_values: torch.Tensor,
        latents: torch.Tensor,
        expression: torch.Tensor,
        valence: torch.Tensor,
        arousal: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Unweighted enabled terms, each a scalar differentiable w.r.t. ``model_pred``.

        noisy_latents, model_pred, latents: (B,4,h,w) in the scaled latent space; timesteps
        (B,); pixel_values (B,3,8h,8w) in [-1,1]; expression (B,) long (-1 unknown); valence,
        arousal (B,) float (NaN unknown).
        """
        if not self.terms:
            return {}
        # Frozen parts run in their own dtype, never under the caller's autocast: it would
        # run each GroupNorm in fp32 with a cast each way (and resize in bf16 on the CPU).
        with torch.autocast(model_pred.device.type, enabled=False):
            b = timesteps.shape[0]
            gate = self.max_timestep
            if gate >= scheduler.config.num_train_timesteps:
                gate = None  # every timestep pays: no need to read the timesteps back
            pad = (self.samples_per_batch or self.chunk_size or b) if self.compiled else 1
            index, keep = select_pixel_samples(timesteps, gate, self.samples_per_batch, pad)
            if index.numel() == 0:  # nobody pays: zeros, still in the graph, NaN-proof
                none = torch.zeros(1, dtype=torch.bool, device=model_pred.device)
                zero = masked_mean(model_pred.float().sum().view(1), none)
                return dict.fromkeys(self.terms, zero)
            x0 = predict_x0(noisy_latents[index], model_pred[index], timesteps[index], scheduler)
            real = latents[index].float()
            with torch.no_grad():
                reference = None
                if self.needs_image:
                    if self.decoder.decodes_reference:
                        reference = self._call("decoder")(self._layout(real, "decoder")).float()
                    else:
                        reference = pixel_values[index].float()  # (n,3,H,W)
                goals = self._emotion_goals(
                    reference, expression[index], valence[index], arousal[index]
                )
            size = self.chunk_size or x0.shape[0]
            values = torch.cat(
                [
                    self._chunk_terms(
                        x0[s],
                        real[s],
                        None if reference is None else reference[s],
                        *(g if g is None else g[s] for g in goals),
                    )
                    for s in (slice(i, i + size) for i in range(0, x0.shape[0], size))
                ]
            )  # (n, terms)
            return {name: masked_mean(values[:, j], keep) for j, name in enumerate(self.terms)}

    def _layout(self, x: torch.Tensor, part: str) -> torch.Tensor:
        """``x`` in the memory layout chosen for ``part`` ('decoder' or 'critics')."""
        fmt = self._formats.get(part)
        return x if fmt is None else x.contiguous(memory_format=fmt)

    def _checkpointed(self, fn, *args):
        """fn(*args), under its own checkpoint in 'full' mode: only its inputs are kept."""
        if self.checkpointing == "full" and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _decode(self, x0: torch.Tensor) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """(m,4,h,w) predicted x0 -> (the decoder's features when the latent LPIPS reads them,
        the (m,3,H,W) fp32 image when a term needs it); the graph reaches x0."""
        x0 = self._layout(x0, "decoder")
        if self.latent_lpips:
            blocks = self.checkpointing != "none"
            features, image = self._call("features")(self.decoder, x0, blocks, self.needs_image)
            return features, None if image is None else image.float()
        return None, self._call("decoder")(x0).float()

    def _chunk_terms(
        self,
        x0: torch.Tensor,
        real: torch.Tensor,
        reference: torch.Tensor | None,
        *goals: torch.Tensor,
    ) -> torch.Tensor:
        """(m,4,h,w) predicted x0, real latents and reference images -> (m, terms) per-sample
        values, in ``self.terms`` order."""
        features, image = self._decode(x0)
        out: dict[str, torch.Tensor] = {}
        if "pixel_l1" in self.terms:
            out["pixel_l1"] = (image - reference).abs().mean(dim=(1, 2, 3))
        if self.latent_lpips:
            with torch.no_grad():
                target, _ = self._call("features")(
                    self.decoder, self._layout(real, "decoder"), False, False
                )
            out["lpips"] = feature_distance(features, target)
        elif self.lpips is not None:
            out["lpips"] = self._checkpointed(self._lpips, image, reference)
        if self.emonet is not None:
            expression, valence, arousal, points = self._checkpointed(self._emonet, image)
            v_goal, a_goal, e_goal, p_goal = goals
            if "valence" in self.terms:
                out["valence"] = (valence - v_goal).abs()
            if "arousal" in self.terms:
                out["arousal"] = (arousal - a_goal).abs()
            if "expression" in self.terms:
                out["expression"] = F.cross_entropy(expression, e_goal, reduction="none")
            if "landmarks" in self.terms:
                out["landmarks"] = (points - p_goal).abs().mean(dim=(1, 2))
        return torch.stack([out[name] for name in self.terms], dim=1)  # (m, terms)

    def critics_to(self, dtype: torch.dtype, channels_last: bool = False) -> PixelLosses:
        """LPIPS and EmoNet in ``dtype``: frozen, like the VAE and text encoder, they run in the
        training's weight dtype (the decoder already follows the VAE's). Layouts: 'auto'
        follows ``channels_last`` (where the UNet has it, fast_paths.use_fast_paths) and
        leaves inputs as they come; 'channels_last' / 'contiguous' convert the part (for the
        decoder: the VAE's decoder half, not its encoder) and each input it is given."""
        auto = torch.channels_last if channels_last else torch.preserve_format
        for part, layout in self.layouts.items():
            if layout != "auto":
                self._formats[part] = _FORMATS[layout]
        critic_format = self._formats.get("critics", auto)
        for critic in (self.lpips, self.emonet):
            if critic is not None:
                critic.to(dtype=dtype, memory_format=critic_format)
        if self.decoder is not None and "decoder" in self._formats:
            autoencoder = self.decoder.autoencoder
            for part in (autoencoder.decoder, getattr(autoencoder, "post_quant_conv", None)):
                if part is not None:
                    part.to(memory_format=self._formats["decoder"])
        return self

    def _lpips(self, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        image, reference = self._layout(image, "critics"), self._layout(reference, "critics")
        return (
            frozen_forward(self.lpips, image, reference, run=self._call("lpips")).flatten().float()
        )  # (m,)

    def _emonet(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """EmoNet on the prediction, NOT under no_grad: (logits (m,C), valence, arousal (m,),
        soft landmarks (m,68,2))."""
        x = self._layout(to_emonet_input(image), "critics")
        pred = frozen_forward(self.emonet, x, run=self._call("emonet"))
        return (
            pred["expression"].float(),
            pred["valence"].float(),
            pred["arousal"].float(),
            soft_landmarks(pred["heatmap"]),
        )

    def _emotion_goals(
        self,
        reference: torch.Tensor,
        expression: torch.Tensor,
        valence: torch.Tensor,
        arousal: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """(valence (n,), arousal (n,), expression distribution (n,C), landmarks (n,68,2) or
        None): labels where known, EmoNet on the reference where not (or always, with
        ``target: teacher``); the landmarks always EmoNet's own on the reference, read by the
        same soft-argmax as the prediction's (recorded landmarks would leave its bias in)."""
        if self.emonet is None:
            return ()
        device, classes = reference.device, self.emonet.n_expression
        valence = valence.to(device, torch.float32)
        arousal = arousal.to(device, torch.float32)
        expression = expression.to(device)
        known_e = (expression >= 0) & (expression < classes)
        if self.target == "teacher":
            known_e = torch.zeros_like(known_e)
            valence = torch.full_like(valence, float("nan"))
            arousal = torch.full_like(arousal, float("nan"))
        onehot = F.one_hot(expression.clamp(0, classes - 1), classes).float()  # (n,C)
        missing = {"valence": valence.isnan(), "arousal": arousal.isnan(), "expression": ~known_e}
        asks_teacher = "landmarks" in self.terms or any(
            bool(missing[t].any()) for t in self.terms if t in missing
        )
        if not asks_teacher:
            return valence, arousal, onehot, None
        x = self._layout(to_emonet_input(reference), "critics")
        teacher = frozen_forward(self.emonet, x, run=self._call("emonet"))
        return (
            torch.where(valence.isnan(), teacher["valence"].float(), valence),
            torch.where(arousal.isnan(), teacher["arousal"].float(), arousal),
            torch.where(known_e[:, None], onehot, teacher["expression"].float().softmax(dim=1)),
            soft_landmarks(teacher["heatmap"]),
        )
