"""Average Perturbation Hessian: closed forms on hand-built tails, the float32 trap, the LayerNorm
null direction, streaming, live tail inputs and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.core import match
from fxquant.core.aph import APH_TEMPERATURE, average_perturbation_hessian, tail_graph
from fxquant.core.errors import CalibrationError, ConfigError
from fxquant.core.graph import propagate_shapes
from fxquant.core.meta import SUBGRAPH_INPUTS
from fxquant.core.testing import tiny_vit

T = APH_TEMPERATURE


class LinearTail(nn.Module):
    """``O = pre(x)`` ([B, N, C]); logits = ``head(O[:, 0])`` (class token) or ``head(O)`` per token."""

    def __init__(self, per_token: bool = False, offset: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.per_token = per_token
        self.pre = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)
        with torch.no_grad():
            self.pre.weight.copy_(torch.randn(6, 4, generator=g) * (0.1 if offset else 1.0))
            self.pre.bias.copy_(torch.randn(6, generator=g) + offset)
            self.head.weight.copy_(torch.randn(5, 6, generator=g) * (0.05 if offset else 1.0))

    def forward(self, x):
        o = self.pre(x)
        return self.head(o if self.per_token else o[:, 0])


def _graph(model, x):
    gm = fxquant.trace(model, (x,))
    return gm, next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "pre")


def _closed_form(model: LinearTail, xs: list[torch.Tensor], directions: list[torch.Tensor] | None = None) -> torch.Tensor:
    """mean over images of |H·d| with H = Wᵀ (diag p − p pᵀ) W / T² per token (the class token
    only, or every token), d = 1 unless ``directions`` (one per batch) are given."""
    w = model.head.weight.double()
    total, n = 0, 0
    for i, x in enumerate(xs):
        with torch.no_grad():
            o = model.pre(x).double()
        d = torch.ones_like(o) if directions is None else directions[i].double()
        z = o @ w.T + model.head.bias.double()
        p = torch.softmax(z / T, dim=-1)
        s = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        h = w.T @ s @ w / T**2  # [B, N, C, C]
        hd = (h @ d.unsqueeze(-1)).squeeze(-1).abs()
        if not model.per_token:
            hd[:, 1:] = 0
        total = total + hd.sum(0)
        n += x.shape[0]
    return total / n


def _batches(seed=0, n=3, batch=2, tokens=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, 4, generator=g) for _ in range(n)]


@pytest.mark.parametrize("per_token", [False, True], ids=["cls-token", "per-token"])
def test_aph_recovers_the_row_sums_of_the_closed_form_hessian(per_token):
    model, xs = LinearTail(per_token).eval(), _batches()
    gm, o = _graph(model, xs[0])
    h = average_perturbation_hessian(gm, o, xs)
    ref = _closed_form(model, xs)
    assert h.dtype == torch.float64 and h.shape == (3, 6)
    assert torch.allclose(h, ref, rtol=1e-6, atol=1e-12)
    assert ref.abs().max() > 1e-4  # not trivially zero
    if not per_token:
        assert torch.equal(h[1:], torch.zeros_like(h[1:]))  # only the class token reaches the logits


def test_aph_rademacher_direction_matches_the_closed_form():
    model, xs = LinearTail(per_token=True).eval(), _batches()
    gm, o = _graph(model, xs[0])
    h = average_perturbation_hessian(gm, o, xs, direction="rademacher", seed=5)
    gen = torch.Generator().manual_seed(5)  # one ±1 draw of O's shape per batch, in batch order
    dirs = [torch.randint(0, 2, (x.shape[0], 3, 6), generator=gen) * 2 - 1 for x in xs]
    assert torch.allclose(h, _closed_form(model, xs, dirs), rtol=1e-6, atol=1e-12)


def test_float32_perturbation_vanishes_on_large_values_float64_does_not():
    """|O| >= 32: in float32 O ± 1e-6 == O, so the APH is exactly zero; float64 matches the closed form."""
    model = LinearTail(offset=100.0).eval()
    xs = _batches()
    gm, o = _graph(model, xs[0])
    with torch.no_grad():
        assert min(model.pre(x).abs().min().item() for x in xs) >= 32
    h32 = average_perturbation_hessian(gm, o, xs, dtype=torch.float32)
    h64 = average_perturbation_hessian(gm, o, xs)
    ref = _closed_form(model, xs)
    assert torch.equal(h32, torch.zeros_like(h32))
    assert ref[0].min() > 1e-6 and torch.allclose(h64, ref, rtol=1e-6, atol=1e-12)


def test_ones_direction_is_the_layernorm_null_direction_in_a_pre_ln_vit():
    """A pre-LN ViT's logits do not change when a constant is added to every channel of a block
    output: H·1 = 0, so the paper's direction measures roundoff; a ±1 pattern does not."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gm = fxquant.trace(tiny_vit(), (x[:2],))
    propagate_shapes(gm, (x[:2],))
    out = match.find_blocks(gm)[0].output
    ones = average_perturbation_hessian(gm, out, [x[:2], x[2:]])
    rad = average_perturbation_hessian(gm, out, [x[:2], x[2:]], direction="rademacher")
    assert ones.abs().max() < 1e-8 * rad.abs().max()
    assert (rad > 0).float().mean() > 0.9


def test_aph_streams_independent_of_batching_and_caps_images():
    model = LinearTail(per_token=True).eval()
    xs = _batches(n=3, batch=2)
    gm, o = _graph(model, xs[0])
    one = average_perturbation_hessian(gm, o, [torch.cat(xs)])
    assert torch.allclose(average_perturbation_hessian(gm, o, xs), one, rtol=1e-12, atol=1e-15)
    capped = average_perturbation_hessian(gm, o, xs, max_images=3)
    assert torch.allclose(capped, average_perturbation_hessian(gm, o, [torch.cat(xs)[:3]]), rtol=1e-12, atol=1e-15)
    assert not torch.allclose(capped, one)


class _LateReader(nn.Module):
    """A value computed before ``O`` (``scale``) is read after it: the tail takes it as an input."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        scale = x.abs().mean(dim=-1, keepdim=True)
        o = self.pre(x)
        return self.head((o * scale)[:, 0]) + x[:, 0, :1]


def test_tail_takes_live_values_and_graph_inputs():
    x = _batches()[0]
    model = _LateReader().eval()
    gm, o = _graph(model, x)
    tail = tail_graph(gm, o)
    names = tail.meta[SUBGRAPH_INPUTS]
    assert names[0] == "pre" and "mean" in names and names[-1] == "x"
    with torch.no_grad():
        scale = x.abs().mean(dim=-1, keepdim=True)
        assert torch.equal(tail(model.pre(x), scale, x), gm(x))
    h = average_perturbation_hessian(gm, o, [x])
    assert h.shape == (3, 6) and h[0].abs().max() > 0 and torch.equal(h[1:], torch.zeros_like(h[1:]))


def test_aph_errors():
    model = LinearTail().eval()
    xs = _batches()
    gm, o = _graph(model, xs[0])
    with pytest.raises(CalibrationError, match="needs calibration batches"):
        average_perturbation_hessian(gm, o, lambda m: m(xs[0]))
    with pytest.raises(CalibrationError, match="empty"):
        average_perturbation_hessian(gm, o, [])
    with pytest.raises(ConfigError, match="direction must be one of"):
        average_perturbation_hessian(gm, o, xs, direction="random")
