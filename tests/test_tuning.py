"""Self-tuning without a model and with a fake clock: the cost curve learned from real steps corrects a wrong
cached one (flat as on a GPU, or with a bogus spike), and the speed guard stops drafting where it does not pay."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_spec.sizing import BatchSizing, CostCurve, CostModel, Sizer, SpeedGuard, best_size
from retrieval_spec.verifier import PhaseTimer

SIZES = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64])
# The "machine": SmolLM2 on 2 CPU cores (ANCHORS.md), interpolated on the probe's sizes.
TRUE = CostCurve(sizes=SIZES, ms=np.interp(SIZES, [1, 2, 4, 8, 16, 32, 64], [45, 63, 90, 94.5, 103.5, 121.5, 180.0]))
FLAT = CostCurve(sizes=SIZES, ms=np.full(len(SIZES), 45.0))  # probed on a GPU-like machine, or by a broken probe
SPIKE = CostCurve(sizes=SIZES, ms=np.where(SIZES == 8, 400.0, TRUE.ms))  # one size measured during a load burst
# Candidate path probabilities of a copy that is usually right: the optimum is a mid-sized tree.
SCORES = 0.9 ** np.arange(1, 41)


def clock(size: int, rng: np.random.Generator) -> float:
    """A step's time: the true cost, plus what other processes add now and then (never less)."""
    return float(TRUE.ms[np.searchsorted(SIZES, size)] * (1 + rng.exponential(0.05)))


def efficiency(nodes: int, run: int) -> float:
    """Expected tokens per true millisecond of a step verifying ``nodes`` candidates in ``run`` rows."""
    return (1 + SCORES[:nodes].sum()) / float(np.interp(run, SIZES, TRUE.ms))


def decode(sizing: BatchSizing, steps: int, rng: np.random.Generator) -> tuple[list[float], list[bool]]:
    """The efficiency of each of ``steps`` steps sized by the engine's sizer on the fake clock, and whether each
    step was an exploration."""
    achieved, explored = [], []
    for _ in range(steps):
        plan = sizing.plan([SCORES], [0], first=False)
        sizing.learn(plan, timed(clock(plan.run, rng)), [1])
        achieved.append(efficiency(plan.size, plan.run))
        explored.append(plan.explored)
    return achieved, explored


def timed(forward_ms: float) -> PhaseTimer:
    """A step's timer that saw ``forward_ms`` of forward and nothing else."""
    timer = PhaseTimer(lambda: 0.0)
    timer.ms["forward"] = forward_ms
    return timer


class Given:
    """A cost source that hands out one curve and stores nothing."""

    def __init__(self, curve: CostCurve) -> None:
        self.curve = curve

    def cost_prior(self, batch: int) -> CostCurve:
        return self.curve

    def store_costs(self, batch: int, curve: CostCurve) -> None:
        pass


@pytest.mark.parametrize("prior", [FLAT, SPIKE, TRUE], ids=["flat", "spike", "true"])
def test_a_wrong_cached_curve_is_corrected_within_tens_of_steps(prior):
    rng = np.random.default_rng(0)
    best = best_size(SCORES, TRUE)
    optimum = efficiency(best, TRUE.padded_size(1 + best))
    achieved, explored = decode(Sizer(Given(prior)).start(1), 80, rng)
    settled = [e for e, exploring in zip(achieved[40:], explored[40:]) if not exploring]
    assert min(settled) >= 0.97 * optimum, (optimum, achieved)
    if prior is FLAT:
        assert np.mean(achieved[:5]) < 0.9 * optimum  # the wrong curve did cost something at first


def test_a_probe_taken_on_a_loaded_machine_comes_down_to_the_quick_steps():
    rng = np.random.default_rng(1)
    model = CostModel(CostCurve(sizes=SIZES, ms=TRUE.ms * 1.5))
    for _ in range(60):
        model.observe(8, clock(8, rng))
    assert model.curve().ms[np.searchsorted(SIZES, 8)] == pytest.approx(94.5, rel=0.06)
    assert model.curve().ms[0] == pytest.approx(45.0, rel=0.1)  # unobserved sizes shift with the observed ones


