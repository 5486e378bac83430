"""onnxruntime CPU latency and top-1: FP32 vs fxquant W8A8 vs onnxruntime's own quantize_static.

Variants, all from the same captured FP32 graph:
  * ``fp32``: fxquant's ``fp32`` recipe exported to ONNX;
  * ``fxquant-w8a8``: the ``w8a8`` recipe exported as QDQ (``fxquant.export.to_onnx``);
  * ``ort-quantize-static``: ``onnxruntime.quantization.quantize_static`` on the FP32 ONNX model
    (after ``quant_pre_process``, as onnxruntime recommends): QDQ format, per-channel weights,
    its default calibrator (MinMax), the same 32 calibration images.

Latency: median of ``--reps`` runs after warm-up runs, ``--threads`` intra-op threads, batch 1 and
32 (CIFAR ViT) or 1 and 8 (224-pixel model). Top-1 on all CIFAR-10 test images (CIFAR ViT only).

    python tools/bench_onnx.py [--model cifar-vit|timm:vit_small_patch16_224] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fxquant
from fxquant.data import load_data
from fxquant.export import to_onnx
from fxquant.models import load_model

MODELS = {"cifar-vit": (1, 32), "timm:vit_small_patch16_224": (1, 8)}


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    names = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return " ".join(names) or "no AVX2"


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency_ms(path: Path, x: torch.Tensor, threads: int, reps: int, warmup: int = 3) -> float:
    sess = _session(path, threads)
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


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


def bench_model(spec: str, threads: int, tmp: Path, with_top1: bool) -> list[dict]:
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
    fp = fxquant.compile(info.model, recipe="fp32", example_inputs=ex, progress=False)
    q = fxquant.compile(info.model, recipe="w8a8", calib=list(torch.split(calib, 32)), example_inputs=ex, progress=False)
    tag = spec.replace(":", "_")
    paths = {"fp32": to_onnx(fp, ex, tmp / f"{tag}_fp32.onnx").path,
             "fxquant-w8a8": to_onnx(q, ex, tmp / f"{tag}_w8a8.onnx").path}
    paths["ort-quantize-static"] = ort_quantize_static(paths["fp32"], tmp / f"{tag}_ortq.onnx", calib)
    rows = []
    for variant, path in paths.items():
        acc = top1(path, data.test_batches(), threads) if (with_top1 and data is not None) else None
        for b in batches_sizes:
            reps = 200 if (b == 1 and info.dataset == "cifar10") else 30 if info.dataset == "cifar10" else 20 if b == 1 else 10
            ms = latency_ms(path, x[:b], threads, reps)
            rows.append({"model": spec, "variant": variant, "batch": b, "threads": threads, "ms_median": round(ms, 3),
                         "top1": None if acc is None else round(acc, 2)})
            print(f"{spec:28s} {variant:20s} batch {b:3d}  {ms:9.2f} ms" + ("" if acc is None else f"  top1 {acc:.2f}"),
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, choices=list(MODELS), help="one model (default: both)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-top1", action="store_true", help="latency only")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_flags()}; onnxruntime {ort.__version__}; {args.threads} threads")
    tmp = Path(tempfile.mkdtemp(prefix="fxq_bench_"))
    rows = []
    for spec in ([args.model] if args.model else list(MODELS)):
        rows += bench_model(spec, args.threads, tmp, not args.no_top1)
    print()
    print(f"{'model':28s} {'batch':>5}  {'fp32 ms':>9}  {'fxq w8a8':>9}  {'ort q':>9}  {'w8a8/fp32':>9}  {'w8a8/ortq':>9}")
    for spec in dict.fromkeys(r["model"] for r in rows):
        for b in MODELS[spec]:
            ms = {r["variant"]: r["ms_median"] for r in rows if r["model"] == spec and r["batch"] == b}
            print(f"{spec:28s} {b:5d}  {ms['fp32']:9.2f}  {ms['fxquant-w8a8']:9.2f}  {ms['ort-quantize-static']:9.2f}  "
                  f"{ms['fp32'] / ms['fxquant-w8a8']:8.2f}x  {ms['ort-quantize-static'] / ms['fxquant-w8a8']:8.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
