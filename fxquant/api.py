"""``fxquant.compile``: capture → run passes → quantized ``GraphModule``."""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from .core.calibration import Calibration
from .core.errors import ConfigError
from .core.graph import trace
from .core.meta import CAPTURE, EXAMPLE_INPUTS, PIPELINE, RECIPE, REPORT
from .core.pipeline import PASS_REGISTRY, Pass, PassContext, PassManager, PipelineReport, pass_from_config
from .passes import LowerToKernels
from .recipes import Recipe, get_recipe


def _resolve_passes(passes: Sequence[Pass | str] | None, recipe: Recipe | str | None,
                    overrides: dict) -> tuple[list[Pass], Recipe | None]:
    if passes is not None and recipe is not None:
        raise ConfigError("give either passes=[...] or recipe=..., not both")
    if passes is None and recipe is None:
        raise ConfigError("nothing to do: pass recipe='w8a8' (see fxquant.list_recipes()) or passes=[...]")
    if recipe is not None:
        if isinstance(recipe, str):
            recipe = get_recipe(recipe, **overrides)
        elif overrides:
            raise ConfigError(f"options {sorted(overrides)} apply to a recipe given by name; "
                              f"use dataclasses.replace on a Recipe object")
        return recipe.build_passes(), recipe
    if overrides:
        raise ConfigError(f"unknown keyword arguments {sorted(overrides)}: options go to the passes' constructors")
    out = []
    for p in passes:
        if isinstance(p, str):
            if p not in PASS_REGISTRY:
                raise ConfigError(f"unknown pass {p!r}; known passes: {sorted(PASS_REGISTRY)}")
            p = pass_from_config(p, {})
        out.append(p)
    return out, None


def _refuse_half_precision(model: nn.Module) -> None:
    """float16/bfloat16 models are refused up front: calibration statistics, range searches and
    quantizer parameters are float32 (fp16 would round scales and flush those below 6e-5 to zero)."""
    if isinstance(model, fx.GraphModule) and PIPELINE in model.meta:
        return  # already compiled (QwT's fp16 compensation is deliberate)
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t is not None and t.dtype in (torch.float16, torch.bfloat16):
            dtype = str(t.dtype).replace("torch.", "")
            raise ConfigError(f"the model holds {dtype} tensors (e.g. '{name}'); fxquant.compile quantizes float32 "
                              f"models (calibration and quantizer parameters are float32): pass model.float() and "
                              f"float32 calibration data")


def compile(
    model: nn.Module,
    passes: Sequence[Pass | str] | None = None,
    *,
    recipe: Recipe | str | None = None,
    calib: Iterable | Callable[[nn.Module], Any] | torch.Tensor | None = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = True,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict | None = None,
    lower: bool | LowerToKernels = False,
    **recipe_options: Any,
) -> fx.GraphModule:
    """Quantize ``model`` and return the rewritten ``torch.fx.GraphModule``.

    Args:
        model: a timm / plain ``nn.Module`` (traced with torch.fx) or a Hugging Face model
            (captured with torch.export); an already captured ``fxquant.trace`` graph is copied.
            The caller's model is never modified.
        passes: the passes to run, in order (``Pass`` objects or registered names).
        recipe: a recipe name (``fxquant.list_recipes()``) or ``Recipe`` instead of ``passes``;
            extra keyword arguments override recipe fields (``w_bits=6``).
        calib: calibration data: an iterable of batches (tensor, ``(images, labels)`` or a dict of
            model kwargs), an image tensor (split into batches of 32), or ``forward_loop(model)``.
        example_inputs: inputs for capture (required for Hugging Face models; otherwise taken
            from the first calibration batch when possible).
        seed: makes every random choice reproducible; same seed and inputs → bit-identical output.
        progress: show progress bars.
        lower: finish with ``LowerToKernels``: quantized Linears, the patch-embedding convolution and the
            attention matmuls run on integer kernels (Triton on
            CUDA, exact integer matmuls on CPU) instead of fake quantization; a ``LowerToKernels(...)``
            instance sets its options (e.g. ``fuse_attention=False``).

    Returns:
        The quantized graph module. ``fxquant.report(gm)`` holds the per-pass summary.

    Raises:
        ConfigError: a float16/bfloat16 model (pass ``model.float()``), or bad passes/options.
        CalibrationError: calibration batches unlike ``example_inputs`` (the first tensor batch is
            checked: sizes after the batch dimension, dtype, device), empty, or non-finite.
    """
    _refuse_half_precision(model)
    pass_list, recipe_obj = _resolve_passes(passes, recipe, recipe_options)
    if lower:
        pass_list = pass_list + [lower if isinstance(lower, LowerToKernels) else LowerToKernels()]
    cal = Calibration(calib, progress=progress) if calib is not None else None
    if cal is not None and example_inputs is not None:
        first_example = example_inputs if isinstance(example_inputs, torch.Tensor) else next(iter(example_inputs), None)
        if isinstance(first_example, torch.Tensor):
            cal.check_first_batch(first_example)
    if example_inputs is None and cal is not None:
        first = cal.first_batch()
        if isinstance(first, torch.Tensor):
            example_inputs = (first[:2],)
        elif isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor):
            example_inputs = (first[0][:2],)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model, fx.GraphModule) and CAPTURE in model.meta:
            gm = copy.deepcopy(model)
        else:
            gm = trace(model, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
        ctx = PassContext(calib=cal, example_inputs=tuple(example_inputs or ()), seed=seed, progress=progress)
        gm, rep = PassManager(pass_list).run(gm, ctx)
    gm.meta[REPORT] = rep
    gm.meta[PIPELINE] = [{"pass": p.name, "config": p.config()} for p in pass_list]
    gm.meta[RECIPE] = recipe_obj.to_dict() if recipe_obj is not None else None
    gm.meta[EXAMPLE_INPUTS] = [(list(t.shape), str(t.dtype).replace("torch.", "")) for t in (example_inputs or ())
                            if isinstance(t, torch.Tensor)]
    gm.eval()
    return gm


def report(gm: fx.GraphModule) -> PipelineReport:
    """The per-pass report of a compiled graph (print it for a table)."""
    if REPORT not in gm.meta:
        raise ConfigError("this module was not produced by fxquant.compile (no report attached)")
    return gm.meta[REPORT]
