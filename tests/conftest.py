"""Shared fixtures: tiny random-weight models built from configs (no download) and the real SmolLM2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import retrieval_spec.drafters.registry  # noqa: F401  (every drafter's kernels declared before they compile)
import retrieval_spec.integrations.vllm  # noqa: F401  (and the proposer's)
from retrieval_spec.compiled import compile_all
from retrieval_spec.drafters.base import Drafter
from retrieval_spec.replay import CostClock, Recording, ReplayVerifier
from retrieval_spec.tree import DraftTree, Source, trie_from_continuations

compile_all()  # once, before any test: a first compile inside a test with a deadline would time it out

ROOT = Path(__file__).resolve().parents[1]
SPEC_BENCH = ROOT / "data" / "spec_bench" / "dev.jsonl"


class OutsideReads:
    """Records every file this process opens beside the checkout (under its parent, outside it): a fresh clone
    with nothing beside it must pass, so the suite fails when a test reads such a path (see the session hook).

    Caches, the virtual environment, temporary files and the home directory's ``.cache`` are not "beside".
    """

    def __init__(self, root: Path) -> None:
        import tempfile

        self.root, self.parent = root, root.parent
        allowed = [Path(tempfile.gettempdir()), Path(sys.prefix), Path(sys.base_prefix), Path.home() / ".cache"]
        allowed += [Path(p) for p in os.environ.get("RETRIEVAL_SPEC_CACHE", "").split(os.pathsep) if p]
        self.allowed = [a.resolve() for a in allowed]
        self.seen: list[str] = []

    def outside(self, path: str) -> bool:
        resolved = Path(os.path.abspath(path))
        return (resolved.is_relative_to(self.parent) and not resolved.is_relative_to(self.root)
                and not any(resolved.is_relative_to(a) for a in self.allowed))

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and not isinstance(args[0], int):
            path = os.fsdecode(args[0])
            if self.outside(path):
                self.seen.append(path)


OUTSIDE_READS = OutsideReads(ROOT)
sys.addaudithook(OUTSIDE_READS)


def pytest_sessionfinish(session, exitstatus):
    if OUTSIDE_READS.seen:
        print(f"\nFAILED: tests read files beside the checkout (a fresh clone has none): {sorted(set(OUTSIDE_READS.seen))}")
        session.exitstatus = 1


@pytest.fixture(scope="session", autouse=True)
def measured_costs_of_this_session(tmp_path_factory):
    """Cost curves and kernel choices measured or learned during the tests go to a folder of the session's own
    (or where a test points ``$RETRIEVAL_SPEC_CACHE``), never into the user's cache beside the converted models: a
    probe taken while the suite loads the machine would otherwise steer the user's later runs (a curve stored by a
    suite run beside other work priced 6 nodes at 639 ms instead of 54), and the suite would start from whatever
    the user's runs left there."""
    from retrieval_spec import costs, linear_forms

    folder = tmp_path_factory.mktemp("measured")

    def measured_dir() -> Path:
        chosen = os.environ.get("RETRIEVAL_SPEC_CACHE")
        return Path(chosen) if chosen else folder

    patcher = pytest.MonkeyPatch()
    for module in (costs, linear_forms):
        patcher.setattr(module, "disk_cache_dir", measured_dir)
    yield folder
    patcher.undo()


@pytest.fixture(scope="module")
def no_fsync():
    """For modules whose tests build indexes but do not test durability against power loss (``pytestmark =
    pytest.mark.usefixtures("no_fsync")``): fsync costs ~40 ms a build."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda descriptor: None)
        yield


def tiny_config(kind: str):
    """A 2-4 layer config of a causal-LM family, vocabulary 96. Sliding windows (8 tokens) are shorter than the
    prompts plus outputs the tests decode, and hybrid families mix sliding and full layers."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    hybrid = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen2-sliding": lambda: tf.Qwen2Config(**{**common, "num_hidden_layers": 4}, use_sliding_window=True,
                                                sliding_window=8, max_window_layers=2),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=8),
        "gemma2": lambda: tf.Gemma2Config(**{**common, "num_hidden_layers": 4}, head_dim=16, sliding_window=8,
                                          layer_types=hybrid),
        "gemma3": lambda: tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=16, sliding_window=8,
                                              layer_types=hybrid),
        "phi3": lambda: tf.Phi3Config(**common, sliding_window=8),
        "gpt2": lambda: tf.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=512),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512),
        "opt": lambda: tf.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64),
    }
    config = configs[kind]()
    config.bos_token_id = config.eos_token_id = None
    config.pad_token_id = 0
    return config


