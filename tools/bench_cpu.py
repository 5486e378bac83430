"""CPU deployment benchmark (issue 16): latency and top-1 of fxquant's exported models in
onnxruntime and OpenVINO next to the FP32 models and the two usual INT8 tool chains, in one run.

Variants, all from the same captured FP32 graph and the same 32 calibration images:
  * ``fp32-ort`` / ``fp32-ov``: fxquant's ``fp32`` recipe exported to ONNX, in onnxruntime / OpenVINO;
  * ``ort-quantize-static``: ``onnxruntime.quantization.quantize_static`` on the FP32 ONNX model
    (after ``quant_pre_process``): QDQ, per-channel weights, its default MinMax calibrator;
  * ``nncf-ov``: ``nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER)`` on the FP32
    model read by OpenVINO (default preset), run by OpenVINO;
  * ``fxquant-<recipe>-ort`` / ``-ov``: each ``--recipes`` entry (default ``w8a8`` and ``w8a8-sym``, the
    same recipe with symmetric activations) exported as QDQ (``to_onnx``) and run by
    onnxruntime, and exported for OpenVINO (``target="openvino"``: the same function with each
    fused qkv Linear split into q, k and v Linears and the per-tensor Q/DQ pairs above the
    reshapes feeding them) and read by OpenVINO.
Each OpenVINO variant runs in every compile configuration a user picks (``--ov-shapes`` ×
``--ov-precisions``): the IR's dynamic batch or reshaped to the batch being timed (``static``:
``model.reshape``, as ``benchmark_app -shape`` does), and the plugin's default inference precision
(bf16 on CPUs with AVX512-BF16/AMX, else f32) or f32 (``INFERENCE_PRECISION_HINT``). Where the
plugin's default is f32 the two precisions are one configuration and run once. Every OpenVINO
row records what the plugin runs in int8 in its configuration (``fxquant.export.plugin_record``:
FullyConnected, Convolution, and the attention matmuls wherever the plugin put them), and top-1 is
measured in each configuration (static: compiled for the evaluation batch). The headline table gives
each model at its own best configuration per batch.

Latency: the median of a set of runs after warm-up, measured in ``--rounds`` interleaved rounds over
all variants (each model loaded or compiled once; the best median is kept, so that load from
elsewhere hits every variant alike), ``--threads`` threads, batch 1 and 32 (the CIFAR ViTs:
``cifar-vit``, and ``cifar-vit-outliers`` with planted post-LayerNorm outliers, where NNCF applies
SmoothQuant) or 1 and 8 (224-pixel model, random init: latency only). Top-1 on all CIFAR-10 test images.

    python tools/bench_cpu.py [--model cifar-vit|cifar-vit-outliers|timm:vit_small_patch16_224] [--threads 2]
        [--json out.json] [--ov-precisions default f32] [--ov-shapes static dynamic]
        [--recipes w8a8 'w8a8-sym:attention_matmuls=qk'] [--variants 'nncf-ov' 'fxquant-*-ov']
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import tempfile
import time
from pathlib import Path

import torch
from _bench import Table, cpu_flags, cpu_line, interleaved_rounds, median_ms, recipe_from_arg, write_json

import fxquant
from fxquant.core.data import load_data
from fxquant.core.models import load_model
from fxquant.export import CompileConfig, compile_for_cpu, plugin_record, to_onnx

MODELS = {"cifar-vit": (1, 32), "cifar-vit-outliers": (1, 32), "timm:vit_small_patch16_224": (1, 8)}


@functools.lru_cache(maxsize=None)  # one session per model: built once, timed in every round
def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency_ms(path: Path, x: torch.Tensor, threads: int, reps: int, warmup: int = 3) -> float:
    sess = _session(path, threads)
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return median_ms(lambda: sess.run(None, feed), warmup=warmup, reps=reps)


def top1(path: Path, batches, threads: int) -> float:
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    correct = n = 0
    for x, y in batches:
        pred = sess.run(None, {name: x.numpy()})[0].argmax(1)
        correct += int((pred == y.numpy()).sum())
        n += len(y)
    return 100.0 * correct / n


def ort_quantize_static(fp32_path: Path, out: Path, calib: torch.Tensor) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calib[i:i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


@functools.lru_cache(maxsize=None)  # one compiled model per (model, configuration, batch), as _session
def _ov_compiled(path: Path, threads: int, shape: str, precision: str, batch: int):
    """``shape``: ``dynamic`` (the IR's dynamic batch) or ``static`` (reshaped to ``batch``);
    ``precision``: ``default`` (the plugin's choice) or ``f32``/``bf16`` (``INFERENCE_PRECISION_HINT``)."""
    return compile_for_cpu(path, CompileConfig(shape, batch, precision), threads=threads)


def ov_latency_ms(path: Path, x: torch.Tensor, threads: int, reps: int, shape: str, precision: str,
                  warmup: int = 3) -> float:
    request = _ov_compiled(path, threads, shape, precision, len(x)).create_infer_request()
    arr = x.numpy()
    return median_ms(lambda: request.infer([arr]), warmup=warmup, reps=reps)


def ov_top1(path: Path, batches, threads: int, shape: str, precision: str) -> float:
    correct = n = 0
    for x, y in batches:
        compiled = _ov_compiled(path, threads, shape, precision, len(x))
        pred = compiled([x.numpy()])[compiled.output(0)].argmax(1)
        correct += int((pred == y.numpy()).sum())
        n += len(y)
    return 100.0 * correct / n


def nncf_quantize(fp32_path: Path, out: Path, calib: torch.Tensor) -> Path:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_path))
    dataset = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
    q = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    ov.save_model(q, str(out), compress_to_fp16=False)
    return out


