"""Spec-Bench dev split: our methods against plain greedy and transformers' prompt lookup, same process.

    python benchmarks/spec_bench.py --model smollm2-135m --limit 4 --methods pld
    python benchmarks/spec_bench.py --limit 8 --categories summarization,rag --out results/sb.json
    python benchmarks/spec_bench.py --limit 3 --methods pld,auto --fresh-curve       # probe the cost curve anew
    python benchmarks/spec_bench.py --limit 3 --methods pld,auto --poison-curve spike  # start from a wrong one
    python benchmarks/spec_bench.py --limit 3 --methods pld,auto --load               # one core kept busy
    python benchmarks/spec_bench.py --limit 3 --methods auto --cost flat --budget 64  # a GPU-like curve, forced
    python benchmarks/spec_bench.py --limit 3 --methods pld,auto,pld@2  # pld@2: pld again, the run's noise floor

Per prompt, every method runs once, in rotating order (interleaved, so drift in machine speed hits all
alike). Baselines: ``plain`` is ``model.generate(do_sample=False)``; ``hf_pld`` is the same with
``prompt_lookup_num_tokens=10``. In float32 our methods must reproduce ``plain`` token for token; a mismatch is
recorded and makes the script exit non-zero. In bfloat16/float16 tree and plain forwards round differently, so
the report counts how often each method's output equals plain decoding's in the same dtype (``agreement``) and
how many leading tokens agree. Writes JSON (``--out``), a markdown table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import ROOT, prompt_ids, spec_bench, write_chart, write_json
from retrieval_spec.costs import CostProbe, cached_cost_curve, measure_cost_curve, store_cost_curve
from retrieval_spec.datastore.manifest import tokenizer_fingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.lookahead import LookaheadConfig, LookaheadDrafter
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.linear_forms import cpu_name
from retrieval_spec.models import load_model
from retrieval_spec.sizing import CostCurve


def hf_generate(model, ids: np.ndarray, max_new_tokens: int, **kwargs) -> tuple[np.ndarray, float]:
    tensor = torch.as_tensor(ids[None], dtype=torch.long, device=model.device)
    kwargs.setdefault("do_sample", False)
    synchronize(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_new_tokens, **kwargs)
    synchronize(model.device)
    return out[0, len(ids):].cpu().numpy(), time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreeing_prefix(ours: np.ndarray, plain: np.ndarray) -> int:
    """How many leading tokens two outputs share."""
    n = min(len(ours), len(plain))
    differ = np.flatnonzero(ours[:n] != plain[:n])
    return int(differ[0]) if len(differ) else n


def table(report: dict, methods: list[str]) -> str:
    """The run's markdown: what it ran on (CPU or GPU, threads, the cost curve every learning method started from),
    then per category and method the speedup over plain ``generate()``, over our loop drafting nothing (``ar``,
    when it ran), tokens per step and the drafting + verification ms per step."""
    curve = report.get("starting_cost_curve")
    lines = [f"{report['model']} {report['dtype']} on {report['device']} ({report['cpu']}, "
             f"{report['torch_threads']} threads); cost curve at the start (nodes: ms): "
             + (", ".join(f"{k}: {v:.0f}" for k, v in zip(curve["sizes"], curve["ms"])) if curve else report["cost"]),
             "", "| category | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for category, row in report["categories"].items():
        cells = []
        for method in methods:
            r = row[method]
            cell = f"{r['speedup']:.2f}x"
            if "mean_accepted" in r:
                if "ar" in row and method != "ar":
                    cell += f" · {r['speedup'] / row['ar']['speedup']:.2f}x ar"
                cell += f" · {r['mean_accepted']:.2f} tok/step · {r['draft_ms_per_step']:.1f}+{r['verify_ms_per_step']:.0f} ms"
            cells.append(cell)
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="pld",
                        help="comma-separated methods of ours (retrieval_spec.drafters.registry.METHODS); NAME@2 "
                             "runs a second, independent instance of NAME: how far two identical methods differ per "
                             "category is the noise floor of any per-category comparison in the run")
    parser.add_argument("--limit", type=int, default=4, help="prompts per category")
    parser.add_argument("--categories", help="comma-separated subset of categories")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="> 0: sample (top_k=0, top_p=1) in every method; outputs are then not compared")
    parser.add_argument("--no-hf-pld", action="store_true", help="skip transformers' prompt lookup baseline")
    parser.add_argument("--index", type=Path, help="corpus datastore for `rest` and `auto` (built by build-index)")
    parser.add_argument("--branch-overhead", type=float,
                        help="run Lookahead's window even when it makes a step this much dearer (default: the fuser's)")
    parser.add_argument("--lookahead", help="W,N,G of the lookahead method (default: LookaheadConfig's)")
    parser.add_argument("--budget", type=int, default=64, help="most draft nodes per step (GenerationConfig.tree_budget)")
    parser.add_argument("--cost", default="learned",
                        help="learned: the cached or probed curve, then learned from real steps (the default engine); "
                             "flat: verification as cheap at 64 nodes as at 1 (a GPU-like curve), fixed; "
                             "a JSON file {sizes, ms}: that curve, fixed")
    parser.add_argument("--fresh-curve", action="store_true", help="probe the cost curve anew before the run")
    parser.add_argument("--poison-curve", help="start the learned curve from a wrong cached one: flat, spike "
                                               "(one size 10x dearer), slow (everything 1.5x) or a JSON file")
    parser.add_argument("--load", action="store_true",
                        help="keep one core busy with another process for the whole run (baselines share the load)")
    parser.add_argument("--out", type=Path, help="JSON path (default results/spec_bench_<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "results" / f"spec_bench_{args.model}.json"
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    exact = args.dtype == "float32" and not args.temperature
    ours = args.methods.split(",")
    datastore = Datastore.open(args.index, tokenizer_fingerprint(tokenizer)) if args.index else None
    fixed_curve = forced_cost_curve(args)
    generators = {
        m: SpeculativeGenerator(model, tokenizer, make_drafters(m.split("@")[0], model.config.vocab_size, datastore),
                                cost_curve=fixed_curve) for m in ours
    }
    verifier = next(iter(generators.values())).verifier  # every generator's verifier runs the same model
    start_curve = None if fixed_curve is not None else starting_cost_curve(verifier, args)
    if args.lookahead:
        window, ngram, guesses = map(int, args.lookahead.split(","))
        config = LookaheadConfig(window=window, ngram=ngram, guesses=guesses)
        for m in ours:
            if m.split("@")[0] == "lookahead":
                generators[m] = SpeculativeGenerator(model, tokenizer, [LookaheadDrafter(config)])
    if args.branch_overhead is not None:
        for generator in generators.values():
            generator.sizer.max_branch_overhead = args.branch_overhead
    baselines = ["plain"] + ([] if args.no_hf_pld else ["hf_pld"])
    methods = baselines + ours
    rows = spec_bench(args.limit, args.categories.split(",") if args.categories else None)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0,
                              tree_budget=args.budget)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0} if args.temperature else {}
    warm = prompt_ids(tokenizer, rows[0])
    hf_generate(model, warm, 8)
    for generator in generators.values():  # each learns its own cost model here, from the same cached curve
        if start_curve is not None:
            store_cost_curve(verifier, CostProbe(), start_curve)
        generator.generate(warm, GenerationConfig(max_new_tokens=8))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.load else None
    try:
        totals, mismatches, agreement = run(args, model, tokenizer, rows, methods, ours, generators, config, sampling,
                                            exact)
    finally:
        if busy is not None:
            busy.kill()
    report = {"model": args.model, "device": str(model.device), "cpu": cpu_name(), "dtype": args.dtype,
              "torch_threads": torch.get_num_threads(),
              "starting_cost_curve": None if start_curve is None else {"sizes": start_curve.sizes.tolist(),
                                                                        "ms": [round(float(m), 2) for m in
                                                                               start_curve.ms]},
              "index": str(args.index) if args.index else None, "lookahead": args.lookahead,
              "branch_overhead": args.branch_overhead, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "limit_per_category": args.limit, "budget": args.budget,
              "cost": args.cost, "fresh_curve": args.fresh_curve, "poison_curve": args.poison_curve, "load": args.load,
              "mismatches": mismatches,
              "agreement_with_plain": {m: {"identical_outputs": f"{c['identical']}/{c['prompts']}",
                                           "agreeing_prefix_share": round(c["prefix"] / max(c["tokens"], 1), 4)}
                                       for m, c in agreement.items()},
              "tuning": {m: g.tuning_report() for m, g in generators.items()},
              "categories": {}}
    summarize(report, totals, methods)
    write_json(out, report)
    markdown = table(report, methods)
    out.with_suffix(".md").write_text(markdown + "\n")
    write_chart(out.with_suffix(".png"), report, methods, f"Spec-Bench dev, {args.model}, {args.dtype}")
    print(markdown)
    if not exact and not args.temperature:
        print(f"agreement with plain decoding in {args.dtype}: {json.dumps(report['agreement_with_plain'])}")
    if mismatches:
        print(f"MISMATCHES against plain greedy: {mismatches}", file=sys.stderr)
        sys.exit(1)


def forced_cost_curve(args) -> CostCurve | None:
    """The fixed curve of ``--cost`` (None: the engine's learned curve)."""
    if args.cost == "flat":
        return CostCurve.flat(64)
    if args.cost != "learned":
        data = json.loads(Path(args.cost).read_text())
        return CostCurve(sizes=np.array(data["sizes"]), ms=np.array(data["ms"], dtype=np.float64))
    return None


def starting_cost_curve(verifier, args) -> CostCurve:
    """The cached curve every learning generator starts from: the fresh probe of ``--fresh-curve``, the wrong one
    of ``--poison-curve``, or the one cached. It is stored again before each generator's first call, since each
    stores what it learned: else only the first generator would start from it, and the others from what the
    first learned."""
    probe = CostProbe()
    start = measure_cost_curve(verifier, probe) if args.fresh_curve else cached_cost_curve(verifier, probe)
    if args.poison_curve:
        true = start
        poisons = {
            "flat": CostCurve(sizes=true.sizes, ms=np.full(len(true.sizes), true.ms[0])),
            "spike": CostCurve(sizes=true.sizes, ms=np.where(true.sizes == 8, 10 * true.ms, true.ms)),
            "slow": CostCurve(sizes=true.sizes, ms=1.5 * true.ms),
        }
        if args.poison_curve in poisons:
            start = poisons[args.poison_curve]
        else:
            data = json.loads(Path(args.poison_curve).read_text())
            start = CostCurve(sizes=np.array(data["sizes"]), ms=np.array(data["ms"]))
    return start


def run(args, model, tokenizer, rows, methods, ours, generators, config, sampling, exact):
    """Every prompt through every method, in rotating order; per-category totals, mismatches, agreement."""
    totals: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    mismatches, agreement = [], defaultdict(lambda: {"identical": 0, "prompts": 0, "prefix": 0, "tokens": 0})
    for i, row in enumerate(tqdm(rows, desc="spec-bench")):
        ids = prompt_ids(tokenizer, row)
        outputs = {}
        for method in methods[i % len(methods):] + methods[: i % len(methods)]:
            if method == "plain":
                tokens, seconds = hf_generate(model, ids, args.max_new_tokens, **sampling)
                stats = None
            elif method == "hf_pld":
                tokens, seconds = hf_generate(model, ids, args.max_new_tokens, prompt_lookup_num_tokens=10, **sampling)
                stats = None
            else:
                result = generators[method].generate(ids, config)
                tokens, seconds, stats = result.tokens, result.stats.total_ms / 1e3, result.stats
            outputs[method] = tokens
            for bucket in (totals[row["category"]][method], totals["overall"][method]):
                bucket["seconds"] += seconds
                bucket["tokens"] += len(tokens)
                if stats is not None:
                    bucket["steps"] += stats.steps
                    bucket["draft_ms"] += stats.draft_ms
                    bucket["verify_ms"] += stats.verify_ms
                    bucket["observe_ms"] += stats.observe_ms
                    for phase, ms in stats.phase_ms.items():
                        bucket["phase_" + phase] += ms
                    bucket["paused_steps"] += stats.paused_steps
                    for source, count in stats.accepted_by_source.items():
                        bucket["accepted_" + source] += count
                    for source, count in stats.drafted_by_source.items():
                        bucket["drafted_" + source] += count
        for method in ours if not args.temperature else ():
            same = np.array_equal(outputs[method], outputs["plain"])
            if not same and exact:
                mismatches.append({"question_id": row["question_id"], "method": method})
            counts = agreement[method]
            counts["identical"] += same
            counts["prompts"] += 1
            counts["prefix"] += agreeing_prefix(outputs[method], outputs["plain"])
            counts["tokens"] += len(outputs["plain"])
    return totals, mismatches, agreement


def summarize(report: dict, totals: dict, methods: list[str]) -> None:
    """Per category and method: speedup over plain, tokens/s, tokens per step, ms per step, accepted by source."""
    for category in sorted(totals, key=lambda c: (c == "overall", c)):
        plain_rate = totals[category]["plain"]["tokens"] / totals[category]["plain"]["seconds"]
        report["categories"][category] = {}
        for method in methods:
            t = totals[category][method]
            entry = {"speedup": round(t["tokens"] / t["seconds"] / plain_rate, 3),
                     "tokens_per_second": round(t["tokens"] / t["seconds"], 2)}
            if t["steps"]:
                entry |= {"mean_accepted": round(t["tokens"] / t["steps"], 3),
                          "draft_ms_per_step": round(t["draft_ms"] / t["steps"], 3),
                          "verify_ms_per_step": round(t["verify_ms"] / t["steps"], 3),
                          "observe_ms_per_step": round(t["observe_ms"] / t["steps"], 4),
                          "phase_ms_per_step": {k[6:]: round(v / t["steps"], 3) for k, v in t.items()
                                                if k.startswith("phase_")},
                          "accepted_by_source": {k[9:]: int(v) for k, v in t.items() if k.startswith("accepted_")},
                          "drafted_by_source": {k[8:]: int(v) for k, v in t.items() if k.startswith("drafted_")},
                          "paused_steps": int(t["paused_steps"])}
            report["categories"][category][method] = entry


if __name__ == "__main__":
    main()
