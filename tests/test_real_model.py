"""On the real SmolLM2-135M and real Spec-Bench prompts: speculative greedy == transformers greedy."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from conftest import plain_greedy, spec_bench_rows
from retrieval_spec.builders.build import build_index
from retrieval_spec.datastore.manifest import tokenizer_fingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.models import chat_prompt
from retrieval_spec.sizing import CostCurve

pytestmark = pytest.mark.real_model

CATEGORIES = ("summarization", "rag", "extraction", "translation", "qa", "coding", "math_reasoning", "writing",
              "reasoning", "humanities")
FREE = CostCurve.flat(64)


@pytest.fixture(scope="module")
def datastore(smollm2, tmp_path_factory):
    """A real-text datastore: the Python tutorial chapter bundled with the package plus Spec-Bench prompts."""
    _, tokenizer = smollm2
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rows = spec_bench_rows(20, CATEGORIES)
    article = resources.files("retrieval_spec").joinpath("data/article.txt").read_text()
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in [article] + [r["turns"][0] for r in rows]) + "\n")
    path = corpus.parent / "index"
    build_index([corpus], path, tokenizer, progress=False)
    return Datastore.open(path, expected_fingerprint=tokenizer_fingerprint(tokenizer))


@pytest.fixture(scope="module")
def generators(smollm2, datastore):
    """One generator per method, shared by the prompts so that learned state (recycling table) carries over.

    A free cost curve makes the trees as large as the budget: the hardest case for exactness.
    """
    model, tokenizer = smollm2
    vocab = model.config.vocab_size
    return {m: SpeculativeGenerator(model, tokenizer, make_drafters(m, vocab, datastore), cost_curve=FREE)
            for m in ("pld", "rest", "recycle", "lookahead", "auto")}


@pytest.mark.parametrize("row", spec_bench_rows(1, CATEGORIES), ids=lambda r: f"{r['category']}-{r['question_id']}")
def test_every_method_equals_plain_greedy_on_spec_bench(smollm2, generators, row):
    model, tokenizer = smollm2
    prompt = np.asarray(tokenizer(chat_prompt(tokenizer, row["turns"][0]), add_special_tokens=False)["input_ids"],
                        dtype=np.int32)
    expected = plain_greedy(model, prompt, 40)
    for method, generator in generators.items():
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=40, tree_budget=24))
        np.testing.assert_array_equal(result.tokens, expected, err_msg=method)


def test_batched_rows_equal_plain_greedy_on_spec_bench(smollm2, datastore):
    """Four distinct real prompts decoded as one batch (prompt lookup + REST + cross-path drafting)."""
    model, tokenizer = smollm2
    rows = spec_bench_rows(1, ("summarization", "rag", "qa", "translation"))
    batch = [np.asarray(tokenizer(chat_prompt(tokenizer, r["turns"][0]), add_special_tokens=False)["input_ids"],
                        dtype=np.int32) for r in rows]
    generator = SpeculativeGenerator(model, tokenizer, make_drafters("auto", model.config.vocab_size, datastore),
                                     cost_curve=FREE)
    result = generator.generate_batch(batch, GenerationConfig(max_new_tokens=40, tree_budget=24))
    for row, prompt, out in zip(rows, batch, result.rows):
        np.testing.assert_array_equal(out.tokens, plain_greedy(model, prompt, 40), err_msg=row["category"])
    assert result.mean_accepted > 1.0
