"""A second turn that rewrites the first: the chat holds the model's first answer, and the rewrite copies from it.

    .venv/bin/python examples/second_turn.py
    .venv/bin/python examples/second_turn.py --first "Explain what a Python generator is." \\
        --second "Now give the same explanation as a numbered list."

Decodes the first turn, then the second with the first turn's question and answer in the chat (rendered by the
model's chat template), with one ``SpeculativeGenerator`` drafting ``auto``; prints each reply with its tokens per
model step and the sources that supplied the accepted drafted tokens. Greedy: each reply is exactly what plain
greedy decoding gives.
"""

from __future__ import annotations

import argparse
import os

import torch

from retrieval_spec.config import GenerationConfig
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator
from retrieval_spec.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--first", default="Write a short paragraph on why unit tests are worth writing.")
    parser.add_argument("--second", default="Rewrite your paragraph for a ten-year-old, keeping its structure.")
    parser.add_argument("--max-new-tokens", type=int, default=int(os.environ.get("MAX_NEW_TOKENS", 160)))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    generator = SpeculativeGenerator(model, tokenizer, make_drafters("auto", model.config.vocab_size))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    messages = []
    for turn in (args.first, args.second):
        messages.append({"role": "user", "content": turn})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        result = generator.generate(prompt, config)
        messages.append({"role": "assistant", "content": result.text})
        stats = result.stats
        sources = ", ".join(f"{source} {count}" for source, count in
                            sorted(stats.accepted_by_source.items(), key=lambda item: -item[1]) if count)
        print(f"--- user: {turn}\n{result.text.strip()}\n"
              f"({stats.new_tokens} tokens in {stats.steps} model steps, {stats.mean_accepted:.2f} tokens per step; "
              f"accepted drafted tokens by source: {sources or 'none'})\n")


if __name__ == "__main__":
    main()
