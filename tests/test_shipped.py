"""The models the package ships (models/shipped.py): they load by name with no network, and
they do what the demo relies on: the base draws faces, the critics read them."""

from __future__ import annotations

import pytest
import torch

from controlnet_emo.evaluation.evaluate import read_faces
from controlnet_emo.evaluation.metrics import MIRROR_68, heatmap_landmarks, nme
from controlnet_emo.models.emonet import build_emonet
from controlnet_emo.models.sd import load_sd, resolve_pretrained, vae_scale_factor
from controlnet_emo.models.shipped import SHIPPED, WEIGHTS_DIR, shipped_path
from controlnet_emo.models.tiny import sd_pipeline
from controlnet_emo.pretrain.critic import score_critic, to_contract
from controlnet_emo.pretrain.faces import render_faces


def test_every_shipped_model_is_in_the_package_and_small():
    sizes = {n: sum(f.stat().st_size for f in (WEIGHTS_DIR / n).rglob("*")) for n in SHIPPED}
    assert all(sizes.values()) and sum(sizes.values()) <= 25 * 2**20


def test_unknown_names_pass_through_to_the_hub_loader():
    assert shipped_path("runwayml/stable-diffusion-v1-5") is None
    assert resolve_pretrained("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def base():
    return load_sd("demo-face-base")


def test_base_loads_by_name_offline_in_fp32(base):
    assert base.source == "demo-face-base" and vae_scale_factor(base.vae) == 4
    assert {m.dtype for m in (base.unet, base.vae, base.text_encoder)} == {torch.float32}
    text = "a close-up photo of a happy face, smiling, brown hair"
    ids = base.tokenizer(text).input_ids
    decoded = base.tokenizer.decode(ids, skip_special_tokens=True)  # CLIP spaces punctuation
    assert decoded.replace(" ", "") == text.replace(" ", "")
    assert len(ids) < len(text) // 2  # words, not characters


@pytest.fixture(scope="module")
def eval_critic():
    return build_emonet("demo-critic-eval")


@pytest.mark.parametrize("name", ["demo-critic-train", "demo-critic-eval"])
def test_critics_load_frozen_and_read_unseen_faces(name):
    critic = build_emonet(name)
    assert not critic.training and not any(p.requires_grad for p in critic.parameters())
    faces = render_faces(32, 64, seed=424242)  # a seed neither critic trained on
    scores = score_critic(critic, faces)
    assert scores["top1"] >= 0.85 and scores["nme_iod"] <= 0.06
    assert scores["nme_iod_flip_test"] <= 0.06


def mirror(points, width):
    """(B,68,2) landmarks of faces -> those of their mirror images (``x.flip(-1)``)."""
    return torch.stack([width - 1 - points[..., 0], points[..., 1]], -1)[:, list(MIRROR_68)]


def test_mirror_68_names_each_landmarks_partner_on_a_mirrored_face(eval_critic):
    """The critic reads a mirrored face where MIRROR_68 says its landmarks went: a wrong pair
    (an eye for the other, a mouth corner for the other) would sit a face-width away."""
    faces = render_faces(8, 64, seed=424243)
    mirrored = faces.float_images(torch.arange(8)).flip(-1)
    read = heatmap_landmarks(eval_critic(to_contract(mirrored))["heatmap"], 64)
    assert nme(read, mirror(faces.landmarks, 64)).mean() <= 0.06
    assert nme(read, faces.landmarks).mean() > 0.1  # an unmirrored answer is far off


def test_the_flip_test_reads_a_mirrored_face_as_the_mirrored_landmarks(eval_critic):
    """``evaluate`` reads landmarks by the flip test: no left/right bias of the critic is left
    in its figures, and it reads a face and its mirror image alike."""
    x = render_faces(4, 64, seed=424244).float_images(torch.arange(4))
    points = read_faces(eval_critic, x)["landmarks"]
    of_mirror = read_faces(eval_critic, x.flip(-1))["landmarks"]
    assert torch.allclose(of_mirror, mirror(points, 64), atol=1e-3)


def draw(base, prompts, seed=0, steps=12):
    from diffusers import UniPCMultistepScheduler

    sampler = UniPCMultistepScheduler.from_config(base.scheduler.config)
    pipe = sd_pipeline(base.vae, base.text_encoder, base.tokenizer, base.unet, sampler)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, height=64, width=64, num_inference_steps=steps, guidance_scale=3.0,
               generator=gens, output_type="pt")  # fmt: skip
    return out.images  # (B,3,64,64) in [0,1]


def test_base_turns_a_prompt_into_a_face_the_critic_reads(base, eval_critic):
    """Noise has no expression: the independent critic finds the prompted expression (one
    caption per class, as the synthetic captions read) on most of the base's faces."""
    faces = render_faces(8, 64, seed=777)  # classes 0..7, captions naming each
    images = draw(base, faces.captions)
    read = eval_critic(images)["expression"].argmax(1)
    noise = eval_critic(torch.rand(8, 3, 64, 64))["expression"].argmax(1)
    hits = (read == faces.expression).float().mean()
    assert hits >= 0.5 > (noise == faces.expression).float().mean()
