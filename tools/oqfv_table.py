"""The OQFV table (issue 14): QLoRA / LoftQ / OQFV / FP LoRA on the natural (CIFAR-10) and structured
(rotation) few-shot tasks — top-1 right after initialisation and after fine-tuning, trainable
parameters, wall time.

    python tools/oqfv_table.py --run --dir results/oqfv           # run the 8 fine-tunings, then the table
    python tools/oqfv_table.py --dir results/oqfv [--json t.json] # table from existing finetune JSONs

Each run is ``fxquant finetune --model M --task T --init I --bits B --rank R --json DIR/T-I.json``
(defaults of docs/methods.md, OQFV: 800 train / 200 val images, all test images, 20 epochs, batch 64, seed 0).
Any ``*.json`` written by ``fxquant finetune`` in ``--dir`` joins the table (e.g. a torchrun or a
Hugging Face run), labelled by its model, world size and init.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _bench import text_table, write_json

INITS = ("qlora", "loftq", "oqfv", "fp")
TASKS = ("cifar10", "rotation")


def run_grid(out: Path, model: str, bits: int, rank: int, extra: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        for init in INITS:
            cmd = [sys.executable, "-m", "fxquant", "finetune", "--model", model, "--task", task, "--init", init,
                   "--bits", str(bits), "--rank", str(rank), "--quiet", "--json", str(out / f"{task}-{init}.json"), *extra]
            print(" ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True)


def load_rows(folder: Path) -> list[dict]:
    rows = []
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text())
        if "top1_init" not in d or "init" not in d:
            continue
        rows.append({"file": f.name, "model": d["model"], "task": d["task"], "init": d["init"], "bits": d["bits"],
                     "rank": d["rank"], "world_size": d.get("world_size", 1), "top1_init": d["top1_init"], "top1": d["top1"],
                     "best_val": max(d["val_top1"]) if d.get("val_top1") else None, "top1_best_val": d.get("top1_best_val"),
                     "best_val_epoch": d.get("best_val_epoch"), "trainable_params": d["trainable_params"],
                     "seconds": d["seconds"], "seconds_train": d.get("seconds_train"),
                     "oqfv_mse": (d["oqfv"]["mse_before"], d["oqfv"]["mse_after"]) if d.get("oqfv") else None,
                     "digest": d.get("trainable_digest", "")[:12]})
    order = {i: n for n, i in enumerate(INITS)}
    return sorted(rows, key=lambda r: (r["model"], r["task"], r["world_size"], order.get(r["init"], 9), r["file"]))


def table(rows: list[dict]) -> str:
    head = ("model", "task", "procs", "init", "bits", "top1 init %", "top1 %", "best val % (epoch)", "top1 at best val %",
            "trainable", "seconds")
    body = [(r["model"], r["task"], str(r["world_size"]), r["init"], str(r["bits"] or "fp"), f"{r['top1_init']:.2f}",
             f"{r['top1']:.2f}", "-" if r["best_val"] is None else f"{r['best_val']:.1f} ({r['best_val_epoch']})",
             "-" if r["top1_best_val"] is None else f"{r['top1_best_val']:.2f}", f"{r['trainable_params']:,}",
             f"{r['seconds']:.0f}") for r in rows]
    return text_table(head, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="results/oqfv", help="folder of finetune JSON files")
    ap.add_argument("--run", action="store_true", help="run the 2 tasks x 4 inits first")
    ap.add_argument("--model", default="cifar-vit")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--json", default=None, help="write the rows as JSON")
    args, extra = ap.parse_known_args()
    folder = Path(args.dir)
    if args.run:
        run_grid(folder, args.model, args.bits, args.rank, extra)
    rows = load_rows(folder)
    if not rows:
        raise SystemExit(f"no fxquant finetune JSON files in {folder}")
    print(table(rows))
    write_json(args.json, rows, newline=True)


if __name__ == "__main__":
    main()
