"""Monocular depth maps for the depth condition: any transformers depth model, or files on disk.

ZoeDepth (``Intel/zoedepth-nyu-kitti``) is the default; DPT and Depth Anything load through the
same ``AutoModelForDepthEstimation`` call. Whatever the network measures (metric depth grows
with distance, relative "disparity" shrinks with it), the map we keep is normalised per image
to [0, 1] with *near = bright*, the ControlNet depth convention. Images of any shape batch
together: each is reflect-padded to a square and resized to ``input_size`` before the model
and cropped back after, so one forward pass serves a whole batch on a GPU.

Weights load only from a local folder or the Hugging Face cache unless downloads are asked
for: a prepare job on an offline node fails at once, naming the model and the fetch command.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from conditioners.io import read_map

logger = logging.getLogger(__name__)

# config.model_type -> what the raw output measures. "depth" grows with distance (metric
# models); "disparity" (relative inverse depth) shrinks with it.
OUTPUT_KIND = {
    "zoedepth": "depth",
    "glpn": "depth",
    "depth_pro": "depth",
    "dpt": "disparity",
    "depth_anything": "disparity",
    "prompt_depth_anything": "depth",
}


DEFAULT_MODEL = "Intel/zoedepth-nyu-kitti"
AUTO, PRECOMPUTED = "auto", "precomputed"
"""``depth.model`` words that are not a network: maps on disk when complete, else the default."""


class DepthModelError(FileNotFoundError):
    """The depth weights are not where an offline run can read them."""


def network_name(model: str) -> str:
    """The network a ``depth.model`` value runs: 'auto' / 'precomputed' mean the default one
    (what ``infer --reference`` needs from a run whose training maps came from disk)."""
    return DEFAULT_MODEL if model in (AUTO, PRECOMPUTED) else model


def normalise_depth(prediction: np.ndarray, kind: str) -> np.ndarray:
    """Raw model output -> float32 in [0, 1], near = 1. A constant map becomes all zeros."""
    pred = prediction.astype(np.float32)
    low, high = float(pred.min()), float(pred.max())
    if high - low < 1e-8:
        return np.zeros_like(pred)
    scaled = (pred - low) / (high - low)
    return 1.0 - scaled if kind == "depth" else scaled


def to_png_values(depth: np.ndarray, bits: int) -> np.ndarray:
    """[0, 1] float -> uint8 or uint16 single-channel array for a PNG."""
    top = (1 << bits) - 1
    return np.round(np.clip(depth, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)


class DepthConditioner:
    """List of RGB uint8 images -> list of float32 depth maps (same sizes, near = 1)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str | None = None,
        batch_size: int = 8,
        input_size: int = 512,
        allow_download: bool = False,
    ) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.input_size = input_size
        model = network_name(model)
        source = tiny_zoedepth_dir() if model == "tiny" else model
        local_only = not allow_download or _hub_offline()
        try:
            self.processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
            self.model = AutoModelForDepthEstimation.from_pretrained(
                source, local_files_only=local_only
            )
        except OSError as err:
            raise DepthModelError(missing_model_message(model, err)) from None
        self.model.to(self.device).eval()
        self.kind = _output_kind(self.model.config)
        # ZoeDepth's post-processing must be told the input size to strip its own padding
        post_process = inspect.signature(self.processor.post_process_depth_estimation)
        self._takes_source_sizes = "source_sizes" in post_process.parameters

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One forward pass per ``batch_size`` images; maps come back at each image's size."""
        maps: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            maps.extend(self._batch(images[start : start + self.batch_size]))
        return maps

    def _batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        squares, regions = zip(*(_pad_square(img, self.input_size) for img in images), strict=True)
        inputs = self.processor(images=list(squares), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device)  # (B, 3, h, w)
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixel_values)
        sizes = [(self.input_size, self.input_size)] * len(images)
        kwargs = {"target_sizes": sizes}
        if self._takes_source_sizes:
            kwargs["source_sizes"] = sizes
        results = self.processor.post_process_depth_estimation(outputs, **kwargs)
        maps = []
        for result, image, (top, left, size) in zip(results, images, regions, strict=True):
            square = result["predicted_depth"].float().cpu().numpy()  # (S, S)
            region = square[top : top + size[0], left : left + size[1]]
            height, width = image.shape[:2]
            region = cv2.resize(region, (width, height), interpolation=cv2.INTER_LINEAR)
            maps.append(normalise_depth(region, self.kind))
        return maps


