"""JSON and folders a user (or a crafted file) gives: nesting too deep, integers too long, lone surrogate escapes, a
byte-order mark, folders too deep to walk recursively. Each is one line naming the file and line, exit code 2,
no traceback, and every file as it was; or, for a BOM and a deep folder, read like any other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval_spec import models
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.datastore.manifest import MANIFEST, TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.errors import DatastoreFormatError
from retrieval_spec.strict_json import JsonProblem, parse
from test_builders import CharTokenizer
from test_cli import refused, run
from test_hostile_files import checksums

pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest: durability is not under test here

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("text, problem", [
    (DEEP, "nested too deeply"),
    ('{"a": ' * 101 + "1" + "}" * 101, "nested too deeply"),
    ("1" * 5000, "an integer of more than 4300 digits"),
    ('"\\ud800"', "the escape \\ud800 at column 2 is half of a UTF-16 surrogate pair"),
    ('{\n "a": "x\\udfff"\n}', "the escape \\udfff at line 2, column 9"),
    ('["\\ud83d x"]', "the escape \\ud83d at column 3"),
    ("{oops", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
])
def test_json_that_later_code_could_not_use_is_refused_saying_where(text: str, problem: str):
    with pytest.raises(JsonProblem) as raised:
        parse(text)
    assert problem in str(raised.value)


@pytest.mark.parametrize("text, value", [
    ('"\\ud83d\\ude00"', "\U0001F600"),  # a pair is one character
    ('"\\\\ud800"', "\\ud800"),  # an escaped backslash, then letters
    ("\ufeff" + '{"a": 1}', {"a": 1}),
    ("[" * 100 + "]" * 100, json.loads("[" * 100 + "]" * 100)),
])
def test_json_within_the_limits_is_read_as_json_reads_it(text: str, value):
    assert parse(text) == value


@pytest.fixture
def index(tmp_path: Path) -> Path:
    index = tmp_path / "idx"
    build_index_from_tokens([np.arange(50) % 7], index, TokenizerFingerprint("fake/char", 40, "0" * 64),
                            progress=False)
    return index


@pytest.mark.parametrize("damage, message", [
    ("deep", "manifest.json: not usable JSON (nested too deeply)"),
    ("digits", "manifest.json: not usable JSON (an integer of more than 4300 digits)"),
    ("surrogate", "manifest.json: not usable JSON (the escape \\ud800 at line"),
])
def test_a_manifest_of_crafted_json_is_refused_by_index_info_and_build_index(
    tmp_path: Path, index: Path, monkeypatch: pytest.MonkeyPatch, damage: str, message: str
):
    text = (index / MANIFEST).read_text()
    text = {"deep": text.replace('"build": {', '"build": ' + DEEP + ', "x": {', 1),
            "digits": text.replace('"num_tokens": 50', '"num_tokens": ' + "5" * 5000, 1),
            "surrogate": text.replace('"fake/char"', '"fake\\ud800"', 1)}[damage]
    (index / MANIFEST).write_text(text)
    (tmp_path / "c.txt").write_text("hi")
    monkeypatch.setattr(models, "load_tokenizer", lambda name: CharTokenizer())
    before = checksums(tmp_path)
    refused(run("index-info", str(index)), message)
    refused(run("build-index", str(tmp_path / "c.txt"), "-o", str(index), "--force", "--quiet"),
            "manifest.json: not a retrieval-spec index manifest")
    assert checksums(tmp_path) == before


@pytest.mark.real_model
def test_a_manifest_nested_too_deeply_is_refused_by_generate(tmp_path: Path, index: Path, smollm2,
                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "load_model", lambda name, *args, **kwargs: smollm2)
    (index / MANIFEST).write_text(DEEP)
    before = checksums(tmp_path)
    refused(run("generate", "--prompt", "hi", "--method", "rest", "--index", str(index)),
            "manifest.json: not usable JSON (nested too deeply)")
    assert checksums(tmp_path) == before


BAD_LINES = {
    "text": '{"text": "caf\\ud800"}',
    "metadata": '{"text": "ok", "title": "\\udc00"}',
    "chat": '{"messages": [{"role": "user", "content": "\\ud83d"}]}',
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("field", list(BAD_LINES))
def test_a_lone_surrogate_in_a_corpus_line_is_named_by_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str, workers: str
):
    monkeypatch.setattr(models, "load_tokenizer", lambda name: CharTokenizer())
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n' + BAD_LINES[field] + "\n")
    before = checksums(tmp_path)
    args = ["build-index", str(corpus), "-o", str(tmp_path / "idx"), "--quiet", "--workers", workers]
    refused(run(*args), f"c.jsonl:2: not usable JSON (the escape \\u", "half of a UTF-16 surrogate pair",
            "--skip-bad-lines skips such lines")
    assert checksums(tmp_path) == before
    result = run(*args, "--skip-bad-lines", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["skipped_lines"] == 1, result.output


def test_a_lone_surrogate_in_generate_input_is_named_by_line(tmp_path: Path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "caf\\ud800"}\n')
    before = checksums(tmp_path)
    refused(run("generate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")),
            "in.jsonl:2: not usable JSON (the escape \\ud800 at column 16")
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("depth", [20_000, 100_000])  # within the metadata's size limit, and beyond it
def test_state_metadata_nested_too_deeply_is_refused_by_the_vllm_proposer(tmp_path: Path, depth: int):
    from retrieval_spec.integrations.vllm import RetrievalProposer
    from test_vllm_proposer import FINGERPRINT, vllm_config

    np.savez(tmp_path / "output_history.npz", meta=np.array("[" * depth + "]" * depth),
             text=np.zeros(3, np.int32))
    before = checksums(tmp_path)
    with pytest.raises(DatastoreFormatError, match="output_history.npz"):
        RetrievalProposer(vllm_config(method="history", state_dir=str(tmp_path)), fingerprint=FINGERPRINT)
    assert checksums(tmp_path) == before


@pytest.mark.real_model
def test_state_metadata_nested_too_deeply_is_refused_by_generate(tmp_path: Path, smollm2,
                                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "load_model", lambda name, *args, **kwargs: smollm2)
    np.savez(tmp_path / "output_history.npz", meta=np.array("[" * 20_000 + "]" * 20_000),
             text=np.zeros(3, np.int32))
    before = checksums(tmp_path)
    refused(run("generate", "--prompt", "hi", "--max-new-tokens", "2", "--state-dir", str(tmp_path)),
            "output_history.npz")
    assert checksums(tmp_path) == before


@pytest.fixture
def deep_folder(tmp_path: Path):
    """``docs/d/d/.../d/note.txt``, 1,200 folders deep, and ``docs/top.txt``; removed without recursion after the
    test (pytest's own cleanup, shutil.rmtree, recurses once per level and would fail on it)."""
    deep = tmp_path / "docs"
    deep.mkdir()
    for _ in range(1200):  # Path.mkdir(parents=True) would recurse as deep itself
        deep = deep / "d"
        deep.mkdir()
    (deep / "note.txt").write_text("deep down")
    (tmp_path / "docs" / "top.txt").write_text("on top")
    yield tmp_path / "docs"
    (deep / "note.txt").unlink()
    (tmp_path / "docs" / "top.txt").unlink()
    while deep != tmp_path:
        deep.rmdir()
        deep = deep.parent


def test_a_folder_1200_levels_deep_is_read_like_any_other(tmp_path: Path, deep_folder: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "load_tokenizer", lambda name: CharTokenizer())
    result = run("build-index", str(deep_folder), "-o", str(tmp_path / "idx"), "--quiet", "--workers", "1",
                 "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["documents"] == 2
    sources = Datastore.open(tmp_path / "idx").documents()["source"].to_pylist()
    assert sources[0].endswith("/d/note.txt") and sources[1].endswith("top.txt")


def test_a_byte_order_mark_is_read_alike_by_build_index_and_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from retrieval_spec.files import read_text

    monkeypatch.setattr(models, "load_tokenizer", lambda name: CharTokenizer())
    (tmp_path / "c.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "abc"}\n')
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbfdef")
    result = run("build-index", str(tmp_path / "c.jsonl"), str(tmp_path / "d.txt"), "-o", str(tmp_path / "idx"),
                 "--quiet", "--workers", "1")
    assert result.exit_code == 0, result.output
    datastore = Datastore.open(tmp_path / "idx")
    assert datastore.num_tokens == 6  # "abc" and "def": no mark indexed
    assert read_text(tmp_path / "d.txt", "--reference") == "def"


@pytest.mark.real_model
def test_a_byte_order_mark_is_read_alike_by_generate_input(tmp_path: Path, smollm2, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "load_model", lambda name, *args, **kwargs: smollm2)
    (tmp_path / "in.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "hi", "id": "first"}\n')
    result = run("generate", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "--method", "ar", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out.jsonl").read_text())["id"] == "first"
