"""Every drafter and every method, named once: what the CLI offers, what the library builds, what vLLM may run.

A *drafter* is one source of drafts (a module of this package); a *method* is what a user chooses (``--method``,
``make_drafters``, ``hf.enable``): a set of drafters fused into one tree. The table records what each drafter
needs, so that every face refuses what it cannot give by the same rule: a datastore (``rest``), the model's
vocabulary size (``recycle``), the target's top-k tokens at every verified node (``recycle``) or a look-ahead
branch run in the verification forward (``lookahead``) — vLLM gives neither of the last two.

    from transformers import pipeline
    from retrieval_spec import GenerationConfig, SpeculativeGenerator, make_drafters

    pipe = pipeline("text-generation", model="./my-model")
    generator = SpeculativeGenerator(pipe.model, pipe.tokenizer, make_drafters("pld"))
    result = generator.generate(prompt, GenerationConfig(max_new_tokens=128))
    print(result.text, result.stats.mean_accepted)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..datastore.reader import Datastore
from ..errors import InputError
from .base import Drafter
from .cross_path import CrossPathDrafter
from .history import OutputHistoryDrafter
from .lookahead import LookaheadDrafter
from .prompt_lookup import PromptLookupDrafter
from .recycling import RecyclingDrafter
from .rest import RestDrafter


@dataclass(frozen=True)
class DrafterSpec:
    """One source of drafts and what it needs.

    Attributes:
        name: how methods, ``+``-joined vLLM settings and messages call it.
        description: one line for a reader choosing it.
        build: ``build(vocab_size, datastore)``, called only with what the flags below say it needs.
        needs_datastore: reads a corpus datastore (``retrieval-spec build-index``).
        needs_vocab_size: sizes a table by the model's vocabulary.
        needs_top_k: learns from the target's top-k tokens at every verified node (``Drafter.top_k > 0``).
        needs_branch: runs extra nodes beside the tree in the verification forward (``Drafter.branch``).
    """

    name: str
    description: str
    build: Callable[[int | None, Datastore | None], Drafter]
    needs_datastore: bool = False
    needs_vocab_size: bool = False
    needs_top_k: bool = False
    needs_branch: bool = False


def _recycling(vocab_size: int | None, datastore: Datastore | None) -> RecyclingDrafter:
    """A recycling table, warm-started from the datastore's most frequent continuations when there is one."""
    recycling = RecyclingDrafter(vocab_size)
    if datastore is not None:
        recycling.warm_start(datastore.top_next_tokens(recycling.config.k))
    return recycling


DRAFTERS: dict[str, DrafterSpec] = {spec.name: spec for spec in (
    DrafterSpec("pld", "prompt lookup / LLMA: copies from the prompt, references and output so far",
                lambda vocab_size, datastore: PromptLookupDrafter()),
    DrafterSpec("history", "outputs of earlier requests (kept across runs with a state directory)",
                lambda vocab_size, datastore: OutputHistoryDrafter()),
    DrafterSpec("cross", "outputs of the other running rows with the same prompt (samples of one prompt)",
                lambda vocab_size, datastore: CrossPathDrafter()),
    DrafterSpec("rest", "REST: continuations of the context's longest suffix found in a corpus datastore",
                lambda vocab_size, datastore: RestDrafter(datastore), needs_datastore=True),
    DrafterSpec("lookahead", "lookahead decoding: n-grams from a Jacobi window run in the verification forward",
                lambda vocab_size, datastore: LookaheadDrafter(), needs_branch=True),
    DrafterSpec("recycle", "token recycling: the model's own earlier top-k predictions after each token",
                _recycling, needs_vocab_size=True, needs_top_k=True),
)}


@dataclass(frozen=True)
class Method:
    """A drafting method: drafters fused into one tree.

    Attributes:
        name: what ``--method`` and ``make_drafters`` take.
        description: one line for ``--help``.
        drafters: names of :data:`DRAFTERS`, in the order they are built (the fuser's order).
        optional: of ``drafters``, those left out, rather than refused, when what they need is not given.
    """

    name: str
    description: str
    drafters: tuple[str, ...]
    optional: frozenset[str] = frozenset()


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("ar", "plain autoregressive decoding through the same loop (no drafting)", ()),
    Method("pld", "copy continuations from the prompt, references and output so far (prompt lookup / LLMA)",
           ("pld",)),
    Method("rest", "copy continuations from a corpus datastore (REST; needs an index)", ("rest",)),
    Method("recycle", "the model's own earlier top-k predictions after each token (token recycling)", ("recycle",)),
    Method("lookahead", "n-grams from a Jacobi window run in the verification forward, where the measured cost "
                        "curve makes its extra rows nearly free (lookahead decoding)", ("lookahead",)),
    Method("auto", "every available source fused into one tree: pld, earlier outputs, recycle, lookahead, and rest "
                   "when an index is given", ("pld", "rest", "lookahead", "history", "recycle"),
           optional=frozenset({"rest"})),
)}


def make_drafters(method: str, vocab_size: int | None = None, datastore: Datastore | None = None) -> list[Drafter]:
    """The drafters of a named method (see :data:`METHODS`).

    Args:
        method: a key of :data:`METHODS`.
        vocab_size: the model's vocabulary size (``model.config.vocab_size``); needed by ``recycle`` and ``auto``.
        datastore: an open corpus datastore (``Datastore.open(path, tokenizer_fingerprint(tokenizer))``);
            needed by ``rest``, used by ``auto`` (REST, and a warm start of the recycling table).

    Raises:
        InputError: unknown method, or a method without what it needs.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    chosen = METHODS[method]
    drafters: list[Drafter] = []
    for spec in (DRAFTERS[name] for name in chosen.drafters):
        if spec.needs_datastore and datastore is None:
            if spec.name in chosen.optional:
                continue
            raise InputError(f"method {method!r} needs a datastore: build one with `retrieval-spec build-index`, "
                             "pass --index")
        if spec.needs_vocab_size and not vocab_size:
            raise InputError(f"method {method!r} needs the model's vocabulary size")
        drafters.append(spec.build(vocab_size, datastore))
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
