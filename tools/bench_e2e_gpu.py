"""End-to-end latency / throughput of ViTs on a CUDA GPU: fp16, torch.compile, torchao int8, fxquant lowered.

Models (random init, ``fxquant.core.models.load_model``): ``timm:vit_base_patch16_224`` and
``timm:deit_small_patch16_224``; batches 1, 8, 64. Variants, all in one process:

  fp16-eager            the timm model in fp16 (cuBLAS, PyTorch's SDPA attention)
  fp16-compile          ``torch.compile(model)`` (default mode) of the same fp16 model
  fp16-compile-max-autotune   ``mode="max-autotune-no-cudagraphs"`` (only with ``--max-autotune``)
  torchao-int8dyn       torchao ``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` on the fp16
                        model, then ``torch.compile`` (torchao's recommendation; its recommended inductor
                        settings are applied while it compiles, unless ``--torchao-inductor default``);
                        skipped with a message when torchao is not installed
  fxquant-<recipe>      ``fxquant.compile(model, recipe=R, calib=<random batch>, lower=True)`` for R in
                        w8a8, repq-w4a4, bitlog2-w4a4: the integer Triton kernels of ``kernels/lowered.py``
                        (Linears, patch convolution, fused attention where the lowering fuses it); moved to
                        CUDA and run in fp16 (the kernels take fp16 activations and write fp16; the integer
                        modules' scales stay float32), fp32 if the fp16 forward fails
  fxquant-<recipe>-unfused   (with ``--unfused``) the same lowered model with its ``LoweredAttention``
                        modules on ``backend="unfused"`` (two lowered matmuls + softmax); skipped when the
                        graph has none (RepQ's log√2 A·v is not fused)

Calibration runs on the CPU (fxquant's observers are CPU code) on ``--calib-images`` random images.
By default the recipes' range estimators are replaced by ``minmax`` (``--calib-estimator``): the
lowered graph (which layers, which kernels, which bit widths) is the same, only the ranges differ,
and the kernels' work does not depend on the ranges, while the searched estimators (``pctmse``)
multiply the calibration time (ViT-B w8a8 on 2 CPU cores: 70 s vs 13 s with ``minmax``);
``--calib-estimator recipe`` keeps each recipe's own.

Timing: per (model, batch), every variant is warmed up (first call: torch.compile / Triton autotuning,
timed as ``warmup_s``), then ``--rounds`` interleaved rounds time each variant for about ``--round-ms``
(CUDA events around each forward; median over all calls). Reported: median ms, images/s, speed-up
vs fp16 eager and vs fp16 torch.compile, and the cosine similarity of the logits with fp16 eager's
(a check that the variant computes the model). Every variant is wrapped: a failure prints the error,
is recorded in the JSON, and the run goes on. ``--budget-s`` skips what is left (recorded) once the
run has taken that long, so a time-boxed run still writes a complete JSON; the JSON is rewritten
after every (model, batch).

    python tools/bench_e2e_gpu.py [--models ...] [--batches 1,8,64] [--variants 'fp16-*,fxquant-w8a8'] [--json out.json]
    python tools/bench_e2e_gpu.py --device cpu --tiny      # smoke test of every code path (cifar-vit, CPU)
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import functools
import math
import os
import statistics
import sys
import time
import traceback

from _bench import Table, call_ms, cuda_or_interpreter, cuda_sync, fast_autotune, interleaved_rounds, write_json

MODELS = ["timm:vit_base_patch16_224", "timm:deit_small_patch16_224"]
BATCHES = [1, 8, 64]
RECIPES = ["w8a8", "repq-w4a4", "bitlog2-w4a4"]
BASE_VARIANTS = ["fp16-eager", "fp16-compile", "torchao-int8dyn"] + [f"fxquant-{r}" for r in RECIPES]
MAX_AUTOTUNE = "fp16-compile-max-autotune"
UNFUSED = "-unfused"
TINY_MODELS, TINY_BATCHES = ["cifar-vit"], [1, 2]


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma list of fxquant model specs (default {','.join(MODELS)})")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,64)")
    ap.add_argument("--variants", default="*",
                    help=f"comma list of names or globs out of {','.join(BASE_VARIANTS)} (and {MAX_AUTOTUNE})")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="fxquant recipes of the fxquant-<recipe> variants")
    ap.add_argument("--max-autotune", action="store_true", help=f"add {MAX_AUTOTUNE} (long compiles)")
    ap.add_argument("--unfused", action="store_true",
                    help=f"add fxquant-<recipe>{UNFUSED}: the same lowered model with its fused attention kernels "
                         "(LoweredAttention) switched to the two lowered matmuls + softmax")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true",
                    help=f"smoke test: {','.join(TINY_MODELS)}, batches {TINY_BATCHES}, few timed calls (with --device cpu)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (fp16-compile*, torchao)")
    ap.add_argument("--compile-dynamic", default="default", choices=["default", "false", "true"],
                    help="torch.compile(dynamic=...): default (None: static first, dynamic batch after a second batch size), "
                         "false (one static graph per batch: more compiles), true")
    ap.add_argument("--calib-images", type=int, default=2, help="random calibration images (one batch)")
    ap.add_argument("--calib-estimator", default="minmax", help="'minmax' (fast; default) or 'recipe' (each recipe's own)")
    ap.add_argument("--torchao-inductor", default="recommended", choices=["recommended", "default"],
                    help="inductor settings while the torchao model compiles")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--round-ms", type=float, default=300.0, help="time per variant per round (≥ 5 calls)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (the first compiles)")
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip what is left after this many seconds (0: no limit)")
    ap.add_argument("--tune-rep", type=float, default=20,
                    help="ms per config in Triton's autotuner benchmark for fxquant's kernels (0: Triton's default)")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def select_variants(pattern: str, max_autotune: bool, no_compile: bool, recipes: list[str], unfused: bool = False) -> list[str]:
    names = ["fp16-eager", "fp16-compile"] + ([MAX_AUTOTUNE] if max_autotune else []) + ["torchao-int8dyn"]
    for r in recipes:
        names += [f"fxquant-{r}"] + ([f"fxquant-{r}{UNFUSED}"] if unfused else [])
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    if not unfused and any(UNFUSED in p for p in pats):  # named explicitly
        return select_variants(pattern, max_autotune, no_compile, recipes, True)
    out = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if MAX_AUTOTUNE in pats and MAX_AUTOTUNE not in out:
        out.insert(2, MAX_AUTOTUNE)
    if no_compile:
        out = [n for n in out if not (n.startswith("fp16-compile") or n.startswith("torchao"))]
    return out


# ------------------------------------------------------------------------------------ torchao


def torchao_config():
    """``(config, name)`` for int8 dynamic activations × int8 weights, whichever API this torchao has
    (``Int8DynamicActivationInt8WeightConfig`` since 0.10; the ``int8_dynamic_activation_int8_weight()``
    function before). Raises ``SkipVariant`` with a message when torchao is missing."""
    try:
        import torchao
        import torchao.quantization as tq
    except Exception as e:  # ImportError, or a torchao built for another torch
        raise SkipVariant(f"torchao is not importable ({type(e).__name__}: {e}); `pip install torchao` "
                          "(the `bench` extra) to get its rows") from e
    ver = getattr(torchao, "__version__", "?")
    if hasattr(tq, "Int8DynamicActivationInt8WeightConfig"):
        cls = tq.Int8DynamicActivationInt8WeightConfig
        try:  # keep inductor's global config alone; the recommended settings are applied around its compile
            return cls(set_inductor_config=False), f"torchao {ver} Int8DynamicActivationInt8WeightConfig"
        except TypeError:
            return cls(), f"torchao {ver} Int8DynamicActivationInt8WeightConfig"
    if hasattr(tq, "int8_dynamic_activation_int8_weight"):
        return tq.int8_dynamic_activation_int8_weight(), f"torchao {ver} int8_dynamic_activation_int8_weight()"
    raise SkipVariant(f"torchao {ver} has neither Int8DynamicActivationInt8WeightConfig nor int8_dynamic_activation_int8_weight")


TORCHAO_INDUCTOR = {  # torchao.quantization.utils.recommended_inductor_config_setter
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "force_fuse_int_mm_with_mul": True,
}


# ------------------------------------------------------------------------------------ variants


class SkipVariant(Exception):
    """A variant that cannot run here (missing package, nothing to compare): reported as skipped."""


class Variant:
    """A ready-to-call model: ``fn(x)`` on ``dtype`` inputs; ``warm_ctx()`` wraps its untimed first calls."""

    def __init__(self, name, fn, dtype, note="", build_s=0.0, warm_ctx=None):
        self.name, self.fn, self.dtype, self.note, self.build_s = name, fn, dtype, note, build_s
        self.warm_ctx = warm_ctx


def half_except_quant(gm):
    """``gm`` in fp16 except the float buffers of fxquant's integer modules (``kernels/lowered.py``) and
    fake quantizers: their scales and zero points stay float32 (fp16 would round them, and flush
    scales below 6e-5 towards 0). Those modules return their input's dtype."""
    import torch
    from torch import nn

    from fxquant.core.quant import FakeQuantize
    from fxquant.kernels import lowered

    quant_types = tuple(c for c in vars(lowered).values()
                        if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == lowered.__name__)
    keep = {}
    for mname, mod in gm.named_modules():
        if isinstance(mod, quant_types + (FakeQuantize,)):
            for bname, buf in mod.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    keep[(mname, bname)] = buf.detach().clone()
    gm.half()
    with torch.no_grad():
        for (mname, bname), buf in keep.items():
            setattr(gm.get_submodule(mname), bname, buf)
    return gm