def guard_run(tokens_per_step: float, step_cost: float, steps: int = 600) -> tuple[float, float]:
    """Plain steps cost 1; drafting steps ``step_cost`` and gain ``tokens_per_step``. Returns (tokens, time)."""
    guard, tokens, time = SpeedGuard(), 0.0, 0.0
    for _ in range(steps):
        gained, cost = (tokens_per_step, step_cost) if guard.drafting else (1.0, 1.0)
        guard.record(gained, cost, plain_step_ms=1.0)
        tokens, time = tokens + gained, time + cost
    return tokens, time


def test_the_guard_stops_drafting_that_does_not_pay_and_keeps_drafting_that_does():
    tokens, time = guard_run(tokens_per_step=1.05, step_cost=1.3)  # a busy machine: drafting slows decoding
    assert tokens / time >= 0.95  # plain decoding is 1.0; always drafting would be 0.81
    tokens, time = guard_run(tokens_per_step=2.0, step_cost=1.3)
    assert tokens / time == pytest.approx(2.0 / 1.3)  # never paused


def test_a_batch_drafts_while_its_rows_together_gain_and_pauses_together():
    """The rows of a batch share each step's cost: one row that gains little is carried by the others (pausing it
    would save nothing), and when the batch as a whole does not pay, every row pauses."""
    curve = CostCurve(sizes=np.array([1, 2]), ms=np.array([1.0, 1.3]))
    sizing = Sizer(Given(curve)).start(2)
    plan = sizing.plan([np.array([0.9]), np.array([0.9])], [0, 0], first=False)
    while plan.plain:  # the first steps time a plain step
        sizing.learn(plan, timed(1.0), [1, 1])
        plan = sizing.plan([np.array([0.9]), np.array([0.9])], [0, 0], first=False)
    for _ in range(100):  # row 0 gains nothing, row 1 three tokens, at 1.3 plain steps: 1.5 a row, > 1.3
        sizing.learn(plan, timed(1.3), [1, 3])
        assert sizing.floor == 0.0
    paused = []
    for _ in range(3 * sizing.guard.window):  # both gain nothing: the batch pauses, every row with it
        sizing.learn(plan, timed(1.3), [1, 1])
        paused.append(sizing.floor > 0.0)
    assert any(paused)


def test_the_guard_keeps_looking_while_the_drafters_cost_only_their_own_time():
    """Steps in which nothing worth verifying was found: plain forwards plus about 1% of drafting. Pausing would save
    that 1% and miss the copy that starts meanwhile; the guard goes on looking."""
    guard = SpeedGuard()
    for _ in range(200):
        guard.record(1, 1.01, plain_step_ms=1.0)
        assert guard.drafting


def test_a_paused_row_keeps_only_confident_drafts_unless_asking_is_what_costs():
    guard = SpeedGuard(confident=0.6)
    assert guard.floor == 0.0
    for _ in range(guard.judge_after):
        guard.record(1, 2.0, plain_step_ms=1.0)  # drafting at half of plain speed
    assert not guard.drafting and guard.floor == 0.6
    for _ in range(guard.first_pause):
        guard.record(1, 1.0, plain_step_ms=1.0)
    assert guard.drafting and guard.floor == 0.0
    for _ in range(guard.judge_after):  # now asking the drafters is what costs (a slow datastore): ask none
        guard.record(1, 2.0, plain_step_ms=1.0, draft_ms=0.9)
    assert not guard.drafting and guard.floor == float("inf")


def test_the_guard_retries_and_recovers_when_drafting_pays_again():
    guard = SpeedGuard()
    for _ in range(40):
        guard.record(1 if guard.drafting else 1, 2.0 if guard.drafting else 1.0, plain_step_ms=1.0)
    assert guard.pause > guard.first_pause  # failed retries doubled the pause
    drafting = []
    for _ in range(300):
        drafting.append(guard.drafting)
        guard.record(3 if guard.drafting else 1, 1.2 if guard.drafting else 1.0, plain_step_ms=1.0)
    assert all(drafting[-100:])


