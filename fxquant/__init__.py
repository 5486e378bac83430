"""fxquant: a torch.fx graph-rewriting post-training quantization compiler for vision transformers.

    import fxquant
    qmodel = fxquant.compile(model, recipe="w8a8", calib=calib_loader)
    print(fxquant.report(qmodel))
"""

from . import passes, quant  # importing the passes registers them (fxquant.pipeline.PASS_REGISTRY)
from .api import compile, report
from .errors import ArtifactError, CalibrationError, ConfigError, FxQuantError, PassError, TraceError
from .graph import trace
from .pipeline import Pass, PassContext, PassManager, PassResult, register_pass
from .recipes import Recipe, get_recipe, list_recipes, register_recipe

__version__ = "0.1.0"

__all__ = [
    "compile", "report", "trace", "quant", "passes",
    "Pass", "PassContext", "PassManager", "PassResult", "register_pass",
    "Recipe", "get_recipe", "list_recipes", "register_recipe",
    "FxQuantError", "ConfigError", "TraceError", "CalibrationError", "PassError", "ArtifactError",
]
