"""How many tokens a step the drafters' candidates could give, against what the ranked tree gives: where a flat
(GPU-like) curve's tokens per step are lost.

    python benchmarks/ceiling.py --limit 1                      # Spec-Bench dev, SmolLM2, auto, flat 64 nodes
    python benchmarks/ceiling.py --limit 1 --skip 3 --method pld
    python benchmarks/ceiling.py --limit 1 --index indexes/sharegpt   # with a corpus (make corpora)

Per step of the real model decoding each prompt (greedy, float32, checked against plain ``generate()``), three
figures, each the longest path of a tree that the output goes on to take, plus the step's bonus token:

- ``ranked``: the tree the fuser ranked and cut to the budget (``TreeFuser.rank``); the step verifies a head of it
  (all of it on a flat curve, unless the speed guard paused drafting): the measured tokens per step;
- ``candidates``: every candidate the drafters proposed before the cut (``TreeFuser.candidates``): what a perfect
  ranking within any budget could reach;
- ``no_first``: the share of steps where no candidate carried the next token, which no ranking and no budget can
  recover: only better first candidates can.

Also the accepted tokens of each bound by source. Writes JSON (``--out``) and prints a markdown table. No timing:
tokens only, so the machine's load does not matter.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import ROOT, prompt_ids, read_curve, spec_bench, write_json
from harness import WARM_UP_PROMPT, chat_ids
from retrieval_spec.config import GenerationConfig
from retrieval_spec.datastore.manifest import tokenizer_fingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.demo import plain_generate
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.linear_forms import cpu_name
from retrieval_spec.models import load_model
from retrieval_spec.tree import DraftTree, Source


def matched_path(tree: DraftTree, truth: np.ndarray) -> list[int]:
    """The sources of the nodes on ``tree``'s longest path from the root that spells a prefix of ``truth``."""
    children: dict[int, list[int]] = defaultdict(list)
    for node, parent in enumerate(tree.parents.tolist()):
        if parent >= 0:
            children[parent].append(node)
    node, sources = 0, []
    for token in truth.tolist():
        node = next((c for c in children[node] if tree.tokens[c] == token), -1)
        if node < 0:
            break
        sources.append(int(tree.sources[node]))
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--index", type=Path, help="corpus datastore for `rest` and `auto` (built by build-index)")
    parser.add_argument("--limit", type=int, default=1, help="prompts per category")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first prompts of each category")
    parser.add_argument("--budget", type=int, default=64, help="most draft nodes per step")
    parser.add_argument("--cost", default="flat", help="flat (64 nodes cost one step) or a JSON file {sizes, ms}")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON path (default results/ceiling_<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    datastore = Datastore.open(args.index, tokenizer_fingerprint(tokenizer)) if args.index else None
    generator = SpeculativeGenerator(model, tokenizer, make_drafters(args.method, model.config.vocab_size, datastore),
                                     cost_curve=read_curve(args.cost))
    fuser = generator.fuser
    steps: list[dict] = []
    propose, rank = fuser.candidates, fuser.rank

    def candidates(request, context, budget):  # one row a step: the generator decodes one prompt at a time
        tree = propose(request, context, budget)
        steps[-1]["candidates"] = tree
        return tree

    def ranked(requests, contexts, budgets, max_depths):
        steps.append({"position": len(contexts[0]), "candidates": DraftTree.empty(int(contexts[0][-1]))})
        steps[-1]["ranked"] = rank(requests, contexts, budgets, max_depths)[0]
        return [steps[-1]["ranked"]]

    fuser.candidates, fuser.rank = candidates, ranked
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, tree_budget=args.budget)
    generator.generate(chat_ids(tokenizer, WARM_UP_PROMPT), GenerationConfig(max_new_tokens=8))  # as spec_bench.py
    totals: dict = defaultdict(Counter)
    mismatches = []
    for row in tqdm(spec_bench(args.limit, skip=args.skip), desc="ceiling"):
        ids = prompt_ids(tokenizer, row)
        steps.clear()
        result = generator.generate(ids, config)
        plain, _ = plain_generate(model, ids, args.max_new_tokens)
        if not np.array_equal(result.tokens, plain):
            mismatches.append(row["question_id"])
        text = np.concatenate([ids, result.tokens])
        for step in steps:
            truth = text[step["position"]:]
            ranked_path, candidate_path = matched_path(step["ranked"], truth), matched_path(step["candidates"], truth)
            for bucket in (totals[row["category"]], totals["overall"]):
                bucket["steps"] += 1
                bucket["ranked"] += len(ranked_path)
                bucket["candidates"] += len(candidate_path)
                bucket["no_first"] += not candidate_path
                bucket["candidate_nodes"] += len(step["candidates"]) - 1
                for source in ranked_path:
                    bucket[f"ranked:{Source(source).name.lower()}"] += 1
                for source in candidate_path:
                    bucket[f"candidates:{Source(source).name.lower()}"] += 1
    report = {"model": args.model, "method": args.method, "index": str(args.index) if args.index else None,
              "cpu": cpu_name(), "cost": args.cost, "budget": args.budget,
              "max_new_tokens": args.max_new_tokens, "limit_per_category": args.limit, "skip": args.skip,
              "mismatches": mismatches, "categories": {}}
    print("| category | steps | ranked tok/step | candidates tok/step | steps with no right first candidate | "
          "candidates a step |\n|---|---|---|---|---|---|")
    for category in sorted(totals, key=lambda c: (c == "overall", c)):
        t = totals[category]
        n = max(t["steps"], 1)
        report["categories"][category] = {
            "steps": t["steps"], "ranked_tokens_per_step": round(1 + t["ranked"] / n, 3),
            "candidates_tokens_per_step": round(1 + t["candidates"] / n, 3),
            "no_first_candidate": round(t["no_first"] / n, 3),
            "candidates_per_step": round(t["candidate_nodes"] / n, 1),
            "accepted_by_source": {key: value for key, value in sorted(t.items()) if ":" in key}}
        c = report["categories"][category]
        print(f"| {category} | {t['steps']} | {c['ranked_tokens_per_step']:.2f} | {c['candidates_tokens_per_step']:.2f}"
              f" | {c['no_first_candidate']:.0%} | {c['candidates_per_step']:.0f} |")
    write_json(args.out or ROOT / "results" / f"ceiling_{args.model}.json", report)
    if mismatches:
        raise SystemExit(f"outputs differ from plain greedy on {mismatches}")


if __name__ == "__main__":
    main()
