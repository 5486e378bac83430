"""Benchmark fxquant's integer GEMM kernels on a CUDA GPU, next to cuBLAS fp16 and ``torch._int_mm``.

Linear layers of ViT-B/16 (197 tokens; M = 197·batch for batch 1, 8, 32, 64, i.e. M = 197 … 12,608;
(N, K) = (2304, 768) qkv, (768, 768) proj, (3072, 768) fc1, (768, 3072) fc2) and DeiT-S/16
((1152, 384), (384, 384), (1536, 384), (384, 1536)). Per shape, in one run:

  pure GEMM (operands already quantized; TOPS from 2·M·N·K):
    fp16       ``x @ w.T`` in fp16 (cuBLAS, the nn.Linear layout)
    int_mm     ``torch._int_mm`` int8 × int8 → int32 (cuBLASLt, no epilogue)
    w8a8       ``int_linear`` int8 × int8, fused epilogue (zero points, scales, bias, fp16 out)
    w4a8       ``int_linear`` int8 activations × packed int4 weights
    w4a4       ``int_linear`` packed int4 × packed int4
  activation quantization alone (fp16 [M, K] → codes):
    q8, q4     ``quantize_act`` per tensor (int8, and int4 packed two per byte)
  layer = ``quantize_act`` + GEMM from the fp16 activation (what a lowered Linear runs):
    L-w8a8     per-tensor static int8 codes + w8a8
    L-w8a8dyn  dynamic per-token symmetric int8 codes + w8a8 (torchao's int8 dynamic scheme)
    L-w4a4     per-tensor static packed int4 codes + w4a4

Attention matmuls of ViT-B/16 (12 heads, 197 tokens, head dim 64): ``int_bmm`` (int8 q·kᵀ and A·v)
vs fp16 ``torch.matmul``. A cheap exactness check per shape compares w8a8 / w4a4 with
``torch._int_mm`` (``check`` in the JSON). Times: ``triton.testing.do_bench`` (CUDA events, L2
flushed between runs, median); Triton's autotuner runs once per shape before timing (its own
benchmark shortened by ``--tune-rep``). End-to-end model timings: ``tools/bench_e2e_gpu.py``.

    python tools/bench_kernels.py [--quick] [--json out.json] [--models vit_b,deit_s] [--batches 1,8,32,64]
    python tools/bench_kernels.py --device cpu      # smoke test: tiny shapes, Triton interpreter, wall clock

Without a GPU (and without ``--device cpu``) it says so and exits 0. The JSON file is rewritten
after every shape, so a run stopped by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

from _bench import Table, cuda_or_interpreter, fast_autotune, kernel_ms, write_json

TOKENS = 197
SHAPES = {  # (N, K) of the Linear layers, nn.Linear(K, N)
    "vit_b": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
    "deit_s": [(1152, 384), (384, 384), (1536, 384), (384, 1536)],
}
BATCHES = [1, 8, 32, 64]
QUICK = {"batches": [1, 64], "shapes": {"vit_b": [(2304, 768), (768, 3072)], "deit_s": [(1152, 384)]}}
GEMM = ["fp16", "int_mm", "w8a8", "w4a8", "w4a4"]
QUANT = ["q8", "q4"]
LAYER = ["L-w8a8", "L-w8a8dyn", "L-w4a4"]
VARIANTS = GEMM + QUANT + LAYER
# --device cpu: tiny shapes for the Triton interpreter (it runs a kernel program by program in Python)
CPU_TOKENS, CPU_BATCHES, CPU_SHAPES = 5, [1, 2], {"tiny": [(32, 64), (64, 32)]}


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the rows here (rewritten after every shape)")
    ap.add_argument("--quick", action="store_true",
                    help=f"batches {QUICK['batches']} and 3 shapes (qkv, fc2 of ViT-B; qkv of DeiT-S)")
    ap.add_argument("--models", default="vit_b,deit_s", help="shape sets: vit_b, deit_s")
    ap.add_argument("--batches", default=None, help="batches (M = 197·batch); default 1,8,32,64")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--no-attention", action="store_true", help="skip the int_bmm attention section")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: smoke test of every code path with tiny shapes under TRITON_INTERPRET=1 (timings meaningless)")
    ap.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=float, default=100, help="do_bench measuring time, ms")
    ap.add_argument("--tune-rep", type=float, default=20,
                    help="ms per config in Triton's autotuner benchmark (its default 100; 0 leaves it alone)")
    return ap.parse_args(argv)


def bench_linear(torch, timer, dev: str, m: int, n: int, k: int, variants: list[str]) -> dict:
    from fxquant.core.quant import QuantSpec, pack_int4, unpack_int4
    from fxquant.kernels.int_linear import int_linear, quantize_act

    g = torch.Generator(device=dev).manual_seed(0)
    a8 = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
    w8 = torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
    a4 = pack_int4(torch.randint(-8, 8, (m, k), device=dev, dtype=torch.int8, generator=g), signed=True)
    w4 = pack_int4(torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=g), signed=True)
    x = torch.randn(m, k, device=dev, generator=g).half()  # the fp16 activation a layer quantizes
    ah, wh = a8.half(), w8.half()
    s_a, z_a = torch.tensor(0.01, device=dev), torch.tensor(0, dtype=torch.int32, device=dev)
    s_w, z_w = torch.full((n,), 0.01, device=dev), torch.zeros(n, dtype=torch.int32, device=dev)
    bias = torch.zeros(n, device=dev)
    colsum8 = w8.to(torch.int32).sum(1)
    colsum4 = unpack_int4(w4, signed=True).to(torch.int32).sum(1)
    spec8, spec4 = QuantSpec(bits=8), QuantSpec(bits=4)  # asymmetric per tensor, as the uniform recipes' activations
    spec8_sym = QuantSpec(bits=8, symmetric=True)
    sx8 = (x.float().amax() - x.float().amin()) / 255
    sx4 = (x.float().amax() - x.float().amin()) / 15
    zx8 = torch.round(-x.float().amin() / sx8)
    zx4 = torch.round(-x.float().amin() / sx4)
    f16 = torch.float16

    def gemm(a, sa, za, w, sw, zw, cs, **kw):
        return int_linear(a, sa, za, w, sw, zw, bias, k=k, w_colsum=cs, out_dtype=f16, **kw)

    fns = {
        "fp16": lambda: ah @ wh.T,
        "int_mm": lambda: torch._int_mm(a8, w8.T),
        "w8a8": lambda: gemm(a8, s_a, z_a, w8, s_w, z_w, colsum8),
        "w4a8": lambda: gemm(a8, s_a, z_a, w4, s_w, z_w, colsum4, w_packed=True),
        "w4a4": lambda: gemm(a4, s_a, z_a, w4, s_w, z_w, colsum4, a_packed=True, w_packed=True),
        "q8": lambda: quantize_act(x, spec8, sx8, zx8),
        "q4": lambda: quantize_act(x, spec4, sx4, zx4, pack=True),
        "L-w8a8": lambda: gemm(*quantize_act(x, spec8, sx8, zx8), w8, s_w, z_w, colsum8),
        "L-w8a8dyn": lambda: gemm(*quantize_act(x, spec8_sym, per_token=True), w8, s_w, z_w, colsum8),
        "L-w4a4": lambda: gemm(*quantize_act(x, spec4, sx4, zx4, pack=True), w4, s_w, z_w, colsum4, a_packed=True, w_packed=True),
    }
    row = {"M": m, "N": n, "K": k, "ops": 2 * m * n * k, "ms": {}, "tops": {}, "errors": {}}
    for v in variants:
        try:
            fns[v]()  # compile / autotune outside the timed region
            if dev == "cuda":
                torch.cuda.synchronize()
            t = timer(fns[v])
            row["ms"][v] = t
            if v not in QUANT:
                row["tops"][v] = row["ops"] / (t * 1e-3) / 1e12
        except Exception as e:  # one broken variant must not cost the others
            row["errors"][v] = f"{type(e).__name__}: {e}"
    # exactness: int_linear's w8a8 / w4a4 (fp32 out, no bias) against torch._int_mm's int32 product × s_a·s_w
    # (after the timed calls, so that the autotuner tunes the fp16-output kernels that are timed)
    try:
        ref8 = torch._int_mm(a8, w8.T).float() * (0.01 * 0.01)
        ref4 = torch._int_mm(unpack_int4(a4, signed=True), unpack_int4(w4, signed=True).T).float() * (0.01 * 0.01)
        y8 = int_linear(a8, s_a, z_a, w8, s_w, z_w, None, k=k, w_colsum=colsum8)
        y4 = int_linear(a4, s_a, z_a, w4, s_w, z_w, None, k=k, w_colsum=colsum4, a_packed=True, w_packed=True)
        d8, d4 = (y8 - ref8).abs().max().item(), (y4 - ref4).abs().max().item()
        tol8, tol4 = 1e-6 * ref8.abs().max().item() + 1e-6, 1e-6 * ref4.abs().max().item() + 1e-6
        row["check"] = {"w8a8_max_abs_diff": d8, "w4a4_max_abs_diff": d4, "ok": d8 <= tol8 and d4 <= tol4}
    except Exception as e:
        row["check"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    t = row["ms"]
    if "fp16" in t and "w8a8" in t:
        row["speedup_w8a8_vs_fp16"] = t["fp16"] / t["w8a8"]
    if "int_mm" in t and "w8a8" in t:
        row["speedup_w8a8_vs_int_mm"] = t["int_mm"] / t["w8a8"]
    if "fp16" in t and "L-w8a8" in t:
        row["speedup_layer_w8a8_vs_fp16"] = t["fp16"] / t["L-w8a8"]
    if "fp16" in t and "L-w4a4" in t:
        row["speedup_layer_w4a4_vs_fp16"] = t["fp16"] / t["L-w4a4"]
    return row


def bench_attention(torch, timer, dev: str, batches: list[int], tokens: int, heads: int, dim: int) -> list[dict]:
    from fxquant.kernels.int_attention import int_bmm

    rows = []
    for b in batches:
        g = torch.Generator(device=dev).manual_seed(0)
        for op, (m, k, n) in {"q·kᵀ": (tokens, dim, tokens), "A·v": (tokens, tokens, dim)}.items():
            row = {"attention": op, "batch": b, "heads": heads, "M": m, "K": k, "N": n}
            try:
                a8 = torch.randint(-128, 128, (b * heads, m, k), device=dev, dtype=torch.int8, generator=g)
                b8 = torch.randint(-128, 128, (b * heads, k, n), device=dev, dtype=torch.int8, generator=g)
                ah, bh = a8.half(), b8.half()
                int_bmm(a8, 0.01, 3, b8, 0.02, -1, out_dtype=torch.float16)  # autotune outside the timed region
                row["fp16_ms"] = timer(lambda: ah @ bh)
                row["int_bmm_ms"] = timer(lambda: int_bmm(a8, 0.01, 3, b8, 0.02, -1, out_dtype=torch.float16))
                ops = 2 * b * heads * m * n * k
                row["fp16_tflops"] = ops / row["fp16_ms"] / 1e9
                row["int_bmm_tops"] = ops / row["int_bmm_ms"] / 1e9
                row["speedup_int_vs_fp16"] = row["fp16_ms"] / row["int_bmm_ms"]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
    return rows


def main(argv=None) -> int:
    args = _parse_args(argv)
    if not cuda_or_interpreter(args.device, "bench_kernels"):
        return 0
    import torch
    dev = args.device
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"bench_kernels: unknown variants {unknown}; known: {VARIANTS}")
        return 2
    if dev == "cpu":
        tokens, batches, shape_sets = CPU_TOKENS, CPU_BATCHES, CPU_SHAPES
        heads, dim = 2, 16
        print("bench_kernels --device cpu: smoke test (Triton interpreter, tiny shapes); the timings mean nothing")
    else:
        tokens, heads, dim = TOKENS, 12, 64
        models = [s for s in args.models.split(",") if s]
        bad = sorted(set(models) - set(SHAPES))
        if bad:
            print(f"bench_kernels: unknown --models {bad}; known: {sorted(SHAPES)}")
            return 2
        src = QUICK["shapes"] if args.quick else SHAPES
        shape_sets = {s: src[s] for s in models if s in src}
        batches = QUICK["batches"] if args.quick else BATCHES
    if args.batches:
        batches = [int(b) for b in args.batches.split(",") if b]
    if dev == "cuda":
        from fxquant.kernels import int_attention, int_linear

        for tuned in (getattr(int_linear, "_int_gemm_tuned", None), getattr(int_attention, "_int_bmm_tuned", None)):
            fast_autotune(tuned, args.tune_rep)
    timer = functools.partial(kernel_ms, device=dev, warmup_ms=args.warmup, rep_ms=args.rep)  # timer(fn) -> ms
    import triton

    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "tokens": tokens, "batches": batches,
            "variants": variants, "FXQUANT_AUTOTUNE": os.environ.get("FXQUANT_AUTOTUNE"),
            "do_bench": {"warmup_ms": args.warmup, "rep_ms": args.rep, "autotune_rep_ms": args.tune_rep}}
    out = {"info": info, "linear": [], "attention": []}

    def save():
        write_json(args.json, out)

    print(f"{info['device']}  torch {torch.__version__}  triton {triton.__version__}")
    tops_cols = [v for v in variants if v not in QUANT]
    quant_cols = [v for v in variants if v in QUANT]
    print("TOPS (TFLOP/s for fp16) from 2·M·N·K; q8/q4: activation quantization alone, ms; "
          "×fp16 = fp16 ms / w8a8 ms, ×int_mm = _int_mm ms / w8a8 ms (>1: w8a8 faster)")
    table = Table([("set", ">6"), ("batch", "5d"), ("M", "6d"), ("N", "5d"), ("K", "5d")] + [(c, "9.1f") for c in tops_cols]
                  + [(c + " ms", "8.4f") for c in quant_cols] + [("×fp16", "6.2f"), ("×int_mm", "7.2f"), ("check", ">5")])
    print(table.header())
    t_start = time.perf_counter()
    for set_name, shapes in shape_sets.items():
        for b in batches:
            m = tokens * b
            for n, k in shapes:
                row = bench_linear(torch, timer, dev, m, n, k, variants)
                row.update({"set": set_name, "batch": b})
                out["linear"].append(row)
                save()
                r8 = row.get("speedup_w8a8_vs_fp16")
                ri = row.get("speedup_w8a8_vs_int_mm")
                chk = row["check"].get("ok")
                print(table.row(set_name, b, m, n, k, *(row["tops"].get(c) for c in tops_cols),
                                *(row["ms"].get(c) for c in quant_cols), r8, ri, "ok" if chk else "FAIL"), flush=True)
                for v, e in row["errors"].items():
                    print(f"    {v}: {e}")
                if not chk:
                    print(f"    check: {row['check']}")
    print("\nms per variant:")
    ms_table = Table([("set", ">6"), ("M", "6d"), ("N", "5d"), ("K", "5d")] + [(c, "9.4f") for c in variants])
    print(ms_table.header())
    for row in out["linear"]:
        print(ms_table.row(row["set"], row["M"], row["N"], row["K"], *(row["ms"].get(c) for c in variants)))
    if not args.no_attention:
        print(f"\nattention matmuls ({heads} heads, {tokens} tokens, head dim {dim}): int_bmm (int8) vs fp16 torch.matmul")
        att = Table([("batch", "6d"), ("op", ">6"), ("fp16 ms", "9.4f"), ("int ms", "9.4f"), ("fp16 TF", "8.1f"),
                     ("int8 TOPS", "9.1f"), ("int/fp16", "7.2f", "x")])
        print(att.header())
        for row in bench_attention(torch, timer, dev, batches, tokens, heads, dim):
            out["attention"].append(row)
            if "error" in row:
                print(att.row(row["batch"], row["attention"]) + f" error: {row['error']}")
                continue
            print(att.row(row["batch"], row["attention"], row["fp16_ms"], row["int_bmm_ms"], row["fp16_tflops"],
                          row["int_bmm_tops"], row["speedup_int_vs_fp16"]))
        save()
    info["seconds"] = time.perf_counter() - t_start
    save()
    n_err = sum(len(r["errors"]) for r in out["linear"]) + sum("error" in r for r in out["attention"])
    n_bad = sum(not r["check"].get("ok") for r in out["linear"])
    print(f"\n{len(out['linear'])} linear shapes, {len(out['attention'])} attention rows in {info['seconds']:.0f} s; "
          f"{n_err} variant errors, {n_bad} failed exactness checks" + (f"; JSON: {args.json}" if args.json else ""))
    return 1 if n_err or n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
