"""transformers' ``pipeline("text-generation")``, as shipped and after ``retrieval_spec.hf.enable``, same process.

    python benchmarks/pipeline.py --limit 4                          # 4 prompts per Spec-Bench dev category
    python benchmarks/pipeline.py --limit 1 --categories qa,rag --max-new-tokens 16   # a quick check

Every prompt goes through the same pipeline object twice, greedy (``do_sample=False``), in alternating order
(interleaved, so drift in machine speed hits both alike): ``plain`` is transformers' own ``generate``, ``switched``
the engine that ``hf.enable(model, tokenizer, method=...)`` attached, one engine for the whole run (so what its
drafters learn carries over, as in a long-lived process). The generated texts must be identical; a mismatch is
recorded and makes the script exit non-zero. Writes JSON (``--out``), a markdown table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import pipeline

from common import ROOT, spec_bench, write_chart, write_json
from retrieval_spec.config import GenerationConfig
from retrieval_spec import hf
from retrieval_spec.drafters.registry import METHODS
from retrieval_spec.models import load_model


def table(report: dict) -> str:
    lines = ["| category | prompts | plain tok/s | switched tok/s | speedup | tokens/step |", "|---" * 6 + "|"]
    for category, row in report["categories"].items():
        lines.append(f"| {category} | {row['prompts']} | {row['plain_tokens_per_second']:.1f} | "
                     f"{row['switched_tokens_per_second']:.1f} | {row['speedup']:.2f}x | {row['mean_accepted']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="auto", choices=list(METHODS), help="drafting method of the switched runs")
    parser.add_argument("--index", type=Path, help="corpus datastore for `rest` and `auto` (built by build-index)")
    parser.add_argument("--limit", type=int, default=4, help="prompts per category")
    parser.add_argument("--categories", help="comma-separated subset of categories")
    parser.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--out", type=Path, help="JSON path (default results/pipeline_<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "results" / f"pipeline_{args.model}.json"
    model, tokenizer = load_model(args.model, device=args.device)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    engine = hf.enable(model, tokenizer, method=args.method, index=args.index)
    # The switch is an instance attribute: setting it back and forth keeps one engine (and what it learns) for
    # the whole run, where disable() + enable() would start a new one each time.
    generate = {"switched": model.generate, "plain": engine.transformers_generate}
    call = dict(max_new_tokens=args.max_new_tokens, do_sample=False, return_full_text=False)
    rows = spec_bench(args.limit, args.categories.split(",") if args.categories else None)

    def run(mode: str, messages: list[dict], **overrides) -> tuple[str, float]:
        model.generate = generate[mode]
        start = time.perf_counter()
        text = pipe(messages, **{**call, **overrides})[0]["generated_text"]
        return text, time.perf_counter() - start

    warm = [{"role": "user", "content": rows[0]["turns"][0]}]
    for mode in generate:  # first calls: lazy initialisation, and the engine's cost curve (measured once, cached)
        run(mode, warm, max_new_tokens=8)
    totals: dict = defaultdict(lambda: defaultdict(float))
    mismatches = []
    for i, row in enumerate(tqdm(rows, desc="pipeline")):
        messages = [{"role": "user", "content": row["turns"][0]}]
        texts, seconds = {}, {}
        for mode in (("plain", "switched") if i % 2 == 0 else ("switched", "plain")):
            texts[mode], seconds[mode] = run(mode, messages)
            if mode == "switched":
                stats = engine.last_result.rows[0].stats
        if texts["plain"] != texts["switched"]:
            mismatches.append({"question_id": row["question_id"], "plain": texts["plain"],
                               "switched": texts["switched"]})
        for bucket in (totals[row["category"]], totals["overall"]):
            bucket["prompts"] += 1
            bucket["tokens"] += stats.new_tokens  # the same tokens on both sides when the texts are identical
            bucket["steps"] += stats.steps
            bucket["plain_seconds"] += seconds["plain"]
            bucket["switched_seconds"] += seconds["switched"]
    model.generate = generate["switched"]
    hf.disable(model)
    report = {"model": args.model, "method": args.method, "index": str(args.index) if args.index else None,
              "device": str(model.device), "threads": args.threads, "max_new_tokens": args.max_new_tokens,
              "limit_per_category": args.limit, "mismatches": mismatches, "categories": {}}
    for category in sorted(totals, key=lambda c: (c == "overall", c)):
        t = totals[category]
        report["categories"][category] = {
            "prompts": int(t["prompts"]),
            "plain_tokens_per_second": round(t["tokens"] / t["plain_seconds"], 2),
            "switched_tokens_per_second": round(t["tokens"] / t["switched_seconds"], 2),
            "speedup": round(t["plain_seconds"] / t["switched_seconds"], 3),
            "mean_accepted": round(t["tokens"] / max(t["steps"], 1), 3),
        }
    write_json(out, report)
    markdown = table(report)
    out.with_suffix(".md").write_text(markdown + "\n")
    chart = {"categories": {category: {args.method: row} for category, row in report["categories"].items()}}
    write_chart(out.with_suffix(".png"), chart, [args.method],
                f"pipeline('text-generation') with hf.enable vs without, {args.model}")
    print(markdown)
    if mismatches:
        print(f"MISMATCHES between plain and switched pipeline outputs: {mismatches}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
