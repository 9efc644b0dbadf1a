"""Speculative sampling reproduces the target distribution: chi-square tests that can fail.

The joint distribution of the first three sampled tokens is computed exactly from a tiny random model
(vocabulary 8, so 512 outcomes), then compared with 10^4 speculative samples and with 10^4 samples of
transformers' own ``generate(do_sample=True)``. A deliberately broken acceptance rule (each drafted child
accepted with its own probability in turn, the bonus drawn from the unreduced distribution, as REST's sampling
mode does) must fail the same test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import children_lists, StubTokenizer
from retrieval_spec.drafters.base import Drafter
from retrieval_spec.config import GenerationConfig
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.sizing import CostCurve
from retrieval_spec.tree import Source, trie_from_continuations
from retrieval_spec.verify import Sampler

VOCAB = 8
PROMPT = np.array([1, 5, 2, 7, 3], dtype=np.int32)
SAMPLES = 10_000
SEED_BASE = 100_000  # seeds SEED_BASE + i: fixed, so the test is deterministic (other bases were checked too)
FREE = CostCurve.flat(64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # scale the random logits: a first token of probability ~0.4, drafts often right, often wrong
        m.lm_head.weight.mul_(8.0)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


class RandomTreeDrafter(Drafter):
    """Trees of a given shape: ``wide`` gives six siblings in a fixed order (each with a random child), otherwise
    two random chains of four. A fixed sibling order is what exposes rules that favour early siblings."""

    source = Source.PROMPT

    def __init__(self, wide: bool, seed: int):
        self.wide, self.rng = wide, np.random.default_rng(seed)

    def propose(self, request, context, budget):
        if self.wide:
            paths = [np.array([t, self.rng.integers(VOCAB)]) for t in (0, 3, 7, 1, 4, 6)]
        else:
            paths = [self.rng.integers(0, VOCAB, 4) for _ in range(2)]
        weights = np.linspace(2, 1, len(paths))  # distinct weights keep the sibling order
        return trie_from_continuations(int(context[-1]), paths, weights, np.full(4, 0.9),
                                       self.source, budget)


def processed_probs(config: GenerationConfig, logits: torch.Tensor) -> np.ndarray:
    """(n, vocab) logits -> (n, vocab) float64 probabilities after the config's temperature, top-k and top-p."""
    return torch.softmax(Sampler.from_config(config).warpers(None, logits.float()), dim=-1).double().numpy()


def exact_joint(model, config: GenerationConfig) -> np.ndarray:
    """(VOCAB ** 3,) probability of every 3-token continuation, from processed next-token distributions."""
    joint = np.zeros((VOCAB,) * 3)
    with torch.no_grad():
        p1 = processed_probs(config, model(torch.as_tensor(PROMPT[None])).logits[0, -1:])[0]
        pairs = np.array(list(itertools.product(range(VOCAB), repeat=2)))
        ids = torch.as_tensor(np.concatenate([np.tile(PROMPT, (len(pairs), 1)), pairs], axis=1))
        logits = model(ids).logits
        p2 = processed_probs(config, logits[:: VOCAB, -2])  # after one token: rows for x1 = 0..7
        p3 = processed_probs(config, logits[:, -1]).reshape(VOCAB, VOCAB, VOCAB)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return joint.reshape(-1)


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness-of-fit p-value; outcomes expected fewer than 5 times are pooled into one cell."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expect = np.append(expected[~small], expected[small].sum())
    if expect[-1] < 5:  # pool too small to stand alone: merge it into the smallest regular cell
        j = int(np.argmin(expect[:-1]))
        observed[j] += observed[-1]
        expect[j] += expect[-1]
        observed, expect = observed[:-1], expect[:-1]
    statistic = float(((observed - expect) ** 2 / expect).sum())
    dof = len(expect) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def speculative_counts(model, config: GenerationConfig, wide: bool) -> np.ndarray:
    generator = SpeculativeGenerator(model, StubTokenizer(), [RandomTreeDrafter(wide, seed=1)], cost_curve=FREE)
    counts = np.zeros(VOCAB ** 3)
    for i in range(SAMPLES):
        result = generator.generate(PROMPT, GenerationConfig(max_new_tokens=3, tree_budget=16, seed=SEED_BASE + i,
                                                             temperature=config.temperature, top_k=config.top_k,
                                                             top_p=config.top_p))
        a, b, c = result.tokens
        counts[(a * VOCAB + b) * VOCAB + c] += 1
    return counts


