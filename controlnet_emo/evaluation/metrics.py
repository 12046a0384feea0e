"""The figures ``evaluate`` reports, as pure functions on CPU tensors.

Kept apart from generation and plotting so each one can be checked on hand-made inputs, and
so a benchmark or notebook can score its own readings with exactly the definitions the
report uses. torchmetrics' functional API computes each figure whose definition matches
ours (RMSE, PCC, macro-F1, top-k accuracy, the confusion matrix); CCC stays ours, and the
comment in `ccc` says why.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)
from torchmetrics.functional.regression import mean_squared_error, pearson_corrcoef

LEFT_EYE, RIGHT_EYE = 36, 45  # outer eye corners, 68-point scheme
MIRROR_68 = (
    *range(16, -1, -1),  # jaw
    *range(26, 16, -1),  # brows
    27, 28, 29, 30, 35, 34, 33, 32, 31,  # nose bridge, nostrils
    45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes
    54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer lips
    64, 63, 62, 61, 60, 67, 66, 65,  # inner lips
)  # fmt: skip
"""Landmark i of a face is landmark ``MIRROR_68[i]`` of its mirror image (68-point scheme)."""


def rmse(pred: Tensor, target: Tensor) -> float:
    """Root mean squared error of two (N,) series; NaN when empty."""
    if pred.numel() == 0:
        return math.nan
    return float(mean_squared_error(pred.double(), target.double(), squared=False))


def pearson(pred: Tensor, target: Tensor) -> float:
    """Pearson correlation; blind to shifts and scales (which is why CCC is reported too).
    NaN for fewer than two values or a constant series (undefined, not an error)."""
    x, y = pred.double(), target.double()
    if x.numel() < 2 or x.var() == 0 or y.var() == 0:
        return math.nan
    return float(pearson_corrcoef(x, y))


def ccc(pred: Tensor, target: Tensor) -> float:
    """Lin's concordance correlation: 1 only when the series agree in value, so a constant
    offset or a squashed range (a model that always predicts ~0) is penalised, unlike PCC."""
    # Not torchmetrics' concordance_corrcoef: it takes n-1 (unbiased) variances and covariance,
    # which do not cancel against the squared mean gap; Lin and EmoNet's published CCC use n.
    x, y = pred.double(), target.double()
    if x.numel() < 2:
        return math.nan
    cov = ((x - x.mean()) * (y - y.mean())).mean()
    denom = x.var(unbiased=False) + y.var(unbiased=False) + (x.mean() - y.mean()) ** 2
    return float(2 * cov / denom) if denom > 0 else math.nan


def macro_f1(pred: Tensor, target: Tensor) -> float:
    """Mean per-class F1 over the classes in labels or predictions (sklearn's convention), so
    the majority class (happy is about half of AffectNet) cannot carry the figure."""
    if target.numel() == 0:
        return math.nan
    # torchmetrics' macro average leaves out a class absent from both sides (tp+fp+fn = 0),
    # so any num_classes above the largest class seen gives the same figure (it wants >= 2).
    n = max(2, int(torch.cat([pred, target]).max()) + 1)
    return float(multiclass_f1_score(pred, target, num_classes=n, average="macro"))


def topk_accuracy(logits: Tensor, target: Tensor, k: int) -> float:
    """(N,C) scores, (N,) labels -> share of labels among the k best-scored classes.

    Reported beside top-1 because AffectNet's classes overlap (fear/surprise, disgust/anger,
    contempt/neutral): a face whose label is the second guess is near, not wrong. NaN when
    empty; k above C counts every class.
    """
    if target.numel() == 0:
        return math.nan
    c = logits.shape[1]
    # "micro": the share over samples, not a mean over classes (torchmetrics' default).
    return float(
        multiclass_accuracy(logits, target, num_classes=c, top_k=min(k, c), average="micro")
    )


def confusion_matrix(pred: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """(N,) predicted, (N,) labels -> (C,C) int64 counts, rows = label, columns = predicted.

    Pairs with a class outside [0, C) on either side are left out (a missing label is -1).
    """
    # torchmetrics refuses out-of-range predictions (its ignore_index is for labels only).
    keep = (target >= 0) & (target < n_classes) & (pred >= 0) & (pred < n_classes)
    return multiclass_confusion_matrix(pred[keep].long(), target[keep].long(), n_classes)


def heatmap_landmarks(
    heatmap: Tensor, image_size: int | tuple[int, int], radius: int = 3
) -> Tensor:
    """(B,K,h,w) heatmaps -> (B,K,2) (x, y) in image pixels, pixel centres at integers.

    Argmax, refined by the weighted mean of its (2r+1)^2 window (weights: heatmap minus the
    window's minimum): sub-pixel accuracy (~0.1 heatmap px for Gaussians of sigma <= 2) that
    ignores a background offset, without a whole-map soft-argmax's pull towards the centre.
    """
    b, k, h, w = heatmap.shape
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    flat = heatmap.detach().float().reshape(b * k, h, w)
    idx = flat.flatten(1).argmax(1)  # (BK,)
    offs = torch.arange(-radius, radius + 1, device=flat.device)  # (win,)
    ys = torch.div(idx, w, rounding_mode="floor")[:, None] + offs  # (BK, win)
    xs = (idx % w)[:, None] + offs  # (BK, win)
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    win = flat[
        torch.arange(b * k, device=flat.device)[:, None, None],
        ys.clamp(0, h - 1)[:, :, None],
        xs.clamp(0, w - 1)[:, None, :],
    ]  # (BK, win, win)
    weights = (win - win.amin(dim=(1, 2), keepdim=True)) * inside
    total = weights.sum(dim=(1, 2)).clamp(min=1e-12)  # flat window: weights 0, offset 0
    y = (weights.sum(2) * ys).sum(1) / total + (total <= 1e-12) * ys[:, radius]
    x = (weights.sum(1) * xs).sum(1) / total + (total <= 1e-12) * xs[:, radius]
    xy = torch.stack([(x + 0.5) * W / w - 0.5, (y + 0.5) * H / h - 0.5], dim=1)
    return xy.reshape(b, k, 2)


def flip_test_heatmap(heatmap: Tensor, of_mirror: Tensor) -> Tensor:
    """(B,68,h,w) a critic's heatmaps of some faces and of their mirror images (``x.flip(-1)``)
    -> their mean in the faces' frame (the mirror's flipped back, left and right swapped).

    Why: the "flip test" of landmark benchmarks. It cancels the left/right bias a critic
    learns and averages out part of its noise; the shipped evaluation critic's NME on real
    faces drops from 3.1 % to 2.9 % (BENCHMARKS.md, "Shipped critics"), and a mirrored face
    reads as exactly the mirrored landmarks.
    """
    return (heatmap.float() + of_mirror.float().flip(-1)[:, list(MIRROR_68)]) / 2


def crop_landmarks(points: Tensor, height: int, width: int, size: int) -> Tensor:
    """(...,2) (x, y) in a (height, width) image -> the same points after
    ``data.transforms.resize_center_crop(image, size)``, pixel centres at integers.

    Why: the target's annotated landmarks live in the prepared image's frame, while the critic
    reads the evaluated (resized, centre-cropped) one; NME must compare them in one frame.
    Mirrors ``resize_short_side``'s rounding and bilinear ``align_corners=False`` geometry.
    Points cropped away come out outside [-0.5, size - 0.5]; they still count.
    """
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    sx, sy = new_w / width, new_h / height
    x = (points[..., 0] + 0.5) * sx - 0.5 - left
    y = (points[..., 1] + 0.5) * sy - 0.5 - top
    return torch.stack([x, y], dim=-1)


def nme(pred: Tensor, target: Tensor, left: int = LEFT_EYE, right: int = RIGHT_EYE) -> Tensor:
    """(B,K,2), (B,K,2) -> (B,) mean point distance over the target's inter-ocular distance.

    Scale-free, so any resolution compares; NaN where the target's eye corners coincide or
    the target is NaN (a sample without reference landmarks).
    """
    iod = (target[:, left] - target[:, right]).norm(dim=-1)  # (B,)
    err = (pred - target).norm(dim=-1).mean(dim=1)  # (B,)
    return torch.where(iod > 1e-6, err / iod.clamp(min=1e-6), math.nan)


def has_va_label(truth: Tensor) -> Tensor:
    """(N,) valence or arousal labels -> (N,) bool: present (not NaN, not AffectNet's -2)."""
    return torch.isfinite(truth) & (truth != -2)


def emotion_metrics(
    read: dict[str, Tensor], expression: Tensor, valence: Tensor, arousal: Tensor, n_classes: int
) -> dict[str, float]:
    """Critic readings vs labels; samples whose label is missing (-1, NaN, AffectNet's -2)
    or outside the critic's classes (5-class model) are left out of that figure.

    ``read``: "expression" (N,) classes, "valence", "arousal" (N,), and optionally
    "expression_logits" (N,C), which adds top-3 accuracy.
    """
    out: dict[str, float] = {}
    for name, truth in (("valence", valence), ("arousal", arousal)):
        keep = has_va_label(truth)
        p, t = read[name][keep], truth[keep]
        out |= {
            f"{name}_rmse": rmse(p, t),
            f"{name}_ccc": ccc(p, t),
            f"{name}_pcc": pearson(p, t),
            f"n_{name}": int(keep.sum()),
        }
    keep = (expression >= 0) & (expression < n_classes)
    p, t = read["expression"][keep], expression[keep]
    out |= {
        "expression_accuracy": float((p == t).double().mean()) if t.numel() else math.nan,
        "expression_macro_f1": macro_f1(p, t),
        "n_expression": int(keep.sum()),
    }
    if "expression_logits" in read:
        out["expression_top3_accuracy"] = topk_accuracy(read["expression_logits"][keep], t, 3)
    return out
