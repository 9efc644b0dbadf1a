"""The embedded demo: summarise a bundled article with plain decoding and with prompt lookup."""

from __future__ import annotations

from importlib import resources

import numpy as np

from .config import GenerationConfig
from .drafters.registry import make_drafters
from .generate import SpeculativeGenerator
from .models import chat_prompt, load_model


def run_demo(model_name: str = "smollm2-135m", max_new_tokens: int = GenerationConfig.max_new_tokens) -> dict:
    """Decode the same summary request plainly and with prompt lookup; report both and their ratio."""
    model, tokenizer = load_model(model_name)
    article = resources.files("retrieval_spec").joinpath("data/article.txt").read_text(encoding="utf-8")
    prompt = chat_prompt(tokenizer, f"Summarize the following text in a few sentences.\n\n{article}")
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    plain = SpeculativeGenerator(model, tokenizer, make_drafters("ar"))
    speculative = SpeculativeGenerator(model, tokenizer, make_drafters("pld"))
    speculative.generate(prompt, GenerationConfig(max_new_tokens=8))  # warm up caches and the cost curve
    plain_result = plain.generate(prompt, config)
    pld_result = speculative.generate(prompt, config)
    return {
        "model": model_name,
        "summary": pld_result.text,
        "identical": bool(np.array_equal(plain_result.tokens, pld_result.tokens)),
        "speedup": plain_result.stats.total_ms / pld_result.stats.total_ms,
        "plain": plain_result.stats.to_dict(),
        "pld": pld_result.stats.to_dict(),
    }
