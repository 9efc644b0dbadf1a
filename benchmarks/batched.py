"""Greedy batches of different prompts: our loop decoding B rows at once against transformers' batched
``generate()`` of the same B prompts, same model, same process.

    python benchmarks/batched.py                               # batches of 4 of the Spec-Bench dev split, ar,pld,auto
    python benchmarks/batched.py --batch 1,4,8 --limit 1       # how the gain moves with the batch
    python benchmarks/batched.py --limit 1 --max-new-tokens 16 # a smoke run

The prompts are Spec-Bench's dev split (``--limit`` per category after ``--skip``), in file order, cut into batches of
``--batch``; a batch mixes categories, as a server's does. For every batch, in rotating order: ``plain``
(``generate()`` with left padding, the rows' attention masks, greedy) and each method of ours
(``SpeculativeGenerator.generate_batch``). Tokens count up to each row's EOS. Every output of ours must equal the
prompt's plain greedy output decoded alone (its reference, computed once and untimed: padding may change a padded
batch's own numerics, never ours), or the script exits non-zero. Reports tokens/s, speedup over plain and over
``ar``, tokens per row per step and ms per step, per batch size. Writes JSON (``--out``, default
``results/batched_<model>.json``), a markdown table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import eos_ids, spec_bench, until_eos
from harness import chat_ids, count, default_out, hf_generate, linear_forms, summarize, write_report
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.linear_forms import cpu_name
from retrieval_spec.models import load_model


def plain_batch(model, prompts: list[np.ndarray], max_new_tokens: int, pad: int) -> tuple[list[list[int]], float]:
    """Each row's greedy tokens (up to EOS) and the seconds of one left-padded batched ``generate()``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad)
    seconds = time.perf_counter() - start
    eos = eos_ids(model)
    return [until_eos(row, eos) for row in out[:, width:].tolist()], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="ar,pld,auto", help="comma-separated methods of ours")
    parser.add_argument("--batch", default="4", help="comma-separated batch sizes")
    parser.add_argument("--limit", type=int, default=3, help="prompts per Spec-Bench category")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first prompts of each category (tuning)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON path (default results/batched_<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = default_out(args, "batched")
    model, tokenizer = load_model(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids(model))
    vocab = model.config.vocab_size
    ours = {m: SpeculativeGenerator(model, tokenizer, make_drafters(m, vocab)) for m in args.methods.split(",")}
    methods = ["plain", *ours]
    prompts = [chat_ids(tokenizer, row["turns"][0]) for row in spec_bench(args.limit, skip=args.skip)]
    # Each prompt's plain greedy output decoded alone: the lossless reference.
    references = [hf_generate(model, p, args.max_new_tokens)[0].tolist() for p in tqdm(prompts, desc="references")]
    sizes = [int(b) for b in args.batch.split(",")]
    warm = GenerationConfig(max_new_tokens=4)
    for size in sizes:  # each batch size's cost curve is probed, and transformers' batch warmed, before any timing
        plain_batch(model, prompts[:size], 4, pad)
        for generator in ours.values():
            generator.generate_batch(prompts[:size], warm)
    totals: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    mismatches = []
    runs = [(size, start) for size in sizes for start in range(0, len(prompts) - size + 1, size)]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    for i, (size, start) in enumerate(tqdm(runs, desc="batches")):
        batch = prompts[start : start + size]
        for method in methods[i % len(methods):] + methods[: i % len(methods)]:
            if method == "plain":
                rows, seconds = plain_batch(model, batch, args.max_new_tokens, pad)
                tokens, stats = sum(map(len, rows)), []
            else:
                result = ours[method].generate_batch(batch, config)
                tokens, seconds = sum(len(r.tokens) for r in result.rows), result.total_ms / 1e3
                stats = [r.stats for r in result.rows]
                for b, row in enumerate(result.rows):
                    if np.asarray(row.tokens).tolist() != references[start + b]:
                        mismatches.append({"method": method, "prompt": start + b, "batch": size})
            count(totals[f"B={size:>2}"][method], tokens, seconds, stats)
    report = {"model": args.model, "device": str(model.device), "cpu": cpu_name(), "dtype": "float32",
              "torch_threads": torch.get_num_threads(), "threads": args.threads,
              "cost": "learned per batch size from the cached probe", "max_new_tokens": args.max_new_tokens,
              "linear_forms": linear_forms(next(iter(ours.values())).verifier),
              "limit_per_category": args.limit, "skip": args.skip, "prompts": len(prompts),
              "mismatches": mismatches, "categories": summarize(totals, methods)}
    write_report(out, report, methods, f"Greedy batches of different prompts, {args.model}")


if __name__ == "__main__":
    main()
