"""Multi-sample inference (self-consistency) on Spec-Bench's GSM8K problems: N samples of one prompt decoded
together, against N plain samples batched by transformers, same model, same process.

    python benchmarks/multisample.py --limit 3 --samples 1,4,8,16

For every problem and N, three runs in rotating order: ``plain`` (``generate(do_sample=True,
num_return_sequences=N)``), ``ours`` (batched token trees: prompt lookup + cross-path drafting) and
``ours_no_cross`` (prompt lookup only). Reports tokens/s (all samples' tokens up to EOS per wall second),
speedup over plain and mean accepted tokens per row per step. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import ROOT, prompt_ids, spec_bench, write_json
from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
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
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    tokens = 0
    for row in out[:, len(ids):].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        tokens += len(row) if stop is None else stop + 1
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3, help="GSM8K problems (Spec-Bench math_reasoning)")
    parser.add_argument("--samples", default="1,4,8,16", help="comma-separated N")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="JSON path (default results/multisample_<model>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = args.out or ROOT / "results" / f"multisample_{args.model}.json"
    model, tokenizer = load_model(args.model)
    vocab = model.config.vocab_size
    ours = {
        "ours": SpeculativeGenerator(model, tokenizer, make_drafters("pld", vocab), cross_path=True),
        "ours_no_cross": SpeculativeGenerator(model, tokenizer, make_drafters("pld", vocab), cross_path=False),
    }
    methods = ["plain", *ours]
    rows = spec_bench(args.limit, ["math_reasoning"])
    sizes = [int(n) for n in args.samples.split(",")]
    totals: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    for n in sizes:  # measure each batch size's cost curve before timing anything
        for generator in ours.values():
            generator.generate_batch([prompt_ids(tokenizer, rows[0])] * n,
                                     GenerationConfig(max_new_tokens=4, temperature=1.0))
    runs = [(row, n) for row in rows for n in sizes]
    for i, (row, n) in enumerate(tqdm(runs, desc="multisample")):
        ids = prompt_ids(tokenizer, row)
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=1000 * i)
        for method in methods[i % len(methods):] + methods[: i % len(methods)]:
            bucket = totals[n][method]
            if method == "plain":
                tokens, seconds = plain_samples(model, ids, n, config)
            else:
                result = ours[method].generate_batch([ids] * n, config)
                tokens, seconds = sum(len(r.tokens) for r in result.rows), result.total_ms / 1e3
                bucket["row_steps"] += sum(r.stats.steps for r in result.rows)
                bucket["forwards"] += result.forwards
                bucket["sibling"] += sum(r.stats.accepted_by_source.get("sibling", 0) for r in result.rows)
            bucket["tokens"] += tokens
            bucket["seconds"] += seconds
    report = {"model": args.model, "threads": args.threads, "temperature": args.temperature,
              "max_new_tokens": args.max_new_tokens, "problems": len(rows), "samples": {}}
    lines = ["| N | plain tok/s | ours tok/s (speedup, tok/step) | ours without cross-path (speedup, tok/step) |",
             "|---|---|---|---|"]
    for n in sizes:
        plain_rate = totals[n]["plain"]["tokens"] / totals[n]["plain"]["seconds"]
        entry = {"plain": {"tokens_per_second": round(plain_rate, 2)}}
        for method in ours:
            t = totals[n][method]
            rate = t["tokens"] / t["seconds"]
            entry[method] = {"tokens_per_second": round(rate, 2), "speedup": round(rate / plain_rate, 3),
                             "mean_accepted": round(t["tokens"] / t["row_steps"], 3),
                             "forwards": int(t["forwards"]), "accepted_from_siblings": int(t["sibling"])}
        report["samples"][str(n)] = entry
        lines.append(f"| {n} | {plain_rate:.1f} | " + " | ".join(
            f"{entry[m]['tokens_per_second']:.1f} ({entry[m]['speedup']:.2f}x, {entry[m]['mean_accepted']:.2f})"
            for m in ours) + " |")
    write_json(out, report)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
