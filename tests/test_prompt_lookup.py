"""Prompt lookup without a model: a copy picks up right after an edit instead of waiting for a long match again."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from retrieval_spec.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter
from retrieval_spec.tree import Source, StepFeedback


def decode(drafter: PromptLookupDrafter, prompt: np.ndarray, target: np.ndarray) -> list[int]:
    """Greedy verification of the drafter's trees against ``target``: the tokens gained at each step."""
    drafter.start("r", prompt)
    context, gained = prompt.copy(), []
    while len(context) - len(prompt) < len(target):
        tree = drafter.propose("r", context, 32)
        produced = len(context) - len(prompt)
        path, node = [0], 0
        while True:  # descend while a child carries the target's next token
            children = np.flatnonzero(tree.parents == node)
            want = target[produced + len(path) - 1] if produced + len(path) - 1 < len(target) else -1
            match = [c for c in children if tree.tokens[c] == want]
            if not match:
                break
            node = int(match[0])
            path.append(node)
        new = target[produced : produced + len(path)]
        drafter.observe("r", StepFeedback(tree=tree, accepted_nodes=np.array(path[: len(new)], np.int32),
                                          new_tokens=new))
        context = np.concatenate([context, new])
        gained.append(len(new))
    return gained


def test_a_copy_resumes_right_after_a_renamed_token():
    rng = np.random.default_rng(0)
    prompt = rng.permutation(np.arange(100, 400)).astype(np.int32)[:120]  # no token repeats: no chance matches
    target = prompt[20:80].copy()
    target[[15, 35]] = [7, 8]  # two renamed tokens the prompt never had
    with_resync = decode(PromptLookupDrafter(), prompt, target)
    without = decode(PromptLookupDrafter(dataclasses.replace(PromptLookupConfig(), resync_window=0)), prompt, target)
    assert sum(with_resync) == sum(without) == len(target)
    # Without resync, each edit costs the steps until an n-gram after it matches again; with it, one step.
    assert len(with_resync) < len(without)
    assert max(with_resync) > 10


@pytest.mark.parametrize("shortest, longest_gram", [(1, 3), (2, 4)])
def test_the_ngram_index_agrees_with_a_scan_of_its_text(shortest, longest_gram):
    """Copies (longest match first, most recent first within a length, measured back up to ``longest``; the spans
    after them cut before a separator) equal a brute-force scan, the text appended with separators among it: in one
    piece, in pieces of every size and in small chunks, searched between appends; the text grows past its capacity
    and its table's slots (the chains re-threaded), and the 6-symbol alphabet's n-grams share slots (hash
    collisions). The one-call trie of the copies is the trie of what ``copies`` returns."""
    from retrieval_spec.drafters.ngram_index import SEPARATOR, NgramIndex
    from retrieval_spec.drafters.prompt_lookup import copied_spans_trie, copied_trie

    rng = np.random.default_rng(3)
    for trial in range(60):
        text = rng.integers(0, 6, 600).astype(np.int32)
        text[rng.random(600) < 0.03] = SEPARATOR
        index = NgramIndex(shortest, longest_gram, capacity=8)
        pieces = ([600] if trial % 3 == 0 else [74, 20, 5, 130, 3, 300] if trial % 3 == 1 else [40] * 14)
        for chunk in np.split(text, np.cumsum(pieces)[:-1]):
            index.append(chunk)
            if trial % 2:
                index.copies(rng.integers(0, 6, 5).astype(np.int32), 4, 12, 10)
        prefix = text[:5][text[:5] >= 0] if trial % 2 else text[:0]  # half the contexts shorter than max_ngram
        context = np.concatenate([prefix, rng.integers(0, 6, 1 + trial % 9)]).astype(np.int32)
        starts, lengths, tokens, sizes = index.copies(context, 8, 12, 10)
        expected = []  # (length, end) of every suffix match of shortest-longest_gram tokens, measured back up to 12
        for end in range(1, len(text) + 1):
            n = next((n for n in range(longest_gram, shortest - 1, -1) if n <= min(end, len(context))
                      and np.array_equal(text[end - n : end], context[-n:])), 0)
            if n and end < len(text):
                window = min(12, end, len(context))
                equal = text[end - window : end][::-1] == context[-window:][::-1]
                expected.append((max(n, window if equal.all() else int(np.argmin(equal))), end))
        by_index = sorted(expected, key=lambda m: (-min(m[0], longest_gram), -m[1]))[:8]  # what the index finds first
        wanted = sorted(by_index, key=lambda m: -m[0])
        assert list(zip(lengths.tolist(), starts.tolist())) == wanted
        spans = []
        for start in starts.tolist():
            stop = next((i for i in range(start, min(start + 10, len(text))) if text[i] == SEPARATOR),
                        min(start + 10, len(text)))
            assert index.span(start, 10).tolist() == text[start:stop].tolist()
            spans.append(text[start:stop].tolist())
        assert [piece.tolist() for piece in np.split(tokens, np.cumsum(sizes)[:-1])] == (spans or [[]])
        config = PromptLookupConfig(min_ngram=shortest, max_ngram=longest_gram, max_matches=8, depth=10, longest=12)
        fused, fused_starts, fused_lengths = copied_trie(int(context[-1]), index, context, config, Source.PROMPT, 16)
        tree = copied_spans_trie(int(context[-1]), tokens, sizes, lengths, 10, Source.PROMPT, 16)
        assert fused_starts.tolist() == starts.tolist() and fused_lengths.tolist() == lengths.tolist()
        for name in ("tokens", "parents", "scores", "sources", "matches", "depths"):
            assert getattr(fused, name).tolist() == getattr(tree, name).tolist()


def test_each_index_draws_its_own_hash_seed_and_finds_the_same_copies():
    """Where n-grams land in the table is seeded per index (text cannot be made ahead of time to crowd one slot);
    what a lookup finds never depends on it."""
    from retrieval_spec.drafters.ngram_index import NgramIndex

    text = np.random.default_rng(5).integers(0, 5, 3000).astype(np.int32)
    first, second = NgramIndex(1, 4), NgramIndex(1, 4)
    first.append(text)
    second.append(text)
    assert first.chains[2] != second.chains[2]
    for end in range(10, 3000, 97):
        found = [index.copies(text[:end], 8, 64, 16) for index in (first, second)]
        assert all(np.array_equal(a, b) for a, b in zip(*found))
