"""The APH of every block output of the CIFAR ViT along the paper's all-ones direction (float64 and
float32) and along a random ±1 pattern (float64): RMS over [N, C] and the largest |O|.

In float64 the all-ones APH of a pre-LN ViT is roundoff (LayerNorm ignores a per-token constant);
in float32 it is non-zero because ``O + 1e-6`` rounds to a value-dependent number of ulps, so the
perturbation is not uniform.

    python tools/aph_directions.py [--images 16] [--model cifar-vit]
"""

from __future__ import annotations

import argparse

import torch
from _bench import Table

import fxquant
from fxquant.core import match
from fxquant.core.aph import average_perturbation_hessian
from fxquant.core.data import load_data
from fxquant.core.graph import extract_subgraph, propagate_shapes
from fxquant.core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--model", default="cifar-vit")
    args = ap.parse_args()
    info = load_model(args.model)
    x = load_data(info, None, calib_images=args.images, limit=0).calib
    gm = fxquant.trace(info.model, (x[:2],))
    propagate_shapes(gm, (x[:2],))
    batches = list(torch.split(x, 8))
    print(f"{args.model}, {len(x)} calibration images; APH RMS over [N, C]")
    table = Table([("block", "10"), ("max |O|", "8.2f"), ("ones f64", "10.3g"), ("ones f32", "10.3g"), ("±1 f64", "10.3g")])
    print(table.header())
    for b in match.find_blocks(gm):
        with torch.no_grad():
            o = extract_subgraph(gm, [], [b.output])(x)
        rms = [average_perturbation_hessian(gm, b.output, batches, **kw).pow(2).mean().sqrt().item()
               for kw in ({}, {"dtype": torch.float32}, {"direction": "rademacher"})]
        print(table.row(b.fqn, o.abs().max().item(), *rms))


if __name__ == "__main__":
    main()
