"""EmoNet (Toisoul et al., Nature Machine Intelligence 2021), our own implementation.

The emotion losses need a frozen critic that maps a face image to expression logits, valence
and arousal, and that passes gradients back to the image. The released weights
(`emonet_8.pth`, `emonet_5.pth`) load here key for key; the module names below therefore
follow the released state dict, not our naming habits. Written from the published facts
(see FACTS.md), checked output for output against a test vector of the released network.

Layout: a FAN stem (256 ch at 64x64), two stacked depth-4 hourglasses with 68-heatmap heads,
and an emotion head fed by both hourglasses' features under a heatmap attention mask.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from controlnet_emo.labels import EXPRESSIONS  # noqa: F401  (public: the head's class order)

"""Class order of the 8-class model; the 5-class model has the first five."""

INPUT_SIZE = 256
N_LANDMARKS = 68
_N_STACKS = 2
_HG_DEPTH = 4


class ConvBlock(nn.Module):
    """FAN residual block: three pre-activation (BN -> ReLU -> conv3x3) convs of out/2, out/4,
    out/4 channels, concatenated to `out` channels, plus a (projected) skip."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch // 2)
        self.conv2 = nn.Conv2d(out_ch // 2, out_ch // 4, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch // 4)
        self.conv3 = nn.Conv2d(out_ch // 4, out_ch // 4, 3, padding=1, bias=False)
        self.downsample = None
        if in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, out, H, W)
        a = self.conv1(F.relu(self.bn1(x)))  # (B, out/2, H, W)
        b = self.conv2(F.relu(self.bn2(a)))  # (B, out/4, H, W)
        c = self.conv3(F.relu(self.bn3(b)))  # (B, out/4, H, W)
        skip = x if self.downsample is None else self.downsample(x)
        return torch.cat((a, b, c), dim=1) + skip


class HourGlass(nn.Module):
    """Recursive 256-ch hourglass. Level `k` owns `b1_k` (skip branch), `b2_k` (after a 2x2
    max-pool), `b3_k` (before nearest 2x upsampling); the innermost level adds `b2_plus_1`.
    Modules are registered in the released order so state-dict keys line up."""

    def __init__(self, depth: int = _HG_DEPTH, ch: int = 256):
        super().__init__()
        self.depth = depth
        self._build(depth, ch)

    def _build(self, level: int, ch: int) -> None:
        self.add_module(f"b1_{level}", ConvBlock(ch, ch))
        self.add_module(f"b2_{level}", ConvBlock(ch, ch))
        if level > 1:
            self._build(level - 1, ch)
        else:
            self.add_module(f"b2_plus_{level}", ConvBlock(ch, ch))
        self.add_module(f"b3_{level}", ConvBlock(ch, ch))

    def _level(self, level: int, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        up = self._modules[f"b1_{level}"](x)
        low = self._modules[f"b2_{level}"](F.max_pool2d(x, 2))  # (B, C, H/2, W/2)
        if level > 1:
            low = self._level(level - 1, low)
        else:
            low = self._modules[f"b2_plus_{level}"](low)
        low = self._modules[f"b3_{level}"](low)
        return up + F.interpolate(low, scale_factor=2, mode="nearest")

    def forward(self, x: Tensor) -> Tensor:
        return self._level(self.depth, x)


class EmoNet(nn.Module):
    """Expression logits, valence, arousal and 68 landmark heatmaps from a face crop.

    Input (B, 3, H, W) RGB in [0, 1] without mean/std normalisation. Inputs that are not
    256x256 are resized bilinearly (align_corners=False, no antialias) inside the forward, so
    the loss code can pass decoded images of any size and still get gradients to them.
    """

    def __init__(self, n_expression: int = 8):
        super().__init__()
        self.n_expression = n_expression
        # FAN stem: 256x256 -> 64x64, 256 channels.
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, 256)
        for i in range(_N_STACKS):
            self.add_module(f"m{i}", HourGlass())
            self.add_module(f"top_m_{i}", ConvBlock(256, 256))
            self.add_module(f"conv_last{i}", nn.Conv2d(256, 256, 1))
            self.add_module(f"bn_end{i}", nn.BatchNorm2d(256))
            self.add_module(f"l{i}", nn.Conv2d(256, N_LANDMARKS, 1))
            if i < _N_STACKS - 1:  # feed features and heatmaps into the next stack
                self.add_module(f"bl{i}", nn.Conv2d(256, 256, 1))
                self.add_module(f"al{i}", nn.Conv2d(N_LANDMARKS, 256, 1))
        # Emotion head: stem (256) + both stacks' features (2 x 256) -> 256 ch, 64 -> 4 px.
        self.conv1x1_input_emo_2 = nn.Conv2d(256 * (1 + _N_STACKS), 256, 1)
        blocks: list[nn.Module] = []
        for _ in range(4):
            blocks += [ConvBlock(256, 256), nn.MaxPool2d(2)]
        self.emo_net_2 = nn.Sequential(*blocks)
        self.emo_fc_2 = nn.Sequential(
            nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, n_expression + 2)
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = (INPUT_SIZE, INPUT_SIZE)
        if x.shape[-2:] != size:  # (B, 3, H, W) -> (B, 3, 256, 256)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 64, 128, 128)
        # Max-pools throughout, as released (face-alignment's FAN average-pools instead).
        x = F.max_pool2d(self.conv2(x), 2)  # (B, 128, 64, 64)
        stem = self.conv4(self.conv3(x))  # (B, 256, 64, 64)

        prev, feats = stem, []
        for i in range(_N_STACKS):
            y = self._modules[f"top_m_{i}"](self._modules[f"m{i}"](prev))  # (B, 256, 64, 64)
            y = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](y)))
            heatmap = self._modules[f"l{i}"](y)  # (B, 68, 64, 64)
            if i < _N_STACKS - 1:
                y = self._modules[f"bl{i}"](y)  # the projected features are the ones kept
                prev = prev + y + self._modules[f"al{i}"](heatmap)
            feats.append(y)

        # Attention: the last heatmaps summed over landmarks weight the hourglass features.
        mask = heatmap.sum(dim=1, keepdim=True)  # (B, 1, 64, 64)
        e = torch.cat((stem, torch.cat(feats, dim=1) * mask), dim=1)  # (B, 768, 64, 64)
        e = self.emo_net_2(self.conv1x1_input_emo_2(e))  # (B, 256, 4, 4)
        out = self.emo_fc_2(e.mean(dim=(2, 3)))  # (B, n_expression + 2)
        return {
            "expression": out[:, : self.n_expression],  # (B, n_expression) logits
            "valence": out[:, self.n_expression],  # (B,)
            "arousal": out[:, self.n_expression + 1],  # (B,)
            "heatmap": heatmap,  # (B, 68, 64, 64)
        }


