"""What drafting costs inside vLLM: the proposer driven with vLLM's argument shapes, no vLLM needed.

    python benchmarks/proposer.py --requests 32 --prompt-tokens 1000,8000,50000
    python benchmarks/proposer.py --requests 1,8,32 --prompt-tokens 8000 --method pld --k 8

Per setting, ``--requests`` requests with prompts of ``--prompt-tokens`` tokens of real text (the Spec-Bench
dev prompts, tokenized with the model's tokenizer and repeated as far as needed, each request starting at its
own offset) run together in one persistent batch: ``token_ids_cpu`` is (requests, prompt + steps + k + 1) int32
and ``num_tokens_no_spec`` the history lengths, as vLLM's model runner hands them to
``RetrievalProposer.propose``. Each step, every row's last draft is verified greedily against the text that
follows its prompt (what the target would say is here the text itself, so drafts copied from the prompt are
accepted as often as the text repeats), the accepted tokens and one bonus token are written into the histories,
and ``propose`` is timed for the whole batch. The first call of a request (indexing its prompt) is reported
apart, as ``start_ms``: vLLM pays it once per request, during its prefill.

Prints one JSON line per setting: ``requests``, ``prompt_tokens``, ``propose_ms_p50``, ``propose_ms_p99`` (per
step, whole batch), ``start_ms``, ``tokens_per_step`` (per request) and the CPU it ran on; ``--out`` also writes
them to a JSONL file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from common import spec_bench, write_jsonl
from retrieval_spec.integrations.vllm import RetrievalProposer
from retrieval_spec.linear_forms import cpu_name
from retrieval_spec.models import load_tokenizer


class FixedBatch:
    """vLLM's batch as the proposer sees it: the same requests in rows 0..n-1, all running, prompts known."""

    def __init__(self, prompt_lengths: list[int]) -> None:
        self.prompt_lengths = prompt_lengths

    def request_ids(self, num_rows: int) -> list[str]:
        return [f"req-{row}" for row in range(num_rows)]

    def prompt_length(self, row: int) -> int:
        return self.prompt_lengths[row]

    def is_alive(self, request: str) -> bool:
        return True

    def output_limits(self, request: str) -> tuple[None, frozenset[int]]:
        return None, frozenset()


def real_text(tokenizer, length: int) -> np.ndarray:
    """(length,) int32: the Spec-Bench dev prompts' token ids, repeated as far as needed."""
    text = "\n\n".join(turn for row in spec_bench() for turn in row["turns"])
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    return np.resize(ids, length)


def run(text: np.ndarray, vocab_size: int, requests: int, prompt_tokens: int, steps: int, k: int,
        method: str) -> dict:
    """Time ``steps`` calls of ``propose`` on one batch; the first (the requests' start) is timed apart."""
    width = prompt_tokens + steps * (k + 1) + k + 1
    stride = max(1, (len(text) - width) // max(1, requests))
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=width + k + 1, get_vocab_size=lambda: vocab_size),
        parallel_config=SimpleNamespace(rank=0),
        additional_config={"retrieval_spec": {"method": method}})
    proposer = RetrievalProposer(config, batch=FixedBatch([prompt_tokens] * requests))
    proposer.load_model()
    sources = [text[r * stride: r * stride + width] for r in range(requests)]  # prompt, then what "the target" says
    token_ids = np.zeros((requests, width), dtype=np.int32)
    lengths = np.full(requests, prompt_tokens, dtype=np.int32)
    for r, source in enumerate(sources):
        token_ids[r, :prompt_tokens] = source[:prompt_tokens]
    drafts: list[list[int]] = [[] for _ in range(requests)]
    times, gained = [], 0
    for step in range(steps + 1):
        sampled = []
        for r in range(requests):
            n = int(lengths[r])
            target = sources[r][n: n + len(drafts[r]) + 1]
            accepted = 0
            while accepted < len(target) - 1 and drafts[r][accepted] == target[accepted]:
                accepted += 1
            new = target[: accepted + 1]
            token_ids[r, n: n + len(new)] = new
            lengths[r] = n + len(new)
            sampled.append(new.tolist())
            gained += len(new) if step else 0
        started = time.perf_counter()
        drafts = proposer.propose(sampled, lengths, token_ids)
        times.append((time.perf_counter() - started) * 1e3)
    per_step = np.array(times[1:])
    return {"requests": requests, "prompt_tokens": prompt_tokens, "method": method, "k": k, "steps": steps,
            "propose_ms_p50": round(float(np.percentile(per_step, 50)), 3),
            "propose_ms_p99": round(float(np.percentile(per_step, 99)), 3),
            "start_ms": round(times[0], 3),
            "tokens_per_step": round(gained / (steps * requests), 3),
            "cpu": cpu_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer and vocabulary")
    parser.add_argument("--requests", default="32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", default="1000,8000,50000", help="comma-separated prompt lengths")
    parser.add_argument("--steps", type=int, default=64, help="timed propose() calls per setting")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--method", default="auto", help="additional_config's retrieval_spec.method")
    parser.add_argument("--out", type=Path, help="also write the lines to this JSONL file")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    prompt_lengths = [int(p) for p in args.prompt_tokens.split(",")]
    batch_sizes = [int(r) for r in args.requests.split(",")]
    text = real_text(tokenizer, max(prompt_lengths) + max(batch_sizes) * 4096 + args.steps * (args.k + 1) * 2)
    lines = []
    for requests in batch_sizes:
        for prompt_tokens in prompt_lengths:
            line = run(text, len(tokenizer), requests, prompt_tokens, args.steps, args.k, args.method)
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.out:
        write_jsonl(args.out, lines)


if __name__ == "__main__":
    main()
