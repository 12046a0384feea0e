"""Config errors surface as one line naming the key, before any model loads."""

from pathlib import Path

import pytest
import yaml

from controlnet_emo.config import Config, ConfigError, gradient_accumulation_steps, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_follow_the_design_schema():
    cfg = load_config()
    assert cfg.conditions == ["flame", "depth", "skeleton"]
    assert cfg.loss.diffusion.weight == 0.92 and cfg.loss.diffusion.snr_gamma == 0.8
    assert cfg.loss.lpips.weight == 0.08 and cfg.train.total_batch_size == 1024


def test_overrides_are_yaml_typed_and_nested(tmp_path):
    cfg = load_config(
        write(tmp_path, {"train": {"max_steps": 10}}),
        [
            "train.learning_rate=1e-5",
            "loss.diffusion.snr_gamma=null",
            "conditions=[flame, skeleton]",
            "model.controlnet.mode=multi",
        ],
    )
    assert cfg.train.learning_rate == 1e-5 and cfg.train.max_steps == 10
    assert cfg.loss.diffusion.snr_gamma is None
    assert cfg.conditions == ["flame", "skeleton"]
    assert cfg.model.controlnet.mode == "multi"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("trian.max_steps=3", "trian"),
        ("train.batch_size=four", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("loss.lpips.weight=-0.1", "loss.lpips.weight"),
        ("loss.emotion.valence=-1", "loss.emotion.valence"),
        ("train.total_batch_size=10", "train.total_batch_size"),
        ("model.unet_trainable=everything", "model.unet_trainable"),
        ("conditions=[flame, normals]", "conditions"),
        ("data.condition_dropout=1.5", "data.condition_dropout"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("loss.pixel.balance=0", "loss.pixel.balance"),
        ("loss.landmarks.weight=-1", "loss.landmarks.weight"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert key in message and "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=7", "data.max_samples=5"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, Config)


def test_accumulation_from_total_batch():
    cfg = load_config(None, ["train.batch_size=4", "train.total_batch_size=1024"])
    assert gradient_accumulation_steps(cfg, 1) == 256
    assert gradient_accumulation_steps(cfg, 8) == 32
    with pytest.raises(ConfigError, match="3 processes"):
        gradient_accumulation_steps(cfg, 3)


PRETRAIN_RECIPES = {"base_synthetic.yaml", "critic_train.yaml", "critic_eval.yaml"}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_recipes_parse(name):
    from controlnet_emo.pretrain.base import load_base_config
    from controlnet_emo.pretrain.critic import load_critic_config

    if name == "base_synthetic.yaml":
        load_base_config(CONFIGS / name, [])
    elif name in PRETRAIN_RECIPES:
        load_critic_config(CONFIGS / name, [])
    else:
        load_config(CONFIGS / name)


def test_lr_scheduler_names_match_diffusers():
    from diffusers.optimization import SchedulerType

    from controlnet_emo.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    with pytest.raises(ConfigError, match="train.lr_scheduler"):
        load_config(None, ["train.lr_scheduler=warmup_cosine"])


def test_bare_no_means_the_string_choice():
    # YAML 1.1 reads `no` as False; `--set train.mixed_precision=no` must still mean "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_cluster_templates_resume_latest_under_accelerate_launch():
    """The SLURM and HTCondor templates requeue on preemption into train.resume=latest."""
    from pathlib import Path

    cluster = Path(__file__).resolve().parent.parent / "configs" / "cluster"
    node = (cluster / "train_node.sh").read_text()
    assert "accelerate launch" in node and "train.resume=latest" in node
    slurm = (cluster / "slurm.sbatch").read_text()
    assert "--requeue" in slurm and "TERM@120" in slurm and "train_node.sh" in slurm
    condor = (cluster / "htcondor.sub").read_text()
    assert "checkpoint_exit_code = 85" in condor and "train_node.sh" in condor
    from controlnet_emo.training.checkpointing import PREEMPTED_EXIT_CODE

    assert PREEMPTED_EXIT_CODE == 85


def test_a_run_whose_first_steps_have_no_active_term_is_refused(tmp_path, capsys):
    """Diffusion off while the pixel and emotion terms wait for their start step: steps before
    it would have nothing to backpropagate. Refused by name before anything loads."""
    from controlnet_emo.cli.main import main

    off = ["loss.diffusion.weight=0", "loss.landmarks.weight=0.1", "loss.pixel.start_step=500"]
    with pytest.raises(ConfigError, match=r"loss\.diffusion\.weight.*loss\.pixel\.start_step"):
        load_config("demo", off)
    out = tmp_path / "run"
    args = ["train", "--config", "demo", "--set", f"output_dir={out}"]
    assert main([*args, *(a for kv in off for a in ("--set", kv))]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss.diffusion.weight" in err and "loss.pixel.start_step" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    # either term scheduled from step 0 is a run that trains
    load_config("demo", ["loss.diffusion.weight=0", "loss.landmarks.weight=0.1"])
    load_config("demo", ["loss.landmarks.weight=0.1", "loss.pixel.start_step=500"])
    # and a run with every term off has nothing to train at all
    with pytest.raises(ConfigError, match="every term has weight 0"):
        load_config("demo", ["loss.diffusion.weight=0"])


def test_recipes_are_usable_by_name_from_any_folder(tmp_path, monkeypatch):
    """After ``pip install`` there is no configs/ beside the user: ``--config demo`` finds the
    shipped recipe, and so does the old ``configs/demo.yaml`` spelling from another folder."""
    monkeypatch.chdir(tmp_path)
    by_name = load_config("stableface_best")
    assert by_name.loss.lpips.weight == pytest.approx(0.08)
    assert load_config("configs/demo.yaml").data.resolution == load_config("demo").data.resolution
    with pytest.raises(ConfigError, match="shipped recipes by name: .*stableface_best"):
        load_config("stableface_bets")
    (tmp_path / "demo.yaml").write_text("seed: 7\n")  # a user's own file wins over the name
    assert load_config("demo.yaml").seed == 7


def test_the_wheel_ships_the_recipes_and_the_small_models(tmp_path):
    """`pip install .` (not editable) must carry what `controlnet-emo demo` reads."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("controlnet_emo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"controlnet_emo/configs/{p.name}" for p in CONFIGS.glob("*.yaml")}
    assert recipes and recipes <= names
    assert "controlnet_emo/configs/accelerate/1gpu.yaml" in names
    assert "controlnet_emo/weights/demo-face-base/unet/diffusion_pytorch_model.safetensors" in names
    assert "controlnet_emo/weights/demo-critic-eval/model.safetensors" in names