def int8_layers(path: Path, shape: str, precision: str, batch: int) -> str:
    """What the CPU plugin runs in int8 in one configuration: FullyConnected, Convolution and the
    attention matmuls (``plugin_record``)."""
    record = plugin_record(path, CompileConfig(shape, batch, precision))
    return ", ".join(f"{kind} {i8}/{total}" for kind, (i8, total) in record.int8_summary().items())


def ov_configs(shapes: tuple[str, ...], precisions: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(shape, precision)`` pairs to run; ``default`` and ``f32`` are one configuration where the
    plugin's default inference precision is f32 (CPUs without AVX512-BF16/AMX), so f32 runs once."""
    import openvino as ov

    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    same = (default.get_type_name() if hasattr(default, "get_type_name") else str(default)) == "f32"
    kept = [p for p in precisions if not (same and p == "f32" and "default" in precisions)]
    return [(shape, prec) for shape in shapes for prec in kept]


def bench_model(spec: str, threads: int, tmp: Path, with_top1: bool, recipes: list[str], rounds: int,
                keep: list[str] | None = None, configs: list[tuple[str, str]] = (("dynamic", "default"),)) -> list[dict]:
    info = load_model(spec)
    batches_sizes = MODELS[spec]
    if info.dataset == "cifar10":
        data = load_data(info, "cifar10", calib_images=32, batch_size=500)
        calib = data.calib
        x = next(iter(data.test_batches()))[0]
    else:  # latency only: random inputs of the model's size
        g = torch.Generator().manual_seed(0)
        calib = torch.randn(32, *info.input_size, generator=g)
        x = torch.randn(max(batches_sizes), *info.input_size, generator=g)
        data = None
    ex = info.example_inputs()
    tag = spec.replace(":", "_")
    fp = fxquant.compile(info.model, recipe="fp32", example_inputs=ex, progress=False)
    fp32_onnx = to_onnx(fp, ex, tmp / f"{tag}_fp32.onnx").path
    models = {"fp32-ort": ("ort", fp32_onnx), "fp32-ov": ("ov", fp32_onnx),
              "ort-quantize-static": ("ort", ort_quantize_static(fp32_onnx, tmp / f"{tag}_ortq.onnx", calib)),
              "nncf-ov": ("ov", nncf_quantize(fp32_onnx, tmp / f"{tag}_nncf.xml", calib))}
    for name in recipes:
        q = fxquant.compile(info.model, recipe=recipe_from_arg(name), calib=list(torch.split(calib, 32)),
                            example_inputs=ex, progress=False)
        stem = f"{tag}_{name.replace(':', '_').replace(';', '_')}"
        models[f"fxquant-{name}-ort"] = ("ort", to_onnx(q, ex, tmp / f"{stem}.onnx").path)
        # OpenVINO reads the file exported for it (Q/DQ above reshapes: prepare_for_export's target)
        models[f"fxquant-{name}-ov"] = ("ov", to_onnx(q, ex, tmp / f"{stem}_ov.onnx", target="openvino").path)
    if keep:
        models = {k: v for k, v in models.items() if any(fnmatch.fnmatch(k, pat) for pat in keep)}
    # (model variant, shape, precision): OpenVINO variants once per compile configuration
    variants = [(name, shape, prec) for name, (runtime, _) in models.items()
                for shape, prec in (configs if runtime == "ov" else (("-", "-"),))]
    # top-1 and the int8 layer record first; then latency in interleaved rounds (every variant once
    # per round, best median kept), so that load from elsewhere on the machine hits them alike
    info_rows = {}
    for name, shape, prec in variants:
        runtime, path = models[name]
        acc = None
        if with_top1 and data is not None:
            acc = top1(path, data.test_batches(), threads) if runtime == "ort" else \
                ov_top1(path, data.test_batches(), threads, shape, prec)
        layers = {}
        if runtime == "ov":  # a dynamic compile does not depend on the batch: one record serves both
            one = int8_layers(path, shape, prec, batches_sizes[0]) if shape == "dynamic" else None
            layers = {b: one or int8_layers(path, shape, prec, b) for b in batches_sizes}
        info_rows[(name, shape, prec)] = (acc, layers)

    # the models compiled for top-1 (batch 500) are not timed: release them and their thread pools.
    # A run with them resident measured the CIFAR ViT at batch 1 in 4.0-4.2 ms (load average 2.0 per
    # round), one without in 3.2-3.4 ms (load 1.1), NNCF's model and fxquant's alike
    _ov_compiled.cache_clear()
    _session.cache_clear()

    def measure(runtime: str, path: Path, b: int, shape: str, prec: str) -> float:
        reps = 100 if (b == 1 and info.dataset == "cifar10") else 15 if info.dataset == "cifar10" else 10 if b == 1 else 5
        time.sleep(0.2)  # let the previous variant's worker threads go idle before this one is timed
        if runtime == "ort":
            return latency_ms(path, x[:b], threads, reps)
        # 20 untimed runs at batch 1: each variant starts cold after the others ran; with 3, batch-1
        # medians of one model moved by up to 15 % between runs (an A/B with 20 warm-up runs and 7
        # rounds: within 1 %)
        return ov_latency_ms(path, x[:b], threads, reps, shape, prec, warmup=20 if b == 1 else 3)

    timed = interleaved_rounds({(v, b): functools.partial(measure, *models[v[0]], b, v[1], v[2])
                                for v in variants for b in batches_sizes}, rounds)
    best, loads = timed.best(), timed.loads
    rows = []
    for v in variants:
        (name, shape, prec), runtime = v, models[v[0]][0]
        acc, layers = info_rows[v]
        for b in batches_sizes:
            ms = best[(v, b)]
            rows.append({"model": spec, "variant": name, "runtime": runtime, "shape": shape, "precision": prec,
                         "batch": b, "threads": threads, "ms_best_median": round(ms, 3), "rounds": rounds,
                         "top1": None if acc is None else round(acc, 2), "openvino_int8_layers": layers.get(b, ""),
                         "load_avg_per_round": loads})
            config = "" if runtime == "ort" else f"[{shape}, {prec}]"
            print(f"{spec:28s} {name:28s} {config:20s} batch {b:3d}  {ms:9.2f} ms"
                  + ("" if acc is None else f"  top1 {acc:.2f}") + (f"  [{layers[b]}]" if layers else ""), flush=True)
    return rows


def headline(rows: list[dict]) -> list[dict]:
    """Each model variant at its own best configuration for each batch (the lowest latency)."""
    best: dict = {}
    for r in rows:
        key = (r["model"], r["batch"], r["variant"])
        if key not in best or r["ms_best_median"] < best[key]["ms_best_median"]:
            best[key] = r
    return list(best.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, choices=list(MODELS), help="one model (default: all three)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=["w8a8", "w8a8-sym"],
                    help="fxquant recipes to export (w8a8-sym: w8a8 with symmetric activations)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="glob patterns of the variants to run (default: all), e.g. 'nncf-ov' 'fxquant-*-ov'")
    ap.add_argument("--no-top1", action="store_true", help="latency only")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (the best median is kept)")
    ap.add_argument("--ov-precisions", nargs="+", default=["default", "f32"], choices=["default", "f32", "bf16"],
                    help="OpenVINO inference precisions (INFERENCE_PRECISION_HINT; 'default' is the plugin's choice, "
                         "bf16 where the CPU has it); f32 is skipped where it is the plugin's default")
    ap.add_argument("--ov-shapes", nargs="+", default=["static", "dynamic"], choices=["static", "dynamic"],
                    help="OpenVINO compile shapes: the IR reshaped to the timed batch (static) or its dynamic batch")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import onnxruntime as ort
    import openvino as ov

    torch.set_num_threads(args.threads)
    hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # an element type: "f32", "bf16"
    print(f"{cpu_line()}; onnxruntime {ort.__version__}; OpenVINO {ov.__version__} (inference precision {hint}); "
          f"{args.threads} threads")
    tmp = Path(tempfile.mkdtemp(prefix="fxq_bench_"))
    configs = ov_configs(tuple(args.ov_shapes), tuple(args.ov_precisions))
    print(f"OpenVINO configurations (shape, precision): {configs}")
    rows = []
    for spec in ([args.model] if args.model else list(MODELS)):
        rows += bench_model(spec, args.threads, tmp, not args.no_top1, args.recipes, args.rounds, args.variants, configs)
    print(f"\nload average per round: {rows[0]['load_avg_per_round'] if rows else []}")
    print("\nEach variant at its best configuration (lowest latency) per batch:")
    table = Table([("model", "28s"), ("batch", "5d"), ("variant", "30s"), ("configuration", "20s"), ("ms", "9.2f"),
                   ("top-1", "7.2f"), ("int8 layers", "s")])
    print(table.header())
    top = headline(rows)
    for r in sorted(top, key=lambda r: (r["model"], r["batch"], r["ms_best_median"])):
        config = "-" if r["runtime"] == "ort" else f"{r['shape']}, {r['precision']}"
        print(table.row(r["model"], r["batch"], r["variant"], config, r["ms_best_median"], r["top1"],
                        r["openvino_int8_layers"]))
    write_json(args.json, {"cpu": cpu_flags(), "threads": args.threads, "openvino_precision": str(hint),
                           "openvino_configs": configs, "rows": rows, "headline": top})


if __name__ == "__main__":
    main()
