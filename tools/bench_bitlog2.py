"""Benchmark the BitLog2 attention kernels on a CUDA GPU.

Compares, per attention shape (ViT-B/16: 12 heads, 197 tokens, head dim 64) and BitLog2 variant:
  * fp16: ``softmax(scores) @ v`` in fp16 (no quantization; what an fp16 model runs);
  * torch: softmax + BitLog2 fake quantization (float) + A·v matmul (fp16), the simulated path;
  * triton: fused softmax → 4-bit codes (packed for the 16-level variants) + integer A·v
    (``codes ms`` + ``A·v ms``; ``v`` as int8 codes, as the lowered model feeds it).

    python tools/bench_bitlog2.py [--variant half16,half17] [--batches 1,8,32,64] [--json out.json]
    python tools/bench_bitlog2.py --device cpu      # smoke test: tiny shapes, Triton interpreter, wall clock

Without a GPU (and without ``--device cpu``) it says so and exits 0 (the kernels' correctness runs
in CI under TRITON_INTERPRET=1). Times: ``triton.testing.do_bench`` (CUDA events, median). The JSON
file is rewritten after every row, so a run stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import sys

from _bench import Table, cuda_or_interpreter, kernel_ms, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="half16,half17", help="comma list of single16 | single17 | half16 | half17")
    ap.add_argument("--batches", default=None, help="default 1,8,32,64 (cpu: 1,2)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test with tiny shapes under TRITON_INTERPRET=1 (timings meaningless)")
    ap.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=float, default=100, help="do_bench measuring time, ms")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if not cuda_or_interpreter(args.device, "bench_bitlog2"):
        return 0
    import torch

    from fxquant.core.quant import QuantSpec, fake_quantize
    from fxquant.kernels.bitlog2 import bitlog2_av, softmax_bitlog2_codes

    dev = args.device
    timed = functools.partial(kernel_ms, device=dev, warmup_ms=args.warmup, rep_ms=args.rep)  # timed(fn) -> ms
    if dev == "cuda":
        heads, tokens, dim = 12, 197, 64
        name = torch.cuda.get_device_name()
        batches = args.batches or "1,8,32,64"
    else:
        heads, tokens, dim = 2, 9, 16
        name = "cpu (Triton interpreter)"
        batches = args.batches or "1,2"
        print("bench_bitlog2 --device cpu: smoke test (Triton interpreter, tiny shapes); the timings mean nothing")
    rows = []
    n_err = 0

    def save():
        write_json(args.json, rows)

    print(f"{name}  heads={heads} tokens={tokens} head_dim={dim}")
    table = Table([("variant", ">8"), ("batch", "5d"), ("fp16 ms", "9.3f"), ("torch ms", "9.3f"), ("triton ms", "9.3f"),
                   ("codes ms", "9.3f"), ("A·v ms", "9.3f"), ("×torch", "6.2f", "x"), ("×fp16", "5.2f", "x")], sep="  ")
    print(table.header())
    for variant in [v for v in args.variant.split(",") if v]:
        spec = QuantSpec(bits=4, scheme="bitlog2", bitlog2_variant=variant)
        delta = torch.tensor(300.0, device=dev)
        zero = torch.zeros((), device=dev)
        for b in [int(x) for x in batches.split(",") if x]:
            g = torch.Generator(device=dev).manual_seed(0)
            scores = torch.randn(b, heads, tokens, tokens, device=dev, generator=g).half()
            v = torch.randint(-128, 128, (b, heads, tokens, dim), device=dev, dtype=torch.int8, generator=g)
            vh = v.half()

            def fp16_path():
                return torch.softmax(scores, -1) @ vh

            def torch_path():
                p = torch.softmax(scores.float(), -1)
                return fake_quantize(p, delta, zero, spec).half() @ vh

            def codes():
                return softmax_bitlog2_codes(scores, variant)

            row = {"batch": b, "variant": variant, "heads": heads, "tokens": tokens, "head_dim": dim, "device": name}
            try:
                c = codes()

                def av():
                    return bitlog2_av(c, v, variant)

                av()  # compile outside the timed region
                row.update(fp16_ms=timed(fp16_path), torch_ms=timed(torch_path), codes_ms=timed(codes), av_ms=timed(av))
                row["triton_ms"] = row["codes_ms"] + row["av_ms"]
                row["speedup"] = row["torch_ms"] / row["triton_ms"]
                row["speedup_vs_fp16"] = row["fp16_ms"] / row["triton_ms"]
                print(table.row(variant, b, row["fp16_ms"], row["torch_ms"], row["triton_ms"], row["codes_ms"], row["av_ms"],
                                row["speedup"], row["speedup_vs_fp16"]), flush=True)
                row.update(_whole_attention(b, heads, tokens, dim, spec, dev, timed))
                print(" " * len(table.row(variant, b))
                      + f"  whole attention from int8 q, k, v: torch {row['attn_torch_ms']:.3f} ms, "
                      f"unfused integer {row['attn_unfused_ms']:.3f} ms, fused {row['attn_fused_ms']:.3f} ms "
                      f"({row['attn_fused_vs_torch']:.2f}x torch, {row['attn_fused_vs_unfused']:.2f}x unfused)", flush=True)
            except Exception as e:  # one broken variant must not cost the others
                n_err += 1
                row["error"] = f"{type(e).__name__}: {e}"
                print(table.row(variant, b) + f"  error: {row['error']}", flush=True)
            rows.append(row)
            save()
    save()
    return 1 if n_err else 0


def _whole_attention(b: int, heads: int, tokens: int, dim: int, spec, dev: str, timed) -> dict:
    """The whole BitLog2 attention core from int8 codes of q, k, v (issue 17's target: fused ≥ 1.5× the
    unfused torch path at batch 32): ``torch`` = fp16 q·kᵀ, float softmax, BitLog2 fake quantization,
    fp16 A·v (what the fake-quant model runs); ``unfused`` = the lowered kernels one after another
    (``int_bmm`` → ``softmax_bitlog2_codes`` → ``bitlog2_av``); ``fused`` = ``fused_attention``."""
    import torch

    from fxquant.core.quant import fake_quantize
    from fxquant.kernels.bitlog2 import bitlog2_av, softmax_bitlog2_codes
    from fxquant.kernels.fused_attention import fused_attention
    from fxquant.kernels.int_attention import int_bmm

    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randint(-128, 128, (b, heads, tokens, dim), device=dev, dtype=torch.int8, generator=g) for _ in range(3))
    s_qk, s_v, delta = 1e-3, 0.02, 300.0
    qh, kh, vh = q.half(), k.half(), v.half()
    d_t, zero = torch.tensor(delta, device=dev), torch.zeros((), device=dev)
    variant = spec.bitlog2_variant

    def torch_path():
        p = torch.softmax(((qh @ kh.transpose(-1, -2)) * s_qk).float(), -1)
        return fake_quantize(p, d_t, zero, spec).half() @ (vh * s_v)

    def unfused():
        s = int_bmm(q, 1.0, 0, k.transpose(-1, -2), s_qk, 0, out_dtype=torch.float16)
        return bitlog2_av(softmax_bitlog2_codes(s, variant), v, variant)

    def fused():
        return fused_attention(q, 0, k, 0, v, 0, s_qk, spec, delta, 0.0, s_v / delta, out_dtype=torch.float16)

    unfused(), fused()  # compile outside the timed region
    out = {"attn_torch_ms": timed(torch_path), "attn_unfused_ms": timed(unfused), "attn_fused_ms": timed(fused)}
    out["attn_fused_vs_torch"] = out["attn_torch_ms"] / out["attn_fused_ms"]
    out["attn_fused_vs_unfused"] = out["attn_unfused_ms"] / out["attn_fused_ms"]
    return out


if __name__ == "__main__":
    sys.exit(main())
