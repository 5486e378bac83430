"""The multiple-choice knapsack shared by IGQ-ViT's group allocation and mixed precision
(``fxquant.core.knapsack``): exact against brute force, and the coarse units keep the budget."""

from __future__ import annotations

import itertools

import pytest
import torch

from fxquant.core.errors import ConfigError
from fxquant.core.knapsack import knapsack_units, solve_allocation


def test_knapsack_is_exact_and_within_budget():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n_items, n_choices = 4, 3
        cost = torch.randint(0, 6, (n_items, n_choices), generator=g).tolist()
        loss = torch.rand(n_items, n_choices, generator=g).tolist()
        floor = sum(min(row) for row in cost)
        budget = int(torch.randint(floor, floor + 12, (1,), generator=g))
        best = min((sum(loss[i][j] for i, j in enumerate(js)), js) for js in itertools.product(range(n_choices), repeat=n_items)
                   if sum(cost[i][j] for i, j in enumerate(js)) <= budget)
        got = solve_allocation(cost, loss, budget)
        assert sum(cost[i][j] for i, j in enumerate(got)) <= budget
        assert sum(loss[i][j] for i, j in enumerate(got)) == pytest.approx(best[0])
    with pytest.raises(ConfigError, match="allocate_groups: no assignment of the candidates fits the budget"):
        solve_allocation([[5, 6]], [[0.0, 1.0]], 4, what="allocate_groups")


def test_coarse_knapsack_units_keep_the_uniform_choice_and_the_exact_budget():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        units = torch.randint(1, 10_000, (5,), generator=g).tolist()
        costs = [[u * k for k in (1, 2, 4, 8, 16)] for u in units]
        uniform = [int(torch.randint(0, 5, (1,), generator=g))] * 5
        budget = sum(row[j] for row, j in zip(costs, uniform))
        for max_units in (3, 50, 10**9):
            coarse, coarse_budget = knapsack_units(costs, uniform, max_units)
            assert coarse_budget <= max(max_units, 0) + 5 and all(c >= 0 for row in coarse for c in row)
            assert sum(row[j] for row, j in zip(coarse, uniform)) <= coarse_budget  # the uniform choice fits
            for js in itertools.product(range(5), repeat=5):  # every coarse-feasible choice fits exactly
                if sum(row[j] for row, j in zip(coarse, js)) <= coarse_budget:
                    assert sum(row[j] for row, j in zip(costs, js)) <= budget
