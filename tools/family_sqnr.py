"""W8A8 SQNR (dB) of every supported model family against FP32 (random init, random inputs; the
same models and inputs as tests/test_families.py -m slow: full size, 224 px).

    python tools/family_sqnr.py [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch
from _bench import write_json

import fxquant
from fxquant.core.data import load_data
from fxquant.core.evaluate import compare_outputs
from fxquant.core.models import load_model
from fxquant.core.testing import FAMILIES, family_data, family_model


def family_w8a8_sqnr(name: str, seed: int = 0) -> float:
    """W8A8 SQNR of family ``name`` at full size (the steps of tests/test_families.py)."""
    model, res = family_model(name, seed=seed)
    calib, x = family_data(res, seed=seed)
    q = fxquant.compile(model, recipe="w8a8", calib=calib, example_inputs=(x[:2],), progress=False)
    return compare_outputs(model, q, (x,))["sqnr_db"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for name in FAMILIES:
        t0 = time.perf_counter()
        sqnr = family_w8a8_sqnr(name)
        rows.append({"family": name, "init": "random", "sqnr_db": round(sqnr, 2), "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name:34s} {sqnr:6.2f} dB  ({rows[-1]['seconds']} s)", flush=True)
    info = load_model("cifar-vit")
    data = load_data(info, "cifar10", calib_images=32, limit=500)
    x = torch.cat([b[0] for b in data.test_batches()])
    q = fxquant.compile(info.model, recipe="w8a8", calib=[data.calib], progress=False)
    sqnr = compare_outputs(info.model, q, (x,))["sqnr_db"]
    rows.append({"family": "cifar-vit", "init": "trained", "sqnr_db": round(sqnr, 2)})
    print(f"{'cifar-vit (trained, 500 real images)':34s} {sqnr:6.2f} dB")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
