"""The console script end to end, as a user runs it."""

import json
import subprocess
import sys

import pytest

from controlnet_emo.cli.main import main
from tests.conftest import CRITIC_TERMS, DEMO_CONFIG


@pytest.mark.slow  # the whole demo: synth, prepare, train, infer, evaluate
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--n",
            "16",
            "--resolution",
            "96",
            "--steps",
            "3",
            "--set",
            "train.checkpoint_every=2",
            "--set",
            "train.validation_steps=2",
            "--set",
            "train.report_to=none",
            # demo.yaml trains the diffusion term alone; the research-style terms, turned on
            *(arg for k, v in CRITIC_TERMS.items() for arg in ("--set", f"{k}={v}")),
        ]
    )
    assert code == 0
    for name in (
        "raw/annotations.csv",
        "data/metadata.jsonl",
        "data/prepare_report.json",
        "checkpoint-3",
        "controlnet/config.json",
        "controlnet.safetensors",
        "samples/step-3.png",
        "metrics.jsonl",
        "README.md",
        "infer/happy.png",
        "eval/metrics.json",
        "eval/grid.png",
        "eval/confusion.png",
        "eval/valence_arousal.png",
    ):
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss/pixel_l1", "loss/expression", "loss/landmarks"} <= rows[0].keys()
    report = json.loads((out / "eval" / "metrics.json").read_text())
    assert report["emonet"]["source"] == "demo-critic-eval" and not report["warnings"]


@pytest.mark.slow  # the whole demo: synth, prepare, train, infer, evaluate
def test_demo_codes_runs_the_flame_path_to_an_edit_sweep(tmp_path):
    """synth --codes (no camera) -> prepare renders the maps from the codes, fitting each
    camera -> train -> evaluate -> an expression sweep of a held-out face."""
    from PIL import Image

    out = tmp_path / "demo"
    code = main(
        ["demo", "--codes", "--out", str(out), "--n", "16", "--resolution", "64", "--steps", "1"]
        + [f"--set={kv}" for kv in ("train.validation_steps=2", "train.report_to=none")]
    )
    assert code == 0
    report = json.loads((out / "data" / "prepare_report.json").read_text())
    assert report["flame_source"] == "codes", report.get("flame_source")
    assert (out / "data" / "expression_codes.npz").is_file()
    sheet = Image.open(out / "edit" / "happy_sweep.png")
    faces = sorted((out / "edit").glob("happy_sweep_face_*.png"))
    assert len(faces) >= 3 and sheet.width > sheet.height  # a row per strength
    assert Image.open(faces[0]).size == (64, 64)


def test_config_errors_stop_before_any_model_loads(tmp_path, capsys):
    code = main(
        [
            "train",
            "--config",
            str(DEMO_CONFIG),
            "--set",
            "loss.lpips.weight=-1",
            "--set",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss.lpips.weight" in err
    assert not (tmp_path / "run").exists()


def test_train_entry_point_is_the_train_subcommand(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train_controlnet.py",
            "--config",
            str(DEMO_CONFIG),
            "--set",
            "train.max_steps=0",
        ],
        capture_output=True,
        text=True,
        cwd=DEMO_CONFIG.parent.parent,
    )
    assert proc.returncode == 2 and "train.max_steps" in proc.stderr


@pytest.mark.parametrize(
    "command",
    [
        "synth",
        "prepare",
        "train",
        "infer",
        "export",
        "evaluate",
        "demo",
        "pretrain-base",
        "train-critic",
        "render",
        "edit",
    ],
)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--n", "-3"], ["--n", "4", "--resolution", "8"]])
def test_synth_rejects_impossible_counts_and_sizes(tmp_path, capsys, argv):
    assert main(["synth", str(tmp_path / "raw"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and argv[-2] in err
    assert not (tmp_path / "raw").exists()


def test_missing_dataset_is_reported_before_the_base_model_loads(tmp_path, capsys):
    args = ["train", "--config", str(DEMO_CONFIG), "--set", f"output_dir={tmp_path / 'run'}"]
    args += ["--set", f"data.root={tmp_path / 'nowhere'}", "--set", "model.pretrained=/no/such"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and "/no/such" not in err


def test_a_missing_local_base_is_a_missing_path_not_a_hub_download(tmp_path, prepared, capsys):
    args = ["train", "--config", str(DEMO_CONFIG), "--set", f"output_dir={tmp_path / 'run'}"]
    args += ["--set", f"data.root={prepared}", "--set", "model.pretrained=/no/such/model"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/no/such/model: no such file or folder" in err
    assert "huggingface-cli" not in err


def test_synth_then_prepare_works_with_the_default_config(tmp_path, capsys):
    """depth.model defaults to auto: synthetic raw data ships its depth maps, so a plain
    `synth raw && prepare raw prepared` needs no depth network."""
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    assert main(["synth", str(raw), "--n", "4", "--resolution", "96"]) == 0
    assert main(["prepare", str(raw), str(out)]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["depth_source"] == "precomputed" and report["depth_model"] == "auto"
    assert report["prepared"] == 4


def test_synth_codes_then_prepare_renders_the_flame_maps_from_the_codes(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    assert main(["synth", str(raw), "--n", "4", "--resolution", "96", "--codes-cam"]) == 0
    assert (raw / "flame_model.npz").is_file() and (raw / "codes/0/synth_00000/cam.npy").is_file()
    assert main(["prepare", str(raw), str(out)]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["flame_source"] == "codes" and report["flame_method"] == {"codes:cam.npy": 4}
