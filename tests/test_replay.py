"""The replay is the engine: on recorded plain greedy outputs and the same fixed cost curve, the replay accepts,
step by step, exactly the tokens a real run accepts, for every drafter whose drafts do not depend on the target's
top tokens away from the accepted path."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import StubTokenizer, plain_greedy, tiny_model
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.config import GenerationConfig
from retrieval_spec.datastore.manifest import TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.history import OutputHistoryDrafter
from retrieval_spec.drafters.prompt_lookup import PromptLookupDrafter
from retrieval_spec.drafters.rest import RestDrafter
from retrieval_spec.errors import InputError
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.replay import CostClock, Recording, ReplayVerifier
from retrieval_spec.sizing import CostCurve

CPU = CostCurve(sizes=np.array([1, 2, 4, 8, 16, 32, 64]), ms=np.array([45.0, 63, 90, 94.5, 103.5, 121.5, 180]))
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts(model):
    """Prompts whose greedy outputs repeat themselves and each other (the tiny model loops), the second one twice:
    prompt lookup, earlier outputs and a corpus of other outputs all find something."""
    rng = np.random.default_rng(0)
    base = [np.tile(rng.integers(0, 96, 7), 4).astype(np.int32) for _ in range(3)]
    return [base[0], base[1], base[2], base[1]]


@pytest.fixture(scope="module")
def index(model, prompts, tmp_path_factory):
    outputs = [plain_greedy(model, p[::-1].copy(), 60) for p in prompts]  # related text, not the answers
    path = tmp_path_factory.mktemp("replay") / "index"
    build_index_from_tokens(outputs, path, TokenizerFingerprint("tiny", 96, "0" * 64), progress=False)
    return Datastore.open(path)


def steps(generator: SpeculativeGenerator, prompts: list[np.ndarray]) -> list[list[int]]:
    """Per prompt, decoded in turn by one generator: the tokens gained at every step."""
    return [generator.generate(p, GenerationConfig(max_new_tokens=NEW_TOKENS)).stats.step_tokens for p in prompts]


@pytest.mark.parametrize("drafter", ["pld", "history", "rest"])
def test_the_replay_accepts_what_a_real_run_accepts_step_by_step(model, prompts, index, drafter):
    make = {"pld": PromptLookupDrafter, "history": OutputHistoryDrafter, "rest": lambda: RestDrafter(index)}[drafter]
    real = steps(SpeculativeGenerator(model, StubTokenizer(), [make()], cost_curve=CPU), prompts)
    recordings = [Recording(p, plain_greedy(model, p, NEW_TOKENS), np.zeros((NEW_TOKENS, 0), np.int32))
                  for p in prompts]
    clock = CostClock()
    replay = ReplayVerifier(recordings, CPU, clock, vocab_size=96)
    replayed = steps(SpeculativeGenerator(replay, None, [make()], cost_curve=CPU, clock=clock), prompts)
    assert replayed == real
    assert max(max(gains) for gains in real) > 1  # drafts were accepted: the comparison says something


def test_a_replay_refuses_what_it_cannot_know():
    recording = Recording(np.arange(5, dtype=np.int32), np.arange(5, 9, dtype=np.int32), np.zeros((4, 0), np.int32))
    generator = SpeculativeGenerator(ReplayVerifier([recording], CPU, None, 96), None, [PromptLookupDrafter()])
    with pytest.raises(InputError, match="greedy"):
        generator.generate(recording.prompt, GenerationConfig(max_new_tokens=4, temperature=0.7))
    with pytest.raises(InputError, match="record at least"):
        generator.generate(recording.prompt, GenerationConfig(max_new_tokens=8))
    with pytest.raises(InputError, match="no recording"):
        generator.generate(recording.prompt[1:], GenerationConfig(max_new_tokens=4))
