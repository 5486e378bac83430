"""The recipe mechanism: a frozen, validated, JSON round-trippable declaration of a pass pipeline.

A recipe is a *composition*: a base pipeline (``base_passes``), named ``Stage``\\ s inserted
before or after a pass *named* in it (or appended), and per-pass option overrides. Options keep
the pass's own names::

    get_recipe("repq-qwt-w4a4", comp_weight_bits=8)          # QwTCompensate.comp_weight_bits
    get_recipe("repq-qwt-w4a4", **{"calibrate.max_images": 64})  # a name several passes share
    get_recipe("w4a4", a_bits=6)                              # a field of the recipe itself

A name resolves to the recipe's own field first, then to the one pass of the pipeline that has an
option of that name (``pass.option`` when several do). ``None`` means "none" (no magic 0).

The method families (how each builds its pipeline) are in ``families``, the named recipes in
``table``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..core.errors import ConfigError
from ..core.pipeline import Pass, pass_from_config

_RECIPES: dict[str, tuple[type["Recipe"], dict, str]] = {}
_RECIPE_CLASSES: dict[str, type["Recipe"]] = {}


def register_recipe(name: str, cls: type["Recipe"], description: str, **defaults: Any) -> None:
    """Register ``name`` as ``cls(name=name, **defaults)`` (validated now, so a bad default fails
    at import, not at a user's first call)."""
    if name in _RECIPES:
        raise ConfigError(f"recipe {name!r} is already registered")
    _RECIPE_CLASSES[cls.__name__] = cls
    cls(name=name, **defaults).build_passes()
    _RECIPES[name] = (cls, defaults, description)


def list_recipes() -> dict[str, str]:
    """``{name: description}`` of every registered recipe."""
    return {k: v[2] for k, v in _RECIPES.items()}


# ------------------------------------------------------------------------------------------
# Composition helpers
# ------------------------------------------------------------------------------------------


def _index(passes: list[Pass], name: str, what: str) -> int:
    names = [p.name for p in passes]
    if names.count(name) != 1:
        raise ConfigError(f"{what}: the pipeline {names} has {names.count(name)} passes named {name!r}; "
                          f"anchor on a pass that occurs exactly once")
    return names.index(name)


def insert_pass(passes: list[Pass], new: Pass, *, after: str | None = None, before: str | None = None) -> list[Pass]:
    """A copy of ``passes`` with ``new`` right after (or before) the pass named ``after``
    (``before``); at the end when neither is given."""
    if after is not None and before is not None:
        raise ConfigError(f"stage {new.name!r}: give after= or before=, not both")
    out = list(passes)
    if after is not None:
        out.insert(_index(out, after, f"stage {new.name!r}") + 1, new)
    elif before is not None:
        out.insert(_index(out, before, f"stage {new.name!r}"), new)
    else:
        out.append(new)
    return out


def configure_pass(passes: list[Pass], name: str, **options: Any) -> list[Pass]:
    """A copy of ``passes`` with the options of the pass named ``name`` replaced (validated by the
    pass's own constructor)."""
    out = list(passes)
    i = _index(out, name, f"options for {name!r}")
    known = {f.name for f in fields(out[i])}
    bad = sorted(set(options) - known)
    if bad:
        raise ConfigError(f"pass {name!r} has no option {bad[0]!r}; its options: {sorted(known)}")
    out[i] = dataclasses.replace(out[i], **options)
    return out


@dataclass(frozen=True)
class Stage:
    """A pass a recipe adds to its base pipeline: right after the pass named ``after``, right
    before the one named ``before``, or at the end."""

    pass_: Pass
    after: str | None = None
    before: str | None = None

    def to_dict(self) -> dict:
        return {"pass": self.pass_.name, "config": self.pass_.config(), "after": self.after, "before": self.before}

    @staticmethod
    def from_dict(d: dict) -> "Stage":
        return Stage(pass_from_config(d["pass"], d["config"]), after=d.get("after"), before=d.get("before"))


# ------------------------------------------------------------------------------------------
# Option values from strings (CLI --set key=value)
# ------------------------------------------------------------------------------------------


def _type_names(annotation: Any) -> set[str]:
    """The base type names an annotation (or its string form) admits: ``"int | None"`` → {int, None}."""
    if isinstance(annotation, str):
        return {t.strip().split("[")[0] for t in annotation.split("|")}
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return set().union(*(_type_names(a) for a in typing.get_args(annotation)))
    if annotation is type(None):
        return {"None"}
    return {getattr(typing.get_origin(annotation) or annotation, "__name__", str(annotation))}


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert a CLI string to the option's type (``none`` → None where the option admits it)."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    kinds = _type_names(annotation)
    if "None" in kinds and value.lower() in ("none", "null"):
        return None
    if "bool" in kinds:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {name!r} takes true/false, got {value!r}")
    try:
        if "int" in kinds:
            return int(value)
        if "float" in kinds:
            return float(value)
    except ValueError:
        raise ConfigError(f"option {name!r} takes a number{' or none' if 'None' in kinds else ''}, got {value!r}") from None
    if "tuple" in kinds:
        return tuple(v for v in value.split(",") if v)
    return value


# ------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A declared pipeline. Subclasses define ``base_passes`` from their fields; ``stages`` and
    ``options`` (``{pass name: {option: value}}``) compose on top of it.

    Attributes:
        name: the registered name.
        calib_images: how many calibration images the caller should provide (the CLI loads them).
        stages: passes added to the base pipeline (``Stage``).
        options: option overrides of passes in the pipeline, under the passes' own option names.
    """

    name: str = "custom"
    calib_images: int = 32
    stages: tuple[Stage, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if self.calib_images < 0:
            raise ConfigError(f"recipe {self.name!r}: calib_images must be >= 0, got {self.calib_images}")

    def base_passes(self) -> list[Pass]:
        return []

    def finish_passes(self, passes: list[Pass]) -> list[Pass]:
        """Passes a recipe field adds once the stages are in (default: none)."""
        return passes

    def build_passes(self) -> list[Pass]:
        """The pipeline: base passes, stages inserted by anchor name, then the option overrides."""
        passes = self.base_passes()
        for st in self.stages:
            passes = insert_pass(passes, st.pass_, after=st.after, before=st.before)
        passes = self.finish_passes(passes)
        for pass_name, opts in self.options.items():
            if pass_name not in [p.name for p in passes]:
                raise ConfigError(f"recipe {self.name!r}: options for {pass_name!r}, which is not in its pipeline "
                                  f"{[p.name for p in passes]}")
            passes = configure_pass(passes, pass_name, **opts)
        return passes

    def option(self, key: str) -> Any:
        """The value of a recipe field or of a pass option (same names as ``get_recipe`` takes)."""
        field_names = {f.name for f in fields(self)}
        if key in field_names:
            return getattr(self, key)
        p, opt = _resolve_pass_option(self, key)
        return getattr(p, opt)

    def to_dict(self) -> dict:
        d = {"class": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "stages":
                v = [s.to_dict() for s in v]
            elif f.name == "options":
                v = {k: {o: list(x) if isinstance(x, tuple) else x for o, x in opts.items()} for k, opts in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @staticmethod
    def from_dict(d: dict) -> "Recipe":
        d = dict(d)
        cls_name = d.pop("class")
        if cls_name not in _RECIPE_CLASSES:
            raise ConfigError(f"unknown recipe class {cls_name!r}; known: {sorted(_RECIPE_CLASSES)}")
        cls = _RECIPE_CLASSES[cls_name]
        d["stages"] = tuple(Stage.from_dict(s) for s in d.get("stages", ()))
        d["options"] = {k: {o: tuple(x) if isinstance(x, list) else x for o, x in opts.items()}
                        for k, opts in d.get("options", {}).items()}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _resolve_pass_option(recipe: Recipe, key: str) -> tuple[Pass, str]:
    """The pass of ``recipe``'s pipeline and option that ``key`` (``option`` or ``pass.option``) names."""
    passes = recipe.build_passes()
    pass_name, _, opt = key.rpartition(".")
    candidates = [p for p in passes if (not pass_name or p.name == pass_name) and opt in {f.name for f in fields(p)}]
    if len(candidates) == 1:
        return candidates[0], opt
    own = sorted(f.name for f in fields(recipe) if f.name not in ("name", "stages", "options"))
    pass_opts = sorted(f"{p.name}.{f.name}" for p in passes for f in fields(p))
    if len(candidates) > 1:
        raise ConfigError(f"recipe {recipe.name!r}: option {key!r} belongs to several passes; say which: "
                          f"{[f'{p.name}.{opt}' for p in candidates]}")
    raise ConfigError(f"recipe {recipe.name!r} has no option {key!r}; options: {own}; pass options: {pass_opts}")


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """The recipe registered as ``name`` with options overridden (values may be CLI strings):
    recipe fields by name, pass options by their own name or as ``pass.option``."""
    if name not in _RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {sorted(_RECIPES)}")
    cls, defaults, _ = _RECIPES[name]
    known = {f.name: f for f in fields(cls)}
    kwargs = dict(defaults)
    pass_overrides: dict[str, Any] = {}
    for k, v in overrides.items():
        if k in ("name", "stages", "options"):
            raise ConfigError(f"recipe {name!r}: {k!r} cannot be overridden by name; build a Recipe object instead")
        if k in known:
            kwargs[k] = _coerce(k, known[k].type, v)
        else:
            pass_overrides[k] = v
    recipe = cls(name=name, **kwargs)
    if pass_overrides:
        options = {p: dict(o) for p, o in recipe.options.items()}
        for k, v in pass_overrides.items():
            p, opt = _resolve_pass_option(recipe, k)
            ftype = next(f.type for f in fields(p) if f.name == opt)
            options.setdefault(p.name, {})[opt] = _coerce(k, ftype, v)
        recipe = dataclasses.replace(recipe, options=options)
    recipe.build_passes()  # validate now, with the passes' own error messages
    return recipe


__all__ = ["Recipe", "Stage", "register_recipe", "list_recipes", "get_recipe", "insert_pass", "configure_pass"]
