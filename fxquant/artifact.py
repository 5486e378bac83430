"""Saving and loading quantized models: ``model.safetensors`` + ``fxquant.json``, never pickle.

A GraphModule's code cannot be stored without pickle, so an artifact stores *how to rebuild it*:
the model spec (or the caller supplies the float model), the pass list with each pass's config,
and each pass's data-dependent decisions (``PassResult.record``). ``load`` re-captures the float
model, replays the passes without data (``PassContext.replay``), then fills every tensor (weights
changed by reparameterization, quantizer scales, compensation weights...) from the safetensors
file, checking names and shapes.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import fx, nn

from .core.errors import ArtifactError
from .core.graph import trace
from .core.meta import ARTIFACT, CAPTURE, EXAMPLE_INPUTS, PIPELINE, RECIPE, REPORT
from .core.models import load_model
from .core.pipeline import PassContext, PassManager, pass_from_config
from .core.quant import FakeQuantize

FORMAT = "fxquant-artifact"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "fxquant.json"


def _json_safe(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        if isinstance(v, dict):
            return {str(k): _json_safe(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [_json_safe(x) for x in v]
        return repr(v)


def save(gm: fx.GraphModule, out_dir: str | Path, *, model_spec: str | None = None,
         example_inputs: tuple | None = None, extra: dict | None = None) -> Path:
    """Write ``gm`` (produced by ``fxquant.compile``) to ``out_dir``.

    Args:
        model_spec: how to rebuild the float model (``cifar-vit``, ``timm:deit_small_patch16_224``,
            a folder); without it, ``load`` needs the float model passed in.
        example_inputs: recorded by shape, for capturing models that need them (Hugging Face).
        extra: more JSON metadata (e.g. evaluation results).
    """
    if PIPELINE not in gm.meta:
        raise ArtifactError("only models returned by fxquant.compile can be saved (no pipeline recorded)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in gm.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": FORMAT})
    report = gm.meta.get(REPORT)
    quantizers = {n: {"spec": m.spec.to_dict(), "weight": m.weight} for n, m in gm.named_modules() if isinstance(m, FakeQuantize)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_spec,
        "example_inputs": ([(list(t.shape), str(t.dtype).replace("torch.", "")) for t in example_inputs]
                           if example_inputs else gm.meta.get(EXAMPLE_INPUTS, [])),
        "recipe": gm.meta.get(RECIPE),
        "pipeline": gm.meta[PIPELINE],
        "records": [r.record for r in report.passes] if report else [],
        "report": report.to_dict() if report else [],
        "capture": _json_safe(gm.meta.get(CAPTURE, {})),
        "quantizers": quantizers,
        "versions": {"fxquant": version("fxquant"), "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        **(extra or {}),
    }
    (out / META).write_text(json.dumps(_json_safe(meta), indent=2))
    return out


def read_meta(path: str | Path) -> dict:
    p = Path(path) / META
    if not p.exists():
        raise ArtifactError(f"'{path}' is not an fxquant artifact (no {META}); create one with `fxquant quantize ... --out DIR`")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"'{path}': unsupported artifact format {meta.get('format')!r} v{meta.get('format_version')}")
    return meta


def load(path: str | Path, model: nn.Module | None = None, *, example_inputs: tuple | None = None) -> fx.GraphModule:
    """Rebuild the quantized GraphModule saved in ``path``.

    Args:
        model: the float model the artifact was made from; by default rebuilt from the saved spec.

    Raises:
        ArtifactError: when the saved tensors do not match the rebuilt graph (names or shapes).
    """
    path = Path(path)
    meta = read_meta(path)
    if model is None:
        if not meta.get("model"):
            raise ArtifactError(f"'{path}' does not record its float model; pass it: fxquant.artifact.load(path, model=...)")
        model = load_model(meta["model"]).model
    if example_inputs is None and meta.get("example_inputs"):
        # values do not matter (shape propagation only); ones keep masks and token ids valid
        example_inputs = tuple(torch.ones(shape, dtype=getattr(torch, dtype)) for shape, dtype in meta["example_inputs"])
    passes = [pass_from_config(p["pass"], p["config"]) for p in meta["pipeline"]]
    gm = trace(model, example_inputs, check=False)
    ctx = PassContext(example_inputs=tuple(example_inputs or ()), replay=True, records=meta.get("records", []), progress=False)
    gm, report = PassManager(passes).run(gm, ctx)
    state = load_file(str(path / WEIGHTS))
    expected = gm.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_bad = [k for k in sorted(set(expected) & set(state))
                 if not isinstance(gm.get_submodule(k.rpartition(".")[0]) if "." in k else gm, FakeQuantize)
                 and tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape_bad:
        made_for = meta.get("model") or "another model"
        lines = [f"artifact '{path}' does not match the model it is loaded into (it was made for {made_for}):"]
        if missing:
            lines.append(f"  missing in artifact: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            lines.append(f"  not in model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        for k in shape_bad[:5]:
            lines.append(f"  '{k}': artifact {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        lines.append("Load it with the float model it was made from (fxquant.artifact.load(path, model=...)).")
        raise ArtifactError("\n".join(lines))
    gm.load_state_dict(state, strict=True)
    gm.meta[PIPELINE] = meta["pipeline"]
    gm.meta[RECIPE] = meta.get("recipe")
    gm.meta[REPORT] = report
    gm.meta[ARTIFACT] = {k: meta.get(k) for k in ("model", "recipe", "eval", "calib_images", "calib_seconds", "seed")}
    gm.eval()
    return gm

