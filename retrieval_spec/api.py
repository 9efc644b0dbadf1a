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
from .errors import InputError

METHODS = {
    "ar": "plain autoregressive decoding through the same loop (no drafting)",
    "pld": "prompt lookup / LLMA: copy continuations from the prompt, references and output so far",
}


def make_drafters(method: str) -> list[Drafter]:
    """The drafters of a named method (see ``METHODS``).

    Raises:
        InputError: unknown method.
    """
    if method == "ar":
        return []
    if method == "pld":
        return [PromptLookupDrafter()]
    raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
