"""What ``evaluate`` writes: metrics.json, per_sample.jsonl, grid.png, the confusion matrix and
valence/arousal scatter plots, and the table it prints.

Kept apart from generation and scoring so that the pictures can change without touching the
figures, and so a benchmark can print the same table for its own metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from controlnet_emo.evaluation.metrics import confusion_matrix
from controlnet_emo.labels import EXPRESSIONS
from controlnet_emo.pictures import Panel, labelled_grid, save_sheet

KINDS = (("generated", "generated"), ("real", "target"), ("baseline", "no maps"))


def _expr_name(i: int) -> str | None:
    return EXPRESSIONS[i] if 0 <= i < len(EXPRESSIONS) else None


def sample_row(
    i: int, rec: Any, prompt: str, read: dict[str, dict[str, Tensor]], labels: dict[str, Tensor]
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": i,
        "file_name": rec.file_name,
        "prompt": prompt,
        "label": {
            "expression": _expr_name(int(labels["expression"][i])),
            "valence": float(labels["valence"][i]),
            "arousal": float(labels["arousal"][i]),
        },
    }
    for kind, r in read.items():
        row[kind] = {
            "expression": _expr_name(int(r["expression"][i])),
            "valence": float(r["valence"][i]),
            "arousal": float(r["arousal"][i]),
        }
        if "nme" in r:
            row[kind]["nme"] = float(r["nme"][i])
    return row


def _finite(obj: Any) -> Any:
    """NaN / inf -> None, so the JSON is strict (other tools reject a bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _describe(r: dict[str, Any]) -> str:
    """'happy v+0.31 a-0.12'; missing parts left out."""
    va = [f"{k[0]}{r[k]:+.2f}" for k in ("valence", "arousal") if math.isfinite(r[k])]
    return " ".join([r["expression"] or "-", *va])


def write_outputs(
    out: Path,
    metrics: dict[str, Any],
    samples: list[dict[str, Any]],
    shown: list[dict[str, Tensor]],
    read: dict[str, dict[str, Tensor]],
    labels: dict[str, Tensor],
    conditions: list[str],
) -> list[Path]:
    """Every file of the report; returns their paths (for the closing message)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2, allow_nan=False))
    (out / "per_sample.jsonl").write_text(
        "".join(json.dumps(_finite(s), allow_nan=False) + "\n" for s in samples)
    )
    rows = []
    for i, (s, img) in enumerate(zip(samples, shown, strict=False)):
        tiles = [Panel(m, [c]) for c, m in zip(conditions, img["maps"].split(3), strict=True)]
        for kind, title in KINDS:
            if kind not in img:
                continue
            lines = [title, ("critic " if kind == "real" else "") + _describe(s[kind])]
            nme = s[kind].get("nme", math.nan)
            lines.append(
                ("label " + _describe(s["label"]) + "  " if kind == "real" else "")
                + f"NME {nme:.3f}"
            )
            tiles.append(Panel(img[kind], lines, read[kind]["landmarks"][i]))
        rows.append(tiles)
    written = [out / "metrics.json", out / "per_sample.jsonl"]
    if rows:  # --grid-rows 0: no picture
        save_sheet(labelled_grid(rows), out / "grid.png")
        written.append(out / "grid.png")
    n_classes = metrics["emonet"]["n_expression"]
    written.append(plot_confusion(read, labels["expression"], n_classes, out / "confusion.png"))
    written.append(plot_valence_arousal(read, labels, out / "valence_arousal.png"))
    return written


def write_maps_sweep(
    path: Path, shown: list[dict[str, Tensor]], follow: Tensor, conditions: list[str]
) -> Path:
    """maps_sweep.png: the FLAME renders of the shown samples over the faces ``follow`` drawn
    from them with one prompt (``evaluation.NEUTRAL_PROMPT``) and one seed, over the targets.
    The prompt and the noise are the same in every column, so whatever moves along the middle
    row (pose, position, mouth, brows) moved because the maps did; a ControlNet that ignored
    its maps would draw one face k times."""

    def row(images, title: list[str]) -> list[Panel]:  # the title on the first tile only
        return [Panel(img, title if i == 0 else []) for i, img in enumerate(images)]

    c = conditions.index("flame") if "flame" in conditions else 0  # the map to show
    rows = [
        row([s["maps"][3 * c : 3 * c + 3] for s in shown], [conditions[c]]),
        row(follow, ["same prompt and", "seed in each column"]),
        row([s["real"] for s in shown], ["target"]),
    ]
    return save_sheet(labelled_grid(rows, min_tile=128), path)


def format_table(m: dict[str, Any]) -> str:
    """The headline figures, one row per image source."""
    cols = [
        ("val RMSE", "valence_rmse"),
        ("val CCC", "valence_ccc"),
        ("aro RMSE", "arousal_rmse"),
        ("aro CCC", "arousal_ccc"),
        ("top-1", "expression_accuracy"),
        ("top-3", "expression_top3_accuracy"),
        ("macro F1", "expression_macro_f1"),
        ("NME", "nme"),
    ]
    rows = [
        ("generated", m["generated"]),
        ("no maps (baseline)", m.get("baseline")),
        ("critic on real", m["real"]),
        ("EmoNet paper", m["published_emonet_affectnet"]),
    ]
    lines = [f"evaluate: {m['n']} samples of split {m['split']!r}, critic {m['emonet']['source']}"]
    lines += [f"WARNING: {w}" for w in m["warnings"]]
    lines.append(f"{'':20}" + "".join(f"{name:>10}" for name, _ in cols))
    for name, r in rows:
        if r is None:
            continue
        cells = [r.get(key) for _, key in cols]
        lines.append(
            f"{name:20}"
            + "".join(
                f"{v:10.3f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>10}"
                for v in cells
            )
        )
    if "map_reliance" in m:
        r = m["map_reliance"]
        lines.append(
            f"reliance on the maps (held-out noise-prediction MSE): own {r['own']:.4f}, "
            f"another sample's {r['shuffled']:.4f} (x{r['shuffled_over_own']:.2f}), "
            f"none {r['none']:.4f} (x{r['none_over_own']:.2f})"
        )
    lines += structure_lines(m)
    return "\n".join(lines)


def structure_lines(m: dict[str, Any]) -> list[str]:
    """The figures no critic gives (``structure.py``) beside the critic's: each claim needs both."""
    if "structure" not in m:
        return []
    g, b = m["structure"]["generated"], m["structure"].get("baseline")

    def none(key: str, fmt: str) -> str:  # the no-maps baseline's figure, where drawn
        return f" (no maps {b[key]:{fmt}})" if b else ""

    lines = [
        "structure (no critic; grey 64 px, inside each target's face region):",
        f"  own target the most similar: {g['own_target_top1']:.0%}{none('own_target_top1', '.0%')}"
        f", chance {g['chance']:.0%}",
        f"  SSIM margin, own target over the others: {g['ssim_margin']:.3f}"
        f"{none('ssim_margin', '.3f')}",
        f"  sharpness, of the targets': {g['sharpness_ratio']:.2f}{none('sharpness_ratio', '.2f')}",
    ]
    ratio = m["generated"].get("nme_over_real", math.nan)
    if isinstance(ratio, float) and math.isfinite(ratio):
        lines.append(
            f"  critic's NME on the generated faces, of its NME on the targets: {ratio:.1f}x"
        )
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    read: dict[str, dict[str, Tensor]], expression: Tensor, n_classes: int, path: Path
) -> Path:
    """One row-normalised confusion matrix (label x critic's class) per image kind."""
    plt = _pyplot()
    kinds = [k for k, _ in KINDS if k in read]
    names = list(EXPRESSIONS[:n_classes])
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        counts = confusion_matrix(read[kind]["expression"], expression, n_classes).double()
        share = counts / counts.sum(1, keepdim=True).clamp(min=1)
        ax.imshow(share.numpy(), vmin=0, vmax=1, cmap="Blues")
        for r, c in counts.nonzero().tolist():
            ax.text(c, r, int(counts[r, c]), ha="center", va="center", fontsize=7)
        acc = counts.diag().sum() / counts.sum().clamp(min=1)
        ax.set_title(f"{dict(KINDS)[kind]}: top-1 {float(acc):.0%}", fontsize=10)
        ax.set_xticks(range(n_classes), names, rotation=60, fontsize=7)
        ax.set_yticks(range(n_classes), names, fontsize=7)
        ax.set_xlabel("critic reads")
        ax.set_ylabel("label")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_valence_arousal(
    read: dict[str, dict[str, Tensor]], labels: dict[str, Tensor], path: Path
) -> Path:
    """Critic's valence and arousal against the labels, one panel each, all kinds overlaid."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.2))
    for ax, name in zip(axes, ("valence", "arousal"), strict=True):
        truth = labels[name]
        for kind, title in KINDS:
            if kind in read:
                ax.scatter(truth.numpy(), read[kind][name].numpy(), s=12, alpha=0.7, label=title)
        ax.plot([-1, 1], [-1, 1], color="grey", linewidth=0.8)
        ax.set(
            xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel=f"label {name}", ylabel=f"critic {name}"
        )
        ax.set_aspect("equal")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
