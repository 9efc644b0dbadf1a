"""Self-consistency: N sampled answers of one GSM8K problem decoded together, the samples drafting from each
other, against transformers' batched sampling of the same N, same model, same process.

    python benchmarks/multisample.py                                  # N = 8, the held-out problems, ar,pld,auto
    python benchmarks/multisample.py --samples 1,4,8,16 --limit 3     # how the gain moves with N
    python benchmarks/multisample.py --methods pld,pld-nocross        # with and without cross-path drafting
    python benchmarks/multisample.py --limit 1 --max-new-tokens 16    # a smoke run

The problems are Spec-Bench's GSM8K-derived ``math_reasoning`` prompts (``data/spec_bench``), split like the
workloads' data: ``--split measure`` the held-out three quarters, ``tune`` the rest (by the sha256 of
``spec_bench:<question_id>``). For every problem and N, in rotating order: ``plain`` (``generate(do_sample=True,
num_return_sequences=N)``) and each method of ours decoding the N samples as one batch (``NAME``: its drafters
plus cross-path drafting from the other samples, arXiv 2503.05330; ``NAME-nocross``: without). Sampling is
lossless (the sampling tests), so outputs are samples, not compared. Reports tokens/s (all samples' tokens up to
EOS per wall second), speedup over plain and over ``ar``, tokens per row per step, ms per step. Writes JSON
(``--out``, default ``results/multisample_<model>.json``), a markdown table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import SPLITS, eos_ids, prompt_ids, spec_bench, split_of, until_eos
from harness import count, default_out, linear_forms, summarize, write_report
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.linear_forms import cpu_name
from retrieval_spec.models import load_model


def plain_samples(model, ids: np.ndarray, n: int, config: GenerationConfig) -> tuple[int, float]:
    """Tokens (each row up to its EOS) and seconds of transformers' batched sampling."""
    tensor = torch.as_tensor(ids[None], dtype=torch.long)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), do_sample=True,
                             temperature=config.temperature, top_k=0, top_p=1.0, num_return_sequences=n,
                             max_new_tokens=config.max_new_tokens)
    seconds = time.perf_counter() - start
    eos = eos_ids(model)
    return sum(len(until_eos(row, eos)) for row in out[:, len(ids):].tolist()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="ar,pld,auto",
                        help="comma-separated methods of ours; NAME-nocross drafts without the other samples")
    parser.add_argument("--split", choices=SPLITS, default="measure",
                        help="measure: the held-out problems, what the tables report; tune: the quarter kept for "
                             "tuning")
    parser.add_argument("--limit", type=int, help="GSM8K problems (Spec-Bench math_reasoning; default: all of the split)")
    parser.add_argument("--samples", default="8", help="comma-separated N")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON path (default results/multisample_<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = default_out(args, "multisample")
    model, tokenizer = load_model(args.model)
    vocab = model.config.vocab_size
    ours = {method: SpeculativeGenerator(model, tokenizer, make_drafters(method.removesuffix("-nocross"), vocab),
                                         cross_path=not method.endswith("-nocross"))
            for method in args.methods.split(",")}
    methods = ["plain", *ours]
    rows = [row for row in spec_bench(None, ["math_reasoning"])
            if split_of(f"spec_bench:{row['question_id']}") == args.split][: args.limit]
    sizes = [int(n) for n in args.samples.split(",")]
    totals: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    extra: dict = defaultdict(lambda: defaultdict(int))
    warm_ids, warm_config = prompt_ids(tokenizer, rows[0]), GenerationConfig(max_new_tokens=4, temperature=1.0)
    for n in sizes:  # measure each batch size's cost curve (and warm transformers' batch) before timing anything
        plain_samples(model, warm_ids, n, warm_config)
        for generator in ours.values():
            generator.generate_batch([warm_ids] * n, warm_config)
    runs = [(row, n) for row in rows for n in sizes]
    for i, (row, n) in enumerate(tqdm(runs, desc="multisample")):
        ids = prompt_ids(tokenizer, row)
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=1000 * i)
        for method in methods[i % len(methods):] + methods[: i % len(methods)]:
            if method == "plain":
                tokens, seconds = plain_samples(model, ids, n, config)
                stats = []
            else:
                result = ours[method].generate_batch([ids] * n, config)
                tokens, seconds = sum(len(r.tokens) for r in result.rows), result.total_ms / 1e3
                stats = [r.stats for r in result.rows]
                extra[f"N={n:>2}"][method + ":forwards"] += result.forwards
                extra[f"N={n:>2}"][method + ":sibling"] += sum(s.accepted_by_source.get("sibling", 0) for s in stats)
            count(totals[f"N={n:>2}"][method], tokens, seconds, stats)
    report = {"model": args.model, "device": str(model.device), "cpu": cpu_name(), "dtype": "float32",
              "torch_threads": torch.get_num_threads(), "threads": args.threads,
              "cost": "learned per batch size from the cached probe",
              "linear_forms": linear_forms(next(iter(ours.values())).verifier),
              "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "split": args.split, "problems": len(rows),
              "categories": summarize(totals, methods)}
    for category, row in report["categories"].items():
        for method in ours:
            row[method] |= {"forwards": extra[category][method + ":forwards"],
                            "accepted_from_siblings": extra[category][method + ":sibling"]}
    write_report(out, report, methods, f"Self-consistency, {args.model}, T={args.temperature}")


if __name__ == "__main__":
    main()
