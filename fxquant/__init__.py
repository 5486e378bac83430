"""fxquant: a torch.fx graph-rewriting post-training quantization compiler for vision transformers.

    import fxquant
    qmodel = fxquant.compile(model, recipe="w8a8", calib=calib_loader)
    print(fxquant.report(qmodel))
    fxquant.artifact.save(qmodel, "out/", model_spec="cifar-vit")

This package is the front (``api``, ``recipes``, ``artifact``, ``finetune``, ``cli``); it sits on
``fxquant.passes`` | ``fxquant.export``, ``fxquant.kernels`` and ``fxquant.core`` (README, "Layout").
"""

from . import artifact, export, passes  # importing the passes registers them (fxquant.core.pipeline.PASS_REGISTRY)
from .api import compile, report
from .core import quant
from .core.errors import ArtifactError, CalibrationError, ConfigError, FxQuantError, PassError, TraceError
from .core.graph import trace
from .core.pipeline import Pass, PassContext, PassManager, PassResult, register_pass
from .recipes import Recipe, get_recipe, list_recipes, register_recipe

__version__ = "0.1.0"

__all__ = [
    "compile", "report", "trace", "quant", "passes", "artifact", "export",
    "Pass", "PassContext", "PassManager", "PassResult", "register_pass",
    "Recipe", "get_recipe", "list_recipes", "register_recipe",
    "FxQuantError", "ConfigError", "TraceError", "CalibrationError", "PassError", "ArtifactError",
]
