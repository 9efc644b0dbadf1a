"""Library face: build drafters by method name and plug the generator into Hugging Face objects.

    from transformers import pipeline
    from retrieval_spec import SpeculativeGenerator, make_drafters

    pipe = pipeline("text-generation", model="./my-model")
    generator = SpeculativeGenerator(pipe.model, pipe.tokenizer, make_drafters("pld"))
    result = generator.generate(prompt, GenerationConfig(max_new_tokens=128))
    print(result.text, result.stats.mean_accepted)
"""

from __future__ import annotations

from .drafters.base import Drafter
from .drafters.prompt_lookup import PromptLookupDrafter
from .drafters.recycling import RecyclingDrafter
from .errors import InputError

METHODS = {
    "ar": "plain autoregressive decoding through the same loop (no drafting)",
    "pld": "prompt lookup / LLMA: copy continuations from the prompt, references and output so far",
    "recycle": "token recycling: the model's own earlier top-k predictions after each token",
    "auto": "every available source fused into one tree (pld + recycle)",
}


def make_drafters(method: str, vocab_size: int | None = None) -> list[Drafter]:
    """The drafters of a named method (see ``METHODS``).

    Args:
        method: a key of ``METHODS``.
        vocab_size: the model's vocabulary size (``len(tokenizer)`` or ``model.config.vocab_size``); needed by
            ``recycle`` and ``auto``.

    Raises:
        InputError: unknown method, or no vocabulary size where one is needed.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if method in ("recycle", "auto") and not vocab_size:
        raise InputError(f"method {method!r} needs the model's vocabulary size")
    drafters: list[Drafter] = []
    if method in ("pld", "auto"):
        drafters.append(PromptLookupDrafter())
    if method in ("recycle", "auto"):
        drafters.append(RecyclingDrafter(vocab_size))
    return drafters
