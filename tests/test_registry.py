"""The registry names every drafter and method once; the library, the CLI and the vLLM proposer all read it."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.cli import generate
from retrieval_spec.datastore.manifest import TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.base import Drafter
from retrieval_spec.drafters.registry import DRAFTERS, METHODS, make_drafters
from retrieval_spec.errors import InputError
from retrieval_spec.integrations.vllm import SERVABLE, ProposerSettings

VOCAB = 50


@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory) -> Datastore:
    path = tmp_path_factory.mktemp("registry") / "index"
    fingerprint = TokenizerFingerprint(name="fake", vocab_size=VOCAB, sha256="f" * 64)
    build_index_from_tokens([np.arange(3, 30, dtype=np.int32)], path, fingerprint, progress=False)
    return Datastore.open(path)


@pytest.mark.parametrize("name", DRAFTERS)
def test_each_drafter_needs_what_the_table_says(name, datastore):
    spec = DRAFTERS[name]
    drafter = spec.build(VOCAB, datastore)
    assert isinstance(drafter, Drafter)
    assert (drafter.top_k > 0) == spec.needs_top_k
    assert (type(drafter).branch is not Drafter.branch) == spec.needs_branch


def test_every_method_runs_registered_drafters_in_its_order(datastore):
    for method in METHODS.values():
        assert set(method.drafters) <= set(DRAFTERS) and method.optional <= set(method.drafters)
        built = make_drafters(method.name, VOCAB, datastore)
        assert [type(d) for d in built] == [type(DRAFTERS[name].build(VOCAB, datastore)) for name in method.drafters]


def test_auto_leaves_out_what_needs_a_datastore_when_none_is_given():
    built = make_drafters("auto", VOCAB)
    expected = [name for name in METHODS["auto"].drafters if not DRAFTERS[name].needs_datastore]
    assert [type(d) for d in built] == [type(DRAFTERS[name].build(VOCAB, None)) for name in expected]


@pytest.mark.parametrize("method, vocab_size, message", [
    ("nope", VOCAB, "unknown method 'nope'"),
    ("rest", VOCAB, "needs a datastore"),
    ("recycle", None, "vocabulary size"),
    ("auto", None, "vocabulary size"),
])
def test_a_method_without_what_it_needs_is_refused_by_name(method, vocab_size, message):
    with pytest.raises(InputError, match=message):
        make_drafters(method, vocab_size)


def test_the_cli_offers_exactly_the_registry_methods():
    option = next(param for param in generate.params if param.name == "method")
    assert list(option.type.choices) == list(METHODS)
    assert all(method.description in option.help for method in METHODS.values())


def test_vllm_auto_is_every_drafter_that_needs_neither_top_k_nor_a_branch():
    servable = [name for name, spec in DRAFTERS.items() if not (spec.needs_top_k or spec.needs_branch)]
    assert list(SERVABLE) == servable
    without_index = ProposerSettings().drafter_names()
    assert list(without_index) == [name for name in servable if not DRAFTERS[name].needs_datastore]
    assert list(ProposerSettings(index="index").drafter_names()) == servable