def _pad_square(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, tuple]]:
    """Reflect-pad to a square, resize to ``size``; return it and where the image lies in it."""
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = cv2.copyMakeBorder(
        image, top, side - height - top, left, side - width - left, cv2.BORDER_REFLECT_101
    )
    square = cv2.resize(
        square, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    )
    f = size / side
    region = (round(height * f), round(width * f))
    return square, (round(top * f), round(left * f), (max(1, region[0]), max(1, region[1])))


def _output_kind(config) -> str:
    if getattr(config, "depth_estimation_type", None) == "metric":
        return "depth"
    kind = OUTPUT_KIND.get(config.model_type)
    if kind is None:
        logger.warning("unknown depth model type %r: assuming it predicts depth", config.model_type)
        return "depth"
    return kind


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def missing_model_message(model: str, err: Exception | str | None = None) -> str:
    """What to do about depth weights an offline run cannot read (the loader and
    ``controlnet-emo doctor`` say the same)."""
    if Path(model).exists() or model == "tiny":
        return f"depth model folder {model!r} could not be loaded: {err}"
    from huggingface_hub import constants

    return (
        f"depth model {model!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"this run does not download. Fetch it once with `hf download {model}` (older hubs: "
        f"`huggingface-cli download {model}`), or pass a local folder with "
        "--set depth.model=/path/to/model, or put precomputed maps under RAW/depth/ "
        "(--set depth.model=precomputed, or auto when every sample has one)."
    )


# ---------------------------------------------------------------------------------------------
# Precomputed maps


class PrecomputedDepth:
    """Depth maps already on disk: ``RAW/depth/<sub>/<stem>.png``, near = bright, any bit depth."""

    def __init__(self, raw_dir: str | Path) -> None:
        self.root = Path(raw_dir) / "depth"

    def path(self, key: str) -> Path:
        return self.root / Path(key).with_suffix(".png")

    def missing(self, keys: list[str]) -> list[str]:
        """The keys with no stored map (what decides ``depth.model: auto``)."""
        return [key for key in keys if not self.path(key).is_file()]

    def load(self, key: str, height: int, width: int) -> np.ndarray:
        """The stored map as float32 [0, 1], resized to the sample's canvas."""
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(path)
        data = read_map(path)
        if data.ndim == 3:
            data = data[:, :, 0]
        top = float(np.iinfo(data.dtype).max) if np.issubdtype(data.dtype, np.integer) else 1.0
        depth = data.astype(np.float32) / top
        if depth.shape != (height, width):
            depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_AREA)
        return np.clip(depth, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Tiny random ZoeDepth (tests, demo)


def tiny_zoedepth_dir(root: str | Path | None = None) -> Path:
    """Build a tiny random ZoeDepth once, save it like a hub checkpoint, return the folder.

    Saving and reloading (instead of handing over the module) sends tests and the demo down
    the exact ``from_pretrained`` path a real checkpoint takes.
    """
    root = Path(
        root
        or os.environ.get("CONTROLNET_EMO_CACHE")
        or Path(tempfile.gettempdir()) / "controlnet_emo"
    )
    folder = root / "tiny-zoedepth-v1"
    if (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file():
        return folder
    import torch
    from transformers import (
        Dinov2Config,
        ZoeDepthConfig,
        ZoeDepthForDepthEstimation,
        ZoeDepthImageProcessor,
    )

    backbone = Dinov2Config(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = ZoeDepthConfig(
        backbone_config=backbone,
        backbone_hidden_size=32,
        fusion_hidden_size=16,
        neck_hidden_sizes=[8, 16, 32, 64],
        bottleneck_features=16,
        num_relative_features=8,
        num_attractors=[4, 4, 4, 4],
        bin_embedding_dim=8,
        bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0, "name": "nyu"}],
        num_patch_transformer_layers=1,
        patch_transformer_hidden_size=16,
        patch_transformer_intermediate_size=16,
        patch_transformer_num_attention_heads=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ZoeDepthForDepthEstimation(config)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-zoedepth-", dir=_mkdir(root)))
    model.save_pretrained(staging)
    ZoeDepthImageProcessor(size={"height": 64, "width": 64}).save_pretrained(staging)
    try:
        os.replace(staging, folder)  # atomic: a parallel builder either wins or finds it done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
