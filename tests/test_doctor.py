"""`controlnet-emo doctor`: the preflight's verdict on a run config, as a user reads it."""

import shutil

import pytest

from controlnet_emo.cli import doctor
from controlnet_emo.cli.main import main
from controlnet_emo.config import load_config
from controlnet_emo.models.shipped import shipped_path
from tests.conftest import DEMO_CONFIG, write_prepared


def run_doctor(capsys, tmp_path, data, *extra):
    """Exit code and stdout of `doctor` on configs/demo.yaml (shipped base and critic) with
    its landmark term on, so that the training critic is needed."""
    args = ["doctor", "--config", str(DEMO_CONFIG), "--num-processes", "1"]
    args += ["--set", f"data.root={data}", "--set", f"output_dir={tmp_path / 'run'}"]
    args += ["--set", "loss.landmarks.weight=0.1"]
    code = main([*args, *extra])
    return code, capsys.readouterr().out


def check_of(line: str) -> str:
    """A table line's check name: after the 8-character status column."""
    return line[9:].split("  ")[0]


def row(out: str, check: str) -> str:
    """The table's line for ``check`` plus its '->' fix line, if any."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if check_of(line) == check:
            fix = lines[i + 1] if i + 1 < len(lines) and "-> " in lines[i + 1] else ""
            return line + "\n" + fix
    raise AssertionError(f"no {check!r} row in:\n{out}")


def test_a_complete_run_would_start(tmp_path, prepared, capsys):
    """The demo recipe on a prepared dataset: every weight ships, so every need is met."""
    code, out = run_doctor(capsys, tmp_path, prepared)
    assert code == 0, out
    assert out.splitlines()[-1].startswith("verdict: the run would start")
    for check in ("base model", "emotion critic", "dataset", "dataset files", "accumulation"):
        assert row(out, check).startswith("ok "), row(out, check)
    assert "demo-critic-train" in row(out, "emotion critic")
    assert "48 files" in row(out, "dataset files")  # 12 rows x (image + 3 maps)
    assert "not needed" in row(out, "LPIPS-vgg trunk")  # demo.yaml: lpips weight 0
    assert not (tmp_path / "run").exists()  # a check, not a run


def test_missing_weights_are_named_with_how_to_get_them(tmp_path, prepared, capsys):
    code, out = run_doctor(
        capsys,
        tmp_path,
        prepared,
        "--set=model.pretrained=/nonexistent",
        f"--set=model.emonet={tmp_path / 'emonet_8.pth'}",
    )
    assert code == 1
    base = row(out, "base model")
    assert base.startswith("missing ") and "/nonexistent: no such file or folder" in base
    assert "huggingface-cli" not in base  # a local path is a path, not a hub id
    critic = row(out, "emotion critic")
    assert critic.startswith("missing ") and "EmoNet weights not found" in critic
    assert "verdict: the run would NOT start (2 missing)" in out


def test_a_dataset_row_whose_image_is_missing_blocks(tmp_path, capsys):
    data = write_prepared(tmp_path / "data")
    (data / "images" / "3.png").unlink()
    (data / "flame" / "5.png").write_bytes(b"not a png")
    code, out = run_doctor(capsys, tmp_path, data)
    assert code == 1
    files = [line for line in out.splitlines() if check_of(line) == "dataset files"]
    assert any(line.startswith("missing ") and "images/3.png" in line for line in files), out
    assert any(line.startswith("fail ") and "flame/5.png" in line for line in files), out


def test_no_dataset_says_how_to_prepare_one(tmp_path, capsys):
    code, out = run_doctor(capsys, tmp_path, tmp_path / "nowhere")
    assert code == 1
    assert row(out, "dataset").startswith("missing ") and "controlnet-emo prepare" in out


def test_config_errors_still_exit_2_in_one_line(tmp_path, prepared, capsys):
    code = main(["doctor", "--config", str(DEMO_CONFIG), "--set", "loss.lpips.weight=-1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss.lpips.weight" in err


def test_a_hub_id_is_found_in_the_cache_and_an_incomplete_one_is_not(
    tmp_path, prepared, capsys, monkeypatch
):
    """A hub id resolves to its cached snapshot, exactly as from_pretrained reads it."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someone--face-base"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(shipped_path("demo-face-base"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    code, out = run_doctor(capsys, tmp_path, prepared, "--set=model.pretrained=someone/face-base")
    assert code == 0 and str(snapshot) in row(out, "base model"), out

    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    code, out = run_doctor(capsys, tmp_path, prepared, "--set=model.pretrained=someone/face-base")
    base = row(out, "base model")
    assert code == 1 and base.startswith("missing ") and "unet/ has no weights file" in base
    assert "huggingface-cli download someone/face-base" in base


def test_processes_come_from_the_accelerate_config_and_set_the_accumulation(
    tmp_path, prepared, monkeypatch
):
    conf = tmp_path / "accelerate.yaml"
    conf.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
        "num_processes: 2\nmixed_precision: 'no'\nuse_cpu: false\n"
    )
    cfg = load_config(
        DEMO_CONFIG,
        [f"data.root={prepared}", f"output_dir={tmp_path / 'run'}", "train.batch_size=2"],
    )
    rows = {r.check: r for r in doctor.diagnose(cfg, accelerate_config=conf)}
    assert rows["processes"].detail.startswith("2 (") and str(conf) in rows["processes"].detail
    assert rows["accumulation"].status == "ok" and rows["accumulation"].detail.startswith("2 ")

    rows = {r.check: r for r in doctor.diagnose(cfg, num_processes=3)}
    assert rows["accumulation"].status == "fail" and "3 processes" in rows["accumulation"].detail

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert doctor.launch_plan(None, None).num_processes == 4


def test_prepare_needs_are_checked_against_the_raw_folder(tmp_path, prepared, capsys, monkeypatch):
    """depth.model=auto needs ZoeDepth once a map is missing; skeleton.source=fan needs FAN."""
    from controlnet_emo.synthetic.faces import write_raw_dataset

    raw = tmp_path / "raw"
    write_raw_dataset(raw, n=4, resolution=64, seed=0)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    cfg = load_config(DEMO_CONFIG, [f"data.root={prepared}", "depth.model=auto"])
    rows = {r.check: r for r in doctor.check_prepare(cfg, raw, prepared=True)}
    assert rows["depth model"].status == "ok" and "precomputed" in rows["depth model"].detail
    assert rows["FAN (landmarks)"].status == "ok"  # synthetic annotations carry landmarks

    next((raw / "depth").rglob("*.png")).unlink()
    cfg.skeleton.source = "fan"
    rows = {r.check: r for r in doctor.check_prepare(cfg, raw, prepared=True)}
    assert rows["depth model"].status == "missing" and "zoedepth" in rows["depth model"].fix
    assert rows["FAN (landmarks)"].status == "missing"
    assert "face-alignment weights not found" in rows["FAN (landmarks)"].fix


def test_too_little_disk_for_the_checkpoints_fails(tmp_path, prepared, monkeypatch):
    cfg = load_config(DEMO_CONFIG, [f"data.root={prepared}", f"output_dir={tmp_path / 'run'}"])
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1))
    rows = {r.check: r for r in doctor.diagnose(cfg, num_processes=1)}
    assert rows["disk"].status == "fail" and "1.9 M params" in rows["disk"].detail


