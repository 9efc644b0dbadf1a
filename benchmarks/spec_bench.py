"""Spec-Bench dev split: our methods against plain greedy and transformers' prompt lookup, same process.

    python benchmarks/spec_bench.py --model smollm2-135m --limit 4 --methods pld
    python benchmarks/spec_bench.py --limit 8 --categories summarization,rag --out results/sb.json
    python benchmarks/spec_bench.py --limit 3 --methods pld,auto --fresh-curve       # probe the cost curve anew
    python benchmarks/spec_bench.py --limit 3 --methods pld,auto --poison-curve spike  # start from a wrong one
    python benchmarks/spec_bench.py --limit 3 --methods pld,auto --load               # one core kept busy
    python benchmarks/spec_bench.py --limit 3 --methods auto --cost flat --budget 64  # a GPU-like curve, forced
    python benchmarks/spec_bench.py --limit 3 --methods pld,auto,pld@2  # pld@2: pld again, the run's noise floor

Per prompt, every method runs once, in rotating order, beside plain ``generate()`` and transformers' prompt
lookup (``harness.py``: the runner the workload benchmarks share). In float32 our methods must reproduce plain
greedy token for token, or the script exits non-zero; in bfloat16/float16 the report counts how often they agree.
Writes JSON (``--out``), a markdown table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from tqdm import tqdm

from common import prompt_ids, spec_bench
from harness import Case, Harness, default_out, harness_arguments
from retrieval_spec.drafters.lookahead import LookaheadConfig, LookaheadDrafter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness_arguments(parser, methods="pld")
    parser.add_argument("--limit", type=int, default=4, help="prompts per category")
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first prompts of each category (tune on --skip 3, measure on the first 3)")
    parser.add_argument("--categories", help="comma-separated subset of categories")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="> 0: sample (top_k=0, top_p=1) in every method; outputs are then not compared")
    parser.add_argument("--branch-overhead", type=float,
                        help="run Lookahead's window even when it makes a step this much dearer (default: the fuser's)")
    parser.add_argument("--lookahead", help="W,N,G of the lookahead method (default: LookaheadConfig's)")
    parser.add_argument("--load", action="store_true",
                        help="keep one core busy with another process for the whole run (baselines share the load)")
    args = parser.parse_args()
    bench = Harness(args, temperature=args.temperature)
    if args.lookahead:
        window, ngram, guesses = map(int, args.lookahead.split(","))
        config = LookaheadConfig(window=window, ngram=ngram, guesses=guesses)
        for m in bench.ours:
            if m.split("@")[0] == "lookahead":
                bench.generators[m] = bench.new_generator(m, [LookaheadDrafter(config)])
    if args.branch_overhead is not None:
        for generator in bench.generators.values():
            generator.sizer.max_branch_overhead = args.branch_overhead
    rows = spec_bench(args.limit, args.categories.split(",") if args.categories else None, skip=args.skip)
    bench.warm_up()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.load else None
    try:
        for row in tqdm(rows, desc="spec-bench"):
            bench.run(Case(str(row["question_id"]), row["category"], prompt_ids(bench.tokenizer, row)))
    finally:
        if busy is not None:
            busy.kill()
    report = bench.report(lookahead=args.lookahead, branch_overhead=args.branch_overhead,
                          temperature=args.temperature, limit_per_category=args.limit, skip=args.skip,
                          load=args.load)
    bench.finish(report, default_out(args, "spec_bench"), "Spec-Bench dev")


if __name__ == "__main__":
    main()
