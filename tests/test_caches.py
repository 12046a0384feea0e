"""The text-embedding, latent and decoded-image caches: faster steps, the same results."""

import numpy as np
import torch
from safetensors.torch import load_file

from controlnet_emo.config import load_config
from controlnet_emo.data import dataset as dataset_module
from controlnet_emo.data.dataset import PreparedDataset, collate, read_metadata
from controlnet_emo.data.latent_cache import encode_moments
from controlnet_emo.models.sd import load_sd
from controlnet_emo.models.text_cache import TextEmbeddingCache
from controlnet_emo.training.loop import train
from tests.conftest import DEMO_CONFIG, tiny_overrides


def _ids(tokenizer, captions):
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


class CountingEncoder(torch.nn.Module):
    """The tiny text encoder, counting the rows it was asked to encode."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0

    def forward(self, input_ids, return_dict=False):
        self.rows += len(input_ids)
        return self.inner(input_ids, return_dict=return_dict)


def test_text_cache_equals_encoding_every_time_and_encodes_each_caption_once():
    sd = load_sd("tiny")
    encoder = CountingEncoder(sd.text_encoder)
    cache = TextEmbeddingCache(encoder, torch.float32)
    captions = ["a photo of a happy face", "a photo of a sad face", ""]
    for batch in (captions[:2], [captions[1], captions[1], captions[2]], captions[::-1]):
        ids = _ids(sd.tokenizer, batch)
        with torch.no_grad():
            direct = sd.text_encoder(ids, return_dict=False)[0]
        torch.testing.assert_close(cache(ids).hidden, direct, rtol=0, atol=0)
    assert encoder.rows == 3 and len(cache) == 3  # three distinct captions, once each


def test_text_cache_stays_within_its_size():
    sd = load_sd("tiny")
    cache = TextEmbeddingCache(sd.text_encoder, torch.float32, max_entries=1)
    ids = _ids(sd.tokenizer, ["a happy face", "a sad face"])
    with torch.no_grad():
        direct = sd.text_encoder(ids, return_dict=False)[0]
    torch.testing.assert_close(cache(ids).hidden, direct, rtol=0, atol=0)
    assert len(cache) == 1


def _run(tmp_path, prepared, name, **extra):
    out = tmp_path / name
    train(load_config(DEMO_CONFIG, tiny_overrides(out, prepared, **extra)))
    return load_file(out / "checkpoint-2" / "model.safetensors")


def test_training_with_the_text_cache_gives_the_same_weights(tmp_path, prepared):
    steps = {"train.max_steps": 2}
    a = _run(tmp_path, prepared, "cached", **steps, **{"data.cache_text": True})
    b = _run(tmp_path, prepared, "uncached", **steps, **{"data.cache_text": False})
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_latent_cache_keeps_flips_with_mirrored_moments(prepared):
    cfg = load_config(DEMO_CONFIG, ["data.resolution=64"])
    sd = load_sd("tiny")
    records = read_metadata(prepared, "train", cfg.conditions)[:2]

    def dataset(**kw):
        args = (prepared, records, cfg.conditions, 64, sd.tokenizer, "{expression}")
        return PreparedDataset(*args, **kw)

    plain = dataset(train=False)
    moments = encode_moments(plain, sd.vae, 2, torch.device("cpu"), torch.float32, False)
    assert moments.shape == (2, 2, 8, 8, 8)  # (N, plain|mirrored, mean|std, h, w)
    with torch.no_grad():
        dist = sd.vae.encode(collate([plain[0]]).pixel_values.flip(-1)).latent_dist
    torch.testing.assert_close(moments[0, 1], torch.cat([dist.mean, dist.std], 1)[0])

    cached = dataset(train=True, latent_moments=moments, load_target=False)
    flips = []
    for key in range(16):
        s = cached[(0, key)]
        flipped = torch.equal(s["latent_moments"], moments[0, 1])
        assert flipped or torch.equal(s["latent_moments"], moments[0, 0])
        ref = plain[0]["conditions"].flip(-1) if flipped else plain[0]["conditions"]
        torch.testing.assert_close(s["conditions"], ref)  # the maps flip with the latents
        assert s["pixel_values"].numel() == 0  # the target is never decoded
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_training_on_the_latent_cache_with_flips(tmp_path, prepared):
    _run(tmp_path, prepared, "lat", **{"train.max_steps": 2, "data.cache_latents": True})
    cache = load_file(tmp_path / "lat" / "latent_cache" / "train-64-mirrored.safetensors")
    assert cache["moments"].shape[1] == 2


def test_a_latent_cache_of_other_data_is_encoded_again(tmp_path, prepared):
    """Training again into the same output folder after the images changed must read the new
    images' latents, not the cache the first run left there."""
    from PIL import Image

    run = {"train.max_steps": 2, "data.cache_latents": True}
    cache = "latent_cache/train-64-mirrored.safetensors"
    _run(tmp_path, prepared, "same", **run)
    before = load_file(tmp_path / "same" / cache)["moments"]
    for path in sorted((prepared / "images").glob("*.png")):  # other faces, the same names
        Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    _run(tmp_path, prepared, "same", **run)
    after = load_file(tmp_path / "same" / cache)["moments"]
    _run(tmp_path, prepared, "fresh", **run)
    fresh = load_file(tmp_path / "fresh" / cache)["moments"]
    torch.testing.assert_close(after, fresh)
    assert not torch.allclose(after, before, atol=1e-3)


def test_image_cache_gives_the_same_samples_and_decodes_each_file_once(prepared, monkeypatch):
    cfg = load_config(DEMO_CONFIG, ["data.resolution=64"])
    records = read_metadata(prepared, "train", cfg.conditions)[:3]
    args = (prepared, records, cfg.conditions, 64, load_sd("tiny").tokenizer, "{expression}")
    plain = PreparedDataset(*args, train=True, condition_dropout=0.3)
    cached = PreparedDataset(*args, train=True, condition_dropout=0.3, cache_images=True)
    reads = []
    real_load = dataset_module.load_rgb
    monkeypatch.setattr(dataset_module, "load_rgb", lambda p: reads.append(p) or real_load(p))
    for key in range(12):  # four epochs of three samples, each with its own flips and dropout
        a, b = plain[(key % 3, key)], cached[(key % 3, key)]
        for name in ("pixel_values", "conditions", "input_ids"):
            assert torch.equal(a[name], b[name]), name
    files = 3 * (1 + len(cfg.conditions))
    assert len(reads) == 12 * (1 + len(cfg.conditions)) + files  # uncached: every read
    assert len(set(reads)) == files
