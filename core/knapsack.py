"""Exact multiple-choice knapsack: one choice per item (a bit width, a group count) minimising the
summed loss under a cost budget. Used by IGQ-ViT's group-size allocation (``allocate_groups``) and
by mixed precision (``mixed_precision``)."""

from __future__ import annotations

import math

import torch

from .errors import ConfigError


def solve_allocation(cost: list[list[int]], loss: list[list[float]], budget: int, *, what: str = "allocation") -> list[int]:
    """Multiple-choice knapsack: one choice ``j`` per item ``i`` minimising ``Σ loss[i][j]`` subject
    to ``Σ cost[i][j] <= budget`` (non-negative integer costs), by exact dynamic programming over
    the used budget. Returns the chosen index per item; raises a ``ConfigError`` naming ``what``
    when no choice fits."""
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for c_i, l_i in zip(cost, loss):
        new = torch.full_like(best, inf)
        pick = torch.full((budget + 1,), -1, dtype=torch.int64)
        for j, (c, lv) in enumerate(zip(c_i, l_i)):
            if c > budget:
                continue
            cand = torch.full_like(best, inf)
            cand[c:] = best[: budget + 1 - c] + lv
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best = new
        picks.append(pick)
    if not torch.isfinite(best).any():
        raise ConfigError(f"{what}: no assignment of the candidates fits the budget")
    used = int(torch.argmin(best))  # first minimum: the cheapest among equal losses
    out = []
    for pick, c_i in zip(reversed(picks), reversed(cost)):
        j = int(pick[used])
        out.append(j)
        used -= c_i[j]
    return out[::-1]


def knapsack_units(costs: list[list[int]], uniform: list[int], max_units: int) -> tuple[list[list[int]], int]:
    """Integer DP costs and budget for ``solve_allocation``, where the budget is the cost of the
    ``uniform`` choice (one index per item). Costs are taken relative to it, divided by a step
    (their gcd, or coarser so that the DP has at most ``max_units`` budget units) and rounded *up*,
    then shifted to be non-negative: every solution of the coarse problem fits the exact budget,
    and the uniform choice is always one of them."""
    deltas = [[c - row[u] for c in row] for row, u in zip(costs, uniform)]
    span = sum(-min(row) for row in deltas)  # exact budget left once every item takes its cheapest choice
    div = math.gcd(*[d for row in deltas for d in row]) or 1
    if span // div > max_units:
        div = math.ceil(span / max_units)
    coarse = [[-(-d // div) for d in row] for row in deltas]
    lows = [min(row) for row in coarse]
    return [[c - lo for c in row] for row, lo in zip(coarse, lows)], -sum(lows)


__all__ = ["solve_allocation", "knapsack_units"]
