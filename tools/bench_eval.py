"""Evaluation throughput of fake-quant and lowered models on the CPU (issue 16, items 4 and 5).

For each recipe (``fp32`` = the captured float graph) and each form (fake-quant, ``--lower``), the
model is compiled once on 32 calibration images, then ``--images`` CIFAR-10 test images are run
in batches of ``--batch-size`` under ``torch.inference_mode``; rounds are interleaved across all models
(so background load hits all of them alike) and the best round is kept. Prints images/s and the
ratio to FP32; ``--json`` writes the rows with the CPU flags, threads and load averages (and the
``machine`` facts).

    python tools/bench_eval.py [--recipes fp32 w8a8 repq-w4a4 bitlog2-w4a4] [--images 1000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os

import torch
from _bench import Table, cpu_flags, interleaved_rounds, median_ms, write_json

import fxquant
from fxquant.core.data import load_data
from fxquant.core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar-vit")
    ap.add_argument("--recipes", nargs="+", default=["fp32", "w8a8", "repq-w4a4", "bitlog2-w4a4"])
    ap.add_argument("--forms", nargs="+", default=["fake", "lower"], choices=["fake", "lower"])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = load_model(args.model)
    data = load_data(info, "cifar10", calib_images=32, limit=args.images, batch_size=args.batch_size)
    batches = [x for x, _ in data.test_batches()]
    models = {}
    for recipe in args.recipes:
        for form in args.forms:
            if recipe == "fp32" and form == "lower":
                continue
            models[(recipe, form)] = fxquant.compile(info.model, recipe=recipe, calib=[data.calib],
                                                     example_inputs=info.example_inputs(), progress=False,
                                                     lower=form == "lower").eval()
    load = [os.getloadavg()[0]]
    with torch.inference_mode():
        for m in models.values():
            m(batches[0])  # warm-up

    def images_per_s(m) -> float:  # one timed pass over all test batches
        def run():
            for x in batches:
                m(x)

        return data.test_count / (median_ms(run, warmup=0, reps=1) / 1e3)

    timed = interleaved_rounds({key: (lambda m=m: images_per_s(m)) for key, m in models.items()}, args.rounds)
    best = {key: max(timed.results[key], default=0.0) for key in models}
    load += timed.loads
    fp32 = best.get(("fp32", "fake"))
    print(f"{args.model}, {data.test_count} images, batch {args.batch_size}, {args.threads} threads, CPU: {cpu_flags()}, "
          f"load {min(load):.2f}-{max(load):.2f}; best of {args.rounds} interleaved rounds")
    table = Table([("recipe", "16s"), ("form", "6s"), ("img/s", "8.1f"), ("vs fp32", "8.2f")])
    print(table.header())
    rows = []
    for (recipe, form), ips in best.items():
        ratio = ips / fp32 if fp32 else None
        print(table.row(recipe, form, ips, ratio or None))
        rows.append({"recipe": recipe, "form": form, "images_per_s": round(ips, 1),
                     "vs_fp32": None if ratio is None else round(ratio, 3)})
    write_json(args.json, {"model": args.model, "images": data.test_count, "batch": args.batch_size, "threads": args.threads,
                           "cpu": cpu_flags(), "load": load, "torch": torch.__version__, "rows": rows}, newline=True)


if __name__ == "__main__":
    main()
