"""The on-disk contract of a datastore: directory layout, manifest, tokenizer fingerprint and file checks.

One directory per index::

    index/
      manifest.json                 # the commit point: replaced atomically, lists every shard and file
      gen-<build id>/shard-00000/
        tokens.bin                  # (stream_length,) big-endian uint16 or uint32 token ids, raw
        suffix_array.bin            # (stream_length,) little-endian int32 (int64 from 2**31 tokens), raw
        documents.parquet           # one row per document: start, length, source, meta
        ngrams.parquet              # context n-gram -> top continuation tokens with counts

A shard's token stream is ``SEP doc_0 SEP doc_1 SEP ... doc_k SEP`` where ``SEP`` is the largest value of the
token dtype, never a token id: a query never contains it, so no match runs across documents. Big-endian tokens
make byte order equal token order, so suffixes compare as plain ``bytes``.

Opening checks every manifest field (:func:`read_manifest`), each file's size and a checksum of its first and
last :data:`SAMPLE_BYTES` (cheap: catches truncation, damaged Parquet footers and most edits); readers check
what they read (``Datastore.open`` says what, when); :func:`~retrieval_spec.datastore.reader.check_integrity`
compares the full sha256 and checks every file's contents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, Protocol

import numpy as np
import pyarrow as pa

from retrieval_spec import strict_json
from retrieval_spec.datastore.ngram_table import MAX_VOCAB_SIZE
from retrieval_spec.errors import DatastoreFormatError, InputError, RetrievalSpecError
from retrieval_spec.files import replace_atomically

FORMAT_NAME = "retrieval-spec-datastore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
SUFFIX_ARRAY = "suffix_array.bin"
DOCUMENTS = "documents.parquet"
NGRAMS = "ngrams.parquet"
SHARD_FILES = (TOKENS, SUFFIX_ARRAY, DOCUMENTS, NGRAMS)
GENERATION_PREFIX = "gen-"
STAGING_PREFIX = ".tmp-"
# Head and tail checked on open; 64 KiB keeps open well under 50 ms with tens of shards.
SAMPLE_BYTES = 1 << 16
SUFFIX_ARRAY_DTYPES = {"<i4": np.dtype("<i4"), "<i8": np.dtype("<i8")}
DOCUMENT_SCHEMA = pa.schema(
    [("start", pa.int64()), ("length", pa.int64()), ("source", pa.string()), ("meta", pa.string())]
)
MAX_NGRAM_TOP_K = 1024  # continuations kept per n-gram context; builds keep 8


class Tokenizer(Protocol):
    """What a datastore needs from a tokenizer (a transformers tokenizer satisfies it)."""

    name_or_path: str

    def get_vocab(self) -> dict[str, int]: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class TokenizerFingerprint:
    """Identity of a tokenizer: equal ``sha256`` means equal vocabularies; the name is for messages only.

    Attributes:
        name: ``tokenizer.name_or_path``.
        vocab_size: one more than the largest token id.
        sha256: hex digest of the vocabulary sorted by id.
    """

    name: str
    vocab_size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> TokenizerFingerprint:
    """Fingerprint a tokenizer from its vocabulary (token strings and ids, added tokens included)."""
    vocab = tokenizer.get_vocab()
    pairs = sorted((token_id, token) for token, token_id in vocab.items())
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()
    vocab_size = max(len(tokenizer), pairs[-1][0] + 1 if pairs else 0)
    return TokenizerFingerprint(name=str(tokenizer.name_or_path), vocab_size=vocab_size, sha256=digest)


def token_dtype(vocab_size: int) -> np.dtype:
    """Big-endian uint16 when every id and the separator fit in 16 bits, else big-endian uint32."""
    return np.dtype(">u2") if vocab_size < 0xFFFF else np.dtype(">u4")


def check_token_ids(ids: np.ndarray, vocab_size: int, what: str, *, lowest: int = 0,
                    error: type[RetrievalSpecError] = InputError, hint: str = "") -> None:
    """Raise ``error`` unless every id of ``ids`` (any shape) lies in ``[lowest, vocab_size)``.

    Args:
        what: names the ids in the message (``file:line``, ``file: array 'table'``).
        lowest: 0, or -1 where -1 stands for no token (padding in saved drafter state).
        hint: what to do about it, appended to the message.
    """
    if not ids.size:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < lowest or high >= vocab_size:
        bad = low if low < lowest else high
        raise error(f"{what} holds token id {bad}, outside the vocabulary [0, {vocab_size})"
                    + (f"; {hint}" if hint else ""))


def as_token_ids(value: Any, vocab_size: int, what: str) -> np.ndarray:
    """``value`` (an array, list, tensor) as a 1-D integer array of ids in ``[0, vocab_size)``.

    Raises:
        InputError: naming ``what``: another shape, values that are not integers (floats would be truncated),
            or an id outside the vocabulary.
    """
    try:
        ids = np.asarray(value)
    except ValueError:  # a ragged nesting of lists
        ids = np.empty((0, 0))
    if ids.ndim != 1:
        raise InputError(f"{what} must be a 1-D sequence of token ids, got {type(value).__name__} of shape "
                         f"{ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        raise InputError(f"{what} holds {ids.dtype} values, expected integer token ids")
    check_token_ids(ids, vocab_size, what)
    return ids


def separator(dtype: np.dtype) -> int:
    """The document separator of a token stream: the largest value of its dtype."""
    return int(np.iinfo(dtype).max)


def suffix_array_dtype(stream_length: int) -> np.dtype:
    return np.dtype("<i4") if stream_length < 2**31 else np.dtype("<i8")


@dataclass(frozen=True)
class FileEntry:
    """Size and checksums of one file of a shard, as recorded in the manifest."""

    size: int
    sample_sha256: str
    sha256: str

    @staticmethod
    def of(path: Path) -> FileEntry:
        """Measure a written file (reads it once in full)."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        size = path.stat().st_size
        return FileEntry(size=size, sample_sha256=sample_sha256(path, size), sha256=digest.hexdigest())