def tiny_model(kind: str, attn_implementation: str | None = None):
    """A random-weight causal LM of the given family (``tiny_config``), fp32, eval mode, deterministic; attention
    as transformers picks it (sdpa where the family has it, else eager) unless ``attn_implementation`` says."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed({"llama": 0, "qwen2": 1, "gpt2": 2}.get(kind, sum(map(ord, kind))))
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32,
                                             attn_implementation=attn_implementation)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def plain_greedy(model, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Reference output: Hugging Face's own greedy generate."""
    import torch

    ids = torch.as_tensor(prompt[None], dtype=torch.long, device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=0, do_sample=False)
    return out[0, len(prompt):].cpu().numpy().astype(np.int32)


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (no sync overhead); the real model uses both cores."""
    import torch

    torch.set_num_threads(2 if request.node.get_closest_marker("real_model") else 1)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (skips when its package is not installed)."""
    from retrieval_spec.errors import ModelNotFoundError
    from retrieval_spec.models import load_model

    try:
        return load_model("smollm2-135m")
    except ModelNotFoundError as e:
        pytest.skip(str(e))


def spec_bench_rows(per_category: int, categories: tuple[str, ...]) -> list[dict]:
    rows = [json.loads(line) for line in SPEC_BENCH.read_text().splitlines()]
    picked = []
    for category in categories:
        picked += [r for r in rows if r["category"] == category][:per_category]
    return picked


def children_lists(parents: np.ndarray) -> list[list[int]]:
    """For every node of a tree, its children in index order."""
    out: list[list[int]] = [[] for _ in range(len(parents))]
    for i in range(1, len(parents)):
        out[parents[i]].append(i)
    return out


class StubTokenizer:
    """Just enough tokenizer for token-id prompts: decoding prints the ids."""

    def decode(self, ids, **_):
        return " ".join(str(int(i)) for i in ids)


class OracleDrafter(Drafter):
    """Test drafter that knows the plain output: proposes it (``right=True``) or guaranteed-wrong tokens,
    plus random distractor branches, always exercising multi-branch trees."""

    source = Source.PROMPT

    def __init__(self, expected: np.ndarray, prompt_len: int, vocab: int, right: bool, seed: int = 0):
        self.expected, self.prompt_len, self.vocab, self.right = expected, prompt_len, vocab, right
        self.rng = np.random.default_rng(seed)

    def propose(self, request, context, budget):
        done = len(context) - self.prompt_len
        truth = self.expected[done: done + int(self.rng.integers(1, 8))]
        paths = [self.rng.integers(0, self.vocab, int(self.rng.integers(1, 6))) for _ in range(3)]
        if self.right and len(truth):
            paths.append(truth)
        elif len(truth):
            paths = [p[p != truth[0]] if len(p) else p for p in paths]  # first token never right
        paths = [p.astype(np.int32) for p in paths if len(p)]
        if not paths:
            return DraftTree.empty(int(context[-1]))
        weights = self.rng.random(len(paths)) + 0.1
        return trie_from_continuations(int(context[-1]), paths, weights, np.full(8, 0.9), self.source, budget)


class LoggingReplay(ReplayVerifier):
    """A replay verifier that logs every forward it is asked for: (rows, nodes per row run, the nodes each row
    needed). A verifier handed to the loop, not a patched module."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forwards: list[tuple[int, int, list[int]]] = []

    def verify(self, rows, run, timer):
        self.forwards.append((len(rows), run, [row.num_nodes for row in rows]))
        return super().verify(rows, run, timer)


def replay_engine(recordings, drafters, cost, prior=None, fixed: bool = False, vocab: int = 500, eos=()):
    """The real loop on a replay of ``recordings`` ((prompt, output) pairs) and a clock that charges ``cost``:
    (generator, verifier, clock). ``fixed`` sizes by ``cost`` without learning; else the sizer learns from
    ``prior`` (default ``cost``)."""
    from retrieval_spec.generate import SpeculativeGenerator

    clock = CostClock()
    records = [Recording(np.asarray(p, np.int32), np.asarray(o, np.int32), np.zeros((len(o), 0), np.int32))
               for p, o in recordings]
    verifier = LoggingReplay(records, cost, clock, vocab, prior=prior, eos_token_ids=frozenset(eos))
    generator = SpeculativeGenerator(verifier, None, drafters, cost_curve=cost if fixed else None, clock=clock)
    return generator, verifier, clock
