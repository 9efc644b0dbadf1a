"""The Hugging Face switch (retrieval_spec.integrations.hf): model.generate, pipeline and custom_generate run this
engine and return what transformers' own generate returns."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import transformers
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessorList, TextIteratorStreamer, TopKLogitsWarper

from conftest import StubTokenizer, tiny_model
from retrieval_spec import hf
from retrieval_spec.errors import UnsupportedOptionError
from retrieval_spec.sizing import CostCurve

FREE = CostCurve.flat(64)  # verify everything drafted: the hardest case for exactness
SMALL = CostCurve.flat(16)  # the real model on a CPU: trees of up to 16 nodes keep the tests short


class VocabStub(StubTokenizer):
    """A tiny model's tokenizer, enough to fingerprint (state files are pinned to it)."""

    name_or_path = "stub-96"

    def get_vocab(self):
        return {str(i): i for i in range(96)}

    def __len__(self):
        return 96


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) left-padded ids and their attention mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    return ids, mask


def repeating(seed: int, count: int) -> list[list[int]]:
    """Prompts of distinct lengths with repeats inside (something to copy), no pad token (0)."""
    rng = np.random.default_rng(seed)
    out = []
    for length in range(count):
        base = rng.integers(1, 96, 4 + 3 * length).tolist()
        out.append(base + base[: 2 + length])
    return out


@pytest.fixture
def tiny():
    """A tiny llama, switched off again after the test whatever happened."""
    model = tiny_model("llama")
    yield model
    hf.disable(model)


def transformers_generate(model, *args, **kwargs):
    """transformers' own generate, whether or not the model is switched."""
    return type(model).generate(model, *args, **kwargs)


# --- tiny models: options, shapes, lifecycle -------------------------------------------------------------------

def test_greedy_equals_transformers_batch_one_and_left_padded_batch(tiny):
    ids, mask = left_padded(repeating(0, 3))
    expected = transformers_generate(tiny, ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    single = transformers_generate(tiny, ids[2:], max_new_tokens=24, do_sample=False)
    engine = hf.enable(tiny, VocabStub(), cost_curve=FREE)
    assert torch.equal(tiny.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False), expected)
    out = tiny.generate(input_ids=ids[2:], max_new_tokens=24, return_dict_in_generate=True)
    assert isinstance(out, transformers.generation.GenerateDecoderOnlyOutput) and out.scores is None
    assert torch.equal(out.sequences, single)
    assert engine.last_result.mean_accepted > 1  # it did speculate


def test_lengths_and_config_merge_follow_generate(tiny):
    ids = torch.tensor([repeating(1, 2)[1]])
    hf.enable(tiny, VocabStub(), cost_curve=FREE)
    calls = [
        {},  # transformers' default: 20 new tokens
        {"max_length": ids.shape[1] + 5},
        {"generation_config": HFGenerationConfig(max_new_tokens=7, repetition_penalty=1.3)},
        {"max_new_tokens": 6, "do_sample": False, "temperature": 0.3, "top_k": 3},  # greedy whatever temperature says
        {"max_new_tokens": 9, "repetition_penalty": 1.5, "eos_token_id": [7, 11], "pad_token_id": None},
    ]
    for kwargs in calls:
        assert torch.equal(tiny.generate(ids, **kwargs), transformers_generate(tiny, ids, **kwargs)), kwargs
    near_the_end = torch.tensor([(repeating(2, 1)[0] * 100)[:500]])  # 512 positions: 12 new tokens, not 20
    assert torch.equal(tiny.generate(near_the_end), transformers_generate(tiny, near_the_end))
    assert tiny.generate(near_the_end).shape[1] == 512
    tiny.generation_config.max_new_tokens = 4  # the model's own defaults count too
    assert tiny.generate(ids).shape[1] == ids.shape[1] + 4


def test_rows_ending_early_are_padded_like_transformers(tiny):
    """An EOS that the greedy output of one row hits early: that row is padded, with pad_token_id or else the EOS."""
    ids, mask = left_padded(repeating(2, 3))
    plain = transformers_generate(tiny, ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    eos = int(plain[1, ids.shape[1] + 3])
    hf.enable(tiny, VocabStub(), cost_curve=FREE)
    for pad in (5, None):
        kwargs = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad,
                      repetition_penalty=1.2)
        out = tiny.generate(ids, **kwargs)
        assert torch.equal(out, transformers_generate(tiny, ids, **kwargs)), pad
        assert int(out[1, -1]) == (eos if pad is None else pad)


