"""Writes that never leave half a file where a good one was.

A model file, its sidecar, the run's README and a generated PNG are each written to a
per-process temporary sibling and moved over the target only once complete, so a killed job
leaves the old file or the new one, and two processes writing the same path never share a
temporary file.

What lands carries the mode a plain ``open()`` / ``mkdir`` would have given it (0o666 / 0o777
less the umask): some writers (safetensors, ``tempfile``) make their files 0600 and folders
0700, which on a shared cluster hides a model from a colleague or from a ComfyUI running as
another user.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask, read from /proc where it can be (setting and restoring it with
    ``os.umask`` leaves a moment when another thread's files get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0o666) or ``mkdir`` (0o777) gives under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def set_usual_modes(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the usual modes: for a
    model written by a 0600 writer or into a ``tempfile`` folder, before it is moved in."""
    path = Path(path)
    file_mode, dir_mode = usual_mode(), usual_mode(directory=True)
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for root, _, files in os.walk(path):  # symlinks are neither followed nor changed
        os.chmod(root, dir_mode)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, file_mode)


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` when the block exits cleanly,
    with the umask's usual file mode whatever mode its writer gave it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    yield tmp
    os.chmod(tmp, usual_mode())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """``Path.write_text``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
