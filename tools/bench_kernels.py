"""Benchmark fxquant's integer GEMM kernels on a CUDA GPU.

ViT-B/16 GEMM shapes (M = 197·batch for batch 1, 8, 32, 64, 128; K×N = 768×2304, 768×768,
768×3072, 3072×768): W8A8, W4A8 and W4A4 Triton kernels (epilogue included) vs ``torch.matmul``
in fp16 (cuBLAS) and ``torch._int_mm`` (no epilogue), with ``triton.testing.do_bench``; TFLOPS/TOPS
from 2·M·N·K. Attention: ``int_bmm`` (int8 q·kᵀ and A·v, 12 heads × 197 tokens × 64) vs fp16
``torch.matmul``. End to end: random-init ``vit_base_patch16_224``, W8A8 lowered vs fp16, batch 1 and 64.

    python tools/bench_kernels.py [--json out.json]

Without a GPU it says so and exits 0 (the kernels' correctness runs in CI under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
BATCHES = [1, 8, 32, 64, 128]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="ViT-B batches: M = 197·batch")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU found; nothing to time (kernel correctness is tested on CPU with TRITON_INTERPRET=1).")
        return 0
    import triton.testing

    from fxquant.kernels.int_linear import int_linear
    from fxquant.quant import pack_int4

    dev = "cuda"
    rows = []
    print(torch.cuda.get_device_name())
    print(f"{'M':>6} {'K':>5} {'N':>5} {'fp16 TF':>8} {'_int_mm':>8} {'w8a8':>8} {'w4a8':>8} {'w4a4':>8} {'w8a8/fp16':>9}")
    batches = [int(b) for b in args.batches.split(",")]
    for b in batches:
        m = 197 * b
        for k, n in SHAPES:
            g = torch.Generator(device=dev).manual_seed(0)
            a8 = torch.randint(-128, 127, (m, k), device=dev, dtype=torch.int8, generator=g)
            w8 = torch.randint(-128, 127, (n, k), device=dev, dtype=torch.int8, generator=g)
            a4 = pack_int4(torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8, generator=g), signed=True)
            w4 = pack_int4(torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=g), signed=True)
            ah, wh = a8.half(), w8.half().T.contiguous()
            s_a, z_a = torch.tensor(0.01, device=dev), torch.tensor(0, device=dev)
            s_w, z_w = torch.full((n,), 0.01, device=dev), torch.zeros(n, dtype=torch.int32, device=dev)
            bias = torch.zeros(n, device=dev)
            flops = 2 * m * n * k
            t = {
                "fp16": triton.testing.do_bench(lambda: ah @ wh),
                "int_mm": triton.testing.do_bench(lambda: torch._int_mm(a8, w8.T)),
                "w8a8": triton.testing.do_bench(lambda: int_linear(a8, s_a, z_a, w8, s_w, z_w, bias, out_dtype=torch.float16)),
                "w4a8": triton.testing.do_bench(lambda: int_linear(a8, s_a, z_a, w4, s_w, z_w, bias, k=k, w_packed=True,
                                                                   out_dtype=torch.float16)),
                "w4a4": triton.testing.do_bench(lambda: int_linear(a4, s_a, z_a, w4, s_w, z_w, bias, k=k, a_packed=True,
                                                                   w_packed=True, out_dtype=torch.float16)),
            }
            tops = {kk: flops / (v * 1e-3) / 1e12 for kk, v in t.items()}
            rows.append({"M": m, "K": k, "N": n, "ms": t, "tflops_or_tops": tops, "speedup_w8a8_vs_fp16": t["fp16"] / t["w8a8"]})
            print(f"{m:6d} {k:5d} {n:5d} {tops['fp16']:8.1f} {tops['int_mm']:8.1f} {tops['w8a8']:8.1f} {tops['w4a8']:8.1f} "
                  f"{tops['w4a4']:8.1f} {t['fp16'] / t['w8a8']:8.2f}x")
    from fxquant.kernels.int_attention import int_bmm

    print("\nattention matmuls, ViT-B/16 (12 heads, 197 tokens, head dim 64)")
    print(f"{'batch':>6} {'op':>6} {'fp16 TF':>8} {'int8 TOPS':>9} {'int8/fp16':>9}")
    for b in batches:
        g = torch.Generator(device=dev).manual_seed(0)
        for op, (m, k, n) in {"q·kᵀ": (197, 64, 197), "A·v": (197, 197, 64)}.items():
            a8 = torch.randint(-128, 127, (b * 12, m, k), device=dev, dtype=torch.int8, generator=g)
            b8 = torch.randint(-128, 127, (b * 12, k, n), device=dev, dtype=torch.int8, generator=g)
            ah, bh = a8.half(), b8.half()
            t_fp16 = triton.testing.do_bench(lambda: ah @ bh)
            t_int = triton.testing.do_bench(lambda: int_bmm(a8, 0.01, 3, b8, 0.02, -1, out_dtype=torch.float16))
            flops = 2 * b * 12 * m * n * k
            rows.append({"attention": op, "batch": b, "fp16_ms": t_fp16, "int_bmm_ms": t_int})
            print(f"{b:6d} {op:>6} {flops / t_fp16 / 1e9:8.1f} {flops / t_int / 1e9:9.1f} {t_fp16 / t_int:8.2f}x")
    if not args.no_e2e:
        import timm

        import fxquant

        model = timm.create_model("vit_base_patch16_224").eval()
        calib = [torch.randn(8, 3, 224, 224)]
        low = fxquant.compile(model, recipe="w8a8", calib=calib, progress=False, lower=True).to(dev)
        fp16 = model.half().to(dev)
        for b in (1, 64):
            x = torch.randn(b, 3, 224, 224, device=dev)
            with torch.no_grad():
                t_fp16 = triton.testing.do_bench(lambda: fp16(x.half()))
                t_low = triton.testing.do_bench(lambda: low(x))
            rows.append({"e2e": "vit_base_patch16_224", "batch": b, "fp16_ms": t_fp16, "lowered_w8a8_ms": t_low})
            print(f"vit_base_patch16_224 batch {b}: fp16 {t_fp16:.2f} ms, lowered W8A8 {t_low:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
