"""Shared start of the GPU benchmark tools: choose the device before Triton compiles anything."""

from __future__ import annotations

import os


def cuda_or_interpreter(device: str, tool: str) -> bool:
    """For ``--device cpu``, run Triton kernels in its interpreter (this must happen before the first
    ``triton.jit`` runs, i.e. before the kernels are imported); for ``--device cuda`` without a GPU,
    say so. Returns whether the tool should go on."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return True
    import torch

    if not torch.cuda.is_available():
        print(f"{tool}: no CUDA GPU found; nothing to time (kernel correctness is tested on CPU with TRITON_INTERPRET=1; "
              "`--device cpu` smoke-tests this script).")
        return False
    return True
