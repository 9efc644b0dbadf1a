"""The library's edges take what a caller may get wrong — strings for numbers, None, floats for token ids, a 2-D
prompt, one stop string given bare, a settings mapping of the wrong shape — and refuse it with an ``InputError``
naming the field, or read it as the one thing it can mean; never a raw TypeError from deep inside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.config import GenerationConfig
from retrieval_spec.datastore.manifest import TokenizerFingerprint
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.errors import InputError, OutputError
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.sizing import CostCurve
from test_hostile_files import checksums

FREE = CostCurve(sizes=np.array([1, 64]), ms=np.array([1.0, 1.0]))


def test_a_single_stop_string_is_one_stop_string():
    assert GenerationConfig(stop_strings="Tower!!").stop_strings == ("Tower!!",)
    assert GenerationConfig(stop_strings=["a", "b"]).stop_strings == ("a", "b")
    assert GenerationConfig(stop_strings=None).stop_strings == ()
    assert GenerationConfig(seed=[1, 2], eos_token_ids=7).seed == (1, 2)
    assert GenerationConfig(eos_token_ids=np.int64(7)).eos_token_ids == (7,)
    assert type(GenerationConfig(max_new_tokens=np.int64(5)).max_new_tokens) is int


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", "5", "max_new_tokens must be an integer, got '5' (str)"),
    ("max_new_tokens", None, "max_new_tokens must be an integer, got None"),
    ("max_new_tokens", 5.0, "max_new_tokens must be an integer, got 5.0 (float)"),
    ("max_new_tokens", True, "max_new_tokens must be an integer, got True (bool)"),
    ("max_new_tokens", 0, "max_new_tokens must be at least 1, got 0"),
    ("tree_budget", "64", "tree_budget must be an integer"),
    ("top_k", 1.5, "top_k must be an integer"),
    ("temperature", "0.7", "temperature must be a number, got '0.7' (str)"),
    ("temperature", None, "temperature must be a number, got None"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("top_p", 0, "need 0 < top_p <= 1"),
    ("repetition_penalty", "1.1", "repetition_penalty must be a number"),
    ("seed", -1, "seed must be at least 0, got -1"),
    ("seed", 1.5, "seed must be an integer, got 1.5"),
    ("seed", (1, -2), "seed must be at least 0, got -2"),
    ("seed", "42", "seed must be an integer, got '42'"),
    ("stop_strings", 5, "stop_strings must be a list or tuple, got 5 (int)"),
    ("stop_strings", ["ok", 5], "stop_strings holds 5, expected strings"),
    ("stop_strings", [""], "a stop string must not be empty"),
    ("eos_token_ids", "2", "eos_token_ids must be a list or tuple, got '2'"),
    ("eos_token_ids", [2, -1], "eos_token_ids must be at least 0, got -1"),
])
def test_a_mistyped_generation_config_field_is_refused_naming_it(field: str, value, message: str):
    with pytest.raises(InputError) as raised:
        GenerationConfig(**{field: value})
    assert message in str(raised.value)


@pytest.fixture(scope="module")
def generator() -> SpeculativeGenerator:
    return SpeculativeGenerator(tiny_model("llama"), None, make_drafters("pld"), cost_curve=FREE)


@pytest.mark.parametrize("prompt, message", [
    (np.array([[1, 2, 3]]), "prompt 0 must be a 1-D sequence of token ids, got ndarray of shape (1, 3)"),
    (np.array([1.7, 2.2]), "prompt 0 holds float64 values, expected integer token ids"),
    ([1.0, 2.0], "prompt 0 holds float64 values"),
    (np.array([True, False]), "prompt 0 holds bool values"),
    ([[1, 2], [3]], "prompt 0 must be a 1-D sequence of token ids"),
    (np.array([5, 500]), "prompt 0 holds token id 500, outside the vocabulary [0, 96)"),
    (np.array([5, -3]), "prompt 0 holds token id -3"),
    (None, "prompt 0 must be a 1-D sequence of token ids, got NoneType"),
    (np.array([], np.int32), "prompt 0 is empty"),
    ("text", "prompt 0 is text, which needs the model's tokenizer"),
])
def test_a_prompt_that_is_not_token_ids_is_refused_naming_it(generator: SpeculativeGenerator, prompt, message: str):
    with pytest.raises(InputError) as raised:
        generator.generate(prompt, GenerationConfig(max_new_tokens=2))
    assert message in str(raised.value)


@pytest.mark.parametrize("references, message", [
    ([5], "reference 0 must be a 1-D sequence of token ids, got int"),
    ([np.array([1, 2]), None], "reference 1 must be a 1-D sequence of token ids, got NoneType"),
    ([np.array([0.5, 1.5])], "reference 0 holds float64 values"),
    (42, "references must be a list of texts or token-id arrays, got int"),
])
def test_references_that_are_not_texts_or_token_ids_are_refused_naming_them(generator, references, message: str):
    with pytest.raises(InputError) as raised:
        generator.generate(np.array([1, 2, 3]), GenerationConfig(max_new_tokens=2), references=references)
    assert message in str(raised.value)


def test_one_reference_given_bare_is_one_reference(generator: SpeculativeGenerator):
    copied = np.array([1, 2, 3, 40, 41, 42, 43], np.int32)
    result = generator.generate(np.array([1, 2, 3]), GenerationConfig(max_new_tokens=4), references=copied)
    listed = generator.generate(np.array([1, 2, 3]), GenerationConfig(max_new_tokens=4), references=[copied, []])
    np.testing.assert_array_equal(result.tokens, listed.tokens)


@pytest.mark.parametrize("documents, message", [
    ([np.array([1, 2]), np.array([1.5, 2.0])], "document 1 holds float64 values, expected integer token ids"),
    ([np.array([[1, 2]])], "document 0 must be a 1-D sequence of token ids"),
    ([np.array([1, 99])], "document 0 holds token id 99, outside the vocabulary [0, 40)"),
])
def test_token_arrays_that_are_not_token_ids_are_refused_before_anything_is_written(tmp_path: Path, documents,
                                                                                    message: str):
    before = checksums(tmp_path)
    with pytest.raises(InputError) as raised:
        build_index_from_tokens(documents, tmp_path / "idx", TokenizerFingerprint("t", 40, "0" * 64), progress=False)
    assert message in str(raised.value)
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("additional, message", [
    (["retrieval_spec"], "additional_config must be a mapping, got list"),
    ({"retrieval_spec": "pld"}, "additional_config['retrieval_spec'] must be a mapping of settings, got str"),
    ({"retrieval_spec": {"save_every": "16"}}, "retrieval_spec.save_every must be an integer, got '16'"),
    ({"retrieval_spec": {"max_nodes": 0}}, "retrieval_spec.max_nodes must be at least 1"),
    ({"retrieval_spec": {"method": 5}}, "retrieval_spec.method must be a string, got 5 (int)"),
    ({"retrieval_spec": {"index": 5}}, "retrieval_spec.index must be a path, got 5 (int)"),
    ({"retrieval_spec": {"min_path_prob": "0.1"}}, "retrieval_spec.min_path_prob must be a number"),
    ({"retrieval_spec": {"cost_ms": "40,80"}}, "retrieval_spec.cost_ms must be a list or tuple, got '40,80'"),
    ({"retrieval_spec": {"cost_ms": [40, "80"]}}, "retrieval_spec.cost_ms must be a number, got '80'"),
    ({"retrieval_spec": {1: 2}}, "unknown setting(s) ['1']"),
])
def test_vllm_settings_of_the_wrong_shape_or_type_are_refused_naming_them(additional, message: str):
    from retrieval_spec.integrations.vllm import RetrievalProposer
    from test_vllm_proposer import vllm_config

    config = vllm_config()
    config.additional_config = additional
    with pytest.raises(InputError) as raised:
        RetrievalProposer(config)
    assert message in str(raised.value)


def test_hf_enable_refuses_a_state_dir_that_is_a_file_and_disable_then_has_nothing_to_save(tmp_path: Path):
    from retrieval_spec.integrations import hf
    from test_hf import VocabStub

    (tmp_path / "notes.txt").write_text("mine")
    model = tiny_model("llama")
    before = checksums(tmp_path)
    with pytest.raises(OutputError, match=r"state_dir .*notes\.txt: exists and is not a directory"):
        hf.enable(model, VocabStub(), state_dir=tmp_path / "notes.txt", cost_curve=FREE)
    assert hf.disable(model) == [] and checksums(tmp_path) == before


def test_a_method_that_is_not_a_name_is_refused():
    with pytest.raises(InputError, match=r"unknown method \['pld'\]"):
        make_drafters(["pld"])
