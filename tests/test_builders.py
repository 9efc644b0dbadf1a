"""Building datastores from corpora: inputs, errors that name the line, atomic and interrupted builds."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrieval_spec.builders import build as build_module
from retrieval_spec.builders import corpus as corpus_module
from retrieval_spec.builders import publish
from retrieval_spec.builders.build import FAIL_SHARD_ENV, build_index, build_index_from_tokens, merge_indexes
from retrieval_spec.builders.corpus import split_document
from retrieval_spec.datastore.manifest import MANIFEST, TokenizerFingerprint, tokenizer_fingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.errors import BuildError, InputError, TokenizerMismatchError

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,:\n<>/"


class CharTokenizer:
    """One token per character of :data:`ALPHABET`; chats render as ``<role>content</role>``."""

    def __init__(self, name: str = "fake/char", alphabet: str = ALPHABET, chat: bool = True) -> None:
        self.name_or_path = name
        self.vocab = {character: number for number, character in enumerate(alphabet)}
        self.chat = chat

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict[str, list[list[int]]]:
        assert add_special_tokens is False
        return {"input_ids": [[self.vocab[c] for c in text] for text in texts]}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool) -> str:
        assert tokenize is False
        if not self.chat:
            raise ValueError("this tokenizer has no chat template")
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)

    def decode(self, ids: list[int]) -> str:
        inverse = {number: character for character, number in self.vocab.items()}
        return "".join(inverse[i] for i in ids)


pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest: durability is not under test here


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def texts(index: Path, tokenizer: CharTokenizer = CharTokenizer()) -> list[str]:
    datastore = Datastore.open(index)
    table = datastore.documents()
    return [
        tokenizer.decode(datastore.continuations(np.array([start]), length)[0].tolist())
        for start, length in zip(table["start"].to_pylist(), table["length"].to_pylist())
    ]


def test_jsonl_documents_keep_their_source_and_other_fields(tmp_path: Path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world", "id": 7, "url": "x"}, {"text": "bye"}])
    summary = build_index([corpus], tmp_path / "index", CharTokenizer(), progress=False)
    assert (summary.tokens, summary.documents, summary.shards, summary.skipped_lines) == (14, 2, 1, 0)
    assert texts(tmp_path / "index") == ["hello world", "bye"]
    table = Datastore.open(tmp_path / "index").documents()
    assert table["source"].to_pylist() == [f"{corpus}:1", f"{corpus}:2"]
    assert [json.loads(m) if m else {} for m in table["meta"].to_pylist()] == [{"id": 7, "url": "x"}, {}]


def test_custom_text_field(tmp_path: Path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"body": "abc", "text": "ignored"}])
    build_index([corpus], tmp_path / "index", CharTokenizer(), text_field="body", progress=False)
    assert texts(tmp_path / "index") == ["abc"]


def test_chats_are_rendered_with_the_chat_template(tmp_path: Path):
    corpus = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        ],
    )
    build_index([corpus], tmp_path / "index", CharTokenizer(), progress=False)
    assert texts(tmp_path / "index") == [
        "<user>hi</user><assistant>yo</assistant>",
        "<user>q</user><assistant>a</assistant>",
    ]


def test_text_files_and_directories(tmp_path: Path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.md").write_text("first")
    (tmp_path / "docs" / "sub" / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    (tmp_path / "docs" / ".hidden").write_text("never")
    (tmp_path / "docs" / "blob.bin").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "one.txt").write_text("zero")
    inputs = [tmp_path / "one.txt", tmp_path / "docs"]
    summary = build_index(inputs, tmp_path / "index", CharTokenizer(), progress=False)
    assert texts(tmp_path / "index") == ["zero", "first", "second", "third"]
    assert summary.skipped_files == 1


def test_a_named_file_that_is_not_text_is_refused(tmp_path: Path):
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match=r"blob\.bin: not UTF-8"):
        build_index([tmp_path / "blob.bin"], tmp_path / "index", CharTokenizer(), progress=False)


@pytest.mark.parametrize(
    "line, why",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"title": "no text"}', "no 'text', 'messages' or 'conversations' field"),
        ('{"text": 5}', "field 'text' is int, expected a string"),
        ('{"conversations": [{"from": "robot", "value": "x"}]}', "unknown speaker 'robot'"),
        ('{"messages": [{"role": "user"}]}', "each of 'messages' must be an object with string 'role'"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(tmp_path: Path, line: str, why: str):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, "", line, {"text": "ok"}])
    with pytest.raises(InputError, match=rf"c\.jsonl:3: {why}"):
        build_index([corpus], tmp_path / "index", CharTokenizer(), progress=False)
    assert not (tmp_path / "index").exists()


def test_skip_bad_lines_counts_them(tmp_path: Path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, "{oops", "[]", {"text": "fine"}])
    summary = build_index([corpus], tmp_path / "index", CharTokenizer(), skip_bad_lines=True, progress=False)
    assert (summary.documents, summary.skipped_lines) == (2, 2)
    assert texts(tmp_path / "index") == ["ok", "fine"]


def test_a_tokenizer_without_chat_template_makes_chat_lines_bad(tmp_path: Path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(InputError, match=r"c\.jsonl:1: the tokenizer's chat template cannot render it"):
        build_index([corpus], tmp_path / "index", CharTokenizer(chat=False), progress=False)


@pytest.mark.parametrize("records", [[], [{"text": ""}], ["{bad"]])
def test_an_empty_corpus_is_refused(tmp_path: Path, records: list):
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    with pytest.raises(InputError, match="empty corpus"):
        build_index([corpus], tmp_path / "index", CharTokenizer(), skip_bad_lines=True, progress=False)
    assert not (tmp_path / "index").exists()


def test_a_missing_input_is_refused(tmp_path: Path):
    with pytest.raises(InputError, match=r"nothing\.jsonl: no such file"):
        build_index([tmp_path / "nothing.jsonl"], tmp_path / "index", CharTokenizer(), progress=False)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path: Path):
    fingerprint = TokenizerFingerprint(name="t", vocab_size=10, sha256="0" * 64)
    with pytest.raises(InputError, match=r"document 0 holds token id 10, outside the vocabulary \[0, 10\)"):
        build_index_from_tokens([np.array([1, 10])], tmp_path / "index", fingerprint, progress=False)
    with pytest.raises(InputError, match=r"document 0 holds token id -1, outside the vocabulary \[0, 10\)"):
        build_index_from_tokens([np.array([1, -1])], tmp_path / "index", fingerprint, progress=False)


def test_documents_are_split_into_shards(tmp_path: Path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "abcde"}] * 7)
    summary = build_index([corpus], tmp_path / "index", CharTokenizer(), shard_tokens=10, batch_size=3, progress=True)
    assert (summary.shards, summary.documents, summary.tokens) == (4, 7, 35)
    datastore = Datastore.open(tmp_path / "index")
    assert [s.num_documents for s in datastore.shards] == [2, 2, 2, 1]
    assert datastore.find(np.array(CharTokenizer()(["cde"], add_special_tokens=False)["input_ids"][0]), 100).size == 7


def test_an_existing_index_is_replaced_only_with_force(tmp_path: Path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "old"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "new"}])
    build_index([first], tmp_path / "index", CharTokenizer(), progress=False)
    with pytest.raises(InputError, match="an index exists there; pass force=True"):
        build_index([second], tmp_path / "index", CharTokenizer(), progress=False)
    assert texts(tmp_path / "index") == ["old"]
    build_index([second], tmp_path / "index", CharTokenizer(), force=True, progress=False)
    assert texts(tmp_path / "index") == ["new"]
    assert len(list((tmp_path / "index").iterdir())) == 2  # the manifest and one generation


def test_a_non_empty_directory_that_is_not_an_index_is_refused(tmp_path: Path):
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "notes.txt").write_text("mine")
    corpus = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(InputError, match="is not empty and holds no index"):
        build_index([corpus], tmp_path / "index", CharTokenizer(), force=True, progress=False)
    assert (tmp_path / "index" / "notes.txt").read_text() == "mine"


def test_a_build_failing_before_commit_leaves_the_previous_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    old = write_jsonl(tmp_path / "a.jsonl", [{"text": "old"}])
    build_index([old], tmp_path / "index", CharTokenizer(), progress=False)

    def crash(index: Path, manifest: dict, **_) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(publish, "write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        build_index([write_jsonl(tmp_path / "b.jsonl", [{"text": "new"}])], tmp_path / "index", CharTokenizer(),
                    force=True, progress=False)
    assert texts(tmp_path / "index") == ["old"]


def test_the_fingerprint_follows_the_vocabulary_not_the_name():
    assert tokenizer_fingerprint(CharTokenizer("x")).sha256 == tokenizer_fingerprint(CharTokenizer("y")).sha256
    assert tokenizer_fingerprint(CharTokenizer(alphabet="ab")) != tokenizer_fingerprint(CharTokenizer(alphabet="ba"))
    assert tokenizer_fingerprint(CharTokenizer()).vocab_size == len(ALPHABET)


def test_merging_indexes_of_different_tokenizers_is_refused(tmp_path: Path):
    corpus = write_jsonl(tmp_path / "a.jsonl", [{"text": "ab"}])
    build_index([corpus], tmp_path / "one", CharTokenizer(), progress=False)
    build_index([corpus], tmp_path / "two", CharTokenizer("other", alphabet=ALPHABET[::-1]), progress=False)
    with pytest.raises(TokenizerMismatchError, match=r"'fake/char'.*'other'"):
        merge_indexes([tmp_path / "one", tmp_path / "two"], tmp_path / "merged")


@pytest.mark.parametrize("name", ["c.JSONL", "c.ndjson", "c.NDJSON"])
def test_jsonl_is_recognised_by_its_suffix_in_any_case(tmp_path: Path, name: str):
    corpus = write_jsonl(tmp_path / name, [{"text": "one"}, {"text": "two"}])
    assert build_index([corpus], tmp_path / "index", CharTokenizer(), progress=False).documents == 2
    assert texts(tmp_path / "index") == ["one", "two"]


def test_unreadable_entries_of_an_input_folder_are_skipped_and_counted(tmp_path: Path, monkeypatch):
    """Root reads everything, so unreadable is what the file system calls say; a FIFO is a real one."""
    docs = tmp_path / "docs"
    (docs / "locked").mkdir(parents=True)
    (docs / "locked" / "secret.txt").write_text("never")
    (docs / "a.txt").write_text("kept")
    (docs / "b.txt").write_text("unreadable")
    os.mkfifo(docs / "pipe")
    real_scandir, real_read_text = os.scandir, Path.read_text

    def scandir(path):
        if not isinstance(path, int) and Path(path) == docs / "locked":  # rmtree scans by descriptor
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def read_text(self, *args, **kwargs):
        if self == docs / "b.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(Path, "read_text", read_text)
    summary = build_index([docs], tmp_path / "index", CharTokenizer(), progress=False)
    assert (summary.documents, summary.skipped_files) == (1, 3)  # the folder, the file and the FIFO
    assert texts(tmp_path / "index") == ["kept"]


def test_a_named_input_that_is_a_fifo_or_unreadable_is_refused(tmp_path: Path, monkeypatch):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(InputError, match=r"input .*pipe\.jsonl: a FIFO \(named pipe\), expected a regular file"):
        build_index([tmp_path / "pipe.jsonl"], tmp_path / "index", CharTokenizer(), progress=False)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == corpus else real_access(path, mode))
    with pytest.raises(InputError, match=r"input .*c\.jsonl: not readable \(permission denied\)"):
        build_index([corpus], tmp_path / "index", CharTokenizer(), progress=False)


@pytest.mark.parametrize("line, why", [
    ("[" * 100_000 + "]" * 100_000, r"not usable JSON \(nested too deeply\)"),
    ('{"text": ' + "1" * 5000 + "}", "not usable JSON"),
])
def test_json_python_cannot_hold_is_a_bad_line(tmp_path: Path, line: str, why: str):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, line])
    with pytest.raises(InputError, match=rf"c\.jsonl:2: {why}"):
        build_index([corpus], tmp_path / "index", CharTokenizer(), progress=False)
    summary = build_index([corpus], tmp_path / "index", CharTokenizer(), skip_bad_lines=True, progress=False)
    assert (summary.documents, summary.skipped_lines) == (1, 1)


@given(st.text(alphabet="ab \n", max_size=60), st.integers(1, 12))
def test_split_document_cuts_after_a_newline_or_before_a_space_and_loses_nothing(text: str, limit: int):
    pieces = split_document(text, limit)
    assert "".join(pieces) == text and all(len(piece) <= limit for piece in pieces)
    assert all(pieces[:-1])
    for piece in pieces[:-1]:
        second_half = piece[limit // 2 + 1 :] if len(piece) == limit else ""
        if "\n" in second_half:
            assert piece.endswith("\n")


def test_a_document_longer_than_the_limit_becomes_several_and_batches_stay_bounded(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(corpus_module, "MAX_DOCUMENT_CHARS", 12)
    monkeypatch.setattr(build_module, "BATCH_CHARS", 20)
    calls: list[int] = []

    class CountingTokenizer(CharTokenizer):
        def __call__(self, texts: list[str], add_special_tokens: bool):
            calls.append(sum(map(len, texts)))
            return super().__call__(texts, add_special_tokens)

    line = "the quick brown fox jumps over the lazy dog"
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": line, "id": 1}, {"text": "short"}])
    summary = build_index([corpus], tmp_path / "index", CountingTokenizer(), progress=False)
    assert texts(tmp_path / "index") == ["the quick", " brown fox", " jumps over", " the lazy", " dog", "short"]
    assert summary.documents == 6 and max(calls) < 20 + 12
    table = Datastore.open(tmp_path / "index").documents()
    assert table["source"].to_pylist()[:5] == [f"{corpus}:1"] * 5


def test_an_index_built_inside_its_own_input_folder_does_not_index_itself(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("abc")
    for _ in range(2):
        summary = build_index([docs], docs / "index", CharTokenizer(), force=True, progress=False)
        assert (summary.documents, summary.skipped_files) == (1, 0)
        assert texts(docs / "index") == ["abc"]


def mixed_corpus(root: Path) -> list[Path]:
    """JSONL with blank, chat and metadata lines, a folder of text files: several slices at 200 bytes a slice."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    records: list = []
    for number in range(120):
        text = " ".join(rng.choice(words, size=int(rng.integers(0, 30))))
        records.append({"text": text, "id": number} if number % 7 else {"messages": [{"role": "user", "content": text}]})
        if number % 40 == 0:
            records.append("")
    (root / "docs").mkdir()
    for number in range(6):
        (root / "docs" / f"{number}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(1, 80)))))
    return [write_jsonl(root / "c.jsonl", records), root / "docs"]


def shard_files(index: Path) -> list[dict]:
    """Every shard's manifest entry but its path (which names the build): sizes and sha256 of every file."""
    manifest = json.loads((index / MANIFEST).read_text())
    return [{key: value for key, value in entry.items() if key != "path"} for entry in manifest["shards"]]


@pytest.fixture(scope="module")
def serial_build(tmp_path_factory) -> tuple[list[Path], list[dict]]:
    """The corpus of :func:`mixed_corpus` and the shards one in-process worker builds from it in one slice."""
    root = tmp_path_factory.mktemp("serial")
    inputs = mixed_corpus(root)
    build_index(inputs, root / "index", CharTokenizer(), shard_tokens=700, progress=False)
    shards = shard_files(root / "index")
    assert len(shards) >= 4
    return inputs, shards


def test_slices_do_not_change_the_index(serial_build, tmp_path: Path):
    inputs, shards = serial_build
    build_index(inputs, tmp_path / "index", CharTokenizer(), shard_tokens=700, slice_bytes=200, progress=False)
    assert shard_files(tmp_path / "index") == shards


def test_two_local_workers_build_the_same_files_even_when_one_dies(
    serial_build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    inputs, shards = serial_build
    monkeypatch.setenv(FAIL_SHARD_ENV, "2")  # the first attempt to build shard 2 exits its worker process
    summary = build_index(inputs, tmp_path / "index", CharTokenizer(), shard_tokens=700, slice_bytes=200,
                          workers=2, progress=False)
    assert (summary.workers, summary.backend) == (2, "local")
    assert shard_files(tmp_path / "index") == shards
    assert [p.name for p in (tmp_path / "index").iterdir() if not p.name.startswith("gen-")] == [MANIFEST]


def test_a_worker_that_keeps_dying_fails_the_build_and_keeps_the_previous_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fingerprint = TokenizerFingerprint("fake/char", 3, "0" * 64)
    build_index_from_tokens([np.array([2, 2, 1])], tmp_path / "index", fingerprint, progress=False)
    monkeypatch.setenv(FAIL_SHARD_ENV, "1:99")
    with pytest.raises(BuildError, match=r"shard 1 died 3 times.*previous index, if any, is unchanged"):
        build_index_from_tokens((np.arange(10) % 3 for _ in range(5)), tmp_path / "index", fingerprint,
                                shard_tokens=20, force=True, workers=2, progress=False)
    assert [p.name.split("-")[0] for p in sorted((tmp_path / "index").iterdir())] == ["gen", MANIFEST]
    datastore = Datastore.open(tmp_path / "index")
    assert (datastore.num_tokens, datastore.find(np.array([2, 2, 1]), 5).size) == (3, 1)


def test_a_malformed_line_is_named_by_its_line_whatever_the_slice(tmp_path: Path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}] * 5 + ["", "{oops"] + [{"text": "ok"}] * 5)
    with pytest.raises(InputError, match=r"c\.jsonl:7: not valid JSON"):
        build_index([corpus], tmp_path / "index", CharTokenizer(), slice_bytes=20, progress=False)
    summary = build_index([corpus], tmp_path / "index", CharTokenizer(), slice_bytes=20, skip_bad_lines=True,
                          progress=False)
    assert (summary.documents, summary.skipped_lines) == (10, 1)
    sources = Datastore.open(tmp_path / "index").documents()["source"].to_pylist()
    assert sources == [f"{corpus}:{line}" for line in [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]]