SETTINGS = [
    pytest.param(GenerationConfig(temperature=1.0), True, id="t1-wide"),
    pytest.param(GenerationConfig(temperature=0.7, top_k=4), False, id="t0.7-topk4-deep"),
    pytest.param(GenerationConfig(temperature=1.3, top_p=0.8), True, id="t1.3-topp0.8-wide"),
]


@pytest.mark.slow
@pytest.mark.parametrize("config,wide", SETTINGS)
def test_speculative_sampling_matches_the_target_distribution(model, config, wide):
    probs = exact_joint(model, config)
    assert chi_square_p(speculative_counts(model, config, wide), probs) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("config,wide", SETTINGS[:1])
def test_transformers_sampling_matches_the_same_exact_distribution(model, config, wide):
    torch.manual_seed(0)
    ids = torch.as_tensor(PROMPT[None])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=3,
                         temperature=config.temperature, top_k=0, top_p=1.0, num_return_sequences=SAMPLES)
    tokens = out[:, len(PROMPT):].numpy()
    counts = np.bincount((tokens[:, 0] * VOCAB + tokens[:, 1]) * VOCAB + tokens[:, 2], minlength=VOCAB ** 3)
    assert chi_square_p(counts, exact_joint(model, config)) > 0.01


def broken_choose(self, logits: torch.Tensor, row) -> torch.Tensor:
    """REST-style sampling: at each node its drafted children are accepted in turn, each with its own (not
    renormalised) probability, and without any the bonus is drawn from the full distribution, rejected children
    included. Replaces ``Sampler.choose``: the token chosen at a node is what the walk compares with its children."""
    rng = np.random.default_rng(int(row.uniforms[0] * 2**32))
    probs = torch.softmax(self.warpers(None, logits.float()), dim=-1).double().numpy()
    kids = children_lists(row.tree.parents)
    chosen = np.zeros(len(row.tree), dtype=np.int64)
    for node, p in enumerate(probs):
        child = next((c for c in kids[node] if rng.random() < p[row.tree.tokens[c]]), None)
        chosen[node] = row.tree.tokens[child] if child is not None else min(
            int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right")), len(p) - 1)
    return torch.as_tensor(chosen)


@pytest.mark.slow
def test_a_broken_acceptance_rule_fails_the_same_test(model, monkeypatch):
    config, wide = GenerationConfig(temperature=1.0), True
    monkeypatch.setattr(Sampler, "choose", broken_choose)
    assert chi_square_p(speculative_counts(model, config, wide), exact_joint(model, config)) < 0.01


def test_seeded_sampling_is_reproducible_whatever_the_drafts(model):
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=42)
    plain = SpeculativeGenerator(model, StubTokenizer(), []).generate(PROMPT, config).tokens
    for wide in (True, False):
        generator = SpeculativeGenerator(model, StubTokenizer(), [RandomTreeDrafter(wide, seed=2)], cost_curve=FREE)
        for _ in range(2):  # the second run has learned acceptance rates, hence other trees: same output
            result = generator.generate(PROMPT, config)
            np.testing.assert_array_equal(result.tokens, plain)
        assert result.stats.steps < 20  # drafts were accepted
    other = SpeculativeGenerator(model, StubTokenizer(), []).generate(PROMPT, GenerationConfig(
        max_new_tokens=20, temperature=1.0, top_p=0.9, seed=43)).tokens
    assert not np.array_equal(other, plain)
