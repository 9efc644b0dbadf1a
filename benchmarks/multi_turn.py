"""Multi-turn rewrites: MT-bench's second turns, answered with the first turn's question and answer in the chat.

    python benchmarks/multi_turn.py                                   # the held-out 56 questions, ar,pld,auto
    python benchmarks/multi_turn.py --model qwen2.5-0.5b
    python benchmarks/multi_turn.py --limit 1 --categories writing --max-new-tokens 16 --turn1-tokens 32  # a smoke run

The questions (``data/multi_turn/question.jsonl``: MT-bench's 80, two turns each; ``SOURCES.md``): per question,
turn 1 is generated first by plain greedy ``generate()`` (not timed; our methods would give the same tokens), then
turn 2 (often "rewrite your previous response ...") is asked with turn 1's question and answer in the chat
(``--turn1-tokens`` long at most). Only turn 2 is measured: plain ``generate()``, transformers' prompt lookup
and our methods in rotating order in one process (``harness.py``); in float32 every output of ours must equal
plain greedy or the script exits non-zero. One row of the table per MT-bench category. Writes JSON (``--out``,
default ``results/multi_turn_<model>.json``), a markdown table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
from typing import Iterator

from common import DATA, read_jsonl
from harness import (
    Case, Harness, chat_ids, default_out, harness_arguments, hf_generate, run_cases, select, workload_arguments,
)

QUESTIONS = DATA / "multi_turn" / "question.jsonl"


def second_turns(bench: Harness, questions: list[dict], turn1_tokens: int) -> Iterator[Case]:
    """Per question, turn 1 answered by plain greedy decoding, then the case of turn 2 with turn 1 in the chat."""
    for question in questions:
        first, second = question["turns"][:2]
        tokens, _ = hf_generate(bench.model, chat_ids(bench.tokenizer, first), turn1_tokens)
        answer = bench.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        chat = [{"role": "user", "content": first}, {"role": "assistant", "content": answer.strip()},
                {"role": "user", "content": second}]
        yield Case(str(question["question_id"]), question["category"], chat_ids(bench.tokenizer, chat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness_arguments(parser)
    workload_arguments(parser, "questions")
    parser.add_argument("--turn1-tokens", type=int, default=256, help="most tokens of the first turn's answer")
    args = parser.parse_args()
    bench = Harness(args)
    questions = select(read_jsonl(QUESTIONS), args)
    run_cases(bench, second_turns(bench, questions, args.turn1_tokens), "second turns", total=len(questions))
    report = bench.report(workload="multi_turn", split=args.split, limit_per_category=args.limit,
                          turn1_tokens=args.turn1_tokens)
    bench.finish(report, default_out(args, "multi_turn"), f"MT-bench second turns ({args.split})")


if __name__ == "__main__":
    main()
