"""Shared fixtures: the reference CIFAR ViT (shared folder or embedded copy), real CIFAR images,
and the tiny random-init ViT (models themselves: fxquant.core.testing)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the FP32 top-1 cache of `fxquant eval` goes to a throw-away folder, never the user's ~/.cache
if "FXQUANT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FXQUANT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxquant-test-cache-")
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (set before triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one intra-op thread per pytest-xdist worker (the default run uses one worker per core), else up to 2
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


@pytest.fixture(scope="session")
def cifar_info():
    from fxquant.core.models import load_model

    return load_model("cifar-vit")


@pytest.fixture(scope="session")
def cifar_data(cifar_info):
    """32 calibration images and the first 500 test images (real CIFAR-10)."""
    from fxquant.core.data import load_data

    data = load_data(cifar_info, "cifar10", calib_images=32, limit=500)
    x = torch.cat([b[0] for b in data.test_batches()])
    y = torch.cat([b[1] for b in data.test_batches()])
    return data.calib, x, y


@pytest.fixture(scope="session")
def cifar_compiled(cifar_info, cifar_data):
    """``get(recipe, **options)``: the CIFAR ViT compiled by a recipe on the 32 calibration images,
    once per session (sequential RepQ calibration is the costly part of many tests). The models
    are shared: tests read them and never change them (export and lowering work on copies)."""
    import fxquant

    calib, _, _ = cifar_data
    cache: dict = {}

    def get(recipe: str, **options):
        key = (recipe, tuple(sorted(options.items())))
        if key not in cache:
            data = [calib] if fxquant.get_recipe(recipe, **options).calib_images else None
            cache[key] = fxquant.compile(cifar_info.model, recipe=recipe, calib=data, example_inputs=(calib[:2],),
                                         progress=False, **options)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def cifar_w8a8(cifar_compiled):
    return cifar_compiled("w8a8")


@pytest.fixture
def tiny_vit_model():
    from fxquant.core.testing import tiny_vit

    return tiny_vit()