def _null_ctx():
    import contextlib

    return contextlib.nullcontext()


def build_variant(name: str, info, args, dev: str, fp16_model, cache: dict) -> Variant:
    import torch

    t0 = time.perf_counter()
    if name == "fp16-eager":
        return Variant(name, fp16_model, torch.float16)
    dyn = {"default": None, "false": False, "true": True}[args.compile_dynamic]
    if name == "fp16-compile":
        return Variant(name, torch.compile(fp16_model, dynamic=dyn), torch.float16, f"torch.compile default mode, dynamic={dyn}")
    if name == MAX_AUTOTUNE:
        return Variant(name, torch.compile(fp16_model, mode="max-autotune-no-cudagraphs", dynamic=dyn), torch.float16,
                       f"torch.compile mode=max-autotune-no-cudagraphs, dynamic={dyn}")
    if name == "torchao-int8dyn":
        cfg, label = torchao_config()
        from torchao.quantization import quantize_

        m = copy.deepcopy(info.model).to(dev).half().eval()
        quantize_(m, cfg)
        compiled = torch.compile(m, dynamic=dyn)
        ctx = _null_ctx
        if args.torchao_inductor == "recommended":
            import torch._inductor.config as icfg

            known = {k: v for k, v in TORCHAO_INDUCTOR.items() if hasattr(icfg, k)}

            def ctx():
                return icfg.patch(known)

        return Variant(name, compiled, torch.float16, f"{label} + torch.compile ({args.torchao_inductor} inductor config)",
                       time.perf_counter() - t0, ctx)
    if name.endswith(UNFUSED):
        base = cache.get(name[:-len(UNFUSED)])
        if base is None:
            raise SkipVariant(f"{name[:-len(UNFUSED)]} was not built")
        from fxquant.kernels import lowered

        att = getattr(lowered, "LoweredAttention", None)
        n_att = sum(isinstance(m, att) for m in base.fn.modules()) if att is not None else 0
        if n_att == 0:
            raise SkipVariant("its lowered graph has no fused attention (LoweredAttention), so it equals "
                              f"{name[:-len(UNFUSED)]}")
        m = copy.deepcopy(base.fn)
        for mod in m.modules():
            if isinstance(mod, att):
                mod.backend = "unfused"
        return Variant(name, m, base.dtype, f"as {base.name} with its {n_att} LoweredAttention modules on backend='unfused' "
                       "(two lowered matmuls + torch.softmax)", time.perf_counter() - t0)
    if name.startswith("fxquant-"):
        import fxquant

        recipe = name[len("fxquant-"):]
        overrides = {}
        recipe_obj = fxquant.get_recipe(recipe)
        if args.calib_estimator != "recipe":
            if hasattr(recipe_obj, "w_estimator") and hasattr(recipe_obj, "a_estimator"):
                overrides = {"w_estimator": args.calib_estimator, "a_estimator": args.calib_estimator}
            else:
                print(f"    {name}: {type(recipe_obj).__name__} has no w_/a_estimator fields; its own estimators")
        if "calib" not in cache:
            g = torch.Generator().manual_seed(0)
            cache["calib"] = [torch.randn(args.calib_images, *info.input_size, generator=g)]
        low = fxquant.compile(info.model, recipe=recipe, calib=cache["calib"], progress=False, lower=True, **overrides)
        summary = ""
        try:
            summary = fxquant.report(low)["lower_to_kernels"].summary
        except Exception:
            pass
        low = low.to(dev).eval()
        note = f"{summary}; calib {args.calib_images} random images, estimators {overrides.get('w_estimator', 'recipe')}"
        # fp16 activations (one batch-1 call: build_s includes its Triton JIT), the integer modules' scales
        # kept in float32; fp32 throughout if that fails
        x = torch.randn(1, *info.input_size, device=dev)
        low16 = half_except_quant(low)
        try:
            with torch.no_grad():
                y = low16(x.half())
            if not torch.isfinite(y.float()).all():
                raise FloatingPointError("non-finite logits in fp16")
            v = Variant(name, low16, torch.float16, note + "; fp16", time.perf_counter() - t0)
        except Exception as e:
            print(f"    {name}: fp16 forward failed ({type(e).__name__}: {e}); running in fp32")
            v = Variant(name, low16.float(), torch.float32, note + f"; fp32 (fp16 failed: {type(e).__name__})",
                        time.perf_counter() - t0)
        cache[name] = v
        return v
    raise ValueError(f"unknown variant {name!r}")


