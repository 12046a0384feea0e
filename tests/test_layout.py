"""The package's imports run one way, from the core up to the CLI (README, "Layout").

Why a test: a newcomer relies on the layout to know what a module may use; one import the
wrong way round (a loader reaching into the CLI, prepare into training) silently ties stages
together, and only a check on every module keeps the picture true.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lower number = lower layer; a module may import its own layer's package and any lower one
LAYERS = {
    "controlnet_emo": 0,  # the package itself: __init__ only
    "controlnet_emo.config": 0,
    "controlnet_emo.labels": 0,
    "controlnet_emo.atomic": 0,
    "controlnet_emo.pictures": 1,  # labelled sheets; uses atomic writes
    "conditioners": 1,
    "controlnet_emo.models": 2,
    "controlnet_emo.data": 3,
    "controlnet_emo.synthetic": 3,
    "controlnet_emo.export": 4,
    "controlnet_emo.training": 5,
    "controlnet_emo.inference": 6,
    "controlnet_emo.evaluation": 7,
    "controlnet_emo.pretrain": 8,
    "controlnet_emo.app": 9,
    "controlnet_emo.cli": 10,
}


def place(module: str) -> str | None:
    """The layer package (or core module) a dotted module name belongs to."""
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or (name != "controlnet_emo" and module.startswith(name + ".")):
            return name
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_imports_run_from_the_core_up_to_the_cli():
    files = [
        *ROOT.joinpath("controlnet_emo").rglob("*.py"),
        *ROOT.joinpath("conditioners").rglob("*.py"),
    ]
    wrong = []
    for path in files:
        me = place(module_name(path))
        assert me is not None, f"{path}: not in any layer of the layout; add it to LAYERS"
        for target in imported(ast.parse(path.read_text())):
            other = place(target)
            if other is None or other == me:
                continue
            if LAYERS[other] >= LAYERS[me]:
                wrong.append(f"{module_name(path)} imports {target}")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_relative_imports_are_not_used():
    """Absolute imports name the layer they reach into, so a reader sees the direction."""
    relative = []
    for path in ROOT.joinpath("controlnet_emo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                relative.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not relative, relative
