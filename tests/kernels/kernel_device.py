"""Where the kernel tests run their Triton kernels: the CUDA GPU when there is one, else the CPU
under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``). References always run on the CPU."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every tensor argument on ``DEVICE``; tensor results back on the CPU."""
    to_dev = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    out = fn(*tree_map(to_dev, args), **tree_map(to_dev, kwargs))
    return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)
