"""One exception family for everything a user can get wrong.

Messages name the file, line or field at fault and what was expected; the CLI prints the message on one
line and exits non-zero. Anything else that escapes is a bug and keeps its traceback.
"""


class RetrievalSpecError(Exception):
    """Base of every error caused by input, files or configuration rather than by a bug."""


class InputError(RetrievalSpecError):
    """A prompt, JSONL record, option or argument that cannot be used as given."""


class OutputError(RetrievalSpecError):
    """An output path that cannot be written: a missing or read-only location, a full disk, or an input file."""


class ModelNotFoundError(RetrievalSpecError):
    """A model name that is neither a known embedded model nor a loadable directory."""


class DatastoreFormatError(RetrievalSpecError):
    """An index directory that is missing files, truncated, altered or of another format version."""


class TokenizerMismatchError(RetrievalSpecError):
    """An index built with one tokenizer opened for a model with another."""


class UnsupportedModelError(RetrievalSpecError):
    """A model whose attention cannot verify a token tree exactly (recurrent layers, flash kernels, ...)."""


class BuildError(RetrievalSpecError):
    """A build that cannot run or finish: a worker that keeps dying, an unreachable cluster, Ray not installed."""


class UnsupportedOptionError(InputError):
    """A ``generate()`` option the engine cannot honour exactly (beam search, custom logits processors, ...).

    Attributes:
        options: the names of the options at fault, as ``generate()`` spells them.
    """

    def __init__(self, message: str, options: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.options = options
