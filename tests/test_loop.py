"""The decoding loop's behaviour on a replay and a cost clock: learning the machine's cost, the speed guard,
exploration, padding and batches whose rows end early. No model, no patched module: the loop is handed a
replay verifier and the clock it charges (``conftest.replay_engine``)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import OracleDrafter, replay_engine
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.base import Drafter
from retrieval_spec.sizing import CostCurve
from retrieval_spec.tree import Branch, DraftTree, Source

SIZES = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64])
# The "machine": SmolLM2 on 2 CPU cores (ANCHORS.md), interpolated on the probe's sizes.
TRUE = CostCurve(sizes=SIZES, ms=np.interp(SIZES, [1, 2, 4, 8, 16, 32, 64], [45, 63, 90, 94.5, 103.5, 121.5, 180.0]))
FLAT = CostCurve(sizes=SIZES, ms=np.full(len(SIZES), 45.0))  # probed on a GPU-like machine, or by a broken probe
RNG = np.random.default_rng(0)
PROMPT = RNG.integers(0, 500, 60).astype(np.int32)
# An output that copies the prompt in long runs, with fresh tokens between them.
OUTPUT = np.concatenate([PROMPT[5:40], RNG.integers(0, 500, 10), PROMPT[20:60], RNG.integers(0, 500, 15),
                         PROMPT[:40], RNG.integers(0, 500, 10), PROMPT[10:60]]).astype(np.int32)


def test_the_loop_learns_the_machine_from_a_poisoned_curve_and_stays_exact():
    generator, verifier, clock = replay_engine([(PROMPT, OUTPUT)], [OracleDrafter(OUTPUT, len(PROMPT), 500, True)],
                                               TRUE, prior=FLAT)
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=len(OUTPUT), tree_budget=32))
    np.testing.assert_array_equal(result.tokens, OUTPUT)
    learned = generator.sizer.models[1]
    timed = learned.observed >= learned.min_samples  # a size timed fewer times is priced at most at its prior
    np.testing.assert_allclose(learned.curve().ms[timed], TRUE.ms[timed], rtol=0.02)
    assert learned.observed[0] > 0 and timed.sum() >= 3  # plain steps were measured, and the sizes drafted
    assert result.stats.paused_steps == 0  # an always-right drafter pays


def test_the_loop_stops_drafting_whose_cost_the_curve_cannot_see():
    """Right drafts, but drafting itself (a slow datastore, a busy core) costs more than the tokens it gains."""
    cost = CostCurve(sizes=SIZES, ms=np.full(len(SIZES), 40.0))

    class SlowNextToken(Drafter):
        """Always right, one token ahead (two tokens a step), and 60 ms to ask: 100 ms for 2 tokens."""

        source = Source.PROMPT

        def propose(self, request, context, budget):
            clock.advance(60.0)
            done = len(context) - len(PROMPT)
            return DraftTree.from_paths(int(context[-1]), [OUTPUT[done : done + 1]], [np.array([0.9])], self.source)

    generator, _, clock = replay_engine([(PROMPT, OUTPUT)], [SlowNextToken()], cost)
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=len(OUTPUT), tree_budget=16))
    np.testing.assert_array_equal(result.tokens, OUTPUT)
    assert result.stats.paused_steps > 0.6 * result.stats.steps
    assert clock() * 1e3 <= 1.06 * 40.0 * len(OUTPUT)  # drafting always: 1.25x plain decoding's time


def test_only_whole_batch_steps_are_timed_or_explore():
    """Only a step that runs every row of the batch times its curve, so only such a step may run an exploration:
    once a row has finished, an explored size would be a padded forward whose time is thrown away."""
    from retrieval_spec.sizing import Sizer

    sizing = Sizer(replay_engine([(PROMPT, OUTPUT)], [], FLAT)[1]).start(4)
    scores = [np.array([0.9, 0.8, 0.5])] * 4
    assert sizing.plan(scores, [0] * 4, first=False).run == 1  # all rows: a plain step is timed first
    partial = sizing.plan(scores[:3], [0] * 3, first=False)  # a row has finished
    assert not partial.timed and partial.run == partial.needed == 4


def test_a_batch_whose_rows_end_early_stays_exact_and_learns_from_whole_steps_only():
    rng = np.random.default_rng(3)
    prompts = [rng.permutation(400)[:60].astype(np.int32) + 400 * (b == 1) for b in range(4)]
    outputs = [np.concatenate([p[5:45], rng.integers(0, 400, 10), p[:40]]).astype(np.int32) for p in prompts]
    eos = int(outputs[1][3])  # row 1 ends after 4 tokens (only row 1 holds tokens of 400 and up)
    cost = CostCurve(sizes=SIZES, ms=40.0 + SIZES)
    generator, verifier, _ = replay_engine(list(zip(prompts, outputs)), make_drafters("pld"), cost, prior=FLAT,
                                           eos=[eos], vocab=800)
    result = generator.generate_batch(prompts, GenerationConfig(max_new_tokens=90))
    for output, row in zip(outputs, result.rows):  # every row is its recording, up to its EOS
        stop = np.flatnonzero(output == eos)
        np.testing.assert_array_equal(row.tokens, output[: stop[0] + 1] if len(stop) else output)
    assert len(result.rows[1].tokens) == 4 < len(result.rows[0].tokens)
    whole = sum(rows == 4 for rows, _, _ in verifier.forwards)  # after the first step, which is the prompts'
    assert 0 < generator.sizer.models[4].steps.sum() == whole < len(verifier.forwards)
    assert {rows for rows, run, needed in verifier.forwards if run != max(needed)} <= {4}


def test_plain_steps_run_padded_where_two_rows_cost_less_than_one():
    """On a machine whose one-row product is slow, the engine drafting nothing (``ar``) runs its steps at two rows
    too: ``ar`` against ``generate()`` is what the engine's step gains, ``auto`` against ``ar`` what drafting
    gains."""
    cost = CostCurve(sizes=SIZES, ms=np.where(SIZES == 2, 36.0, TRUE.ms))
    generator, verifier, clock = replay_engine([(PROMPT, OUTPUT)], [], cost)
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=len(OUTPUT)))
    np.testing.assert_array_equal(result.tokens, OUTPUT)
    runs = [run for _, run, needed in verifier.forwards if needed == [1]]
    assert runs.count(2) > 0.9 * len(runs)
    assert clock() * 1e3 < 0.85 * 45.0 * len(OUTPUT)


def test_a_paused_row_drafts_nothing_not_even_its_branch():
    """A drafter always wrong, whose tree costs more than it gains: the guard pauses the row, and a paused row's
    steps verify the root alone, without the look-ahead branch that would otherwise ride beside it."""

    class WrongWithBranch(Drafter):
        source = Source.POOL

        def propose(self, request, context, budget):
            wrong = (np.arange(1, 5) + int(context[-1])) % 500
            done = len(context) - len(PROMPT)
            wrong[0] = (OUTPUT[done] + 1) % 500 if done < len(OUTPUT) else wrong[0]
            return DraftTree.from_paths(int(context[-1]), [wrong.astype(np.int32)], [np.full(4, 0.9)], self.source)

        def branch(self, request, context):
            return Branch(tokens=np.array([7], np.int32), offsets=np.array([1], np.int32),
                          visible=np.ones((1, 1), bool))

    cost = CostCurve(sizes=SIZES, ms=40.0 + 2 * SIZES)
    generator, verifier, _ = replay_engine([(PROMPT, OUTPUT)], [WrongWithBranch()], cost)
    result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=len(OUTPUT)))
    np.testing.assert_array_equal(result.tokens, OUTPUT)
    assert result.stats.paused_steps > 0
    bare = sum(needed == [1] for _, _, needed in verifier.forwards)
    assert bare >= result.stats.paused_steps  # every paused step verified the root alone


@pytest.mark.parametrize("method", ["pld", "auto"])
def test_random_text_drafts_nothing_after_a_few_steps(method):
    rng = np.random.default_rng(0)
    prompt, output = rng.integers(0, 500, 300).astype(np.int32), rng.integers(0, 500, 400).astype(np.int32)
    generator, verifier, clock = replay_engine([(prompt, output)], make_drafters(method, 500), TRUE, fixed=True)
    generator.generate(prompt, GenerationConfig(max_new_tokens=len(output)))
    assert clock() * 1e3 <= 1.05 * 45.0 * len(output)  # overhead against plain decoding stays within 5%
    assert sum(max(needed) - 1 for _, _, needed in verifier.forwards[-200:]) <= 10


def test_copyable_text_is_drafted_and_pays():
    rng = np.random.default_rng(1)
    document = rng.integers(0, 500, 300).astype(np.int32)
    output = np.concatenate([document[50:150], rng.integers(0, 500, 20), document[200:280]]).astype(np.int32)
    generator, _, clock = replay_engine([(document, output)], make_drafters("pld"), TRUE, fixed=True)
    result = generator.generate(document, GenerationConfig(max_new_tokens=len(output)))
    assert result.stats.mean_accepted > 3
    assert clock() * 1e3 < 0.6 * 45.0 * len(output)  # predicted speedup above 1.6x


def test_a_long_verbatim_run_is_drafted_deeper_than_a_chance_match():
    """A 200-token verbatim copy of the prompt: once the run is long, whole copied spans are verified at once."""
    rng = np.random.default_rng(2)
    document = rng.integers(0, 500, 400).astype(np.int32)
    generator, verifier, _ = replay_engine([(document, document[100:300])], make_drafters("pld"),
                                           CostCurve.flat(64), fixed=True)
    result = generator.generate(document, GenerationConfig(max_new_tokens=200))
    assert result.stats.mean_accepted > 12  # the old 8-deep copies capped a step at 9 tokens
    assert max(max(needed) for _, _, needed in verifier.forwards) > 17
