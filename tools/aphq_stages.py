"""Compile a recipe, print each pass's wall time and summary (APHQ-ViT: stage A = mlp_reconstruct,
B = annotate_* + calibrate + repq_reparam, C = block_reconstruct), the per-region block
reconstruction record, and top-1 against FP32 on the model's test set; optionally write JSON.

    python tools/aphq_stages.py --model cifar-vit --recipe aphq-w4a4 [--set iters=1000] [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from _bench import parse_overrides, write_json

import fxquant
from fxquant.core.data import load_data
from fxquant.core.evaluate import top1
from fxquant.core.models import load_model

STAGES = {"mlp_reconstruct": "A", "annotate_uniform": "B", "annotate_repq": "B", "annotate_aphq": "B",
          "insert_quantizers": "B", "calibrate": "B", "repq_reparam": "B", "block_reconstruct": "C"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar-vit")
    p.add_argument("--recipe", default="aphq-w4a4")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    overrides = parse_overrides(args.set)  # the CLI's --set parser
    info = load_model(args.model)
    recipe = fxquant.get_recipe(args.recipe, **overrides)
    data = load_data(info, None, calib_images=recipe.calib_images, limit=args.limit, seed=args.seed)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    q = fxquant.compile(info.model, recipe=recipe, calib=list(torch.split(data.calib, 32)),
                        example_inputs=info.example_inputs(), progress=False, seed=args.seed)
    compile_s = time.perf_counter() - t0
    report = fxquant.report(q)
    print(report)
    stage_s: dict[str, float] = {}
    for r in report.passes:
        key = STAGES.get(r.name, r.name)
        stage_s[key] = stage_s.get(key, 0.0) + r.seconds
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stage_s.items()))
    regions = {}
    if "block_reconstruct" in [r.name for r in report.passes]:
        regions = report["block_reconstruct"].record.get("regions", {})
        for name, rec in regions.items():
            if rec.get("iters"):
                print(f"  {name:12s} cache {rec['seconds']['cache']:6.1f} s  aph {rec['seconds']['aph']:5.1f} s  "
                      f"train {rec['seconds']['train']:6.1f} s  loss {rec['loss_first']:.4g} -> {rec['loss_last']:.4g}  "
                      f"roundings flipped {100 * rec['rounding_flipped']:.2f} %")
    acc = top1(q, data.test_batches(), total=data.test_count, progress=False)
    fp = top1(info.model, data.test_batches(), total=data.test_count, progress=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.model} {args.recipe} {overrides or ''}: top1 {acc:.2f} (fp32 {fp:.2f}, {acc - fp:+.2f}) on "
          f"{data.test_count} images; compile {compile_s:.1f} s; peak RSS {rss:.0f} MB")
    if args.json:
        out = {"model": args.model, "recipe": args.recipe, "overrides": overrides, "top1": acc, "fp32": fp,
               "test_images": data.test_count, "compile_s": compile_s, "stage_s": stage_s, "peak_rss_mb": rss,
               "passes": [{"name": r.name, "seconds": r.seconds, "summary": r.summary} for r in report.passes],
               "regions": regions}
        write_json(args.json, out, indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
