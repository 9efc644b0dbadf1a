"""The batch allocation of a serving step (TETRIS) and the step cost it is learned on, without any model."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_spec.sizing import StepCost, allocate


def expected_per_ms(scores, lengths, cost: StepCost) -> float:
    tokens = len(scores) + sum(float(np.sum(s[:m])) for s, m in zip(scores, lengths))
    return tokens / float(cost.ms(len(scores) + int(np.sum(lengths))))


def test_the_allocation_is_the_best_one_and_keeps_each_row_a_prefix():
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows = rng.integers(1, 5)
        scores = [np.sort(rng.random(rng.integers(0, 4)))[::-1] for _ in range(rows)]
        cost = StepCost.line(rng.uniform(5, 40), rng.uniform(0, 5))
        lengths = allocate(scores, cost)
        assert all(0 <= m <= len(s) for s, m in zip(scores, lengths))
        best = max(expected_per_ms(scores, choice, cost)  # every choice of prefix lengths, exhaustively
                   for choice in np.ndindex(*[len(s) + 1 for s in scores]))
        assert expected_per_ms(scores, lengths, cost) == pytest.approx(best)


def test_a_flat_step_takes_every_candidate_and_a_steep_one_only_the_likely_ones():
    scores = [np.array([.95, .9, .85, .8]), np.array([.2, .1]), np.array([.6, .3])]
    assert allocate(scores, StepCost.line(30.0, 0.0)).tolist() == [4, 2, 2]
    assert allocate(scores, StepCost.line(30.0, 3.0)).tolist() == [4, 0, 1]
    assert allocate(scores, StepCost.line(1.0, 100.0)).tolist() == [0, 0, 0]  # verification dearer than any gain
    assert allocate([], StepCost.line(1.0, 1.0)).tolist() == []


def test_the_step_cost_is_learned_from_noisy_steps_and_flat_until_then():
    rng = np.random.default_rng(1)
    cost = StepCost()
    cost.observe(40, 30.0)
    assert float(cost.ms(100) - cost.ms(1)) == 0  # one step says nothing about the slope
    for _ in range(64):
        tokens = int(rng.integers(32, 160))
        noise = rng.exponential(8.0) if rng.random() < 0.3 else 0.0  # other processes only ever add time
        cost.observe(tokens, 25.0 + 0.4 * tokens + noise)
    assert cost.per_token_ms == pytest.approx(0.4, rel=0.25)
    assert float(cost.ms(100)) == pytest.approx(65.0, rel=0.1)
    for bad in (0.0, -1.0, float("nan")):
        cost.observe(50, bad)
    assert cost.per_token_ms == pytest.approx(0.4, rel=0.25)
