"""Tiny crafted files that declare huge contents, and paths in manifests that lead elsewhere: refused from what the
files declare (npy headers, Parquet footers, faiss headers) before anything is allocated, in well under a second
under a memory limit; one line and exit code 2 from the command line, every file as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval_spec import models
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.datastore import ngram_table
from retrieval_spec.datastore.manifest import MANIFEST, NGRAMS, FileEntry, TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore, check_integrity
from retrieval_spec.errors import DatastoreFormatError
from test_cli import refused, run
from test_hostile_files import checksums
from test_publish import FakeEmbedder

pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest: durability is not under test here

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = TokenizerFingerprint("fake/char", 40, "0" * 64)
MEMORY_LIMIT_MB = 256  # above what the process holds once its modules are imported


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The header of a .npy file declaring ``shape`` (the data that follows is another matter)."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def crafted_state(path: Path, tokenizer: str, arrays: dict[str, bytes], compress: bool = False) -> Path:
    """An .npz of real metadata for ``tokenizer`` and the given raw .npy members."""
    meta = json.dumps({"format_version": 1, "tokenizer": tokenizer})
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        archive.writestr("meta.npy", npy_header((), f"<U{len(meta)}") + meta.encode("utf-32-le"))
        for name, data in arrays.items():
            archive.writestr(f"{name}.npy", data)
    return path


def deflate_bomb(path: Path, tokenizer: str, declared: int) -> Path:
    """An output history whose text declares ``declared`` int8 tokens, 32 MB of them really there, deflated to
    about 32 KB: what np.load would allocate in full before reading."""
    crafted_state(path, tokenizer, {"text": npy_header((declared,), "|i1") + bytes(32 << 20)}, compress=True)
    return path


def oversized_ngrams(index: Path, rows: int) -> None:
    """Replace the n-gram table of ``index``'s shard by ``rows`` identical rows (a few hundred KB on disk) and
    reseal the manifest, so that only the row count is wrong."""
    block = 2_000_000
    table = pa.table({"order": pa.array(np.ones(block, np.int8)),
                      "context": pa.ListArray.from_arrays(pa.array(np.arange(block + 1, dtype=np.int32)),
                                                          pa.array(np.ones(block, np.int32))),
                      "next": pa.array(np.ones(block, np.int32)), "count": pa.array(np.ones(block, np.int64))},
                     schema=ngram_table.SCHEMA)
    path = next(index.glob(f"gen-*/shard-00000/{NGRAMS}"))
    with pq.ParquetWriter(path, ngram_table.SCHEMA) as writer:
        for _ in range(rows // block):
            writer.write_table(table)
    reseal(index, ["shards", 0, "files", NGRAMS], path)


def reseal(index: Path, keys: list, path: Path) -> None:
    """Record ``path``'s size and checksums at ``keys`` in ``index``'s manifest."""
    manifest = json.loads((index / MANIFEST).read_text())
    record = manifest
    for key in keys[:-1]:
        record = record[key]
    record[keys[-1]] = asdict(FileEntry.of(path))
    (index / MANIFEST).write_text(json.dumps(manifest))


def dense_index(index: Path, documents: int = 2) -> None:
    """A datastore of ``documents`` documents with its passages (a fake embedder: no model)."""
    from retrieval_spec.builders.corpus import Record
    from retrieval_spec.rag import DENSE, dense_writer

    records = [Record(f"Document number {n}. " * 40, f"{n}.txt", "") for n in range(documents)]
    build_index_from_tokens([np.arange(10) % 7] * documents, index, FINGERPRINT, progress=False,
                            extras={DENSE: dense_writer(records, embedder=FakeEmbedder(), progress=False)})


def faiss_declaring(index: Path, floats: int) -> None:
    """Make the flat faiss index of ``index``'s passages declare ``floats`` floats (it holds far fewer), resealed."""
    path = next(index.glob("gen-*/dense/vectors.faiss"))
    data = bytearray(path.read_bytes())
    data[37:45] = np.array([floats], "<u8").tobytes()  # the length of its vector of floats, after a 37-byte header
    path.write_bytes(bytes(data))
    reseal(index, ["dense", "files", path.name], path)