def test_the_guard_measures_drafting_against_plain_steps_as_they_really_ran():
    """On a noisy machine the curve's quantile sits below the mean step; the guard's price of a plain step is the
    mean of plain steps end to end, the same statistic as its drafting steps."""
    model = CostModel(TRUE)
    assert model.plain_step_ms(overhead_ms=2.0) == pytest.approx(47.0)  # no plain step yet: the curve's
    for ms in [45.0, 45.0, 45.0, 135.0] * 8:  # one step in four slowed by another process
        model.observe(1, ms)
        model.observe_plain_step(ms + 2.0)
    assert model.curve().ms[0] == pytest.approx(45.0)
    assert model.plain_step_ms(overhead_ms=2.0) == pytest.approx(69.5, rel=0.1)  # the mean, 67.5 + 2


def test_a_spike_on_a_size_the_decoder_steers_around_is_measured_and_corrected():
    """Trees here run at 5 nodes or 16 (short and long copies); a spike cached at 8 makes every tree avoid 8, so
    only exploration can measure it. It does, within a few explorations, and the curve stored is right there."""
    rng = np.random.default_rng(3)
    spiked = CostCurve(sizes=SIZES, ms=np.where(SIZES == 8, 900.0, TRUE.ms))
    model = CostModel(spiked)
    for step in range(20 * model.explore_every):
        run = model.explore(16 if step % 5 == 0 else 5)
        model.observe(run, clock(run, rng))
    at_8 = np.searchsorted(SIZES, 8)
    assert model.observed[at_8] > 0
    assert model.curve().ms[at_8] < 1.25 * TRUE.ms[at_8]  # 900 cached; a measured step or two since


def test_sizes_the_padding_jumps_over_are_measured():
    """A probe taken in a noisy moment made 2-16 nodes look dearer than 24, so 5-node trees are padded to 24 and
    every size between goes unmeasured; exploration runs them from the trees' own size up, and the padding comes
    back down to what the machine really costs."""
    rng = np.random.default_rng(4)
    noisy = CostCurve(sizes=SIZES, ms=np.where((SIZES > 1) & (SIZES < 24), 2.5 * TRUE.ms, TRUE.ms))
    model = CostModel(noisy)
    assert noisy.padded_size(5) == 24
    for _ in range(12 * model.explore_every):
        run = model.explore(model.curve().padded_size(5), needed=5)
        model.observe(run, clock(run, rng))
    assert np.all(model.observed[(SIZES >= 5) & (SIZES < 24)] > 0)
    assert model.curve().padded_size(5) < 24


def test_explorations_of_dear_sizes_are_spaced_by_what_they_cost():
    """On a steep curve (a larger model on a CPU: 32 nodes cost 9 plain steps) the decoder runs 2-node trees, and
    one step at 48 left every size between unmeasured. Exploration measures them all, yet, until it has, never
    takes more than ``1 / explore_every`` of the time (spaced in steps instead: 9%)."""
    steep = CostCurve(sizes=SIZES, ms=45.0 * (1 + SIZES / 4))
    model = CostModel(steep, stale_after=np.inf)  # the step at 48 keeps the range open however long this takes
    model.observe(48, float(steep.ms[SIZES == 48][0]))
    at = lambda size: float(steep.ms[np.searchsorted(SIZES, size)])  # noqa: E731
    total = extra = 0.0
    for _ in range(200 * model.explore_every):
        run = model.explore(2)
        model.observe(run, at(run))
        total, extra = total + at(run), extra + max(at(run) - at(2), 0.0)
        if np.all(model.observed[SIZES <= 32] >= model.min_samples):  # measured, every one
            break
    else:
        pytest.fail(f"sizes left unmeasured: {model.observed}")
    assert extra / total <= 1 / model.explore_every


def test_a_size_timed_once_in_a_noisy_moment_is_timed_again():
    """A size's only time was taken while another process ran (three times its cost); exploration times it again
    until it has enough times to be trusted, and the curve there is what it costs."""
    rng = np.random.default_rng(5)
    model = CostModel(TRUE)
    at_8 = np.searchsorted(SIZES, 8)
    model.observe(8, 3 * TRUE.ms[at_8])
    for _ in range(10 * model.explore_every):
        curve = model.curve()
        run = model.explore(curve.padded_size(7), needed=7)
        model.observe(run, clock(run, rng))
    assert model.observed[at_8] >= model.min_samples
    assert model.curve().ms[at_8] < 1.15 * TRUE.ms[at_8]


