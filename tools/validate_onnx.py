"""Validate ONNX QDQ exports against the PyTorch fake-quant models in onnxruntime (default) or
OpenVINO (``--runtime openvino``: the IR of ``to_openvino``, CPU plugin with f32 inference precision
so that the figures measure the export, not bf16 arithmetic; ``--ov-precision bf16`` for the default
on CPUs that have it).

For each recipe on the CIFAR ViT: export, run every test image through onnxruntime and through
the fake-quant GraphModule, and report max/mean |Δlogit|, the share of images with the same
prediction, and both top-1 figures. ``fp32`` gives the float noise floor of onnxruntime vs PyTorch.
Random-init timm models at 224 (``--timm``) are validated on real ImageNet-sample images.

    python tools/validate_onnx.py [--runtime onnxruntime|openvino] [--recipes w8a8,repq-w4a4,...] [--limit N]
                                  [--timm deit_small_patch16_224,...] [--json out.json]

``igq-w4a4`` is compiled with ``group_mode="contiguous"`` (``EXPORT_OPTIONS``): IGQ's default
instance-aware groups have no QDQ form and the exporter refuses them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _bench import write_json

import fxquant
from fxquant.core.data import load_data
from fxquant.core.models import load_model, shared_dir
from fxquant.export import run_onnx, to_onnx, to_openvino

# compile options a recipe needs to be exportable (IGQ: contiguous channel groups, not instance-aware)
EXPORT_OPTIONS = {"igq-w4a4": {"group_mode": "contiguous"}}


def _runner(q, example_inputs, path: Path, runtime: str, ov_precision: str):
    """Export ``q`` for ``runtime`` at ``path`` (suffix chosen here) and return ``run(x) -> logits``."""
    if runtime == "onnxruntime":
        res = to_onnx(q, example_inputs, path.with_suffix(".onnx"))
        return lambda x: run_onnx(res.path, (x,))
    import openvino as ov

    res = to_openvino(q, example_inputs, path.with_suffix(".xml"))
    compiled = ov.Core().compile_model(str(res.xml), "CPU", {"INFERENCE_PRECISION_HINT": ov_precision})
    return lambda x: torch.from_numpy(compiled([x.numpy()])[compiled.output(0)].copy())


def _compare(q, run, batches):
    n = agree = correct_q = correct_o = 0
    max_d = sum_d = 0.0
    for x, y in batches:
        with torch.no_grad():
            a = fxquant.core.graph.logits_of(q(x))
        b = run(x)
        d = (a - b).abs()
        max_d = max(max_d, d.max().item())
        sum_d += d.mean().item() * len(x)
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        correct_q += int((a.argmax(1) == y).sum())
        correct_o += int((b.argmax(1) == y).sum())
        n += len(x)
    return {"images": n, "max_abs_diff": max_d, "mean_abs_diff": sum_d / n, "same_prediction": 100 * agree / n,
            "top1_pytorch": 100 * correct_q / n, "top1_onnx": 100 * correct_o / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="fp32,w8a8,repq-w4a4,bitlog2-w4a4,repq-qwt-w4a4,igq-w4a4")
    ap.add_argument("--limit", type=int, default=None, help="CIFAR test images (default: all)")
    ap.add_argument("--timm", default="deit_small_patch16_224,swin_tiny_patch4_window7_224")
    ap.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino"))
    ap.add_argument("--ov-precision", default="f32", choices=("f32", "bf16"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fxq_onnx_"))
    info = load_model("cifar-vit")
    for recipe in [r for r in args.recipes.split(",") if r]:  # --recipes "" : the timm models only
        opts = EXPORT_OPTIONS.get(recipe, {})
        r = fxquant.get_recipe(recipe, **opts)
        data = load_data(info, "cifar10", calib_images=r.calib_images, limit=args.limit, batch_size=500)
        t0 = time.perf_counter()
        q = fxquant.compile(info.model, recipe=recipe, calib=list(torch.split(data.calib, 32)) or None,
                            example_inputs=info.example_inputs(), progress=False, **opts)
        run = _runner(q, info.example_inputs(), tmp / f"cifar_{recipe}", args.runtime, args.ov_precision)
        row = {"model": "cifar-vit", "recipe": recipe, "options": opts, "runtime": args.runtime,
               "export_seconds": time.perf_counter() - t0, **_compare(q, run, data.test_batches())}
        rows.append(row)
        print(f"{row['model']:28s} {recipe:15s} max|Δ| {row['max_abs_diff']:.4f}  mean|Δ| {row['mean_abs_diff']:.5f}  "
              f"same pred {row['same_prediction']:.2f} %  top1 torch {row['top1_pytorch']:.2f} {args.runtime} "
              f"{row['top1_onnx']:.2f}",
              flush=True)
    sample = shared_dir() / "data" / "imagenet-sample" / "val" if shared_dir() else None
    for name in [n for n in args.timm.split(",") if n]:
        tinfo = load_model(f"timm:{name}")
        if sample is not None and sample.is_dir():
            data = load_data(tinfo, str(sample), calib_images=32, limit=64)
            batches = list(data.test_batches())
            calib = [data.calib]
        else:  # no images here: random inputs
            g = torch.Generator().manual_seed(0)
            calib = [torch.randn(8, *tinfo.input_size, generator=g)]
            batches = [(torch.randn(16, *tinfo.input_size, generator=g), torch.zeros(16, dtype=torch.long))]
        for recipe in ("w8a8", "repq-w4a4"):
            q = fxquant.compile(tinfo.model, recipe=recipe, calib=calib, example_inputs=tinfo.example_inputs(), progress=False)
            run = _runner(q, tinfo.example_inputs(), tmp / f"{name}_{recipe}", args.runtime, args.ov_precision)
            row = {"model": f"timm:{name} (random init)", "recipe": recipe, "runtime": args.runtime,
                   **_compare(q, run, batches)}
            rows.append(row)
            print(f"{row['model']:28s} {recipe:15s} max|Δ| {row['max_abs_diff']:.4f}  mean|Δ| {row['mean_abs_diff']:.5f}  "
                  f"same pred {row['same_prediction']:.2f} %  ({row['images']} images)", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
