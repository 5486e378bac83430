"""Peak memory of QwT calibration vs the number of calibration images.

Each image count runs in a fresh subprocess that compiles ``repq-qwt-w4a4`` on the CIFAR ViT
with calibration batches decoded lazily from ``calib.npz`` (so the dataset itself is not held in
memory), and reports the process's peak RSS (``ru_maxrss``) and its growth during compile.

    python tools/qwt_memory.py [--images 128,1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _bench import Table, write_json

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
import fxquant
from fxquant.core.data import _normalise, cifar10_paths
from fxquant.core.models import load_model

n = int(sys.argv[1])
info = load_model("cifar-vit")
_, calib_path, _ = cifar10_paths()
images = np.load(calib_path)["images"]  # uint8, 3 MB for all 1,024 images


class LazyBatches:
    def __iter__(self):
        for i in range(0, n, 32):
            yield _normalise(images[i:min(i + 32, n)], info.mean, info.std)


before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
q = fxquant.compile(info.model, recipe="repq-qwt-w4a4", calib=LazyBatches(), calib_images=n,
                    example_inputs=info.example_inputs(), progress=False)
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = fxquant.report(q)["qwt"].record["solution"]["blocks.0"]["rows"]
print(json.dumps({"images": n, "peak_rss_mib": peak / 1024, "rss_before_compile_mib": before / 1024,
                  "growth_mib": (peak - before) / 1024, "regression_rows_per_block": rows, "compile_seconds": secs}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="128,1024")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.images.split(",")]:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table([("images", "6d"), ("peak RSS MiB", "12.1f"), ("growth MiB", "10.1f"), ("rows/block", "10d"),
                   ("compile s", "9.1f")], sep="  ")
    print(table.header())
    for r in rows:
        print(table.row(r["images"], r["peak_rss_mib"], r["growth_mib"], r["regression_rows_per_block"], r["compile_seconds"]))
    if len(rows) >= 2:
        ratio = rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']
        print(f"peak RSS ratio {rows[-1]['images']} vs {rows[0]['images']} images: {ratio:.3f}")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
