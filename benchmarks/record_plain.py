"""Record plain greedy outputs (and the target's top-k at every output position) for model-free replay.

    python benchmarks/record_plain.py --model smollm2-135m --limit 8 --skip 3   # held out from spec_bench --limit 3

Each line: question_id, category, prompt (token ids), output (token ids), top (k ids per output position,
the target's most likely tokens after each prefix). ``benchmarks/simulate.py`` replays the engine over them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from common import ROOT, prompt_ids, spec_bench
from retrieval_spec.config import GenerationConfig
from retrieval_spec.models import load_model


def plain_recording(model, ids: np.ndarray, max_new_tokens: int, top_k: int) -> dict:
    """``prompt``, ``output`` (what ``model.generate(do_sample=False)`` produced) and ``top``, the target's ``top_k``
    most likely tokens at every output position: one line of a recording file."""
    prompt = torch.as_tensor(ids[None], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        result = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                do_sample=False, output_logits=True, return_dict_in_generate=True)
    top = torch.stack(result.logits)[:, 0].topk(top_k, dim=-1).indices
    return {"prompt": ids.tolist(), "output": result.sequences[0, prompt.shape[1]:].tolist(), "top": top.tolist()}


def record(model, tokenizer, rows: Iterable[dict], max_new_tokens: int, top_k: int) -> Iterator[dict]:
    """Per Spec-Bench row its question id, category and :func:`plain_recording`."""
    for row in rows:
        yield {"question_id": row["question_id"], "category": row["category"],
               **plain_recording(model, prompt_ids(tokenizer, row), max_new_tokens, top_k)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=8, help="prompts per category")
    parser.add_argument("--skip", type=int, default=3,
                        help="first prompts of each category left out (spec_bench.py measures them)")
    parser.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "results" / f"plain_{args.model}.jsonl"
    model, tokenizer = load_model(args.model)
    done = set()
    if out.exists():
        done = {json.loads(line)["question_id"] for line in out.read_text().splitlines()}
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [row for row in spec_bench(args.limit, skip=args.skip) if row["question_id"] not in done]
    with open(out, "a") as f:
        for line in tqdm(record(model, tokenizer, rows, args.max_new_tokens, args.top_k), total=len(rows),
                         desc="plain greedy"):
            f.write(json.dumps(line) + "\n")
            f.flush()


if __name__ == "__main__":
    main()