def _cos(a, b) -> float:
    import torch

    a, b = a.float().flatten(1), b.float().flatten(1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()


def main(argv=None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # --device cpu: Triton kernels in the interpreter if anything reaches them (before triton.jit)
    if not cuda_or_interpreter(args.device, "bench_e2e_gpu", smoke="`--device cpu --tiny`"):
        return 0
    import torch
    dev = args.device
    models = [m for m in (args.models or ",".join(TINY_MODELS if args.tiny else MODELS)).split(",") if m]
    batches = [int(b) for b in (args.batches or ",".join(map(str, TINY_BATCHES if args.tiny else BATCHES))).split(",") if b]
    recipes = [r for r in args.recipes.split(",") if r]
    variants = select_variants(args.variants, args.max_autotune, args.no_compile, recipes, args.unfused)
    if not variants:
        print(f"bench_e2e_gpu: --variants {args.variants!r} selects nothing")
        return 2
    if args.tiny:
        args.rounds, args.round_ms, args.warmup = min(args.rounds, 2), min(args.round_ms, 20.0), min(args.warmup, 2)
    if dev == "cuda":
        from fxquant.kernels import grouped_linear, int_attention, int_linear

        for mod, attr in ((int_linear, "_int_gemm_tuned"), (int_attention, "_int_bmm_tuned"),
                          (grouped_linear, "_grouped_gemm_tuned")):
            fast_autotune(getattr(mod, attr, None), args.tune_rep)
    import torch._dynamo

    from fxquant.core.models import load_model

    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):  # several variants × batches compile the same forward
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s if args.budget_s > 0 else math.inf
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton_version, "models": models, "batches": batches, "variants": variants,
            "rounds": args.rounds, "round_ms": args.round_ms, "calib_images": args.calib_images,
            "calib_estimator": args.calib_estimator, "budget_s": args.budget_s,
            "compile_dynamic": args.compile_dynamic, "torchao_inductor": args.torchao_inductor,
            "FXQUANT_AUTOTUNE": os.environ.get("FXQUANT_AUTOTUNE")}
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except Exception as e:
        info["torchao"] = f"not importable: {type(e).__name__}: {e}"
    out = {"info": info, "rows": [], "errors": [], "skipped": [], "variants": {}}

    def save():
        info["seconds"] = time.perf_counter() - t_start
        write_json(args.json, out)

    def fail(model, variant, stage, e, batch=None):
        msg = f"{type(e).__name__}: {e}"
        print(f"  !! {variant} ({stage}{'' if batch is None else f', batch {batch}'}): {msg}", flush=True)
        tb = traceback.format_exc(limit=6)
        out["errors"].append({"model": model, "variant": variant, "stage": stage, "batch": batch, "error": msg, "traceback": tb})

    def skip(model, variant, why, batch=None):
        out["skipped"].append({"model": model, "variant": variant, "batch": batch, "why": why})
        print(f"  -- {variant}{'' if batch is None else f' batch {batch}'}: skipped ({why})", flush=True)

    table = Table([("variant", "28s"), ("dtype", ">7"), ("ms", "9.3f"), ("img/s", "9.1f"), ("×eager", "7.2f"),
                   ("×compile", "8.2f"), ("cos", "7.4f"), ("warm s", "7.1f")], indent="    ")
    print(f"{info['device']}  torch {torch.__version__}  triton {triton_version}  torchao {info['torchao']}")
    print(f"variants: {', '.join(variants)}")
    for spec in models:
        print(f"\n== {spec}", flush=True)
        if time.perf_counter() > deadline:
            skip(spec, "*", "time budget")
            continue
        try:
            torch.manual_seed(0)
            minfo = load_model(spec)
            fp16_model = copy.deepcopy(minfo.model).to(dev).half().eval()
        except Exception as e:
            fail(spec, "*", "load", e)
            save()
            continue
        built: dict[str, Variant] = {}
        dropped: set[str] = set()  # skipped or failed to build: not tried again for this model
        cache: dict = {}

        def build(name: str) -> Variant | None:
            """Built on first use (so a time-boxed run times what it has built at every batch)."""
            if name in built or name in dropped:
                return built.get(name)
            try:
                v = build_variant(name, minfo, args, dev, fp16_model, cache)
                built[name] = v
                out["variants"].setdefault(spec, {})[name] = {"dtype": str(v.dtype).replace("torch.", ""), "note": v.note,
                                                              "build_s": v.build_s}
                print(f"  built {name:28s} {v.build_s:7.1f} s  {v.note}", flush=True)
                return v
            except SkipVariant as e:
                skip(spec, name, str(e))
            except Exception as e:
                fail(spec, name, "build", e)
            dropped.add(name)
            save()
            return None

        for b in batches:
            if time.perf_counter() > deadline:
                skip(spec, "*", "time budget", b)
                continue
            g = torch.Generator().manual_seed(b)
            x32 = torch.randn(b, *minfo.input_size, generator=g).to(dev)
            xs = {torch.float16: x32.half(), torch.float32: x32}
            ready, ref, rows = [], None, {}
            # build (first batch) and warm up: compiles and autotunes (untimed here, reported as build_s / warmup_s)
            for name in variants:
                if name in dropped:
                    continue
                if time.perf_counter() > deadline:
                    skip(spec, name, "time budget", b)
                    continue
                v = build(name)
                if v is None:
                    continue
                try:
                    t0 = time.perf_counter()
                    with torch.no_grad(), (v.warm_ctx() if v.warm_ctx else _null_ctx()):
                        for _ in range(max(1, args.warmup)):
                            y = v.fn(xs[v.dtype])
                    cuda_sync(dev)
                    warm = time.perf_counter() - t0
                    if name == "fp16-eager":
                        ref = y
                    rows[name] = {"model": spec, "batch": b, "variant": name, "dtype": str(v.dtype).replace("torch.", ""),
                                  "warmup_s": warm, "finite": bool(torch.isfinite(y.float()).all()), "_y": y, "samples": []}
                    ready.append(name)
                except Exception as e:
                    fail(spec, name, "warm-up", e, b)
            # timed: interleaved rounds, each variant about round_ms per round (every call kept: median over all)
            def measure(name: str) -> list[float]:
                v = built[name]
                samples = rows[name]["samples"]
                est = min(samples) if samples else call_ms(v.fn, xs[v.dtype], device=dev)
                n = max(5, min(500, int(args.round_ms / max(est, 1e-3))))
                new = [call_ms(v.fn, xs[v.dtype], device=dev) for _ in range(n)]
                samples += new
                return new

            def timing_failed(name: str, e: Exception) -> None:
                fail(spec, name, "timing", e, b)
                rows.pop(name, None)

            with torch.no_grad():
                timed = interleaved_rounds({name: functools.partial(measure, name) for name in ready}, max(1, args.rounds),
                                           on_error=timing_failed)
            ready = [name for name in ready if name not in timed.failed]
            base = rows.get("fp16-eager")
            comp = rows.get("fp16-compile")
            for name in ready:
                r = rows[name]
                s = r.pop("samples")
                y = r.pop("_y")
                r["calls"] = len(s)
                r["ms"] = statistics.median(s)
                r["ms_min"] = min(s)
                r["ms_p90"] = sorted(s)[int(0.9 * (len(s) - 1))]
                r["images_per_s"] = b / (r["ms"] * 1e-3)
                if ref is not None:
                    r["cos_vs_fp16_eager"] = _cos(y, ref)
            for name in ready:
                r = rows[name]
                if base is not None and "ms" in base:
                    r["speedup_vs_fp16_eager"] = base["ms"] / r["ms"]
                if comp is not None and "ms" in comp:
                    r["speedup_vs_fp16_compile"] = comp["ms"] / r["ms"]
                out["rows"].append(r)
            print(f"  batch {b}:")
            print(table.header())
            for name in ready:
                r = rows[name]
                print(table.row(name, r["dtype"], r["ms"], r["images_per_s"], r.get("speedup_vs_fp16_eager"),
                                r.get("speedup_vs_fp16_compile"), r.get("cos_vs_fp16_eager"), r["warmup_s"])
                      + ("" if r["finite"] else "  NON-FINITE"), flush=True)
            save()
        built.clear()
        cache.clear()
        fp16_model = None
        torch._dynamo.reset()  # the next model starts with no compiled code of this one
        if dev == "cuda":
            torch.cuda.empty_cache()
    save()
    print(f"\n{len(out['rows'])} rows, {len(out['errors'])} errors, {len(out['skipped'])} skipped in "
          f"{info['seconds']:.0f} s" + (f"; JSON: {args.json}" if args.json else ""))
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
