"""QwT — Quantization without Tears (Fu et al., CVPR 2025; docs/methods.md, QwT) as a graph pass.

After each transformer block ``B_l`` of an already calibrated quantized model, a linear node on
the block input cancels the block's quantization error in closed form:

* blocks are found from structure (``match.find_blocks``) or given as FQN globs;
* block by block, in order: ``X`` = the block input computed by the already compensated quantized
  prefix; ``Y_fp`` = the block with its own quantizers off, ``Y_q`` = with them on, same ``X``;
* ``X̃ᵀX̃`` and ``X̃ᵀ(Y_fp − Y_q)`` (``X̃ = [X, 1]``, one row per token) accumulate in float64 over
  the calibration batches — memory is independent of the number of images — and
  ``[W; bᵀ] = argmin ‖X̃[W; bᵀ] − ΔY‖²`` (least squares, no regularisation as in the reference);
* when ``R² > 0`` (and ``l ≥ start_block``) the graph becomes ``out = B_l(X) + linear(X, W, b)``;
  the next block's input is computed with it in place.

The compensation is a ``fxquant.core.quant.CompensationLinear`` module under ``qwt.<block>`` (fp16 compute by
default, as the reference; fp32 or 8-bit weights as options), saved with the artifact.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from fxquant.core import match
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.graph import extract_subgraph, input_values, subgraph_args
from fxquant.core.meta import ROLE
from fxquant.core.pipeline import SHAPES, Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import COMPUTE_DTYPES, CompensationLinear, FakeQuantize, QuantConv2d, QuantLinear, quantizer_state

COMP_ROOT = "qwt"


class LinearRegressionAccumulator:
    """Streams the normal equations of ``Y ≈ X W + b`` in float64: ``X̃ᵀX̃``, ``X̃ᵀY``, ``ΣY``,
    ``ΣY²`` and the row count. Memory is O((C_in + 1)·(C_in + C_out)), whatever the rows."""

    def __init__(self, c_in: int, c_out: int):
        self.xtx = torch.zeros(c_in + 1, c_in + 1, dtype=torch.float64)
        self.xty = torch.zeros(c_in + 1, c_out, dtype=torch.float64)
        self.sum_y = torch.zeros(c_out, dtype=torch.float64)
        self.sum_y2 = torch.zeros(c_out, dtype=torch.float64)
        self.rows = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        self.xtx += xt.T @ xt
        self.xty += xt.T @ y
        self.sum_y += y.sum(0)
        self.sum_y2 += (y * y).sum(0)
        self.rows += x.shape[0]

    def merge(self, other: "LinearRegressionAccumulator") -> "LinearRegressionAccumulator":
        """Add another accumulator's sums (in place; the same float64 additions as ``update``)."""
        for k in ("xtx", "xty", "sum_y", "sum_y2"):
            getattr(self, k).add_(getattr(other, k))
        self.rows += other.rows
        return self

    def solve(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(W [C_out, C_in], b [C_out], R²)``; R² = 0 when Y has no variance."""
        beta = torch.linalg.lstsq(self.xtx, self.xty, driver="gelsd").solution
        sse = (self.sum_y2.sum() - 2 * (beta * self.xty).sum() + (beta * (self.xtx @ beta)).sum()).item()
        sst = (self.sum_y2 - self.sum_y**2 / max(self.rows, 1)).sum().item()
        r2 = 1.0 - max(sse, 0.0) / sst if sst > 0 else 0.0
        return beta[:-1].T.contiguous(), beta[-1].contiguous(), r2


def _block_quantizers(gm: fx.GraphModule, blk: match.Block, modules: dict) -> list[FakeQuantize]:
    out = []
    for n in blk.nodes:
        if n.op != "call_module":
            continue
        mod = modules.get(n.target)
        if isinstance(mod, FakeQuantize):
            out.append(mod)
        elif isinstance(mod, (QuantLinear, QuantConv2d)):
            out.append(mod.weight_fake_quant)
    return out


def _insert_compensation(gm: fx.GraphModule, blk: match.Block, comp: CompensationLinear) -> str:
    target = f"{COMP_ROOT}.{blk.fqn.replace('.', '_')}"
    if COMP_ROOT not in dict(gm.named_modules()):
        gm.add_submodule(COMP_ROOT, nn.Module())
    gm.add_submodule(target, comp)
    out = blk.output
    with gm.graph.inserting_after(out):
        cnode = gm.graph.call_module(target, (blk.input,))
    with gm.graph.inserting_after(cnode):
        added = gm.graph.call_function(operator.add, (out, cnode))
    out.replace_all_uses_with(added, delete_user_cb=lambda u: u is not added)
    for n in (cnode, added):
        n.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "tensor_meta", "val")})
    cnode.meta[ROLE] = "qwt"
    gm.recompile()
    return target


@register_pass
@dataclass(frozen=True)
class QwTCompensate(Pass):
    """QwT: after each transformer block, a least-squares linear layer on the block input cancels its quantization error.

    Args:
        max_images: calibration images for the regression (QwT: 512).
        start_block: compensate blocks with index >= start_block only.
        comp_dtype: ``"float16"`` (reference) or ``"float32"``.
        comp_weight_bits: quantize the compensation weights (per row, symmetric), e.g. 8.
        blocks: FQN globs of the block modules (default: found from the graph structure).
    """

    name = "qwt"
    requires = ("calibrated", SHAPES)
    provides = ("qwt_compensated",)

    max_images: int | None = 512
    start_block: int = 0
    comp_dtype: str = "float16"
    comp_weight_bits: int | None = None
    blocks: tuple[str, ...] = ()

    def __post_init__(self):
        if self.comp_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"qwt: comp_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.comp_dtype!r}")
        if self.comp_weight_bits is not None and not 2 <= self.comp_weight_bits <= 8:
            raise ConfigError(f"qwt: comp_weight_bits must be in 2..8 or None, got {self.comp_weight_bits}")

    def _find_blocks(self, gm: fx.GraphModule, modules: dict) -> list[match.Block]:
        if not self.blocks:
            return match.find_blocks(gm, modules)
        out = []
        for fqn in match.modules_matching(gm, self.blocks):
            blk = match.block_region(gm, fqn, modules)
            if blk is None:
                raise PassError(f"qwt: module '{fqn}' (matched by blocks={self.blocks}) is not a single-input, "
                                f"single-output region; pick the transformer block modules")
            out.append(blk)
        return out

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        blocks = self._find_blocks(gm, modules)
        if not blocks:
            raise PassError("qwt: found no transformer block (one attention + an MLP); pass blocks=('<fqn glob>',)")
        if ctx.replay:
            applied = set(ctx.record().get("applied", []))
            for blk in blocks:
                if blk.fqn in applied:
                    c = tensor_channels(blk)
                    _insert_compensation(gm, blk, CompensationLinear(c[0], c[1], self.comp_dtype, self.comp_weight_bits))
            return PassResult(gm, summary=f"replayed {len(applied)} compensations", record=ctx.record())
        calib = ctx.require_calib(self.name)
        if calib.is_loop:
            raise PassError("qwt needs calib as an iterable of batches (it runs each block on each batch itself), "
                            "not a forward_loop callable")
        r2s: dict[str, float] = {}
        norms: dict[str, dict] = {}
        applied: list[str] = []
        for idx, blk_at_start in enumerate(tqdm(blocks, desc="qwt blocks", disable=not ctx.progress, leave=False)):
            # the graph changed after earlier compensations: re-resolve this block's region
            modules = match.modules_of(gm)
            blk = match.block_region(gm, blk_at_start.fqn, modules)
            if idx < self.start_block:
                continue
            c_in, c_out = tensor_channels(blk)
            block_inputs = [blk.input, *blk.extra_inputs]
            prefix = extract_subgraph(gm, [], block_inputs)
            body = extract_subgraph(gm, block_inputs, [blk.output])  # may also read graph inputs (masks)
            qs = _block_quantizers(gm, blk, modules)
            acc = LinearRegressionAccumulator(c_in, c_out)

            def batch_sums(batch, prefix=prefix, body=body, block_inputs=block_inputs, qs=qs,
                           c_in=c_in, c_out=c_out) -> LinearRegressionAccumulator:
                # values by source node name: the graph inputs, then the block inputs the prefix computes
                values = input_values(gm, batch)
                xs = prefix(*subgraph_args(prefix, values))
                xs = xs if isinstance(xs, tuple) else (xs,)
                values.update(zip((n.name for n in block_inputs), xs))
                body_args = subgraph_args(body, values)
                with quantizer_state(qs, fake_quant=False):
                    y_fp = body(*body_args)
                y_q = body(*body_args)
                part = LinearRegressionAccumulator(c_in, c_out)
                part.update(xs[0], y_fp - y_q)
                return part

            # one batch's sums at a time, added in batch order (sharded across torch.distributed ranks)
            calib.fold_batches(batch_sums, acc.merge, max_images=self.max_images)
            if acc.rows == 0:
                raise PassError("qwt: the calibration data is empty")
            w, b, r2 = acc.solve()
            r2s[blk.fqn] = round(r2, 6)
            norms[blk.fqn] = {"w_max": w.abs().max().item(), "b_max": b.abs().max().item(), "rows": acc.rows}
            if r2 > 0:
                comp = CompensationLinear(c_in, c_out, self.comp_dtype, self.comp_weight_bits)
                with torch.no_grad():
                    comp.weight.copy_(w.to(comp.weight.dtype))
                    comp.bias.copy_(b.to(comp.bias.dtype))
                if comp.weight_fake_quant is not None:
                    comp.weight_fake_quant.calibrate_from(comp.weight.float())
                    comp.weight_fake_quant.fake_quant_enabled = True
                _insert_compensation(gm, blk, comp)
                applied.append(blk.fqn)
        summary = f"{len(applied)}/{len(blocks)} blocks compensated; R² " + ", ".join(f"{v:.3f}" for v in r2s.values())
        return PassResult(gm, summary=summary, record={"applied": applied, "r2": r2s, "solution": norms})


def tensor_channels(blk: match.Block) -> tuple[int, int]:
    si, so = match.tensor_shape(blk.input), match.tensor_shape(blk.output)
    if not si or not so or si[-1] <= 0 or so[-1] <= 0:
        raise PassError(f"qwt: no channel size recorded for block '{blk.fqn}'; compile with example_inputs")
    return si[-1], so[-1]
