"""Library face: build drafters by method name, and load or save what they learned.

    from transformers import pipeline
    from retrieval_spec import GenerationConfig, SpeculativeGenerator, make_drafters

    pipe = pipeline("text-generation", model="./my-model")
    generator = SpeculativeGenerator(pipe.model, pipe.tokenizer, make_drafters("pld"))
    result = generator.generate(prompt, GenerationConfig(max_new_tokens=128))
    print(result.text, result.stats.mean_accepted)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .datastore.reader import Datastore
from .drafters.base import Drafter
from .drafters.history import OutputHistoryDrafter
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
    "auto": "every available source fused into one tree: pld + earlier outputs + recycle + lookahead (where its "
            "window is nearly free), + rest when an index is given",
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
    if method in ("lookahead", "auto"):
        drafters.append(LookaheadDrafter())
    if method == "auto":
        drafters.append(OutputHistoryDrafter())
    if method in ("recycle", "auto"):
        recycling = RecyclingDrafter(vocab_size)
        if datastore is not None:
            recycling.warm_start(datastore.top_next_tokens(recycling.config.k))
        drafters.append(recycling)
    return drafters


def load_state(drafters: Sequence[Drafter], directory: Path, tokenizer_sha256: str, vocab_size: int) -> list[str]:
    """Load every drafter's saved state (recycling table, lookahead pool, output history) found in ``directory``.

    Returns:
        the state files loaded.

    Raises:
        DatastoreFormatError, TokenizerMismatchError: a file there is unreadable, damaged (shapes, ids outside
            ``[0, vocab_size)``) or for another tokenizer.
    """
    loaded = []
    for drafter in drafters:
        if drafter.state_file is not None and (directory / drafter.state_file).is_file():
            drafter.load(directory, tokenizer_sha256, vocab_size)
            loaded.append(drafter.state_file)
    return loaded


def save_state(drafters: Sequence[Drafter], directory: Path, tokenizer_sha256: str) -> list[str]:
    """Save every drafter's learned state into ``directory`` (atomically, file by file); return the files written."""
    saved = []
    for drafter in drafters:
        if drafter.state_file is not None:
            drafter.save(directory, tokenizer_sha256)
            saved.append(drafter.state_file)
    return saved
