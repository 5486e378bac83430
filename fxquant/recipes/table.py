"""The named recipes (``fxquant recipes`` lists them): each a family with its defaults and stages.

A new method is a few lines: its passes registered with ``register_pass``, then e.g.::

    register_recipe("mymethod-w4a4", RepQRecipe, "…", w_bits=4, a_bits=4,
                    stages=(Stage(MyPass(), after="repq_reparam"),))
"""

from __future__ import annotations

from ..passes import BitLog2Attention, GroupQuant, MLPReconstruct, QwTCompensate
from .base import Stage, register_recipe
from .families import APHQRecipe, FloatRecipe, IGQRecipe, PlatformRecipe, RepQRecipe, UniformRecipe


def _bitlog2(scheme: str = "half17") -> Stage:
    """BitLog2 attention maps: replaces the attention-map quantizer chosen by ``annotate_repq``."""
    return Stage(BitLog2Attention(scheme=scheme), after="annotate_repq")


def _qwt() -> tuple[Stage, ...]:
    """QwT compensation after every block, regressed on all the recipe's calibration images."""
    return (Stage(QwTCompensate(max_images=None)),)


# QwT recipes: quantizers calibrate on the first 32 images, the regression on all 512
_QWT_CALIB = {"calib_images": 512, "options": {"calibrate": {"max_images": 32}}}

register_recipe("fp32", FloatRecipe, "no quantization (the captured float graph)")
register_recipe("aphq-mr", FloatRecipe, "APHQ-ViT stage A only: MLP reconstruction (GELU→ReLU, fc1/fc2 retrained per block "
                "with the APH-weighted loss) on 1024 images, no quantization (the quantized recipes: aphq-w4a4/w3a3)",
                calib_images=1024, stages=(Stage(MLPReconstruct()),))
register_recipe("w8a8", UniformRecipe, "uniform W8A8: symmetric per-channel weights, asymmetric per-tensor activations (PctMSE)",
                w_bits=8, a_bits=8, w_symmetric=True)
register_recipe("w8a8-sym", UniformRecipe, "uniform W8A8 with symmetric activations too: the Q/DQ pattern OpenVINO's CPU "
                "plugin runs wholly in int8, attention matmuls included; 7-bit stem weights (overflow_fix=stem) so that CPUs "
                "without VNNI do not saturate (tools/bench_cpu.py)",
                w_bits=8, a_bits=8, w_symmetric=True, a_symmetric=True, overflow_fix="stem")
register_recipe("w8a8-ov", UniformRecipe, "uniform W8A8 for OpenVINO's CPU plugin: symmetric activations, q·kᵀ quantized and "
                "softmax·v left in float (NNCF's transformer scheme), 7-bit stem weights (overflow_fix=stem, NNCF's default); "
                "export with --format openvino (tools/bench_cpu.py)",
                w_bits=8, a_bits=8, w_symmetric=True, a_symmetric=True, attention_matmuls=("qk",), overflow_fix="stem")
register_recipe("w6a6", UniformRecipe, "uniform W6A6: asymmetric per-channel weights and per-tensor activations (PctMSE)",
                w_bits=6, a_bits=6)
register_recipe("w4a4", UniformRecipe, "uniform W4A4: asymmetric per-channel weights and per-tensor activations (PctMSE)",
                w_bits=4, a_bits=4)

register_recipe("aphq-w4a4", APHQRecipe, "APHQ-ViT W4A4: MLP reconstruction + joint-grid calibration with per-head attention "
                "quantizers and LayerNorm reparameterization + AdaRound/QDrop block reconstruction with the APH loss "
                "(--set iters=N per block; paper 20000)", w_bits=4, a_bits=4)
register_recipe("aphq-w3a3", APHQRecipe, "APHQ-ViT W3A3 (as aphq-w4a4 at 3 bits; ub quantile 0.99)", w_bits=3, a_bits=3)
register_recipe("aphq-bitlog2-w4a4", APHQRecipe, "APHQ-ViT W4A4 with BitLog2 (half17) attention maps in place of the per-head "
                "uniform A quantizer", w_bits=4, a_bits=4, stages=(Stage(BitLog2Attention(), after="annotate_aphq"),))
