"""The replay is the engine, on a real model: per prompt, the tokens a real run accepts at every step equal the
replay's, with the same fixed cost curve.

    python benchmarks/replay_check.py --limit 1                     # SmolLM2, one prompt of each category
    python benchmarks/replay_check.py --methods pld,history,rest --limit 2

For each Spec-Bench dev prompt (the first ``--limit`` of each category): plain greedy ``generate()`` is recorded,
then each drafter decodes the prompts in turn, twice over (so that ``history`` drafts from the first pass's
outputs on the second), once against the model and once against the recordings (``retrieval_spec.replay``), both
sized by the model's cached cost curve held fixed. ``rest`` drafts from a datastore of the recorded outputs
themselves, built here, so that it drafts often: this checks that the replay is the engine, not how good a
corpus is. Prints one JSON line per drafter (decodes whose steps all agree, tokens per step of each) and writes
them to ``--out``; exits non-zero on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import ROOT, spec_bench, write_json
from record_plain import record
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.config import GenerationConfig
from retrieval_spec.datastore.manifest import tokenizer_fingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.history import OutputHistoryDrafter
from retrieval_spec.drafters.prompt_lookup import PromptLookupDrafter
from retrieval_spec.drafters.rest import RestDrafter
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.models import load_model
from retrieval_spec.replay import CostClock, Recording, ReplayVerifier
from retrieval_spec.verify import ModelVerifier


def gains(generator: SpeculativeGenerator, prompts: list[np.ndarray], max_new_tokens: int) -> list[list[int]]:
    """Per prompt, decoded in turn: the tokens gained at every step."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    return [generator.generate(prompt, config).stats.step_tokens for prompt in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="pld,history,rest")
    parser.add_argument("--limit", type=int, default=1, help="prompts per category")
    parser.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "replay_check.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    rows = spec_bench(args.limit)
    recordings = [Recording(np.asarray(r["prompt"], np.int32), np.asarray(r["output"], np.int32),
                            np.asarray(r["top"], np.int32)) for r in record(model, tokenizer, rows,
                                                                             args.max_new_tokens, 8)]
    prompts = [r.prompt for r in recordings] * 2
    index = Path(tempfile.mkdtemp()) / "index"
    build_index_from_tokens([r.output for r in recordings], index, tokenizer_fingerprint(tokenizer), progress=False)
    datastore = Datastore.open(index, tokenizer_fingerprint(tokenizer))
    makers = {"pld": PromptLookupDrafter, "history": OutputHistoryDrafter, "rest": lambda: RestDrafter(datastore)}
    verifier = ModelVerifier(model)
    curve = verifier.cost_prior(1)
    report, differ = {"model": args.model, "cost": {"sizes": curve.sizes.tolist(), "ms": curve.ms.tolist()}}, False
    for method in args.methods.split(","):
        real = gains(SpeculativeGenerator(verifier, tokenizer, [makers[method]()], cost_curve=curve), prompts,
                     args.max_new_tokens)
        clock = CostClock()
        replay = ReplayVerifier(recordings, curve, clock, verifier.vocab_size, eos_token_ids=verifier.eos_token_ids)
        replayed = gains(SpeculativeGenerator(replay, None, [makers[method]()], cost_curve=curve, clock=clock),
                         prompts, args.max_new_tokens)
        same = [a == b for a, b in zip(real, replayed)]
        line = {"method": method, "decodes": len(prompts), "identical_steps": sum(same),
                "tokens_per_step_real": round(sum(map(sum, real)) / sum(map(len, real)), 3),
                "tokens_per_step_replay": round(sum(map(sum, replayed)) / sum(map(len, replayed)), 3),
                "differing": [rows[i % len(rows)]["question_id"] for i, s in enumerate(same) if not s]}
        differ |= not all(same)
        report[method] = line
        print(json.dumps(line))
    write_json(args.out, report)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
