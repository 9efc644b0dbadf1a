"""Drafting from earlier requests' outputs (numpy only): what it copies, what it does not, its bound, its file."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_spec.drafters.history import HistoryConfig, OutputHistoryDrafter
from retrieval_spec.drafters.prompt_lookup import PromptLookupConfig
from retrieval_spec.errors import TokenizerMismatchError
from retrieval_spec.tree import DraftTree, Source, StepFeedback


def run(drafter, output, request="earlier"):
    """One finished request that output ``output``."""
    drafter.start(request, np.array([0], np.int32))
    drafter.observe(request, StepFeedback(tree=DraftTree.empty(0), accepted_nodes=np.array([0], np.int32),
                                          new_tokens=np.asarray(output, np.int32)))
    drafter.finish(request)


def test_copies_from_earlier_requests_not_the_running_one():
    drafter = OutputHistoryDrafter()
    run(drafter, [5, 6, 7, 8, 9])
    drafter.start("now", np.array([1], np.int32))
    tree = drafter.propose("now", np.array([3, 6, 7], np.int32), budget=8)
    assert tree.tokens.tolist() == [7, 8, 9] and set(tree.sources[1:]) == {Source.HISTORY}
    drafter.observe("now", StepFeedback(tree=tree, accepted_nodes=np.array([0], np.int32),
                                        new_tokens=np.array([40, 41, 42], np.int32)))
    assert len(drafter.propose("now", np.array([40, 41], np.int32), budget=8)) == 1  # prompt lookup's job
    assert len(drafter.propose("now", np.array([9, 5], np.int32), budget=8)) == 1  # never across requests


def test_history_is_bounded_keeping_the_newest_outputs():
    drafter = OutputHistoryDrafter(HistoryConfig(matching=PromptLookupConfig(min_ngram=1), max_tokens=20))
    run(drafter, [1, 2, 3, 4, 5, 6])
    for i in range(5):
        run(drafter, [100 + i, 101 + i, 102 + i])
    assert drafter.history.length <= 20
    assert len(drafter.propose("now", np.array([1], np.int32), budget=4)) == 1  # the oldest output is gone
    assert drafter.propose("now", np.array([104], np.int32), budget=4).tokens[1] == 105


def test_history_saves_and_loads_pinned_to_the_tokenizer(tmp_path):
    drafter = OutputHistoryDrafter()
    run(drafter, [5, 6, 7, 8])
    drafter.save(tmp_path, "tok-a")
    again = OutputHistoryDrafter()
    again.load(tmp_path, "tok-a", 10_000)
    assert again.propose("next", np.array([5, 6], np.int32), budget=4).tokens.tolist() == [6, 7, 8]
    with pytest.raises(TokenizerMismatchError, match="tok-a"):
        again.load(tmp_path, "tok-b", 10_000)