def sample_sha256(path: Path, size: int) -> str:
    """sha256 of the size and the first and last :data:`SAMPLE_BYTES` of a file."""
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def check_file(path: Path, entry: FileEntry, *, full: bool = False) -> None:
    """Raise :class:`DatastoreFormatError` unless ``path`` has the recorded size and checksum.

    ``full=False`` checks the sample checksum (fast, used on open); ``full=True`` the sha256 of the whole file.
    """
    if not path.is_file():
        raise DatastoreFormatError(f"{path}: missing (the manifest lists it)")
    size = path.stat().st_size
    if size != entry.size:
        raise DatastoreFormatError(f"{path}: {size} bytes, the manifest records {entry.size} (truncated or altered)")
    if sample_sha256(path, size) != entry.sample_sha256:
        raise DatastoreFormatError(f"{path}: checksum of its first and last bytes differs from the manifest (altered)")
    if full and FileEntry.of(path).sha256 != entry.sha256:
        raise DatastoreFormatError(f"{path}: sha256 differs from the manifest (altered)")


def read_manifest(index: Path) -> dict[str, Any]:
    """Load ``index/manifest.json``: a datastore manifest of this format version whose every field is usable.

    Checked: the tokenizer (a vocabulary of 1 to ``MAX_VOCAB_SIZE`` ids), the token dtype it implies, the
    counts (non-negative integers, the shards' summing to the totals), ``ngram_top_k``, and every shard
    entry: a path inside the index, a stream length of ``num_tokens + num_documents + 1``, the suffix array
    dtype it implies, and each file's size (the token stream's and suffix array's equal to the stream length
    times their item size) and checksums.

    Raises:
        DatastoreFormatError: missing, not JSON, another format or version, or a field missing or malformed
            (named in the message).
    """
    path = index / MANIFEST
    if not path.is_file():
        raise DatastoreFormatError(f"{path}: missing; {index} is not a datastore (build one with build_index)")
    manifest = read_versioned_json(path, FORMAT_NAME, FORMAT_VERSION, "rebuild the index")
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    def fail(what: str) -> NoReturn:
        raise DatastoreFormatError(f"{path}: {what} (the manifest is damaged or was edited; rebuild the index)")

    def count(value: Any, where: str, low: int = 0, high: int | None = None) -> int:
        if type(value) is not int or value < low or (high is not None and value > high):
            bound = f"{low} to {high}" if high is not None else f"at least {low}"
            fail(f"{where} is {value!r}, expected an integer {bound}")
        return value

    for key in ("tokenizer", "token_dtype", "shards", "num_tokens", "num_documents", "ngram_top_k"):
        if key not in manifest:
            fail(f"field {key!r} is missing")
    tokenizer = manifest["tokenizer"]
    if not isinstance(tokenizer, dict) or set(tokenizer) != {"name", "vocab_size", "sha256"}:
        fail("field 'tokenizer' must be an object with 'name', 'vocab_size' and 'sha256'")
    if not isinstance(tokenizer["name"], str) or not isinstance(tokenizer["sha256"], str):
        fail("the tokenizer's 'name' and 'sha256' must be strings")
    vocab_size = count(tokenizer["vocab_size"], "tokenizer.vocab_size", 1, MAX_VOCAB_SIZE)
    if manifest["token_dtype"] != token_dtype(vocab_size).str:
        fail(f"token_dtype is {manifest['token_dtype']!r}, a vocabulary of {vocab_size} is stored as "
             f"{token_dtype(vocab_size).str!r}")
    count(manifest["ngram_top_k"], "ngram_top_k", 1, MAX_NGRAM_TOP_K)
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        fail("field 'shards' must be a non-empty list")
    for number, entry in enumerate(shards):
        where = f"shard {number}"
        if not isinstance(entry, dict):
            fail(f"{where} is not an object")
        for key in ("path", "num_tokens", "num_documents", "stream_length", "suffix_array_dtype", "files"):
            if key not in entry:
                fail(f"{where}: field {key!r} is missing")
        relative = entry["path"]
        parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
        if not parts or PurePosixPath(relative).is_absolute() or any(part in (".", "..") for part in parts):
            fail(f"{where}: path {relative!r} is not a relative path inside the index")
        num_tokens = count(entry["num_tokens"], f"{where}.num_tokens", 1)
        num_documents = count(entry["num_documents"], f"{where}.num_documents", 1)
        stream_length = count(entry["stream_length"], f"{where}.stream_length", 1)
        if stream_length != num_tokens + num_documents + 1:
            fail(f"{where}: stream_length {stream_length} is not num_tokens + num_documents + 1 "
                 f"({num_tokens} + {num_documents} + 1)")
        if entry["suffix_array_dtype"] != suffix_array_dtype(stream_length).str:
            fail(f"{where}: suffix_array_dtype is {entry['suffix_array_dtype']!r}, expected "
                 f"{suffix_array_dtype(stream_length).str!r} for {stream_length} tokens")
        files = entry["files"]
        if not isinstance(files, dict):
            fail(f"{where}: field 'files' is not an object")
        for name in SHARD_FILES:
            file = files.get(name)
            if not isinstance(file, dict) or set(file) != {"size", "sample_sha256", "sha256"}:
                fail(f"{where}: files.{name} must be an object with 'size', 'sample_sha256' and 'sha256'")
            count(file["size"], f"{where}: files.{name}.size")
            if not isinstance(file["sample_sha256"], str) or not isinstance(file["sha256"], str):
                fail(f"{where}: the checksums of files.{name} must be strings")
        item_sizes = (token_dtype(vocab_size).itemsize, suffix_array_dtype(stream_length).itemsize)
        for name, item_size in zip((TOKENS, SUFFIX_ARRAY), item_sizes):
            if files[name]["size"] != stream_length * item_size:
                fail(f"{where} records {files[name]['size']} bytes for {name}, expected {stream_length} x {item_size}")
    for total in ("num_tokens", "num_documents"):
        expected = sum(entry[total] for entry in shards)
        if count(manifest[total], total) != expected:
            fail(f"{total} is {manifest[total]}, its shards hold {expected}")