def test_unsupported_options_are_named_and_fallback_routes_them_to_transformers(tiny):
    ids = torch.tensor([repeating(3, 1)[0]])
    hf.enable(tiny, VocabStub(), cost_curve=FREE)
    refused = {
        "num_beams": dict(num_beams=2),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "output_scores": dict(output_scores=True, return_dict_in_generate=True),
        "logits_processor": dict(logits_processor=LogitsProcessorList([TopKLogitsWarper(5)])),
        "prompt_lookup_num_tokens": dict(prompt_lookup_num_tokens=3),
        "typical_p": dict(do_sample=True, typical_p=0.5),
        "min_new_tokens": dict(min_new_tokens=3, eos_token_id=5),  # without an EOS it is inert
    }
    for name, kwargs in refused.items():
        with pytest.raises(UnsupportedOptionError, match=name) as error:
            tiny.generate(ids, max_new_tokens=5, **kwargs)
        assert error.value.options == (name,)
    # what does not change the tokens passes: cache settings, an empty processor list, sampling knobs when greedy,
    # scores without return_dict_in_generate (generate() ignores them), no minimum
    tiny.generate(ids, max_new_tokens=3, use_cache=False, logits_processor=LogitsProcessorList(), typical_p=0.5,
                  output_scores=True, min_new_tokens=0, min_length=2)
    tiny.generation_config.no_repeat_ngram_size = 3  # a model default counts like an argument
    with pytest.raises(UnsupportedOptionError, match="no_repeat_ngram_size=3"):
        tiny.generate(ids, max_new_tokens=5)
    hf.enable(tiny, VocabStub(), fallback=True)
    beams = tiny.generate(ids, max_new_tokens=5, num_beams=2)
    assert torch.equal(beams, transformers_generate(tiny, ids, max_new_tokens=5, num_beams=2))


def test_enable_twice_disable_and_enable_again(tiny, tmp_path):
    stub = VocabStub()
    ids = torch.tensor([repeating(4, 1)[0]])
    engine = hf.enable(tiny, stub, state_dir=tmp_path, cost_curve=FREE)
    assert hf.enable(tiny, stub, state_dir=tmp_path, cost_curve=FREE) is engine  # harmless, keeps what it learned
    tiny.generate(ids, max_new_tokens=8)
    saved = hf.disable(tiny)
    assert saved and all((tmp_path / name).is_file() for name in saved)
    assert "generate" not in tiny.__dict__ and hf.disable(tiny) == []
    assert tiny.generate(ids, max_new_tokens=8).shape[1] == ids.shape[1] + 8  # transformers' own again
    again = hf.enable(tiny, stub, state_dir=tmp_path, cost_curve=FREE)  # loads the saved state
    assert again is not engine
    assert torch.equal(tiny.generate(ids, max_new_tokens=8), transformers_generate(tiny, ids, max_new_tokens=8))


def test_seeded_sampling_reproduces_from_torch_global_seed(tiny):
    ids = torch.tensor([repeating(5, 1)[0]])
    hf.enable(tiny, VocabStub(), cost_curve=FREE)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.3, top_p=0.95, num_return_sequences=3)
    outputs = []
    for seed in (0, 0, 1):
        transformers.set_seed(seed)
        outputs.append(tiny.generate(ids, **kwargs))
    assert outputs[0].shape == (3, ids.shape[1] + 16)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    assert len({tuple(row.tolist()) for row in outputs[0]}) == 3  # three samples, not one copied


def streamed(model, *args, **kwargs) -> tuple[list[str], bool, BaseException | None]:
    """Run generate with a TextIteratorStreamer read by another thread: (chunks, whether the reader finished, error)."""
    streamer = TextIteratorStreamer(kwargs.pop("tokenizer"), skip_prompt=True, timeout=60)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(streamer))
    reader.start()
    error = None
    try:
        model.generate(*args, streamer=streamer, **kwargs)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        error = e
    reader.join(timeout=30)
    return chunks, not reader.is_alive(), error


def test_streamer_reader_finishes_when_decoding_fails(tiny):
    ids = torch.tensor([repeating(6, 1)[0]])
    engine = hf.enable(tiny, VocabStub(), cost_curve=FREE)
    chunks, finished, error = streamed(tiny, ids, max_new_tokens=600, tokenizer=StubTokenizer())  # > 512 positions
    assert finished and "context" in str(error)
    verify, calls = engine.generator.verifier.verify, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return verify(*args, **kwargs)

    engine.generator.verifier.verify = failing
    chunks, finished, error = streamed(tiny, ids, max_new_tokens=20, tokenizer=StubTokenizer())
    assert finished and str(error) == "device lost" and chunks  # what came before the failure was streamed


