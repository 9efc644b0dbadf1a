"""Model-free replay: score drafting methods against recorded plain greedy outputs, in seconds.

For greedy decoding the tokens a tree gains are fixed by the plain output: the longest tree path that agrees
with it, plus one. So the whole decoding loop (drafters, fusion, calibration, cost-based sizing) can run
without the model; only the cost of verifying k tokens is needed, taken from a measured cost curve.

    python benchmarks/record_plain.py --limit 8            # once: results/plain_smollm2-135m.jsonl
    python benchmarks/simulate.py --methods pld --cost results/cost_smollm2-135m.json

Reports per category: mean tokens per step and the speedup the cost curve predicts
(tokens per step divided by the mean relative cost of a step).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import ROOT, write_json
from retrieval_spec.acceptance import accept
from retrieval_spec.fusion import TreeFuser
from retrieval_spec.sizing import CostCurve
from retrieval_spec.tree import DraftTree, StepFeedback, depths

# SmolLM2-135M fp32, 2 threads, 256-token context, few-row products (retrieval_spec.kernels): the probe of
# `spec_bench.py --fresh-curve` on 317fdb1; used when no measured curve is given.
DEFAULT_CURVE = CostCurve(sizes=np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64]),
                          ms=np.array([60.3, 36.8, 43.5, 46.4, 65.3, 66.3, 75.5, 82.9, 86.4, 84.6, 105.7, 115.8, 146.6,
                                       177.0]))


def replay(record: dict, fuser: TreeFuser, budget: int) -> dict:
    """Decode one recorded output with ``fuser``'s drafters; return steps, tokens and summed relative cost."""
    prompt = np.asarray(record["prompt"], dtype=np.int32)
    output = np.asarray(record["output"], dtype=np.int32)
    top = np.asarray(record["top"], dtype=np.int32)
    context = np.concatenate([prompt, output])
    request = record.get("question_id", 0)
    fuser.start(request, prompt)
    pos, steps, cost, draft_s = 0, 0, 0.0, 0.0
    while pos < len(output):
        start = time.perf_counter()
        # The first step rides on the prefill's forward (as in the engine), sized on the same curve.
        tree = fuser.propose(request, context[: len(prompt) + pos], budget, max_depth=len(output) - pos - 1)
        draft_s += time.perf_counter() - start
        # The target's greedy choice after a node on the true path is the recorded output at that depth.
        targets = output[np.minimum(pos + depths(tree.parents), len(output) - 1)]
        accepted, new_tokens = accept(tree, targets)
        fuser.observe(request, StepFeedback(tree=tree, accepted_nodes=accepted, new_tokens=new_tokens))
        # The target's top-k was recorded only along the true path: drafters that learn from it (recycling)
        # see that path, with the top-k of each of its nodes.
        path_tree = DraftTree(tree.tokens[accepted], np.arange(-1, len(accepted) - 1, dtype=np.int32),
                              tree.scores[accepted], tree.sources[accepted])
        on_path = StepFeedback(tree=path_tree, accepted_nodes=np.arange(len(accepted), dtype=np.int32),
                               new_tokens=new_tokens, top_tokens=top[pos : pos + len(accepted)])
        for drafter in fuser.drafters:
            if drafter.top_k:
                drafter.observe(request, on_path)
        cost += float(fuser.cost_curve.relative(np.array([len(tree)]))[0])
        pos += len(new_tokens)
        steps += 1
    fuser.finish(request)
    return {"steps": steps, "tokens": int(len(output)), "cost": cost, "draft_ms": draft_s * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=ROOT / "results" / "plain_smollm2-135m.jsonl")
    parser.add_argument("--methods", default="pld")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=49152, help="the recorded model's vocabulary size")
    parser.add_argument("--cost", help="flat (a GPU-like curve: 64 nodes cost one step) or a cost curve JSON "
                                       "({sizes, ms}); default: ANCHORS.md SmolLM2 on 2 CPU cores")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "simulate.json")
    args = parser.parse_args()
    from retrieval_spec.drafters.registry import make_drafters

    records = [json.loads(line) for line in args.records.read_text().splitlines()]
    curve = DEFAULT_CURVE
    if args.cost == "flat":
        curve = CostCurve.flat(64)
    elif args.cost:
        data = json.loads(Path(args.cost).read_text())
        curve = CostCurve(sizes=np.array(data["sizes"]), ms=np.array(data["ms"]))
    report = {}
    for method in args.methods.split(","):
        fuser = TreeFuser(make_drafters(method, args.vocab_size), curve, args.vocab_size)
        per_category = defaultdict(lambda: {"steps": 0, "tokens": 0, "cost": 0.0, "draft_ms": 0.0})
        for record in records:
            result = replay(record, fuser, args.budget)
            for bucket in (per_category[record["category"]], per_category["overall"]):
                for key, value in result.items():
                    bucket[key] += value
        report[method] = {
            category: {
                "tokens_per_step": round(c["tokens"] / c["steps"], 3),
                "predicted_speedup": round(c["tokens"] / c["cost"], 3),
                "draft_ms_per_step": round(c["draft_ms"] / c["steps"], 3),
            }
            for category, c in sorted(per_category.items())
        }
        print(f"{method}: " + ", ".join(f"{k} {v['tokens_per_step']:.2f}/{v['predicted_speedup']:.2f}x"
                                          for k, v in report[method].items()))
    write_json(args.out, report)


if __name__ == "__main__":
    main()