def test_the_disk_estimate_counts_every_checkpoint_kept():
    cfg = load_config(
        DEMO_CONFIG,
        [
            "train.max_steps=1000",
            "train.checkpoint_every=100",
            "train.checkpoints_total_limit=3",
            "train.ema=false",
        ],
    )
    need, how = doctor.disk_estimate(cfg, doctor.Sizes(controlnet=1000), n_train=0)
    # 4 checkpoints at the peak (the new one is written before the oldest goes) x 12 B/param,
    # + controlnet/ and controlnet.safetensors at 4 B/param each
    assert need == 4 * 12_000 + 8_000 and how.startswith("4 checkpoint(s)")
    cfg.train.ema = True  # the averaged weights ride in every checkpoint: 4 B/param more
    assert doctor.disk_estimate(cfg, doctor.Sizes(controlnet=1000), 0)[0] == 4 * 16_000 + 8_000
    cfg.train.ema = False
    cfg.train.checkpoints_total_limit = None
    assert doctor.disk_estimate(cfg, doctor.Sizes(controlnet=1000), 0)[0] == 10 * 12_000 + 8_000


def test_doctor_has_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["doctor", "--help"])
    assert done.value.code == 0 and "--accelerate-config" in capsys.readouterr().out


def test_spread_picks_evenly():
    assert doctor.spread(list(range(10)), 3) == [0, 3, 6]
    assert doctor.spread([1, 2], None) == [1, 2]


def test_latent_lpips_needs_no_lpips_trunk():
    """`loss.lpips.space: latent` reads the decoder's features: doctor must not demand the
    torchvision trunk that pixel LPIPS loads."""
    cfg = load_config(
        DEMO_CONFIG,
        ["loss.lpips.weight=0.1", "loss.lpips.space=latent", "model.lpips_backbone=pretrained"],
    )
    (only,) = doctor.check_lpips(cfg)
    assert only.status == "ok" and "not needed" in only.detail
    cfg.loss.lpips.space = "pixel"
    assert doctor.check_lpips(cfg)[0].detail != only.detail
