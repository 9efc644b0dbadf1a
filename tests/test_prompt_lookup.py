"""Prompt lookup without a model: a copy picks up right after an edit instead of waiting for a long match again."""

from __future__ import annotations

import dataclasses

import numpy as np

from retrieval_spec.drafters.prompt_lookup import PromptLookupConfig, PromptLookupDrafter
from retrieval_spec.tree import StepFeedback


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
