"""Run by ``tests/test_distributed.py``, once as a plain process and once under ``torchrun``:
quantizes the tiny timm ViT with each recipe given on the command line (5 calibration batches,
so two ranks get 3 and 2), evaluates top-1 and an error report on 6 batches, and writes (rank 0)
the state digest, the logits' bytes digest, the top-1 and the report as JSON."""

from __future__ import annotations

import hashlib
import json
import sys

import torch

import fxquant
from fxquant.core import distributed
from fxquant.core.calibration import Calibration
from fxquant.core.digest import state_digest
from fxquant.core.error_report import error_report
from fxquant.core.evaluate import top1
from fxquant.core.testing import tiny_vit


def main(out: str, recipes: list[str]) -> None:
    distributed.init_from_env()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(5)]
    x = torch.randn(24, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (24,), generator=g)
    results = {"world_size": distributed.world_size()}
    # float sums whose value depends on the order of addition: 1e16 + 1 rounds back to 1e16
    total = [0.0]
    Calibration([torch.tensor([v], dtype=torch.float64) for v in (1.0, 1e16, -1e16, 1.0, 3.0)], progress=False) \
        .fold_batches(lambda b: b.item(), lambda v: total.__setitem__(0, total[0] + v))
    results["ordered_sum"] = total[0]
    for recipe in recipes:
        q = fxquant.compile(tiny_vit(), recipe=recipe, calib=calib, example_inputs=(calib[0],), progress=False, seed=0)
        with torch.no_grad():
            logits = q(x)
        results[recipe] = {
            "state_digest": state_digest(q),
            "logits_digest": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
            "top1": top1(q, zip(x.split(4), y.split(4)), progress=False),
            "report": error_report(q, x.split(4), progress=False).to_dict(),
        }
    if distributed.is_main():
        with open(out, "w") as f:
            json.dump(results, f)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
