"""The non-finite-step decision is one decision over all processes (DDP must not hang)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    from accelerate import Accelerator

    from controlnet_emo.training.divergence import non_finite_terms

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    # Only rank 1 sees a NaN loss, only rank 0 an infinite gradient norm.
    totals = {
        "loss": torch.tensor(float("nan") if rank == 1 else 1.0),
        "loss/diffusion": torch.tensor(0.5),
    }
    grad_norm = torch.tensor(float("inf") if rank == 0 else 2.0)
    bad = non_finite_terms(totals, grad_norm, accelerator)
    fine = non_finite_terms({"loss": torch.tensor(1.0)}, torch.tensor(2.0), accelerator)
    Path(sys.argv[1], f"rank{rank}.txt").write_text(f"bad step {bad}, good step {fine}")
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()  # else gloo's threads may abort the exit
    """
)


def test_every_process_skips_when_any_process_sees_a_non_finite_value(tmp_path):
    """Two gloo processes, as torchrun starts them: each names both bad values, though each
    saw only one, and a finite step is finite on both."""
    script = tmp_path / "bad_step.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), str(tmp_path)]  # --standalone: a free port, whatever else runs here
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        seen = (tmp_path / f"rank{rank}.txt").read_text()
        assert seen == "bad step ['loss', 'grad_norm'], good step []", (rank, seen)