def test_ray_tasks_build_the_same_files_even_when_a_worker_dies(
    serial_build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    inputs, shards = serial_build
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    monkeypatch.setenv(FAIL_SHARD_ENV, "1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token written under the home directory
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = build_index(inputs, tmp_path / "index", CharTokenizer(), shard_tokens=700, slice_bytes=200,
                              workers=2, ray_address="local", progress=False)
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (summary.workers, summary.backend) == (2, "ray")
    assert shard_files(tmp_path / "index") == shards


def test_build_index_cli_runs_workers_and_names_a_missing_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from click.testing import CliRunner

    from retrieval_spec import cli, models

    monkeypatch.setattr(models, "load_tokenizer", lambda name: CharTokenizer())
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "abc"}, {"text": "de"}])
    args = ["build-index", str(corpus), "-o", str(tmp_path / "index"), "--shard-tokens", "2", "--quiet", "--json"]
    result = CliRunner().invoke(cli.main, [*args, "--workers", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["shards"], report["workers"], report["backend"]) == (2, 2, "local")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    result = CliRunner().invoke(cli.main, [*args, "--force", "--ray"])
    assert result.exit_code == 2
    assert "--ray needs Ray: pip install 'retrieval-spec[ray]'" in result.output
    assert texts(tmp_path / "index") == ["abc", "de"]
