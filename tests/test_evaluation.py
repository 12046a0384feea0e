"""Evaluation: the metric functions on hand-made inputs, and the report a user gets."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_emo.cli.generate import add_evaluate_arguments, run_evaluate
from controlnet_emo.evaluation.evaluate import read_faces
from controlnet_emo.evaluation.metrics import (
    ccc,
    confusion_matrix,
    emotion_metrics,
    heatmap_landmarks,
    macro_f1,
    nme,
    pearson,
    rmse,
    topk_accuracy,
)
from controlnet_emo.inference.infer import generate, load_pipeline
from controlnet_emo.models.emonet import build_emonet
from controlnet_emo.models.sampling import Sampling, sample
from tests.conftest import write_prepared
from tests.runs import make_run

# --------------------------------------------------------------------------------------------
# Metric functions


def test_ccc_agreement_sign_and_shift():
    x = torch.tensor([-0.8, -0.3, 0.1, 0.4, 0.6])  # zero mean, so -x has the same mean
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(-x, x) == pytest.approx(-1.0)
    assert ccc(-x + 0.3, x + 0.3) > -1  # off-centre, a negation also shifts the mean
    shifted = x + 0.5  # same correlation, but the values no longer agree
    assert pearson(shifted, x) == pytest.approx(1.0)
    assert ccc(shifted, x) < 0.8
    assert ccc(x * 0.1, x) < 0.3  # a squashed range (always ~0) is penalised too
    assert math.isnan(ccc(x[:1], x[:1]))


def test_rmse_and_macro_f1_by_hand():
    assert rmse(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])) == pytest.approx(12.5**0.5)
    pred, target = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    # class 0: F1 = 2*1 / (2*1 + 1) = 2/3; class 1: 2*2 / (2*2 + 1) = 4/5
    assert macro_f1(pred, target) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)) == 1.0
    # always predicting the majority class scores 3/4 accuracy but a poor macro-F1
    assert macro_f1(torch.ones(4, dtype=torch.long), target) == pytest.approx((0 + 6 / 7) / 2)


# The definitions the report used before torchmetrics computed them, written out by hand:
# torchmetrics must give the same figures on any data, or the published numbers would move.


def _by_hand_macro_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    scores = []
    for c in torch.unique(torch.cat([pred, target])):  # classes in labels or predictions
        tp = ((pred == c) & (target == c)).sum().item()
        wrong = ((pred == c) != (target == c)).sum().item()  # false positives + negatives
        scores.append(2 * tp / (2 * tp + wrong))
    return float(np.mean(scores))


@pytest.mark.parametrize("seed", range(4))
def test_library_metrics_match_the_definitions_by_hand(seed):
    g = torch.Generator().manual_seed(seed)
    n = [2, 7, 50, 300][seed]
    x = torch.randn(n, generator=g)
    y = 0.6 * x + 0.8 * torch.randn(n, generator=g) + 0.3
    assert rmse(x, y) == pytest.approx(float((x.double() - y.double()).square().mean().sqrt()))
    xd, yd = x.double(), y.double()
    xc, yc = xd - xd.mean(), yd - yd.mean()
    r = float((xc * yc).sum() / (xc.square().sum() * yc.square().sum()).sqrt())
    assert pearson(x, y) == pytest.approx(r, abs=1e-9)
    # CCC with population (n) moments, Lin's and EmoNet's; torchmetrics' n-1 form differs
    # (most at small n), which is why ccc() keeps its own code.
    gap = float(xd.mean() - yd.mean())
    lin = 2 * float((xc * yc).mean()) / (float(xc.square().mean() + yc.square().mean()) + gap**2)
    assert ccc(x, y) == pytest.approx(lin, abs=1e-9)
    labels = torch.randint(0, 5, (n,), generator=g)  # a 5-class slice of an 8-class critic
    logits = torch.randn(n, 8, generator=g)
    pred = logits.argmax(1)
    assert macro_f1(pred, labels) == pytest.approx(_by_hand_macro_f1(pred, labels), abs=1e-6)
    for k in (1, 3, 9):
        best = logits.topk(min(k, 8), dim=1).indices
        by_hand = float((best == labels[:, None]).any(dim=1).double().mean())
        assert topk_accuracy(logits, labels, k) == pytest.approx(by_hand, abs=1e-6)
    counts = confusion_matrix(pred, labels, 8)
    for t, p in [(0, 0), (1, 3), (4, 7)]:
        assert counts[t, p] == ((labels == t) & (pred == p)).sum()  # rows label, columns pred
    assert counts.dtype == torch.int64 and counts.sum() == n


def test_ccc_keeps_population_moments_where_torchmetrics_does_not():
    """Two points: the n and n-1 forms of CCC are far apart, and ours is the published one."""
    from torchmetrics.functional import concordance_corrcoef

    x, y = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 2.0])
    # n moments: var 0.25 and 0.5625, cov 0.375, mean gap 0.75 -> 0.75 / 1.375
    assert ccc(x, y) == pytest.approx(0.75 / 1.375)
    assert float(concordance_corrcoef(x, y)) != pytest.approx(ccc(x, y), abs=0.05)
    assert math.isnan(pearson(torch.ones(4), torch.arange(4.0)))  # constant: undefined


def test_confusion_matrix_leaves_out_pairs_outside_the_classes():
    pred, target = torch.tensor([0, 1, 9, 2]), torch.tensor([0, -1, 1, 2])
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_emotion_metrics_skip_missing_labels():
    read = {
        "expression": torch.tensor([1, 2, 3]),
        "valence": torch.tensor([0.5, 0.0, 0.2]),
        "arousal": torch.tensor([0.1, 0.2, 0.3]),
    }
    m = emotion_metrics(
        read,
        expression=torch.tensor([1, -1, 7]),
        valence=torch.tensor([0.5, float("nan"), 0.2]),
        arousal=torch.tensor([0.1, 0.2, -2.0]),
        n_classes=5,
    )
    assert (m["n_valence"], m["n_arousal"], m["n_expression"]) == (2, 2, 1)
    assert m["valence_rmse"] == 0 and m["valence_ccc"] == pytest.approx(1.0)
    assert m["expression_accuracy"] == 1.0  # label 7 is outside a 5-class EmoNet: left out


def test_nme_is_zero_for_identical_landmarks_and_scale_free():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 68, 2, generator=g) * 50
    target[:, 36], target[:, 45] = torch.tensor([10.0, 20.0]), torch.tensor([40.0, 20.0])  # iod 30
    assert torch.allclose(nme(target, target), torch.zeros(2))
    shifted = target + torch.tensor([3.0, 4.0])  # every point 5 px off
    assert torch.allclose(nme(shifted, target), torch.full((2,), 5 / 30))
    assert torch.allclose(nme(target + torch.tensor([6.0, 8.0]), target), torch.full((2,), 10 / 30))
    assert torch.allclose(nme(shifted * 4, target * 4), nme(shifted, target))  # resolution-free
    flat = target.clone()
    flat[:, 45] = flat[:, 36]
    assert torch.isnan(nme(shifted, flat)).all()


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_heatmap_landmarks_recover_gaussian_peaks(sigma):
    g = torch.Generator().manual_seed(1)
    centres = 4 + torch.rand(2, 68, 2, generator=g) * 56  # (B,68,2) sub-pixel (x, y) on 64x64
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    d2 = (xs - centres[..., 0, None, None]) ** 2 + (ys - centres[..., 1, None, None]) ** 2
    heatmap = torch.exp(-d2 / (2 * sigma**2)) - 0.05  # (B,68,64,64), negative background
    points = heatmap_landmarks(heatmap, (256, 128))  # image 128 wide, 256 tall
    scale = torch.tensor([128 / 64, 256 / 64])
    expected = (centres + 0.5) * scale - 0.5
    assert ((points - expected).abs() / scale).max() < 0.05 * sigma**2  # heatmap px


# --------------------------------------------------------------------------------------------
# The subcommand, end to end on a tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("eval") / "run")[0]


CRITIC = "demo-critic-eval"
"""The shipped evaluation critic: a real, trained reader of faces (about 1 MB) that loads
offline; EmoNet itself is tested in test_emonet.py and read with random weights once, in
test_no_baseline_and_default_out_folder."""


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    return run_evaluate(parser.parse_args([str(a) for a in argv]))


def _finite_numbers(block: dict) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in block.values())


def test_evaluate_writes_metrics_grid_and_per_sample(run, prepared, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli(
        run,
        "--data",
        prepared,
        "--split",
        "train",
        "--n",
        3,
        "--steps",
        2,
        "--batch-size",
        2,
        "--guidance-scale",
        1,
        "--out",
        out,
        "--device",
        "cpu",
        "--emonet",
        CRITIC,
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["split"], m["emonet"]["source"]) == (3, "train", CRITIC)
    assert not m["warnings"] and "WARNING" not in capsys.readouterr().out
    assert m["settings"]["steps"] == 2 and m["settings"]["seed"] == 0
    for kind in ("generated", "baseline", "real", "generated_vs_emonet_on_real"):
        keys = {
            "valence_rmse",
            "valence_ccc",
            "arousal_rmse",
            "arousal_ccc",
            "expression_accuracy",
            "expression_macro_f1",
        }
        assert keys <= m[kind].keys() and _finite_numbers(
            {k: m[kind][k] for k in keys if "ccc" not in k}
        )
    assert math.isfinite(m["generated"]["nme"]) and math.isfinite(m["baseline"]["nme"])
    assert m["published_emonet_affectnet"]["expression_accuracy"] == 0.75
    rows = [json.loads(line) for line in (out / "per_sample.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["images/0.png", "images/1.png", "images/2.png"]
    assert [r["seed"] for r in rows] == [0, 1, 2]  # row i is redrawn with infer --seed i
    assert rows[1]["prompt"] == "a photo of a happy face"
    assert rows[0]["prompt"] == "a photo of a neutral face"  # no text: the caption template
    assert rows[2]["label"]["expression"] == "sad" and "nme" in rows[0]["generated"]
    with Image.open(out / "grid.png") as grid:  # rows: 3 maps | generated | target | no maps
        assert grid.size == (6 * 256, 3 * 256)
    with Image.open(out / "maps_sweep.png") as sweep:  # renders | one prompt + seed | targets
        assert sweep.size == (3 * 128, 3 * 128)
        faces = np.asarray(sweep)[128:256]  # (128, 3*128, 3); text only on the first tile
        # the prompt and noise are shared, so columns differ only because the maps do
        assert not np.array_equal(faces[:, 128:256], faces[:, 256:])
    assert 0 <= m["generated"]["expression_top3_accuracy"] <= 1
    for picture in ("confusion.png", "valence_arousal.png"):
        with Image.open(out / picture) as im:
            assert im.size[0] > 300


def test_one_prompt_for_all_and_nme_against_recorded_landmarks(run, tmp_path):
    """--prompt replaces every caption; the target's recorded landmarks are NME's reference,
    so the critic reading the target image gets a finite error of its own."""
    data = write_prepared(tmp_path / "data", n=4, n_val=2, size=(64, 80))
    rows = [json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()]
    for r in rows:  # a face-sized spread of points in the 64x80 target's frame
        r["landmarks"] = [[10 + (k % 10) * 4.0, 20 + (k // 10) * 6.0] for k in range(68)]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    args = ["--data", data, "--n", 2, "--steps", 1, "--guidance-scale", 1, "--device", "cpu"]
    args += ["--emonet", CRITIC, "--out", out]
    assert cli(run, *args, "--prompt", "a photo of a face", "--no-baseline") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["prompt"] == "a photo of a face"
    assert m["nme_reference"] == "target landmarks (metadata)"
    assert math.isfinite(m["real"]["nme"]) and m["real"]["nme"] > 0
    samples = [json.loads(x) for x in (out / "per_sample.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} == {"a photo of a face"}


def test_grading_with_the_training_critic_warns(tmp_path, prepared, capsys):
    import yaml

    run_dir, _ = make_run(tmp_path / "run")
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["model"]["emonet"] = "demo-critic-train"
    raw["loss"]["diffusion"]["weight"] = 1.0  # the diffusion term alone: no critic was read
    raw["loss"]["emotion"].update(valence=0.0, arousal=0.0, expression=0.0)
    raw["loss"]["landmarks"]["weight"] = 0.0
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    args = ["--data", prepared, "--n", 1, "--steps", 1, "--guidance-scale", 1, "--device", "cpu"]
    args += ["--no-baseline", "--grid-rows", 0]
    assert cli(run_dir, *args) == 0  # the run's own model.emonet, which it never trained against
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert not any("trained against" in w for w in m["warnings"])

    raw["loss"]["landmarks"]["weight"] = 0.1  # now the critic's landmarks trained the run
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli(run_dir, *args) == 0
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert any("trained against" in w for w in m["warnings"])
    assert "trained against" in capsys.readouterr().out


def test_no_baseline_and_default_out_folder(run, prepared, capsys):
    """Without --emonet the run's own critic grades: here random EmoNet weights, which the
    report and the console both flag."""
    assert (
        cli(
            run,
            "--data",
            prepared,
            "--n",
            1,
            "--steps",
            2,
            "--no-baseline",
            "--guidance-scale",
            1,
            "--device",
            "cpu",
        )
        == 0
    )
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["split"] == "val" and "baseline" not in m and m["settings"]["baseline"] is False
    assert m["emonet"]["source"] == "random" and m["emonet"]["n_expression"] == 8
    assert any("RANDOM" in w for w in m["warnings"]) and "WARNING" in capsys.readouterr().out


def test_read_faces_with_the_real_emonet():
    with pytest.warns(UserWarning, match="random weights"):
        critic = build_emonet("random")
    read = read_faces(critic, torch.rand(1, 3, 64, 64))
    assert read["expression"].shape == (1,) and read["valence"].shape == (1,)
    assert read["landmarks"].shape == (1, 68, 2)
    assert read["landmarks"].min() >= -0.5 and read["landmarks"].max() <= 63.5  # image pixels


@pytest.mark.parametrize("mode", ["stacked", "multi"])
def test_batched_generation_is_what_infer_draws(run, tmp_path, mode):
    """Any evaluated row can be redrawn with ``controlnet-emo infer --seed S``."""
    pipe, info = load_pipeline(
        run if mode == "stacked" else make_run(tmp_path / "multi", mode=mode)[0], device="cpu"
    )
    assert info.mode == mode
    maps = torch.rand(2, 9, 64, 64, generator=torch.Generator().manual_seed(3))
    prompts = ["a photo of a happy face", "a photo of a sad face"]
    how = Sampling(seed=7, steps=2, guidance_scale=7.5)
    batch = sample(pipe, info.conditions, info.mode, maps, prompts, [7, 8], how)
    for i in range(2):
        single = generate(pipe, info, maps[i], prompts[i], Sampling(seed=7 + i, steps=2))
        single_t = torch.from_numpy(np.asarray(single)).permute(2, 0, 1).float() / 255
        assert (batch[i] - single_t).abs().max() <= 2 / 255
    # evaluate --controlnet-scale draws what infer --controlnet-scale does, and it matters
    weak_how = Sampling(seed=7, steps=2, controlnet_scale=0.2)
    weak = sample(pipe, info.conditions, info.mode, maps[:1], prompts[:1], [7], weak_how)
    single = generate(pipe, info, maps[0], prompts[0], weak_how)
    single_t = torch.from_numpy(np.asarray(single)).permute(2, 0, 1).float() / 255
    assert (weak[0] - single_t).abs().max() <= 2 / 255
    assert (weak[0] - batch[0]).abs().max() > 4 / 255


@pytest.mark.parametrize("case", ["run", "data", "split", "emonet"])
def test_bad_inputs_are_one_line_errors_naming_the_path(run, prepared, tmp_path, capsys, case):
    args = {"run": run, "--data": prepared, "--split": "val", "--emonet": "random"}
    bad = {
        "run": tmp_path / "no_run",
        "--data": tmp_path / "no_data",
        "--split": "test",
        "--emonet": tmp_path / "emonet_8.pth",
    }
    key = {"run": "run", "data": "--data", "split": "--split", "emonet": "--emonet"}[case]
    args[key] = bad[key]
    argv = [args.pop("run")] + [x for kv in args.items() for x in kv]
    assert cli(*argv, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert (str(prepared / "metadata.jsonl") if case == "split" else str(bad[key])) in err
