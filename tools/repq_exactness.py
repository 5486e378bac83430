"""RepQ-ViT exactness figures.

1. Reparameterization alone (every quantizer off afterwards) changes the FP32 output by
   max|Δ| / max|y| (relative) on the CIFAR ViT (32 real images), random-init DeiT-S, Swin-T and a
   small HF ViT.
2. On the LayerNorm → two Linears toy with planted channel outliers: the fraction of identical
   codes between the per-channel-quantized original and the per-tensor-quantized reparameterized
   graph, and the output difference, with integer (default) and fractional (RepQ-faithful) z̃.

    python tools/repq_exactness.py [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
from _bench import write_json

import fxquant
from fxquant.core.data import load_data
from fxquant.core.models import load_model
from fxquant.core.quant import PctMSE, QuantSpec
from fxquant.core.testing import codes_and_output, family_model, float_rel_change, outlier_ln_two_linears
from fxquant.passes import AnnotateRepQ, AnnotateUniform, Calibrate, InsertQuantizers, ReparameterizeLayerNorm


def _ln_pipeline(reparam: ReparameterizeLayerNorm | None):
    """The pipeline of tests/passes/test_repq.py's LayerNorm → two Linears toy tests."""
    act = QuantSpec(bits=4, estimator=PctMSE())
    passes = [AnnotateUniform(act=act), AnnotateRepQ(stem_input_bits=None, log_softmax=False), InsertQuantizers(), Calibrate()]
    return passes + ([reparam] if reparam else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {"float_rel_change": {}, "toy_codes": {}}
    info = load_model("cifar-vit")
    data = load_data(info, "cifar10", calib_images=32, limit=32)
    x = next(iter(data.test_batches()))[0]
    q = fxquant.compile(info.model, recipe="repq-w4a4", calib=[data.calib], progress=False)
    out["float_rel_change"]["cifar-vit"] = float_rel_change(info.model, q, x)
    g = torch.Generator().manual_seed(0)
    for name, family in [("deit_small_patch16_224", "deit_small_patch16_224"),
                         ("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224"),
                         ("hf_vit (small ViTConfig)", "hf_vit")]:
        model, res = family_model(family)
        q = fxquant.compile(model, recipe="repq-w4a4", calib=[torch.randn(4, 3, res, res, generator=g)], progress=False)
        out["float_rel_change"][name] = float_rel_change(model, q, torch.randn(2, 3, res, res, generator=g))
    model = outlier_ln_two_linears()
    g = torch.Generator().manual_seed(7)
    calib, xt = [torch.randn(64, 7, 12, generator=g)], torch.randn(32, 7, 12, generator=g)
    codes_c, y_c, _ = codes_and_output(fxquant.compile(model, passes=_ln_pipeline(None), calib=calib, progress=False), xt)
    for rnd in (True, False):
        q = fxquant.compile(model, passes=_ln_pipeline(ReparameterizeLayerNorm(round_target_zero_point=rnd)), calib=calib,
                            progress=False)
        codes_t, y_t, fq = codes_and_output(q, xt)
        out["toy_codes"]["integer z̃" if rnd else "fractional z̃"] = {
            "z_target": fq.zero_point.item(), "codes_equal_fraction": (codes_t == codes_c).float().mean().item(),
            "output_rel_diff": ((y_c - y_t).abs().max() / y_c.abs().max()).item()}
    for k, v in out["float_rel_change"].items():
        print(f"reparameterization only, {k:32s} max|Δy|/max|y| = {v:.2e}")
    for k, v in out["toy_codes"].items():
        codes = (f"codes equal {100 * v['codes_equal_fraction']:.2f} %" if k.startswith("integer")
                 else "codes shifted by frac(z_c - z̃): not comparable")
        print(f"LN->2 Linears toy, {k:13s}: z̃={v['z_target']:.3f}  {codes}  output rel diff {v['output_rel_diff']:.2e}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
