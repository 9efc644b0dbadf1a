"""Library face: build drafters by method name and plug the generator into Hugging Face objects.

    from transformers import pipeline
    from retrieval_spec import SpeculativeGenerator, make_drafters

    pipe = pipeline("text-generation", model="./my-model")
    generator = SpeculativeGenerator(pipe.model, pipe.tokenizer, make_drafters("pld"))
    result = generator.generate(prompt, GenerationConfig(max_new_tokens=128))
    print(result.text, result.stats.mean_accepted)
"""

from __future__ import annotations

from .datastore.reader import Datastore
from .drafters.base import Drafter
from .drafters.lookahead import LookaheadDrafter
from .drafters.prompt_lookup import PromptLookupDrafter
from .drafters.recycling import RecyclingDrafter
from .drafters.rest import RestDrafter
from .errors import InputError

METHODS = {
    "ar": "plain autoregressive decoding through the same loop (no drafting)",
    "pld": "prompt lookup / LLMA: copy continuations from the prompt, references and output so far",
    "rest": "REST: continuations of the context's longest suffix found in a corpus datastore (needs an index)",
    "recycle": "token recycling: the model's own earlier top-k predictions after each token",
    "lookahead": "lookahead decoding: a Jacobi window run in the verification forward fills an n-gram pool; the "
                 "window runs only where the measured cost curve makes its extra rows nearly free",
    "auto": "every available source fused into one tree: pld + recycle, + rest when an index is given",
}


def make_drafters(method: str, vocab_size: int | None = None, datastore: Datastore | None = None) -> list[Drafter]:
    """The drafters of a named method (see ``METHODS``).

    Args:
        method: a key of ``METHODS``.
        vocab_size: the model's vocabulary size (``model.config.vocab_size``); needed by ``recycle`` and ``auto``.
        datastore: an open corpus datastore (``Datastore.open(path, tokenizer_fingerprint(tokenizer))``);
            needed by ``rest``, used by ``auto`` (REST, and a warm start of the recycling table).

    Raises:
        InputError: unknown method, or a method without what it needs.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if method in ("recycle", "auto") and not vocab_size:
        raise InputError(f"method {method!r} needs the model's vocabulary size")
    if method == "rest" and datastore is None:
        raise InputError("method 'rest' needs a datastore: build one with `retrieval-spec build-index`, pass --index")
    drafters: list[Drafter] = []
    if method in ("pld", "auto"):
        drafters.append(PromptLookupDrafter())
    if datastore is not None and method in ("rest", "auto"):
        drafters.append(RestDrafter(datastore))
    if method == "lookahead":
        drafters.append(LookaheadDrafter())
    if method in ("recycle", "auto"):
        recycling = RecyclingDrafter(vocab_size)
        if datastore is not None:
            recycling.warm_start(datastore.top_next_tokens(recycling.config.k))
        drafters.append(recycling)
    return drafters
