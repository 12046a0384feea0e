"""SIGTERM preemption: finish the step, checkpoint, stop; resume=latest lands on the same weights.

The signal is sent by the test itself from inside the loop (after the optimizer step it
names), so where it lands is deterministic on any machine.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from controlnet_emo.cli.main import main
from controlnet_emo.config import load_config
from controlnet_emo.training import checkpointing, loop
from tests.conftest import DEMO_CONFIG, tiny_overrides

# Everything resume must restore: EMA, a moving LR schedule, augmentations, dropout, and a
# checkpoint cadence the signal does not fall on.
EXTRA = {
    "train.max_steps": 5,
    "train.checkpoint_every": 4,
    "train.ema": True,
    "train.ema_decay": 0.5,
    "train.lr_scheduler": "cosine",
    "train.learning_rate": 1e-3,
    "train.total_batch_size": 4,  # 2 micro-batches per step
}


def config(out: Path, prepared: Path, **extra):
    return load_config(DEMO_CONFIG, tiny_overrides(out, prepared, **{**EXTRA, **extra}))


def sigterm_after_step(monkeypatch, k: int) -> None:
    """Deliver SIGTERM to this process once optimizer step ``k`` (1-based) has finished."""
    real = loop.optimizer_step

    def step_then_signal(cfg, models, accelerator, train_iter, step, opt):
        result = real(cfg, models, accelerator, train_iter, step, opt)
        if step + 1 == k:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(loop, "optimizer_step", step_then_signal)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "controlnet" / "diffusion_pytorch_model.safetensors")


def test_sigterm_checkpoints_and_resume_reaches_the_uninterrupted_weights(
    tmp_path, prepared, monkeypatch
):
    before = signal.getsignal(signal.SIGTERM)
    straight = tmp_path / "straight"
    loop.train(config(straight, prepared))

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        sigterm_after_step(patch, 3)
        with pytest.raises(checkpointing.Preempted, match="after step 3"):
            loop.train(config(stopped, prepared))
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert [s for s, _ in checkpointing.list_checkpoints(stopped)] == [3]
    assert not (stopped / "controlnet").exists()  # not mistaken for a finished run
    steps = [json.loads(x)["step"] for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    loop.train(config(stopped, prepared, **{"train.resume": "latest"}))
    a, b = final_weights(straight), final_weights(stopped)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    raw_a = load_file(straight / "checkpoint-5" / "model.safetensors")
    raw_b = load_file(stopped / "checkpoint-5" / "model.safetensors")
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)  # non-EMA weights too
    assert signal.getsignal(signal.SIGTERM) is before


def test_train_command_exits_with_the_preempted_code(tmp_path, prepared, monkeypatch, caplog):
    sigterm_after_step(monkeypatch, 1)
    out = tmp_path / "run"
    argv = ["train", "--config", str(DEMO_CONFIG)]
    for item in tiny_overrides(out, prepared, **{"train.max_steps": 3}):
        argv += ["--set", item]
    assert main(argv) == checkpointing.PREEMPTED_EXIT_CODE == 85
    lines = [r.getMessage() for r in caplog.records if "stopped after step" in r.getMessage()]
    assert len(lines) == 1 and "train.resume=latest" in lines[0] and "SIGTERM" in lines[0]
    assert (out / "checkpoint-1" / checkpointing.STATE_FILE).is_file()


def test_a_signal_between_steps_is_only_recorded():
    """The handler never interrupts a step: it records the signal for the loop to read."""
    with checkpointing.stop_on_signal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler)
