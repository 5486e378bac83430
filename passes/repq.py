"""RepQ-ViT (Li et al., ICCV 2023) as two passes; docs/methods.md, RepQ-ViT.

``AnnotateRepQ`` (decide, before ``InsertQuantizers``) rewrites the uniform annotation:
  * the input of the Linears behind each foldable LayerNorm gets a *per-channel* PctMSE quantizer
    (one, shared by all those Linears: HF's separate q/k/v);
  * the softmax output feeding A·v gets the log√2 quantizer;
  * the patch-embedding input gets 8 bits.

``ReparameterizeLayerNorm`` (after ``Calibrate``) folds each per-channel ``(s_c, z_c)`` into the
LayerNorm affine and the consuming Linears, leaving a layer-wise ``(s̃, z̃)`` quantizer:
``s̃ = mean s_c``, ``z̃ = mean z_c`` (rounded by default), ``r = s/s̃``, ``b = -(z - z̃)·s̃``;
``γ' = γ/r``, ``β' = β/r - b``, ``W' = W·diag(r)``, ``bias' = bias + W'b`` (created if absent),
then re-derives the weight quantizers of the changed Linears from ``W'``.
With an integer ``z̃`` the layer-wise quantizer emits exactly the codes of the per-channel one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fxquant.core import match
from fxquant.core.errors import PassError
from fxquant.core.meta import REPQ_SITE, ROLE, input_specs, set_input_spec
from fxquant.core.pipeline import SHAPES, Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import FakeQuantize, PctMSE, PerAxis, PerTensor, QuantSpec

from .calibrate import calibrate_weights, observe


def _ln_params(gm: fx.GraphModule, ln: fx.Node, modules: dict) -> tuple[nn.Module, str, str]:
    """(owner module, weight attr, bias attr) holding the LayerNorm affine, creating it if absent."""
    if ln.op == "call_module":
        mod = modules[ln.target]
        if mod.weight is None:
            c = mod.normalized_shape[0]
            mod.weight = nn.Parameter(torch.ones(c))
            mod.bias = nn.Parameter(torch.zeros(c))
        return mod, "weight", "bias"
    # call_function layer_norm(x, shape, weight, bias, eps): weight/bias are get_attr nodes
    args = list(ln.args) + [None] * (4 - len(ln.args))
    w, b = args[2] if len(ln.args) > 2 else ln.kwargs.get("weight"), args[3] if len(ln.args) > 3 else ln.kwargs.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(b, fx.Node) and b.op == "get_attr"):
        raise PassError(f"repq_reparam: LayerNorm '{ln.name}' has no get_attr weight/bias to fold into; give it an affine")
    owner_w, _, wname = w.target.rpartition(".")
    owner_b, _, bname = b.target.rpartition(".")
    if owner_w != owner_b:
        raise PassError(f"repq_reparam: LayerNorm '{ln.name}' weight and bias live in different modules")
    return (gm.get_submodule(owner_w) if owner_w else gm), wname, bname


@register_pass
@dataclass(frozen=True)
class AnnotateRepQ(Pass):
    """RepQ-ViT annotation: per-channel post-LayerNorm Linear inputs, log√2 softmax output, 8-bit patch-embedding input.

    Args:
        reparameterize: per-channel post-LayerNorm quantizers at foldable sites.
        log_softmax: log√2 quantizer on the softmax → A·v edge.
        stem_input_bits: bits of the patch-embedding input (RepQ: 8); None leaves it.
        head_site: also fold the final LayerNorm → classifier head (RepQ's code does not; with
            planted or real outliers there, it matters).
    """

    name = "annotate_repq"
    requires = ("annotated", SHAPES)
    provides = ("repq_annotated",)

    reparameterize: bool = True
    log_softmax: bool = True
    stem_input_bits: int | None = 8
    head_site: bool = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        heads = set(match.head_layers(gm, modules))
        folded, skipped = [], {}
        if self.reparameterize:
            for site in match.layer_norm_sites(gm, modules):
                reason = site.reason
                if site.legal and not self.head_site and any(lin in heads for lin in site.linears):
                    reason = "final LayerNorm -> head (head_site=False)"
                if site.legal and not reason:
                    specs = [input_specs(lin).get(0) for lin in site.linears]
                    if any(s is None for s in specs) or len(set(specs)) != 1:
                        reason = "its Linear consumers are not all quantized with one input spec"
                    elif len({lin.args[0] for lin in site.linears}) != 1:
                        # e.g. distilled DeiT's two heads on the class and distillation tokens: each gets
                        # its own quantizer, and one LayerNorm cannot fold two sets of scales
                        reason = "its Linears read different values (slices) of the LayerNorm output"
                if reason:
                    skipped[site.name] = reason
                    continue
                base = specs[0]
                per_channel = base.with_(granularity=PerAxis(-1), estimator=PctMSE(), zero_in_range=False)
                for lin in site.linears:
                    set_input_spec(lin, 0, per_channel)
                site.ln.meta[REPQ_SITE] = {"linears": [lin.name for lin in site.linears], "layerwise_spec": base}
                folded.append(site.name)
        n_log = 0
        if self.log_softmax:
            for att in match.find_attention(gm, modules):
                spec = input_specs(att.av).get(0)
                if spec is None:
                    continue
                set_input_spec(att.av, 0, QuantSpec(bits=spec.bits, scheme="log_sqrt2", estimator=PctMSE()))
                n_log += 1
        n_stem = 0
        if self.stem_input_bits is not None:
            for stem in match.stem_layers(gm, modules):
                spec = input_specs(stem).get(0)
                if spec is not None:
                    set_input_spec(stem, 0, spec.with_(bits=self.stem_input_bits))
                    stem.meta[ROLE] = "stem"
                    n_stem += 1
        if ctx.replay and ctx.record() and folded != ctx.record().get("sites"):
            raise PassError(f"annotate_repq: replay found LayerNorm sites {folded} but the artifact folded "
                            f"{ctx.record().get('sites')}; load it with the model and input size it was made with")
        summary = f"{len(folded)} LayerNorm sites per-channel, {len(skipped)} left alone; {n_log} log√2 softmax; " \
                  f"{n_stem} stem input at {self.stem_input_bits} bits"
        return PassResult(gm, modified=False, summary=summary, record={"sites": folded, "skipped": skipped})


@register_pass
@dataclass(frozen=True)
class ReparameterizeLayerNorm(Pass):
    """Fold per-channel post-LayerNorm quantization scales into the LayerNorm and next Linears.

    Args:
        round_target_zero_point: round ``z̃`` to an integer (deployable; the layer-wise codes then
            equal the per-channel codes). False reproduces RepQ-ViT's fractional ``z̃``.
        recalibrate: after folding, search the layer-wise quantizer again on the transformed
            input with the uniform annotation's estimator (APHQ-ViT's "full re-search"; needs
            calibration data). False keeps ``(s̃, z̃)`` (RepQ-ViT).
        max_images: calibration images for ``recalibrate`` (None: all).
    """

    name = "repq_reparam"
    requires = ("repq_annotated", "calibrated")
    provides = ("ln_reparameterized",)

    round_target_zero_point: bool = True
    recalibrate: bool = False
    max_images: int | None = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        done, changed_linears, researched = [], set(), []
        for ln in [n for n in gm.graph.nodes if REPQ_SITE in n.meta]:
            linears = [by_name[name] for name in ln.meta[REPQ_SITE]["linears"]]
            qnodes = {lin.args[0] for lin in linears}
            if len(qnodes) != 1:
                raise PassError(f"repq_reparam: the Linears after '{ln.name}' do not share one input quantizer; "
                                f"run annotate_repq before insert_quantizers")
            qnode = qnodes.pop()
            fq = modules.get(qnode.target) if qnode.op == "call_module" else None
            if not isinstance(fq, FakeQuantize) or not isinstance(fq.spec.granularity, PerAxis):
                raise PassError(f"repq_reparam: '{ln.name}' expects a per-channel quantizer before "
                                f"{[lin.name for lin in linears]}")
            target_spec = fq.spec.with_(granularity=PerTensor(), integer_zero_point=self.round_target_zero_point)
            if self.recalibrate:
                base = ln.meta[REPQ_SITE].get("layerwise_spec") or target_spec
                target_spec = base.with_(integer_zero_point=True)
            if ctx.replay:
                fq.spec = target_spec
                for lin in linears:
                    mod = modules[lin.target]
                    if mod.bias is None:
                        mod.bias = nn.Parameter(torch.zeros(mod.out_features))
                done.append(match.node_fqn(ln) or ln.name)
                continue
            if not fq.calibrated:
                raise PassError(f"repq_reparam: the quantizer '{qnode.target}' after '{ln.name}' is not calibrated; "
                                f"run calibrate first")
            s = fq.scale.flatten().double()
            z = fq.zero_point.flatten().double()
            s_t = s.mean()
            z_t = z.mean().round() if self.round_target_zero_point else z.mean()
            r = s / s_t
            b = -(z - z_t) * s_t
            owner, wname, bname = _ln_params(gm, ln, modules)
            gamma, beta = getattr(owner, wname), getattr(owner, bname)
            with torch.no_grad():
                gamma.copy_((gamma.double() / r).to(gamma.dtype))
                beta.copy_((beta.double() / r - b).to(beta.dtype))
                for lin in linears:
                    mod = modules[lin.target]
                    w_new = mod.weight.double() * r.view(1, -1)
                    if mod.bias is None:
                        mod.bias = nn.Parameter(torch.zeros(mod.out_features, dtype=mod.weight.dtype))
                    mod.bias.copy_((mod.bias.double() + w_new @ b).to(mod.bias.dtype))
                    mod.weight.copy_(w_new.to(mod.weight.dtype))
                    changed_linears.add(str(lin.target))
            fq.spec = target_spec
            fq.set_qparams(s_t.float().view(()), z_t.float().view(()))
            if self.recalibrate:
                researched.append(fq)
            done.append(match.node_fqn(ln) or ln.name)
        n_w = 0 if ctx.replay else calibrate_weights(gm, only=changed_linears)
        if researched:
            observe(gm, researched, ctx.require_calib(self.name), self.max_images)
            for fq in researched:
                fq.compute_qparams()
        zp = "integer" if self.round_target_zero_point else "fractional (RepQ-faithful)"
        return PassResult(gm, summary=f"{len(done)} LayerNorms folded ({zp} z̃); {n_w} weight quantizers re-derived"
                          + (f"; {len(researched)} layer-wise quantizers re-searched" if researched else ""),
                          record={"sites": done})
