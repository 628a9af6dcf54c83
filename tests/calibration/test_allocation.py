"""The KV-budget allocation as a pure function: an exact multiple-choice knapsack over per-layer losses, with
labelled inputs (known optimum, ties within TIE, infeasible budgets) and a brute-force check."""
import itertools
import random
from fractions import Fraction

import pytest

from uptrain.calibration.allocation import TIE, allocate, budget_heads
from uptrain.errors import UptrainError


def brute_force(losses, budget):
    """Every choice, exact sums: (loss, heads, G_l) of the best under the rule (within TIE of the least loss, the
    fewest heads, then the smallest tuple)."""
    choices = [(sum(Fraction(losses[i][g]) for i, g in enumerate(c)), sum(c), c)
               for c in itertools.product(*[sorted(x) for x in losses]) if sum(c) <= budget]
    least = min(loss for loss, _, _ in choices)
    heads, groups, loss = min((h, c, loss) for loss, h, c in choices if loss <= least + Fraction(TIE))
    return loss, heads, groups


def test_labelled_optimum():
    # layer 0 suffers most from losing heads, layer 1 least: the budget of 8 heads goes to layer 0 first
    losses = [{1: 4.0, 2: 1.0, 4: 0.5, 8: 0.0},
              {1: 0.1, 2: 0.05, 4: 0.01, 8: 0.0},
              {1: 2.0, 2: 1.0, 4: 0.25, 8: 0.0},
              {1: 0.5, 2: 0.375, 4: 0.125, 8: 0.0}]
    a = allocate(losses, 8)
    assert a.groups == (2, 1, 4, 1) and a.heads == 8 and a.loss == 1.0 + 0.1 + 0.25 + 0.5
    assert allocate(losses, 16).groups == (8, 2, 4, 2)  # 0 + 0.05 + 0.25 + 0.375 = 0.675
    assert allocate(losses, 32).groups == (8, 8, 8, 8) and allocate(losses, 32).loss == 0
    assert allocate(losses, 4).groups == (1, 1, 1, 1)  # the only choice that fits
    assert allocate(losses, 5).groups == (2, 1, 1, 1)  # the one spare head where it helps most


def test_ties_prefer_fewer_heads_then_the_smaller_tuple():
    # G = 1 and G = 2 lose the same: the fewer heads win, whatever the budget allows
    assert allocate([{1: 0.0, 2: 0.0, 4: 0.0}] * 3, 12).groups == (1, 1, 1)
    # identical layers, an odd head: (2, 1) and (1, 2) tie on loss and heads; the smaller tuple wins
    a = allocate([{1: 1.0, 2: 0.5}, {1: 1.0, 2: 0.5}], 3)
    assert a.groups == (1, 2) and a.heads == 3 and a.loss == 1.5


def test_a_near_tie_falls_the_same_way_whatever_the_cpus_rounding():
    """A layer that loses nothing measures float rounding (1e-8 here, 3e-8 on another CPU): either way it gets
    the fewest heads, and the head it does not take goes nowhere. A gain above TIE still buys a head."""
    other = {1: 0.5, 2: 0.1, 4: 0.0}
    for noise in ({1: 3e-8, 2: 1e-8, 4: 0.0}, {1: 1e-8, 2: 3e-8, 4: 0.0}, {1: 0.0, 2: 5e-7, 4: 0.0}):
        a = allocate([noise, other], 6)
        assert a.groups == (1, 4) and a.heads == 5 and a.loss == noise[1]
    assert allocate([{1: 2 * TIE, 2: 0.0, 4: 0.0}, other], 6).groups == (2, 4)
    # sums that differ by float rounding only (0.1 + 0.1 + 0.2 against 0.1 + 0.0 + 0.3) tie: the smaller tuple wins
    assert allocate([{1: 0.1, 2: 0.3}, {1: 0.1, 2: 0.0}, {1: 0.3, 2: 0.2}], 4).groups == (1, 1, 2)


def test_exact_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        layers = rng.randint(1, 5)
        options = rng.choice([[1, 2, 4, 8], [1, 3, 9], [1, 2, 3, 6], [1, 5]])
        losses = [{g: rng.choice([0.0, 0.1, 0.2, 0.3, rng.random()]) for g in options} for _ in range(layers)]
        budget = rng.randint(layers, layers * max(options))
        a = allocate(losses, budget)
        loss, heads, groups = brute_force(losses, budget)
        assert (a.groups, a.heads, a.loss) == (groups, heads, float(loss))


def test_infeasible_budgets_say_the_smallest_one():
    with pytest.raises(UptrainError, match=r"--kv-budget 0.1 keeps the bytes of 3.2 of the source's 32 KV heads "
                                           r"\(summed over its 4 layers\).*smallest budget is 1/8 = 0.125"):
        budget_heads(0.1, [8] * 4, "--kv-budget 0.1")
    with pytest.raises(UptrainError, match="below the 4 that the fewest KV heads of every layer need"):
        allocate([{1: 0.0, 2: 0.0}] * 4, 3)
    with pytest.raises(ValueError, match="no layers"):
        allocate([], 3)


def test_budget_in_heads():
    assert budget_heads(2 / 9, [9] * 30) == 60  # 59.99999999999999 in floats: G = 2 of 9 in 30 layers
    assert budget_heads(0.5, [3] * 30) == 45
    assert budget_heads(0.25, [8] * 4) == 8
    assert budget_heads(1 / 8, [8] * 4) == 4  # MQA in every layer: the smallest budget
    assert budget_heads(0.3, [8] * 4) == 9  # a budget between two uniform G
