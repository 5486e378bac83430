"""MiniLM (all-MiniLM-L6-v2, real pretrained weights): cosine similarity of quantized vs FP32
mean-pooled sentence embeddings, and which LayerNorms the RepQ passes folded or left alone.

    python tools/minilm_cosine.py [--recipe repq-w8a8] [--json out.json]
"""

from __future__ import annotations

import argparse
import os

from _bench import write_json

import fxquant
from fxquant.core.testing import EVAL_SENTENCES, embedding_cosine, minilm_setup

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="repq-w8a8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    # the same steps as tests/test_minilm.py
    model, forward_loop, example_inputs, eval_inputs = minilm_setup()
    q = fxquant.compile(model, recipe=args.recipe, calib=forward_loop, example_inputs=example_inputs, progress=False)
    cos, rep = embedding_cosine(model, q, eval_inputs), fxquant.report(q)
    rec = rep["annotate_repq"].record if any(p.name == "annotate_repq" for p in rep.passes) else {"sites": [], "skipped": {}}
    print(rep)
    print(f"\n{len(EVAL_SENTENCES)} sentences, recipe {args.recipe}: cosine mean {cos.mean():.5f}, min {cos.min():.5f}")
    print(f"folded LayerNorms: {rec['sites'] or 'none'}")
    for name, why in rec["skipped"].items():
        print(f"  left alone: {name}: {why}")
    write_json(args.json, {"recipe": args.recipe, "sentences": len(EVAL_SENTENCES), "cosine_mean": cos.mean().item(),
                           "cosine_min": cos.min().item(), "folded": rec["sites"], "skipped": rec["skipped"]})


if __name__ == "__main__":
    main()
