"""Model-free replay: the engine itself against recorded plain greedy outputs, on a clock that charges the cost curve.

The real ``SpeculativeGenerator`` — drafters, fusion, calibration, sizing, padding and, with ``--learn``, the
learned costs, the explorations and the speed guard — runs against a :class:`~retrieval_spec.replay.ReplayVerifier`
(the target's greedy token after a node on the recorded path is the next recorded token) and a
:class:`~retrieval_spec.replay.CostClock` that moves by the cost curve's price of each forward. So it predicts what
the engine does with that curve, in seconds, without a model.

    python benchmarks/record_plain.py --limit 8            # once: results/plain_smollm2-135m.jsonl
    python benchmarks/simulate.py --methods pld,auto --cost results/cost_smollm2-135m.json
    python benchmarks/simulate.py --methods auto --cost flat --budget 64   # a GPU-like curve

Reports per category and method: tokens per step; the predicted speedup over ``generate()`` (one one-node forward
per token) and over our loop drafting nothing (``ar``: plain steps padded where that is cheaper), both priced by
the curve; and the host milliseconds per step the engine itself spent (everything but the model, measured).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import ROOT, read_curve, write_json
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.config import GenerationConfig
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.replay import CostClock, Recording, ReplayVerifier
from retrieval_spec.sizing import CostCurve

# SmolLM2-135M fp32, 2 threads, 256-token context: the probe of `spec_bench.py --fresh-curve` on 317fdb1, on a
# machine whose torch one-row linear is slow (two rows cost less than one); used when no curve is given.
DEFAULT_CURVE = CostCurve(sizes=np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64]),
                          ms=np.array([60.3, 36.8, 43.5, 46.4, 65.3, 66.3, 75.5, 82.9, 86.4, 84.6, 105.7, 115.8, 146.6,
                                       177.0]))


def curve_of(spec: str | None) -> CostCurve:
    """``flat``, a JSON file ``{sizes, ms}`` (:func:`common.read_curve`), or the default curve."""
    return read_curve(spec) if spec else DEFAULT_CURVE


def replay(method: str, records: list[tuple[dict, Recording]], curve: CostCurve, prior: CostCurve | None,
           budget: int, vocab_size: int, datastore: Datastore | None = None) -> dict:
    """Decode every recording with ``method`` through the engine; per category the totals of steps, tokens,
    clock milliseconds and host milliseconds. ``prior``: learn from it (None: size by ``curve``, fixed)."""
    clock = CostClock()
    verifier = ReplayVerifier([r for _, r in records], curve, clock, vocab_size, prior=prior)
    generator = SpeculativeGenerator(verifier, None, make_drafters(method, vocab_size, datastore),
                                     cost_curve=curve if prior is None else None, clock=clock)
    totals: dict = defaultdict(lambda: defaultdict(float))
    for meta, recording in records:
        config = GenerationConfig(max_new_tokens=len(recording.output), tree_budget=budget, eos_token_ids=())
        clock_started, started = clock(), time.perf_counter()
        references = [np.asarray(ids, dtype=np.int32) for ids in meta.get("references", ())]
        result = generator.generate(recording.prompt, config, references=references)
        host_ms = (time.perf_counter() - started) * 1e3
        if not np.array_equal(result.tokens, recording.output):
            raise AssertionError(f"{method}: the replay of {meta.get('question_id')} differs from its recording")
        for bucket in (totals[meta.get("category", "all")], totals["overall"]):
            bucket["steps"] += result.stats.steps
            bucket["tokens"] += len(result.tokens)
            bucket["ms"] += (clock() - clock_started) * 1e3
            bucket["host_ms"] += host_ms
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=ROOT / "results" / "plain_smollm2-135m.jsonl")
    parser.add_argument("--methods", default="pld")
    parser.add_argument("--budget", type=int, default=GenerationConfig.tree_budget)
    parser.add_argument("--vocab-size", type=int, default=49152, help="the recorded model's vocabulary size")
    parser.add_argument("--cost", help="what a forward of k nodes costs: flat (a GPU-like curve: 64 nodes cost one "
                                       "step), a JSON file {sizes, ms}, or (default) SmolLM2 on a 2-core CPU")
    parser.add_argument("--learn", nargs="?", const="same", metavar="PRIOR",
                        help="learn the costs as the engine does, from PRIOR (a JSON curve; default: --cost's)")
    parser.add_argument("--index", type=Path, help="corpus datastore for `rest` and `auto` (built by build-index)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "simulate.json")
    args = parser.parse_args()
    records = Recording.read_jsonl(args.records)
    curve = curve_of(args.cost)
    prior = None if args.learn is None else curve if args.learn == "same" else curve_of(args.learn)
    report = {"cost": {"sizes": curve.sizes.tolist(), "ms": curve.ms.tolist()}, "learn": args.learn, "methods": {}}
    datastore = Datastore.open(args.index) if args.index else None
    for method in args.methods.split(","):
        totals = replay(method, records, curve, prior, args.budget, args.vocab_size, datastore)
        report["methods"][method] = {
            category: {
                "tokens_per_step": round(t["tokens"] / t["steps"], 3),
                "predicted_speedup": round(t["tokens"] * float(curve.ms[0]) / t["ms"], 3),
                "predicted_speedup_over_ar": round(t["tokens"] * curve.plain_ms / t["ms"], 3),
                "host_ms_per_step": round(t["host_ms"] / t["steps"], 3),
            }
            for category, t in sorted(totals.items(), key=lambda item: (item[0] == "overall", item[0]))
        }
        print(f"{method}: " + ", ".join(f"{k} {v['tokens_per_step']:.2f}/{v['predicted_speedup']:.2f}x"
                                          for k, v in report["methods"][method].items()))
    write_json(args.out, report)


if __name__ == "__main__":
    main()
