"""The fast paths of the hardware at hand, shared by training, inference and benchmarks."""

from __future__ import annotations

import torch


def use_fast_paths(
    device: torch.device, *conv_nets: torch.nn.Module, channels_last: bool = True
) -> bool:
    """channels_last for the conv nets on CPU and CUDA, TF32 matmuls and convolutions on CUDA;
    returns whether channels_last is on (the training's critics follow it).

    Why: cuDNN's and oneDNN's NHWC kernels are their fastest. On the 2-core CPU the demo's
    diffusion steps ran 1.12-1.19x faster with it, its decoder + critic steps 1.15-1.4x
    (BENCHMARKS.md, "Training step") and its evaluation's sampling 1.04-1.19x; the losses
    match to 6 digits, as a change of kernel order would. TF32 is what Ampere and later GPUs
    run fastest; numerics stay fp32-class.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not channels_last or device.type not in ("cpu", "cuda"):
        return False
    for module in conv_nets:
        module.to(memory_format=torch.channels_last)
    return True
