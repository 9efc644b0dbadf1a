"""Self-consistency on GSM8K problems from the Spec-Bench dev split: sample N solutions of each problem
together (one batched forward per step, samples drafting from each other), majority-vote the final numbers.

    .venv/bin/python examples/self_consistency.py --limit 5 --num-samples 8

Prints, per problem, the votes, the majority answer and the reference answer, then throughput and mean
accepted tokens per step. SmolLM2-135M is a weak solver; the point is the pipeline and its speed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch

from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.models import chat_prompt, load_model

DEV = Path(__file__).resolve().parents[1] / "data" / "spec_bench" / "dev.jsonl"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in a solution, without thousands separators."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dev", type=Path, default=DEV, help="Spec-Bench dev.jsonl")
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    generator = SpeculativeGenerator(model, tokenizer, make_drafters("pld"))  # samples draft from each other too
    rows = [json.loads(line) for line in args.dev.read_text().splitlines() if line.strip()]
    problems = [row for row in rows if row["category"] == "math_reasoning"][: args.limit]
    correct, tokens, seconds, steps = 0, 0, 0.0, 0
    for i, row in enumerate(problems):
        prompt = chat_prompt(tokenizer, row["turns"][0] + "\nSolve step by step and end with the final number.")
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=100 * i)
        batch = generator.generate_batch([prompt] * args.num_samples, config)
        votes = Counter(answer for r in batch.rows if (answer := final_number(r.text)) is not None)
        majority = votes.most_common(1)[0][0] if votes else None
        reference = row["reference"][0].rsplit("####", 1)[-1].strip().replace(",", "")
        correct += majority == reference
        tokens += sum(len(r.tokens) for r in batch.rows)
        seconds += batch.total_ms / 1e3
        steps += sum(r.stats.steps for r in batch.rows)
        print(f"problem {row['question_id']}: votes {dict(votes)} -> {majority} (reference {reference}); "
              f"{batch.tokens_per_second:.1f} tok/s, {batch.mean_accepted:.2f} tokens/step")
    print(f"\nmajority-vote accuracy {correct}/{len(problems)}; {tokens / seconds:.1f} tok/s over all samples, "
          f"{tokens / max(steps, 1):.2f} tokens per row per step")


if __name__ == "__main__":
    main()
