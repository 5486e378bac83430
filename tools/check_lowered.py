"""Lowered (integer-kernel) model vs its fake-quant version, per recipe.

Compiles the model twice per recipe with the same calibration images (fake quantization, and
``lower=True``), runs the fake-quant model on the CPU and the lowered one on ``--device`` (the
Triton kernels on CUDA, the exact integer CPU path otherwise), and prints top-1 of both, the share
of identical predictions and the largest logit difference.

    python tools/check_lowered.py [--model embedded] [--recipes w8a8,repq-w4a4,bitlog2-w4a4]
                                  [--device cuda] [--limit 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time

from _bench import Table, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--recipes", default="w8a8,repq-w4a4,bitlog2-w4a4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    import fxquant
    from fxquant.core.data import load_data
    from fxquant.core.models import load_model

    torch.manual_seed(0)
    info = load_model(args.model)
    data = load_data(info, None if args.model == "embedded" else "cifar10", calib_images=32, limit=args.limit)
    x = torch.cat([b[0] for b in data.test_batches()])
    y = torch.cat([b[1] for b in data.test_batches()])
    rows = []
    print(f"{args.model}, {len(x)} test images, lowered model on {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}")
    table = Table([("recipe", "14s"), ("fake-quant", "10.2f"), ("lowered", "8.2f"), ("same pred", "8.2f", "%"),
                   ("max|Δ|", "8.4f"), ("lowered s", "9.2f")])
    print(table.header())
    for recipe in args.recipes.split(","):
        fq = fxquant.compile(info.model, recipe=recipe, calib=[data.calib], progress=False)
        low = fxquant.compile(info.model, recipe=recipe, calib=[data.calib], progress=False, lower=True).to(args.device)
        with torch.no_grad():
            a = torch.cat([fq(xb) for xb in x.split(250)])
            t0 = time.perf_counter()
            b = torch.cat([low(xb.to(args.device)).float().cpu() for xb in x.split(250)])
            secs = time.perf_counter() - t0
        row = {"recipe": recipe, "device": args.device, "images": len(x),
               "top1_fake_quant": 100 * (a.argmax(1) == y).float().mean().item(),
               "top1_lowered": 100 * (b.argmax(1) == y).float().mean().item(),
               "same_pred": 100 * (a.argmax(1) == b.argmax(1)).float().mean().item(),
               "max_abs_diff": (a - b).abs().max().item(), "lowered_seconds": secs,
               "lowered": fxquant.report(low)["lower_to_kernels"].summary}
        rows.append(row)
        print(table.row(recipe, row["top1_fake_quant"], row["top1_lowered"], row["same_pred"], row["max_abs_diff"], secs))
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
