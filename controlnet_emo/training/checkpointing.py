"""checkpoint-<step>/ folders: written whole or not at all, pruned to a total limit.

accelerate's ``save_state`` writes models, optimizer, LR scheduler, registered objects and
RNG states into a temporary folder that is renamed only once complete, so a run killed
mid-save leaves the previous checkpoint as the usable latest one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..config import Config

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


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