UNDER_LIMIT = """
import json, re, resource, sys, time
import numpy, pyarrow.parquet, faiss
from pathlib import Path
from retrieval_spec.drafters.history import OutputHistoryDrafter
from retrieval_spec.drafters.recycling import RecyclingDrafter
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.errors import RetrievalSpecError
from retrieval_spec.rag import DenseIndex

cases = {
    "recycling header": lambda d: RecyclingDrafter(100).load(d / "recycling", "tok", 100),
    "history deflate bomb": lambda d: OutputHistoryDrafter().load(d / "bomb", "tok", 100),
    "history of 3M tokens": lambda d: OutputHistoryDrafter().load(d / "long", "tok", 100),
    "n-gram rows": lambda d: Datastore.open(d / "ngrams").top_next_tokens(8),
    "faiss floats": lambda d: DenseIndex.open(d / "faiss"),
}
size = int(re.search(r"VmSize:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
limit = size + int(sys.argv[2]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for name, case in cases.items():
    started = time.perf_counter()
    try:
        case(Path(sys.argv[1]))
        outcome = "loaded"
    except RetrievalSpecError as error:
        outcome = str(error)
    except MemoryError as error:
        outcome = f"MemoryError: {error}"
    results[name] = {"outcome": outcome, "seconds": time.perf_counter() - started}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Path:
    """A folder of every crafted file, each in its own subfolder."""
    root = tmp_path_factory.mktemp("crafted")
    for name in ("recycling", "bomb", "long"):
        (root / name).mkdir()
    crafted_state(root / "recycling" / "recycling.npz", "tok", {
        "table": npy_header((10**11,), "<i8") + bytes(64), "known": npy_header((100,), "|b1") + bytes(100)})
    deflate_bomb(root / "bomb" / "output_history.npz", "tok", 3 * 10**9)
    np.savez_compressed(root / "long" / "output_history.npz", text=np.zeros(3_000_000, np.int8),
                        meta=np.array(json.dumps({"format_version": 1, "tokenizer": "tok"})))
    build_index_from_tokens([np.arange(50) % 7], root / "ngrams", FINGERPRINT, progress=False)
    oversized_ngrams(root / "ngrams", 12_000_000)
    dense_index(root / "faiss")
    faiss_declaring(root / "faiss", 10**9)
    return root


@pytest.fixture(scope="module")
def under_limit(crafted: Path) -> dict[str, dict]:
    """What loading each crafted file gives in a process limited to MEMORY_LIMIT_MB more than its modules (which
    changes none of them)."""
    before = checksums(crafted)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(UNDER_LIMIT), str(crafted), str(MEMORY_LIMIT_MB)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert checksums(crafted) == before
    return json.loads(result.stdout)


@pytest.mark.parametrize("case, message", [
    ("recycling header", "recycling.npz: array 'table' has shape (100000000000,), expected (100, 8)"),
    ("history deflate bomb", "output_history.npz: array 'text' has shape (3000000000,), expected (at most 1000000)"),
    ("history of 3M tokens", "output_history.npz: array 'text' has shape (3000000,), expected (at most 1000000)"),
    ("n-gram rows", "ngrams.parquet: 12000000 rows, more than the 104 its shard can hold"),
    ("faiss floats", "vectors.faiss: truncated at byte 45 (a field of 4000000000 bytes declared)"),
])
def test_a_file_declaring_more_than_its_reader_keeps_is_refused_before_allocating(
    under_limit: dict[str, dict], case: str, message: str
):
    outcome = under_limit[case]
    assert message in outcome["outcome"], outcome
    assert outcome["seconds"] < 1.0, outcome


@pytest.fixture
def model(smollm2, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "load_model", lambda name, *args, **kwargs: smollm2)
    return smollm2


@pytest.mark.real_model
@pytest.mark.parametrize("case", ["recycling header", "history deflate bomb", "history of 3M tokens", "n-gram rows"])
def test_crafted_state_and_index_files_are_one_line_from_generate(model, tmp_path: Path, case: str):
    from retrieval_spec.datastore.manifest import tokenizer_fingerprint

    model_, tokenizer = model
    sha = tokenizer_fingerprint(tokenizer).sha256
    vocab = model_.config.vocab_size
    state, index = tmp_path / "st", tmp_path / "idx"
    state.mkdir()
    args = ["generate", "--prompt", "hi", "--max-new-tokens", "2", "--state-dir", str(state)]
    if case == "recycling header":
        crafted_state(state / "recycling.npz", sha, {"table": npy_header((10**11,), "<i8") + bytes(64),
                                                      "known": npy_header((vocab,), "|b1") + bytes(vocab)})
        message = f"recycling.npz: array 'table' has shape (100000000000,), expected ({vocab}, 8)"
    elif case == "history deflate bomb":
        deflate_bomb(state / "output_history.npz", sha, 3 * 10**9)
        message = "output_history.npz: array 'text' has shape (3000000000,), expected (at most 1000000)"
    elif case == "history of 3M tokens":
        np.savez_compressed(state / "output_history.npz", text=np.zeros(3_000_000, np.int8),
                            meta=np.array(json.dumps({"format_version": 1, "tokenizer": sha})))
        message = "output_history.npz: array 'text' has shape (3000000,), expected (at most 1000000)"
    else:
        build_index_from_tokens([np.arange(50) % 7], index, tokenizer_fingerprint(tokenizer), progress=False)
        oversized_ngrams(index, 2_000_000)
        args = ["generate", "--prompt", "hi", "--max-new-tokens", "2", "--method", "auto", "--index", str(index)]
        message = "ngrams.parquet: 2000000 rows, more than the 104 its shard can hold"
    before = checksums(tmp_path)
    refused(run(*args), message)
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("path", ["/tmp/elsewhere", "../../elsewhere", "gen-link/dense"])
def test_a_dense_record_whose_path_leads_outside_the_index_is_refused(tmp_path: Path, path: str):
    index = tmp_path / "idx"
    dense_index(index)
    elsewhere = tmp_path / "elsewhere"
    os.rename(next(index.glob("gen-*/dense")), elsewhere)  # what the path would lead to: real passages
    (index / "gen-link").symlink_to(tmp_path)
    manifest = json.loads((index / MANIFEST).read_text())
    manifest["dense"]["path"] = path
    (index / MANIFEST).write_text(json.dumps(manifest))
    before = checksums(tmp_path)
    refused(run("generate", "--rag", "--index", str(index), "--question", "q"), f"'{path}' leads outside {index}")
    assert checksums(tmp_path) == before


def test_a_shard_that_leads_outside_the_index_is_refused(tmp_path: Path):
    index = tmp_path / "idx"
    build_index_from_tokens([np.arange(50) % 7], index, FINGERPRINT, progress=False)
    generation = next(index.glob("gen-*"))
    os.rename(generation, tmp_path / "elsewhere")
    generation.symlink_to(tmp_path / "elsewhere")  # the manifest's path, lexically inside, resolves outside
    with pytest.raises(DatastoreFormatError, match=rf"'{generation.name}/shard-00000' leads outside"):
        Datastore.open(index)
    before = checksums(tmp_path)
    refused(run("index-info", str(index), "--verify"), "leads outside")
    assert checksums(tmp_path) == before
    generation.unlink()
    os.rename(tmp_path / "elsewhere", generation)
    shard = generation / "shard-00000"
    (tmp_path / "tokens.bin").write_bytes((shard / "tokens.bin").read_bytes())
    (shard / "tokens.bin").unlink()
    (shard / "tokens.bin").symlink_to(tmp_path / "tokens.bin")  # one file of the shard, linked out
    with pytest.raises(DatastoreFormatError, match="shard-00000/tokens.bin' leads outside"):
        check_integrity(index)


@pytest.mark.parametrize("damage", ["faiss byte flip", "faiss of another kind", "passages not Parquet",
                                    "passages of other documents"])
def test_damaged_passages_or_vectors_are_refused_even_when_resealed(tmp_path: Path, damage: str):
    index = tmp_path / "idx"
    dense_index(index, documents=2)
    vectors, passages = next(index.glob("gen-*/dense/vectors.faiss")), next(index.glob("gen-*/dense/passages.parquet"))
    if damage == "faiss byte flip":
        data = bytearray(vectors.read_bytes())
        data[5] ^= 0xFF  # the dimension
        vectors.write_bytes(bytes(data))
        target, message = vectors, "vectors.faiss: "
    elif damage == "faiss of another kind":
        import faiss

        faiss.write_index(faiss.IndexFlatL2(8), str(vectors))
        target, message = vectors, "vectors.faiss: not a faiss index of the kinds retrieval-spec writes"
    elif damage == "passages not Parquet":
        passages.write_bytes(b"PAR1 but not really" * 10)
        target, message = passages, "passages.parquet: not readable as Parquet"
    else:
        table = pq.read_table(passages)
        pq.write_table(table.set_column(1, "doc_id", pa.array([7] * table.num_rows, pa.int64())), passages)
        target, message = passages, "a document id outside the datastore's 2 documents"
    reseal(index, ["dense", "files", target.name], target)
    before = checksums(tmp_path)
    refused(run("generate", "--rag", "--index", str(index), "--question", "q"), message)
    assert checksums(tmp_path) == before