def test_custom_generate_folder_runs_the_engine(tiny):
    ids = torch.tensor([repeating(7, 1)[0]])
    expected = transformers_generate(tiny, ids, max_new_tokens=12, do_sample=False)
    out = tiny.generate(ids, max_new_tokens=12, custom_generate=hf.CUSTOM_GENERATE, trust_remote_code=True)
    assert torch.equal(out, expected)
    default = tiny.__dict__["_retrieval_spec_default_engine"]
    chunks, finished, _ = streamed(tiny, ids, max_new_tokens=12, custom_generate=hf.CUSTOM_GENERATE,
                                   trust_remote_code=True, tokenizer=StubTokenizer())
    assert finished and "".join(chunks).split() == [str(t) for t in expected[0, ids.shape[1]:].tolist()]
    assert tiny.__dict__["_retrieval_spec_default_engine"] is default  # built once, kept on the model
    engine = hf.enable(tiny, VocabStub(), cost_curve=FREE)  # an enabled engine serves custom_generate calls too
    out = type(tiny).generate(tiny, ids, max_new_tokens=12, custom_generate=hf.CUSTOM_GENERATE, trust_remote_code=True)
    assert torch.equal(out, expected) and engine.last_result is not None


def test_disable_leaves_no_attribute_of_ours_on_the_model(tiny):
    before = dict(vars(tiny))
    ids = torch.tensor([repeating(8, 1)[0]])
    tiny.generate(ids, max_new_tokens=4, custom_generate=hf.CUSTOM_GENERATE, trust_remote_code=True)
    hf.enable(tiny, VocabStub(), cost_curve=FREE)
    tiny.generate(ids, max_new_tokens=4)
    hf.disable(tiny)
    assert vars(tiny).keys() == before.keys() and all(vars(tiny)[key] is before[key] for key in before)


# --- the real model: text, chat templates, pipeline ------------------------------------------------------------

QUESTIONS = [
    "Summarize in one sentence: The cat sat on the mat. The cat was happy on the mat because the mat was warm.",
    "What is the capital of France?",
    "List three colors.",
]


@pytest.fixture
def smol(smollm2):
    """SmolLM2 and its tokenizer, switched off again after the test."""
    model, tokenizer = smollm2
    padding_side = tokenizer.padding_side  # a pipeline sets it to "left"
    yield model, tokenizer
    hf.disable(model)
    tokenizer.padding_side = padding_side


def chat(tokenizer, questions: list[str]) -> dict:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


@pytest.mark.real_model
def test_real_greedy_equals_transformers_batch_one_and_three(smol):
    model, tokenizer = smol
    batch, single = chat(tokenizer, QUESTIONS), chat(tokenizer, QUESTIONS[:1])
    expected = {name: transformers_generate(model, **inputs, max_new_tokens=16, do_sample=False)
                for name, inputs in (("batch", batch), ("single", single))}
    hf.enable(model, tokenizer, cost_curve=SMALL)
    assert torch.equal(model.generate(**batch, max_new_tokens=16, do_sample=False), expected["batch"])
    out = model.generate(**single, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected["single"])


@pytest.mark.real_model
def test_real_stop_strings_and_repetition_penalty_equal_transformers(smol):
    model, tokenizer = smol
    inputs = chat(tokenizer, QUESTIONS[1:])
    calls = [dict(max_new_tokens=16, stop_strings=["France", "Red"], tokenizer=tokenizer),
             dict(max_new_tokens=16, repetition_penalty=1.3)]
    expected = [transformers_generate(model, **inputs, **kwargs) for kwargs in calls]
    assert expected[0].shape[1] < inputs["input_ids"].shape[1] + 8  # stop strings ended both rows early
    hf.enable(model, tokenizer, cost_curve=SMALL)
    for kwargs, want in zip(calls, expected):
        assert torch.equal(model.generate(**inputs, **kwargs), want), kwargs
    calls[0].pop("tokenizer")  # the enabled tokenizer reads stop strings when the call brings none
    assert torch.equal(model.generate(**inputs, **calls[0]), expected[0])


@pytest.mark.real_model
def test_real_pipeline_and_streamer(smol, tmp_path):
    from retrieval_spec.builders.build import build_index

    model, tokenizer = smol
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    kwargs = dict(max_new_tokens=16, do_sample=False, return_full_text=False)
    expected = pipe(messages, **kwargs)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "The capital of France is Paris. Paris is a city on the Seine."}\n')
    build_index([corpus], tmp_path / "index", tokenizer, progress=False)
    hf.enable(model, tokenizer, index=tmp_path / "index", cost_curve=SMALL)
    assert pipe(messages, **kwargs) == expected
    assert pipe(messages, batch_size=2, **kwargs) == expected  # left-padded batch through the batched loop
    single = chat(tokenizer, QUESTIONS[1:2])
    chunks, finished, error = streamed(model, **single, max_new_tokens=16, tokenizer=tokenizer)
    assert finished and error is None
    new_tokens = model.generate(**single, max_new_tokens=16)[0, single["input_ids"].shape[1]:]
    assert "".join(chunks) == tokenizer.decode(new_tokens)
