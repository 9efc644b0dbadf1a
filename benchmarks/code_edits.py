"""Code edits: a real function and an edit instruction; the reply rewrites the whole function.

    python benchmarks/code_edits.py                                   # the held-out 78 edits, ar,pld,auto
    python benchmarks/code_edits.py --model qwen2.5-0.5b              # Qwen2.5-Coder-0.5B
    python benchmarks/code_edits.py --cost flat --budget 64           # a GPU-like flat cost curve, forced
    python benchmarks/code_edits.py --limit 1 --max-new-tokens 16     # a smoke run: one edit of each kind

The items (``data/code_edits/prompts.jsonl``, sources in its ``SOURCES.md``): functions of the CPython standard
library and HumanEval's solutions, each with one edit (rename a parameter, add a docstring, add type hints,
change an API call), the function given as the prompt's code block. Copy-heavy work, prompt lookup's own
showcase: most of the reply is the function again. One row of the table per edit kind.

Per item, plain ``generate()``, transformers' prompt lookup (``prompt_lookup_num_tokens=10``) and our methods
run in rotating order in one process (``harness.py``); in float32 every output of ours must equal plain greedy
or the script exits non-zero. Writes JSON (``--out``, default ``results/code_edits_<model>.json``), a markdown
table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse

from common import DATA, read_jsonl
from harness import (
    Case, Harness, chat_ids, default_out, harness_arguments, run_cases, select, workload_arguments,
)

PROMPTS = DATA / "code_edits" / "prompts.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness_arguments(parser)
    workload_arguments(parser, "edits")
    args = parser.parse_args()
    bench = Harness(args)
    items = select(read_jsonl(PROMPTS), args, category=lambda item: item["edit"])
    cases = [Case(item["id"], item["edit"], chat_ids(bench.tokenizer, item["prompt"])) for item in items]
    run_cases(bench, cases, "code edits")
    report = bench.report(workload="code_edits", split=args.split, limit_per_category=args.limit)
    bench.finish(report, default_out(args, "code_edits"), f"Code edits ({args.split})")


if __name__ == "__main__":
    main()
