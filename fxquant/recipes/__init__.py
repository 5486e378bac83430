"""Named recipes: declared pass pipelines (``base``: the mechanism; ``families``: how each method
builds its pipeline; ``table``: the registered names)."""

from . import table  # noqa: F401  (registers the named recipes)
from .base import Recipe, Stage, configure_pass, get_recipe, insert_pass, list_recipes, register_recipe
from .families import HEAD_STEM_MODES, APHQRecipe, FloatRecipe, IGQRecipe, PlatformRecipe, RepQRecipe, UniformRecipe

__all__ = ["Recipe", "Stage", "register_recipe", "list_recipes", "get_recipe", "insert_pass", "configure_pass",
           "FloatRecipe", "UniformRecipe", "RepQRecipe", "APHQRecipe", "IGQRecipe", "PlatformRecipe", "HEAD_STEM_MODES"]
