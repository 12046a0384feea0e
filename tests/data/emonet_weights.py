"""Deterministic EmoNet weights from parameter names and shapes alone, so two independent
implementations with the released layout can be compared on the same function."""

import zlib

import torch


def deterministic_state_dict(shapes: dict, salt: str = "") -> dict:
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        g = torch.Generator().manual_seed(zlib.crc32((salt + key).encode()))
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = torch.zeros(shape, dtype=torch.long)
        elif leaf == "running_var":
            out[key] = 1.0 + 0.1 * torch.rand(shape, generator=g)
        elif leaf == "running_mean":
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1 and leaf == "weight":  # norm scale
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif leaf == "bias":
            out[key] = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            out[key] = torch.randn(shape, generator=g) / fan_in**0.5
    return out


def reference_input(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 256, 256, generator=g)
