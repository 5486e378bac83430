"""IGQ-ViT group-count sweep: top-1 and calibration seconds for G in --groups, with and without
group size allocation (budget: the BOPs of G everywhere).

    python tools/igq_sweep.py --model cifar-vit --groups 1,2,4,8,16 [--recipe igq-w4a4] [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _bench import Table, write_json

import fxquant
from fxquant.core.data import load_data
from fxquant.core.evaluate import top1
from fxquant.core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar-vit")
    ap.add_argument("--recipe", default="igq-w4a4")
    ap.add_argument("--groups", default="1,2,4,8,16")
    ap.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--show-groups", action="store_true", help="print the chosen G of every quantizer (allocation rows)")
    args = ap.parse_args()
    info = load_model(args.model)
    recipe = fxquant.get_recipe(args.recipe)
    data = load_data(info, None, calib_images=recipe.calib_images, limit=args.limit, seed=0)
    calib = list(torch.split(data.calib, 32))
    fp32 = top1(info.model, data.test_batches(), total=data.test_count, progress=False)
    rows = []
    for g in [int(v) for v in args.groups.split(",")]:
        for allocate in (False, True):
            t0 = time.perf_counter()
            q = fxquant.compile(info.model, recipe=args.recipe, calib=calib, progress=False, num_groups=g, allocate=allocate)
            secs = time.perf_counter() - t0
            acc = top1(q, data.test_batches(), total=data.test_count, progress=False)
            row = {"groups": g, "allocate": allocate, "top1": round(acc, 2), "calib_seconds": round(secs, 1)}
            if allocate:
                rec = fxquant.report(q)["allocate_groups"].record
                chosen = list(rec["groups"].values())
                row["chosen"] = {str(k): chosen.count(k) for k in sorted(set(chosen))}
                row["bops_used_of_budget"] = round(rec["group_bops"] / rec["budget_bops"], 4)
                row["groups_per_quantizer"] = rec["groups"]
                if args.show_groups:
                    for name, chosen_g in rec["groups"].items():
                        print(f"  G={g} allocation: {name.removeprefix('quantizers.')} -> {chosen_g}")
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "groups_per_quantizer"}), flush=True)
    print(f"\n{args.model} {args.recipe}: fp32 {fp32:.2f} on {data.test_count} test images, {len(data.calib)} calibration images")
    table = Table([("G", ">3"), ("allocation", ">10"), ("top1", "6.2f"), ("calib s", "8.1f")])
    print(table.header() + "  chosen G (count)")
    for r in rows:
        print(table.row(r["groups"], "yes" if r["allocate"] else "no", r["top1"], r["calib_seconds"])
              + f"  {r.get('chosen', '')}")
    write_json(args.json, {"model": args.model, "recipe": args.recipe, "fp32_top1": round(fp32, 2),
                           "test_images": data.test_count, "rows": rows})


if __name__ == "__main__":
    main()