def inside(folder: Path, relative: str, names: tuple[str, ...] = ()) -> Path:
    """``folder / relative``, a path read from ``folder``'s manifest, once checked to stay inside ``folder`` with
    every symbolic link resolved (in ``folder`` itself too), as each of ``names`` in it does.

    Raises:
        DatastoreFormatError: it, or one of ``names`` in it, leads outside ``folder`` (an absolute path,
            ``..``, or a link to elsewhere).
    """
    base = folder.resolve()
    for path in (relative, *(f"{relative}/{name}" for name in names)):
        resolved = (folder / path).resolve()
        if resolved == base or not resolved.is_relative_to(base):
            raise DatastoreFormatError(f"{folder / MANIFEST}: {path!r} leads outside {folder} (to {resolved}); the "
                                       "manifest or the folder was altered, rebuild the index")
    return folder / relative


def read_versioned_json(path: Path, format_name: str, format_version: int, rebuild_hint: str) -> dict[str, Any]:
    """Parse a JSON manifest and check its ``format`` and ``format_version`` fields.

    Raises:
        DatastoreFormatError: not JSON (or JSON that :func:`~retrieval_spec.strict_json.parse` refuses), another
            format, or another version (the message ends with ``rebuild_hint``).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatastoreFormatError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    manifest = strict_json.loads(text, str(path), DatastoreFormatError)
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        raise DatastoreFormatError(f"{path}: not a {format_name} manifest")
    version = manifest.get("format_version")
    if version != format_version:
        raise DatastoreFormatError(
            f"{path}: format version {version!r}, this retrieval-spec reads version {format_version}; {rebuild_hint}"
        )
    return manifest


def write_manifest(index: Path, manifest: dict[str, Any], temporary_directory: Path | None = None) -> None:
    """Replace ``index/manifest.json`` atomically (:func:`~retrieval_spec.files.open_atomically`), its temporary
    file written in ``temporary_directory`` (on the same file system; default ``index``)."""
    replace_atomically(index / MANIFEST, json.dumps(manifest, indent=1), temporary_directory)
