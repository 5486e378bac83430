"""Pass manager and ``fxquant.compile``: requirements, lint/recompile, report, composition, errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import fx

import fxquant
from fxquant.core import match
from fxquant.core.errors import ConfigError, PassError
from fxquant.core.graph import propagate_shapes
from fxquant.core.pipeline import MANAGER_FACTS, SHAPES, Pass, PassContext, PassManager, PassResult
from fxquant.core.testing import toy_calib, toy_vit
from fxquant.passes import AnnotateUniform, Calibrate, InsertQuantizers


@dataclass(frozen=True)
class _Counter(Pass):
    name = "count_nodes"
    requires = ("calibrated",)

    def run(self, gm, ctx):
        return PassResult(gm, modified=False, summary=f"{len(gm.graph.nodes)} nodes", record={"n": len(gm.graph.nodes)})


@dataclass(frozen=True)
class _BreaksGraph(Pass):
    name = "breaks_graph"

    def run(self, gm, ctx):
        nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
        nodes[0].args = (nodes[-1],)  # use before definition: graph.lint() rejects it
        return PassResult(gm)


def test_compile_with_pass_list_and_report():
    q = fxquant.compile(toy_vit(), passes=[AnnotateUniform(), InsertQuantizers(), Calibrate(), _Counter()], calib=toy_calib(),
                        progress=False)
    rep = fxquant.report(q)
    assert [r.name for r in rep.passes] == ["annotate_uniform", "insert_quantizers", "calibrate", "count_nodes"]
    act_quantizers = [m for m in q.modules() if type(m).__name__ == "FakeQuantize" and not m.weight]
    assert rep["insert_quantizers"].nodes_added == len(act_quantizers)
    assert rep["count_nodes"].record["n"] == len(q.graph.nodes)
    assert "count_nodes" in str(rep) and "seconds" in str(rep)


def test_missing_requirement_names_provider():
    with pytest.raises(PassError, match=r"'insert_quantizers' requires \['annotated'\].*annotate_uniform"):
        fxquant.compile(toy_vit(), passes=[InsertQuantizers()], progress=False)


def test_failing_pass_is_named_with_history():
    gm = fxquant.trace(toy_vit(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassError, match=r"pass 'breaks_graph' failed \(passes already run: \['annotate_uniform'\]\)"):
        PassManager([AnnotateUniform(), _BreaksGraph()]).run(gm, PassContext())


def test_pass_names_and_unknown_pass():
    q = fxquant.compile(toy_vit(), passes=["annotate_uniform", "insert_quantizers", "calibrate"], calib=toy_calib(),
                        progress=False)
    assert len(fxquant.report(q).passes) == 3
    with pytest.raises(ConfigError, match=r"unknown pass 'nope'; known passes: \[.*'calibrate'"):
        fxquant.compile(toy_vit(), passes=["nope"])


def test_unknown_recipe_lists_known():
    with pytest.raises(ConfigError, match=r"unknown recipe 'w3a9'; known recipes: \[.*'w4a4'.*'w8a8'"):
        fxquant.compile(toy_vit(), recipe="w3a9")


def test_recipe_option_errors():
    with pytest.raises(ConfigError, match="has no option 'bitz'"):
        fxquant.get_recipe("w4a4", bitz=3)
    with pytest.raises(ConfigError, match="bits=9"):
        fxquant.get_recipe("w4a4", w_bits=9)
    r = fxquant.get_recipe("w4a4", a_bits="6", head_stem_8bit="true", skip="head,blocks.0.*")
    assert r.a_bits == 6 and r.head_stem_8bit is True and r.skip == ("head", "blocks.0.*")
    assert fxquant.Recipe.from_dict(r.to_dict()) == r


def test_passes_and_recipe_are_exclusive():
    with pytest.raises(ConfigError, match="either"):
        fxquant.compile(toy_vit(), passes=[AnnotateUniform()], recipe="w8a8")
    with pytest.raises(ConfigError, match="nothing to do"):
        fxquant.compile(toy_vit())


def test_every_pass_leaves_a_linted_graph():
    seen = []

    class _Spy(PassManager):
        pass

    gm = fxquant.trace(toy_vit(), (torch.randn(1, 3, 8, 8),))
    pm = PassManager([AnnotateUniform(), InsertQuantizers(), Calibrate()], on_pass_end=lambda r: seen.append(r.name))
    out, _ = pm.run(gm, PassContext(calib=fxquant.core.calibration.Calibration(toy_calib(), progress=False)))
    out.graph.lint()
    assert seen == ["annotate_uniform", "insert_quantizers", "calibrate"]
    assert isinstance(out, fx.GraphModule)


def test_fp32_recipe_is_the_float_graph():
    m = toy_vit()
    q = fxquant.compile(m, recipe="fp32", example_inputs=(torch.randn(2, 3, 8, 8),), progress=False)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(q(x), m(x))


# -- facts the manager establishes itself (SHAPES) and nested pipelines -------------------------------


@dataclass(frozen=True)
class _NeedsShapes(Pass):
    name = "needs_shapes"
    requires = (SHAPES,)

    def run(self, gm, ctx):
        missing = [n.name for n in gm.graph.nodes if n.op == "call_module" and match.tensor_shape(n) is None]
        return PassResult(gm, modified=False, record={"missing": missing})


@dataclass(frozen=True)
class _AddsModuleCall(Pass):
    """Inserts an identity module call after the first Linear, without shapes (as insert_quantizers can)."""

    name = "adds_module_call"

    def run(self, gm, ctx):
        modules = dict(gm.named_modules())
        first = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], torch.nn.Linear))
        gm.add_submodule("extra_identity", torch.nn.Identity())
        with gm.graph.inserting_after(first):
            new = gm.graph.call_module("extra_identity", (first,))
        first.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        return PassResult(gm)


def test_the_manager_establishes_shapes_for_passes_that_require_them():
    gm = fxquant.trace(toy_vit(), (torch.randn(2, 3, 32, 32),))
    assert all(match.tensor_shape(n) is None for n in gm.graph.nodes if n.op == "call_module")  # capture records none
    ctx = PassContext(example_inputs=(torch.randn(2, 3, 32, 32),), progress=False)
    gm, rep = PassManager([_NeedsShapes(), _AddsModuleCall(), _NeedsShapes()]).run(gm, ctx)
    assert [r.record["missing"] for r in rep.passes if r.name == "needs_shapes"] == [[], []]  # re-established after the insert
    assert SHAPES in MANAGER_FACTS and SHAPES not in ctx.facts  # derived on demand, never a stale provided fact
    # without example inputs the pass still runs (as before the fact existed), on the shapes it finds
    gm2 = fxquant.trace(toy_vit(), (torch.randn(2, 3, 32, 32),))
    _, rep2 = PassManager([_NeedsShapes()]).run(gm2, PassContext(progress=False))
    assert rep2["needs_shapes"].record["missing"]


def test_shape_propagation_leaves_quantizers_and_observers_untouched():
    q = fxquant.compile(toy_vit(), recipe="w8a8", calib=toy_calib(), progress=False)
    before = {n: (m.fake_quant_enabled, m.observer_enabled, m.scale.clone()) for n, m in q.named_modules()
              if isinstance(m, fxquant.quant.FakeQuantize)}
    propagate_shapes(q, (torch.randn(2, 3, 32, 32),))
    after = {n: (m.fake_quant_enabled, m.observer_enabled, m.scale) for n, m in q.named_modules()
             if isinstance(m, fxquant.quant.FakeQuantize)}
    assert before.keys() == after.keys()
    assert all(before[k][:2] == after[k][:2] and torch.equal(before[k][2], after[k][2]) for k in before)


def test_no_pass_sets_up_shapes_itself():
    """The set-up lives in one place (the manager's SHAPES fact): no pass calls propagate_shapes."""
    import inspect

    import fxquant.passes as passes_pkg
    from fxquant.core.pipeline import PASS_REGISTRY

    for name, cls in PASS_REGISTRY.items():
        if cls.__module__.startswith(passes_pkg.__name__):
            assert "propagate_shapes(" not in inspect.getsource(inspect.getmodule(cls)), name


def test_nested_context_isolates_facts_and_progress():
    ctx = PassContext(calib=None, example_inputs=(torch.zeros(1),), seed=3, facts={"annotated"}, replay=True, records=[{"a": 1}])
    sub = ctx.nested()
    sub.facts.add("calibrated")
    assert ctx.facts == {"annotated"} and sub.seed == 3 and sub.example_inputs is ctx.example_inputs
    assert not sub.progress and not sub.replay and sub.records == []