register_recipe("aphq-qwt-w4a4", APHQRecipe, "APHQ-ViT W4A4 + QwT block compensation after block reconstruction (512 of the "
                "1024 images)", w_bits=4, a_bits=4, stages=(Stage(QwTCompensate(max_images=512), after="block_reconstruct"),))
register_recipe("igq-w4a4", IGQRecipe, "IGQ-ViT W4A4: per-row weights; 8 instance-aware groups on every Linear input and on "
                "attention rows (k-means group ranges on 32 images); --set allocate=true picks G per layer under the BOP "
                "budget of G = 8", w_bits=4, a_bits=4)
register_recipe("igq-w6a6", IGQRecipe, "IGQ-ViT W6A6 (as igq-w4a4 at 6 bits)", w_bits=6, a_bits=6)
register_recipe("igq-qwt-w4a4", IGQRecipe, "IGQ-ViT W4A4 + QwT block compensation (32 + 512 calibration images)",
                w_bits=4, a_bits=4, stages=_qwt(), **_QWT_CALIB)
register_recipe("repq-igq-w4a4", RepQRecipe, "RepQ-ViT W4A4 + IGQ-ViT groups: LayerNorm reparameterization at the post-LN "
                "Linears (qkv, fc1, head), 8 instance-aware groups on the other Linear inputs (proj, fc2) and on attention "
                "rows", w_bits=4, a_bits=4, stages=(Stage(GroupQuant(), after="annotate_repq"),))
register_recipe("platform", PlatformRecipe, "the transformer-quantization platform's defaults (fxquant platform): percentile "
                "[Q(eps), Q(1-eps)], 32 images, --channel_wise per-row weights and per-channel Linear inputs, n_groups "
                "contiguous groups, head/stem float (its --head_stem_8bit)", n_bits=4)
register_recipe("repq-w4a4", RepQRecipe, "RepQ-ViT W4A4: LayerNorm scale reparameterization + log√2 softmax + 8-bit stem input",
                w_bits=4, a_bits=4)
register_recipe("repq-w6a6", RepQRecipe, "RepQ-ViT W6A6: LayerNorm scale reparameterization + log√2 softmax + 8-bit stem input",
                w_bits=6, a_bits=6)
register_recipe("repq-w8a8", RepQRecipe, "RepQ-ViT passes at W8A8 (reparameterization where legal + log√2 softmax)",
                w_bits=8, a_bits=8)
register_recipe("repq-w8a8-sym", RepQRecipe, "RepQ-ViT LayerNorm reparameterization at W8A8 with symmetric weights and "
                "activations and a uniform softmax quantizer: the form OpenVINO's CPU plugin runs wholly in int8 (both "
                "attention matmuls), for models with post-LayerNorm outliers; 7-bit stem weights (overflow_fix=stem) "
                "(tools/bench_cpu.py)",
                w_bits=8, a_bits=8, w_symmetric=True, a_symmetric=True, overflow_fix="stem",
                options={"annotate_repq": {"log_softmax": False}})
register_recipe("bitlog2-w4a4", RepQRecipe, "BitLog2 W4A4: RepQ-ViT + integer log2 attention maps (--set scheme=half17|half16|"
                "single17|single16|sqrt2_17|sqrt2_16)", w_bits=4, a_bits=4, stages=(_bitlog2(),))
register_recipe("repq-qwt-w4a4", RepQRecipe, "RepQ-ViT W4A4 + QwT block compensation (32 + 512 calibration images)",
                w_bits=4, a_bits=4, stages=_qwt(), **_QWT_CALIB)
register_recipe("repq-qwt-w6a6", RepQRecipe, "RepQ-ViT W6A6 + QwT block compensation (32 + 512 calibration images)",
                w_bits=6, a_bits=6, stages=_qwt(), **_QWT_CALIB)
register_recipe("bitlog2-qwt-w4a4", RepQRecipe, "BitLog2 (half17) W4A4 + QwT block compensation (32 + 512 calibration images)",
                w_bits=4, a_bits=4, stages=(_bitlog2(), *_qwt()), **_QWT_CALIB)
