"""Benchmark the BitLog2 attention kernels on a CUDA GPU.

Compares, per attention shape (ViT-B/16: 12 heads, 197 tokens, head dim 64):
  * torch: softmax + BitLog2 fake quantization (float) + A·v matmul (fp16), the simulated path;
  * triton: fused softmax → 4-bit codes (packed for the 16-level variants) + integer A·v.

    python tools/bench_bitlog2.py [--variant half16] [--json out.json]

Without a GPU it says so and exits 0 (the kernels' correctness runs in CI under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="half16", help="single16 | single17 | half16 | half17")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_bitlog2: no CUDA GPU found; nothing to time (kernel correctness is tested on CPU with TRITON_INTERPRET=1).")
        return 0
    import triton.testing

    from fxquant.kernels.bitlog2 import bitlog2_av, softmax_bitlog2_codes
    from fxquant.quant import QuantSpec, fake_quantize

    spec = QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant=args.variant)
    delta = torch.tensor(300.0, device="cuda")
    heads, tokens, dim = 12, 197, 64
    rows = []
    print(f"{torch.cuda.get_device_name()}  variant={args.variant}  heads={heads} tokens={tokens} head_dim={dim}")
    print(f"{'batch':>5}  {'torch ms':>9}  {'triton ms':>9}  {'codes ms':>9}  {'A·v ms':>9}  {'speed-up':>8}")
    for b in [int(x) for x in args.batches.split(",")]:
        scores = torch.randn(b, heads, tokens, tokens, device="cuda", dtype=torch.float16)
        v = torch.randint(-128, 128, (b, heads, tokens, dim), device="cuda", dtype=torch.int32)
        vh = v.half()

        def torch_path():
            p = torch.softmax(scores.float(), -1)
            return fake_quantize(p, delta, torch.zeros((), device="cuda"), spec).half() @ vh

        def codes():
            return softmax_bitlog2_codes(scores, args.variant)

        c = codes()

        def av():
            return bitlog2_av(c, v, args.variant)

        t_torch = triton.testing.do_bench(torch_path)
        t_codes = triton.testing.do_bench(codes)
        t_av = triton.testing.do_bench(av)
        rows.append({"batch": b, "variant": args.variant, "torch_ms": t_torch, "codes_ms": t_codes, "av_ms": t_av,
                     "triton_ms": t_codes + t_av, "speedup": t_torch / (t_codes + t_av), "device": torch.cuda.get_device_name()})
        r = rows[-1]
        print(f"{b:5d}  {t_torch:9.3f}  {r['triton_ms']:9.3f}  {t_codes:9.3f}  {t_av:9.3f}  {r['speedup']:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
