"""Steps whose loss or gradient is not finite: found alike on every process, then skipped.

Kept apart from the loop (and free of accelerate at import) so the CLI can catch
``DivergedError`` without loading the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


def non_finite_terms(
    totals: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, accelerator: Accelerator
) -> list[str]:
    """Names of the terms (and ``grad_norm``) that are not finite on *any* process.

    The flags are summed over processes so every rank takes the same decision: a rank that
    skipped the update alone would leave DDP's replicas apart (and later collectives hung).
    """
    names = [*totals, "grad_norm"]
    values = [*totals.values(), grad_norm if grad_norm is not None else torch.zeros(())]
    flags = torch.stack([~torch.isfinite(torch.as_tensor(v)).all() for v in values]).float()
    flags = accelerator.reduce(flags.to(accelerator.device), "sum")  # one host sync per step
    return [name for name, f in zip(names, flags.tolist(), strict=True) if f > 0]


class DivergedError(RuntimeError):
    """Too many non-finite steps in a row; the message is one line for the CLI."""
