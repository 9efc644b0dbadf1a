"""The engine's own time per step — everything but the model's forward — measured on the replay.

On a GPU a forward over 64 nodes costs about what one over a single node does, so the host time around it decides
the speedup: drafting, sizing, acceptance, the cache's commit and the drafters' learning. This runs the real loop
on a :class:`~retrieval_spec.replay.ReplayVerifier` with a flat curve (trees of up to ``--nodes`` nodes, as a GPU
affords) and reports, per method and batch size, the wall milliseconds per step outside the verifier's forward.

    python benchmarks/overhead.py --methods pld,auto --nodes 64 --batch 1,8

Prints one JSON line per method and batch: ``method``, ``batch``, ``nodes``, ``host_ms_per_step`` (the sum of the
phases below), ``phase_ms_per_step`` (draft, size, accept, commit, observe), ``tokens_per_step``. Recordings come
from ``results/plain_<model>.jsonl`` (``record_plain.py``), recorded here first when missing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from common import ROOT, write_jsonl
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.config import GenerationConfig
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.replay import Recording, ReplayVerifier
from retrieval_spec.sizing import CostCurve

HOST_PHASES = ("draft", "size", "accept", "commit", "observe")  # the replay's "mask" and "forward" are not ours


def recordings(path: Path, model: str) -> list[Recording]:
    """The recordings at ``path``, recorded now (one prompt per category, 128 tokens) when the file is missing."""
    if not path.exists():
        from record_plain import record

        from common import spec_bench
        from retrieval_spec.models import load_model

        loaded, tokenizer = load_model(model)
        write_jsonl(path, record(loaded, tokenizer, spec_bench(1, skip=3), 128, 8))
    return [recording for _, recording in Recording.read_jsonl(path)]


def measure(method: str, records: list[Recording], batch: int, nodes: int, vocab_size: int, clock) -> dict:
    """Host milliseconds per step of ``method`` decoding every recording, ``batch`` rows at a time."""
    curve = CostCurve.flat(nodes)
    verifier = ReplayVerifier(records, curve, None, vocab_size)  # no cost clock: the loop times itself
    generator = SpeculativeGenerator(verifier, None, make_drafters(method, vocab_size), cost_curve=curve,
                                     clock=clock)
    phases: dict[str, float] = defaultdict(float)
    steps = tokens = row_steps = 0
    for start in range(0, len(records) - batch + 1, batch):
        rows = records[start : start + batch]
        limit = min(len(r.output) for r in rows)
        result = generator.generate_batch([r.prompt for r in rows], GenerationConfig(max_new_tokens=limit,
                                                                                      tree_budget=nodes,
                                                                                      eos_token_ids=()))
        for phase, ms in result.rows[0].stats.phase_ms.items():  # a batch's rows share its steps
            phases[phase] += ms
        steps += result.forwards - 1  # the phases count the steps after the prompt's
        tokens += sum(r.stats.new_tokens for r in result.rows)
        row_steps += sum(r.stats.steps for r in result.rows)
    host = {phase: phases[phase] / max(steps, 1) for phase in HOST_PHASES}
    return {"method": method, "batch": batch, "nodes": nodes, "host_ms_per_step": round(sum(host.values()), 4),
            "phase_ms_per_step": {phase: round(ms, 4) for phase, ms in host.items()},
            "tokens_per_step": round(tokens / max(row_steps, 1), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="whose recordings to replay")
    parser.add_argument("--records", type=Path, help="default: results/plain_<model>.jsonl")
    parser.add_argument("--methods", default="pld,auto")
    parser.add_argument("--nodes", type=int, default=64, help="tree budget, on a curve flat up to this size")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--vocab-size", type=int, default=49152, help="the recorded model's vocabulary size")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: what a user waits for (on a quiet machine); cpu: this thread's CPU time, which "
                             "other processes on a busy machine do not inflate")
    parser.add_argument("--out", type=Path, help="also write the lines to this JSONL file")
    args = parser.parse_args()
    records = recordings(args.records or ROOT / "results" / f"plain_{args.model}.jsonl", args.model)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    batches = [int(batch) for batch in args.batch.split(",")]
    if max(batches) > len(records):
        parser.error(f"--batch {max(batches)} needs as many recordings; {len(records)} are stored (record more: "
                     f"python benchmarks/record_plain.py --limit 2 --skip 3)")
    lines = []
    for method in args.methods.split(","):
        for batch in batches:
            measure(method, records[: max(batch, 1)], batch, args.nodes, args.vocab_size, clock)  # warm-up
            lines.append({**measure(method, records, batch, args.nodes, args.vocab_size, clock), "clock": args.clock})
            print(json.dumps(lines[-1]), flush=True)
    if args.out:
        write_jsonl(args.out, lines)


if __name__ == "__main__":
    main()
