"""The prepared-dataset loader: aligned transforms, captions, balancing, resumable order."""

import numpy as np
import pytest
import torch

from controlnet_emo.data.dataset import (
    PreparedDataset,
    StreamSampler,
    class_balance_weights,
    collate,
    read_metadata,
)
from controlnet_emo.data.transforms import paired_transform
from controlnet_emo.models.sd import load_sd

CONDS = ["flame", "depth", "skeleton"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_sd("tiny").tokenizer


def make(prepared, tokenizer, **kw):
    records = read_metadata(prepared, "train", CONDS)
    args = dict(train=True, seed=0)
    args.update(kw)
    return PreparedDataset(
        prepared, records, CONDS, 64, tokenizer, "a photo of a {expression} face", **args
    )


def test_shared_transform_keeps_maps_aligned():
    # A bright square at a known place must land at the same pixels in every image.
    img = torch.zeros(3, 90, 120)
    img[:, 30:50, 70:90] = 1.0
    rng = np.random.default_rng(3)
    for _ in range(5):
        out = paired_transform([img, img.clone(), img.clone()], 64, rng, hflip=True)
        for o in out[1:]:
            assert torch.equal(o, out[0])
    a, b = paired_transform([img, img], 64, None)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        paired_transform([torch.zeros(3, 10, 10), torch.zeros(3, 12, 10)], 8, None)


def test_sample_contents(prepared, tokenizer):
    ds = make(prepared, tokenizer, condition_dropout=0.0)
    s = ds[(0, 0)]
    assert s["pixel_values"].shape == (3, 64, 64)
    assert s["pixel_values"].min() >= -1 and s["pixel_values"].max() <= 1
    assert s["conditions"].shape == (9, 64, 64) and 0 <= s["conditions"].min()
    # depth is one 16-bit channel replicated to three
    depth = s["conditions"][3:6]
    assert torch.equal(depth[0], depth[1]) and depth.max() <= 1
    batch = collate([ds[(i, i)] for i in range(3)])
    assert batch.conditions.shape == (3, 9, 64, 64) and batch.input_ids.shape == (3, 77)


def test_caption_from_text_or_template(prepared, tokenizer):
    ds = make(prepared, tokenizer)
    recs = ds.records
    assert ds.caption(recs[1]) == "a photo of a happy face"  # odd rows carry text
    assert ds.caption(recs[0]) == "a photo of a neutral face"  # expression 0, template


def test_condition_dropout_zeroes_whole_maps(prepared, tokenizer):
    ds = make(prepared, tokenizer, condition_dropout=1.0)
    assert ds[(0, 5)]["conditions"].abs().sum() == 0
    ds = make(prepared, tokenizer, condition_dropout=0.5)
    dropped = 0
    for key in range(40):
        c = ds[(0, key)]["conditions"].view(3, 3, 64, 64)
        per_map = c.flatten(1).abs().sum(1)
        dropped += int((per_map == 0).sum())
    assert 20 < dropped < 100  # ~60 of 120 maps


def test_same_key_same_augmentation(prepared, tokenizer):
    ds = make(prepared, tokenizer)
    assert torch.equal(ds[(2, 17)]["pixel_values"], ds[(2, 17)]["pixel_values"])


def test_a_bad_file_is_skipped_not_fatal(prepared, tokenizer, caplog):
    (prepared / "images" / "0.png").write_bytes(b"not a png")
    ds = make(prepared, tokenizer)
    s = ds[(0, 0)]
    assert s["pixel_values"].shape == (3, 64, 64)
    assert "0.png" in caplog.text


def test_missing_metadata_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        read_metadata(tmp_path)


def test_class_balancing_equalises_expressions():
    from controlnet_emo.data.dataset import Record

    recs = [Record("x", {}, None, 1, 0, 0, "train")] * 90 + [
        Record("y", {}, None, 2, 0, 0, "train")
    ] * 10
    sampler = StreamSampler(100, 10, seed=0, weights=class_balance_weights(recs))
    it = iter(sampler)
    drawn = [recs[next(it)[0]].expression for _ in range(2000)]
    assert 0.4 < drawn.count(2) / len(drawn) < 0.6


def test_stream_resumes_at_the_same_place():
    full = StreamSampler(10, 4, seed=1)
    it = iter(full)
    stream = [next(it) for _ in range(4 * 7)]
    resumed = StreamSampler(10, 4, seed=1, start_batch=3)
    it = iter(resumed)
    assert [next(it) for _ in range(4 * 4)] == stream[12:]


def test_processes_get_disjoint_batches():
    a = iter(StreamSampler(16, 2, seed=0, rank=0, world=2))
    b = iter(StreamSampler(16, 2, seed=0, rank=1, world=2))
    ka = {next(a)[1] for _ in range(8)}
    kb = {next(b)[1] for _ in range(8)}
    assert not ka & kb and len(ka | kb) == 16
