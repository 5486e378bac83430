"""Recipes as declared compositions: stages anchored by pass name, pass options under their own
names, ``None`` for none, JSON round trip, and errors that say what to write instead."""

from __future__ import annotations

import pytest

import fxquant
from fxquant.core.errors import ConfigError
from fxquant.passes import BitLog2Attention, Calibrate, QwTCompensate
from fxquant.recipes import RepQRecipe, Stage, UniformRecipe, configure_pass, insert_pass


def _names(recipe) -> list[str]:
    return [p.name for p in recipe.build_passes()]


def test_registered_pipelines():
    assert _names(fxquant.get_recipe("w4a4")) == ["annotate_uniform", "insert_quantizers", "calibrate"]
    assert _names(fxquant.get_recipe("repq-w4a4")) == ["annotate_uniform", "annotate_repq", "insert_quantizers",
                                                       "calibrate", "repq_reparam"]
    assert _names(fxquant.get_recipe("bitlog2-qwt-w4a4")) == ["annotate_uniform", "annotate_repq", "bitlog2_attention",
                                                              "insert_quantizers", "calibrate", "repq_reparam", "qwt"]
    qwt = fxquant.get_recipe("repq-qwt-w4a4")
    passes = {p.name: p for p in qwt.build_passes()}
    assert qwt.calib_images == 512 and passes["calibrate"].max_images == 32 and passes["qwt"].max_images is None
    assert passes["calibrate"].order == "sequential"


def test_stage_anchors_by_name_not_position():
    base = UniformRecipe(name="t").build_passes()
    after = insert_pass(base, BitLog2Attention(), after="annotate_uniform")
    before = insert_pass(base, BitLog2Attention(), before="calibrate")
    assert [p.name for p in after][:2] == ["annotate_uniform", "bitlog2_attention"]
    assert [p.name for p in before][-2:] == ["bitlog2_attention", "calibrate"]
    assert [p.name for p in insert_pass(base, QwTCompensate())][-1] == "qwt"
    with pytest.raises(ConfigError, match="has 0 passes named 'nope'"):
        insert_pass(base, QwTCompensate(), after="nope")
    with pytest.raises(ConfigError, match="after= or before=, not both"):
        insert_pass(base, QwTCompensate(), after="calibrate", before="calibrate")


def test_configure_pass_uses_the_pass_validation():
    base = UniformRecipe(name="t").build_passes()
    assert configure_pass(base, "calibrate", order="sequential")[-1] == Calibrate(order="sequential")
    with pytest.raises(ConfigError, match="calibrate: order must be 'parallel' or 'sequential'"):
        configure_pass(base, "calibrate", order="random")
    with pytest.raises(ConfigError, match="pass 'calibrate' has no option 'ordr'"):
        configure_pass(base, "calibrate", ordr="sequential")


def test_pass_options_resolve_by_their_own_names():
    r = fxquant.get_recipe("bitlog2-qwt-w4a4", scheme="half16", comp_weight_bits="8", start_block="2",
                           **{"calibrate.max_images": "16", "qwt.max_images": "none"})
    passes = {p.name: p for p in r.build_passes()}
    assert passes["bitlog2_attention"].scheme == "half16"
    assert passes["qwt"].comp_weight_bits == 8 and passes["qwt"].start_block == 2 and passes["qwt"].max_images is None
    assert passes["calibrate"].max_images == 16
    assert r.option("scheme") == "half16" and r.option("w_bits") == 4
    # "none" is None where the option admits it; a number is required otherwise
    assert fxquant.get_recipe("repq-qwt-w4a4", comp_weight_bits="none").option("comp_weight_bits") is None
    with pytest.raises(ConfigError, match="option 'start_block' takes a number, got 'x'"):
        fxquant.get_recipe("repq-qwt-w4a4", start_block="x")


def test_option_errors_say_what_to_write():
    several = (r"'max_images' belongs to several passes; say which: "
               r"\['calibrate.max_images', 'repq_reparam.max_images', 'qwt.max_images'\]")
    with pytest.raises(ConfigError, match=several):
        fxquant.get_recipe("repq-qwt-w4a4", max_images=64)
    with pytest.raises(ConfigError, match="recipe 'w4a4' has no option 'scheme'.*pass options:.*calibrate.order"):
        fxquant.get_recipe("w4a4", scheme="half17")
    with pytest.raises(ConfigError, match="'stages' cannot be overridden by name"):
        fxquant.get_recipe("w4a4", stages=())
    with pytest.raises(ConfigError, match="options for 'qwt', which is not in its pipeline"):
        UniformRecipe(name="t", options={"qwt": {"start_block": 1}}).build_passes()


def test_round_trip_with_stages_and_options():
    r = fxquant.get_recipe("bitlog2-qwt-w4a4", scheme="single16", comp_dtype="float32")
    again = fxquant.Recipe.from_dict(r.to_dict())
    assert again == r and again.build_passes() == r.build_passes()


def test_a_new_method_is_a_few_lines():
    """What the next methods do: a registered recipe = a base class + stages + options."""
    r = RepQRecipe(name="repq-bitlog2-calib64", w_bits=4, a_bits=4, calib_images=64,
                   stages=(Stage(BitLog2Attention(scheme="half16"), after="annotate_repq"),),
                   options={"calibrate": {"max_images": 64}})
    assert _names(r)[2] == "bitlog2_attention" and r.option("calibrate.max_images") == 64


def test_compile_takes_pass_options_as_keywords():
    from fxquant.core.testing import toy_calib, toy_vit

    q = fxquant.compile(toy_vit(), recipe="repq-w4a4", order="parallel", calib=toy_calib(), progress=False)
    assert fxquant.report(q)["calibrate"].record["stages"] == 1
    assert [p["config"].get("order") for p in q.meta["fxquant.pipeline"] if p["pass"] == "calibrate"] == ["parallel"]
