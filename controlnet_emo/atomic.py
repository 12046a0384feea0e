"""Writes that never leave half a file where a good one was.

A model file, its sidecar, the run's README and a generated PNG are each written to a
per-process temporary sibling and moved over the target only once complete, so a killed job
leaves the old file or the new one, and two processes writing the same path never share a
temporary file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` when the block exits cleanly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    yield tmp
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """``Path.write_text``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
