"""Models the package ships, by name: the demo's pretrained base and its two face critics.

Why names: ``model.pretrained: demo-face-base`` reads like a hub id and works on a clone with
no network; each name is an ordinary folder under ``controlnet_emo/weights/`` that the same
loaders read as a user's folder. The recipes that made them are in ``configs/`` (README).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

SHIPPED = {
    "demo-face-base": "small SD 1.x-style pipeline, 64 px synthetic faces (configs/base_synthetic.yaml)",
    "demo-critic-train": "face critic the demo trains against (configs/critic_train.yaml)",
    "demo-critic-eval": "independent face critic the demo evaluates with (configs/critic_eval.yaml)",
}


def shipped_path(name: str) -> Path | None:
    """The folder of a shipped model, or None when ``name`` is not one."""
    if name not in SHIPPED:
        return None
    folder = WEIGHTS_DIR / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: shipped model {name!r} is missing from this install; reinstall the "
            f"package or rebuild it with the recipe named in the README ({SHIPPED[name]})"
        )
    return folder
