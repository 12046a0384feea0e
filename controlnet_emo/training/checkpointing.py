"""checkpoint-<step>/ folders: written whole or not at all, pruned to a total limit.

accelerate's ``save_state`` writes models, optimizer, LR scheduler, registered objects and
RNG states into a temporary folder that is renamed only once complete, so a run killed
mid-save leaves the previous checkpoint as the usable latest one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator

from controlnet_emo.atomic import set_usual_modes
from controlnet_emo.config import Config

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
PREEMPTED_EXIT_CODE = 85
"""``controlnet-emo train``'s exit status after a SIGTERM stop: checkpoint written, rerun with
``train.resume=latest``. 85 is what the HTCondor template's ``checkpoint_exit_code`` expects."""
STOP_SIGNALS = (signal.SIGTERM,)

log = logging.getLogger(__name__)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary folders are not listed)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in out.iterdir()
        if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """'latest' -> newest checkpoint (None when there is none yet); a path -> that folder."""
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(
    accelerator: Accelerator, cfg: Config, step: int, total_limit: int | None
) -> Path:
    out = Path(cfg.output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        cfg.save(tmp / "config.yaml")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        set_usual_modes(tmp)  # accelerate's safetensors files are 0600
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(out, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, total_limit: int | None) -> None:
    if total_limit is None:
        return
    for _, path in list_checkpoints(output_dir)[:-total_limit]:
        shutil.rmtree(path)


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restore everything accelerate saved; returns the optimizer step to continue from."""
    accelerator.load_state(str(path))
    return int(json.loads((path / STATE_FILE).read_text())["step"])


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM -> finish the optimizer step, checkpoint, stop


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after writing a checkpoint (the CLI exits with
    PREEMPTED_EXIT_CODE); ``train.resume=latest`` continues exactly from it."""


class StopRequest:
    """Set by the signal handler; read between optimizer steps, never inside one."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process was signalled: all ranks must stop after the same step, or
        the one that stops first would wait in save_state while the others step on."""
        flag = self.signum is not None
        if accelerator.num_processes == 1:
            return flag
        total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
        return bool(total.item() > 0)


@contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """Catch SIGTERM (schedulers send it before killing a preempted job) for the duration of
    a run, then put the previous handlers back. A second SIGTERM acts as the old handler
    would (kills by default): a stuck step can still be stopped. Off the main thread (where
    Python cannot install handlers) it does nothing."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    # getsignal is None for a handler installed outside Python: restore the default then
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in STOP_SIGNALS}

    def handler(signum: int, frame) -> None:
        if request.signum is not None:
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        request.signum = signum

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a scheduler signals every process of the job, and a
    worker killed by SIGTERM would crash the step the trainer is finishing. Workers exit
    with the trainer instead."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def checkpoint_and_stop(
    accelerator: Accelerator, cfg: Config, step: int, signum: int | None = None
) -> None:
    """Write checkpoint-<step> (unless it is already there), close the trackers and raise
    `Preempted`. ``signum``: None on a rank that was not signalled itself."""
    done = dict(list_checkpoints(cfg.output_dir))
    path = done.get(step) or save_checkpoint(
        accelerator, cfg, step, cfg.train.checkpoints_total_limit
    )
    name = signal.Signals(signum or signal.SIGTERM).name
    if accelerator.is_main_process:
        log.warning(
            "%s: stopped after step %d, state in %s; continue with --set train.resume=latest "
            "(exit code %d)", name, step, path, PREEMPTED_EXIT_CODE,
        )  # fmt: skip
    accelerator.end_training()  # after the save: it may also end the process group
    raise Preempted(f"stopped by {name} after step {step}")