def _freeze(model: EmoNet) -> EmoNet:
    model.requires_grad_(False)
    return model.eval()


def missing_weights_message(path: str | os.PathLike) -> str:
    return (
        f"EmoNet weights not found: {os.fspath(path)!r}. Download pretrained/emonet_8.pth "
        "(or emonet_5.pth) from the EmoNet authors' GitHub release (Toisoul et al. 2021; "
        "non-commercial licence, so they are not shipped here), then point the config at it, "
        "e.g. `--set model.emonet=/path/to/emonet_8.pth`."
    )


def load_emonet(path: str | os.PathLike, n_expression: int | None = None) -> EmoNet:
    """Load released EmoNet weights as a frozen, eval-mode critic.

    Strict key matching catches a wrong or truncated file up front instead of silently
    scoring emotions with half-random weights. `n_expression` is read from the file when None.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one that needs arbitrary unpickling
        raise ValueError(f"{os.fspath(path)!r} is not a loadable EmoNet state dict: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    if n_expression is None:
        head = state.get("emo_fc_2.3.weight")
        if not isinstance(head, Tensor) or head.ndim != 2:
            raise ValueError(f"{os.fspath(path)!r} has no 'emo_fc_2.3.weight': not EmoNet weights")
        n_expression = head.shape[0] - 2
    model = EmoNet(n_expression)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(
        k
        for k in expected.keys() & state.keys()
        if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{os.fspath(path)!r} does not match EmoNet({n_expression}): "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong_shape)} with wrong shape (e.g. {wrong_shape[:3]})"
        )
    model.load_state_dict(state, strict=True)
    return _freeze(model)


def build_emonet(spec: str, n_expression: int = 8) -> nn.Module:
    """A frozen critic with EmoNet's contract from a config value: an EmoNet weights file, a
    shipped critic's name (``demo-critic-train``, ``demo-critic-eval``), a face-critic folder
    (``train-critic``'s output), or "random" for plumbing tests that must run without the
    non-commercial weights. `n_expression` applies to "random" only."""
    from controlnet_emo.models.face_critic import is_face_critic_folder, load_face_critic
    from controlnet_emo.models.shipped import shipped_path

    if spec == "random":
        warnings.warn(
            "EmoNet has random weights (model.emonet=random): emotion losses and metrics are "
            "meaningless; use this for demos and tests only.",
            stacklevel=2,
        )
        return _freeze(EmoNet(n_expression))
    folder = shipped_path(spec) or spec
    if os.path.isdir(folder) and is_face_critic_folder(folder):
        return load_face_critic(folder)
    return load_emonet(spec)