def test_one_slow_time_raises_neither_its_size_nor_its_neighbours_but_three_do():
    """One step at 5 nodes took 3.5 times its cost (another process ran): the decoder would otherwise price 3 to
    6 nodes far too high and, running them no more, never learn better. Three slow times are the machine."""
    rng = np.random.default_rng(6)
    model = CostModel(TRUE)
    for _ in range(20):
        model.observe(1, clock(1, rng))
    for size in (2, 10):
        model.observe(size, clock(size, rng))
    at = np.searchsorted(SIZES, [3, 4, 5, 6])
    model.observe(5, 3.5 * TRUE.ms[at[2]])
    np.testing.assert_allclose(model.curve().ms[at], TRUE.ms[at], rtol=0.12)
    for _ in range(2):
        model.observe(5, 3.5 * TRUE.ms[at[2]])
    assert model.curve().ms[at[2]] > 3 * TRUE.ms[at[2]]


def test_a_size_timed_during_a_load_burst_is_timed_again_once_the_burst_is_over():
    """Two rows cost less than one here (the few-row products), so plain steps run padded to 2 rows. During a
    load burst the 2-row steps took 2.5 times their cost, and plain steps went back to one row: 2 rows, priced
    from times the burst made, would never run again to be timed anew. Their times expire; within the stale
    horizon (and the explorations it takes) plain steps run at 2 rows again, at what 2 rows cost."""
    rng = np.random.default_rng(7)
    kernels = CostCurve(sizes=SIZES, ms=np.where(SIZES == 2, 36.0, TRUE.ms))
    at = lambda size: float(kernels.ms[np.searchsorted(SIZES, size)] * (1 + rng.exponential(0.05)))  # noqa: E731
    model = CostModel(kernels)
    for size in (1, 1, *[2] * 10):
        model.observe(size, at(size) * (2.5 if size == 2 else 1.0))
    assert model.curve().padded_size(1) == 1  # the burst's times steer plain steps off 2 rows
    spent, back_at = 0.0, None  # in plain steps (one row, 45 ms)
    while spent < 2 * model.stale_after:
        run = model.explore(model.curve().padded_size(1), needed=1)
        took = at(run)
        model.observe(run, took)
        spent += took / 45.0
        if back_at is None and model.curve().padded_size(1) == 2:
            back_at = spent
    assert back_at is not None and back_at <= model.stale_after + 4 * model.explore_every, back_at
    assert model.curve().padded_size(1) == 2
    assert model.curve().ms[1] < 1.15 * 36.0


def test_a_curve_cached_after_a_load_burst_is_corrected_by_plain_steps_alone():
    """The last process stored its curve with 2 rows priced from a load burst's times (2.5 times their cost); the
    next one starts from it, and while nothing is drafted its steps run at one row, never at 2 to time it anew (a
    size timed fewer than ``min_samples`` times is never priced above this prior). Plain steps explore the next
    size up, so within a couple of explorations they run at 2 rows again, at what 2 rows cost."""
    rng = np.random.default_rng(8)
    kernels = CostCurve(sizes=SIZES, ms=np.where(SIZES == 2, 36.0, TRUE.ms))  # two rows cheaper than one
    at = lambda size: float(kernels.ms[np.searchsorted(SIZES, size)] * (1 + rng.exponential(0.05)))  # noqa: E731
    model = CostModel(CostCurve(sizes=SIZES, ms=np.where(SIZES == 2, 2.5 * 36.0, TRUE.ms)))
    back_at = None
    for step in range(4 * model.explore_every):
        run = model.explore(model.curve().padded_size(1), needed=1)
        model.observe(run, at(run))
        if back_at is None and model.curve().padded_size(1) == 2:
            back_at = step
    assert back_at is not None and back_at <= 2 * model.explore_every, back_at
    assert model.curve().padded_size(1) == 2
    assert model.curve().ms[1] < 1.15 * 36.0
