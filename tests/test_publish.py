"""Publishing an index: one build at a time, only our own entries deleted, and a build stopped at any stage
leaves the previous index intact and verifying."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.builders.publish import LOCK, MARKER, BuildLock
from retrieval_spec.datastore.manifest import MANIFEST, TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore, check_integrity
from retrieval_spec.errors import InputError, OutputError

FINGERPRINT = TokenizerFingerprint("fake/char", 3, "0" * 64)
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest: durability is not under test here


def build(out: Path, tokens: list[int], **kwargs) -> None:
    build_index_from_tokens([np.array(tokens)], out, FINGERPRINT, progress=False, **kwargs)


def names(directory: Path) -> list[str]:
    """The entries of a directory, generations shown as ``gen-``."""
    return sorted("gen-" if p.name.startswith("gen-") else p.name for p in directory.iterdir())


def test_a_folder_named_like_a_generation_is_not_ours_and_is_kept(tmp_path: Path):
    (tmp_path / "index" / "gen-2024").mkdir(parents=True)
    (tmp_path / "index" / "gen-2024" / "photo.jpg").write_bytes(b"mine")
    for force in (False, True):
        with pytest.raises(InputError, match=r"index: exists, is not empty and holds no index \(it holds 'gen-2024'"):
            build(tmp_path / "index", [1, 2], force=force)
    assert (tmp_path / "index" / "gen-2024" / "photo.jpg").read_bytes() == b"mine"
    assert names(tmp_path / "index") == ["gen-"]


def test_a_foreign_manifest_is_refused_even_with_force_and_kept(tmp_path: Path):
    app = tmp_path / "app"
    (app / "gen-assets").mkdir(parents=True)
    (app / "gen-assets" / "main.js").write_text("js")
    (app / MANIFEST).write_text(json.dumps({"name": "my web app", "icons": []}))
    with pytest.raises(InputError, match=r"app/manifest\.json: not a retrieval-spec index manifest"):
        build(app, [1, 2], force=True)
    assert json.loads((app / MANIFEST).read_text())["name"] == "my web app"
    assert (app / "gen-assets" / "main.js").read_text() == "js"
    assert sorted(p.name for p in app.iterdir()) == ["gen-assets", MANIFEST]


def test_replacing_our_index_deletes_its_generation_and_keeps_what_is_not_ours(tmp_path: Path):
    index = tmp_path / "index"
    build(index, [1, 2])
    old_generation = next(index.glob("gen-*"))
    (index / "gen-2024").mkdir()
    (index / "notes.txt").write_text("mine")
    build(index, [2, 2, 1], force=True)
    assert not old_generation.exists()
    assert (index / "notes.txt").read_text() == "mine" and (index / "gen-2024").is_dir()
    assert Datastore.open(index).num_tokens == 3
    assert LOCK not in names(index) and names(index).count("gen-") == 2  # ours and the foreign gen-2024


def test_an_index_of_another_format_version_is_ours_to_replace(tmp_path: Path):
    index = tmp_path / "index"
    build(index, [1, 2])
    manifest = json.loads((index / MANIFEST).read_text())
    (index / MANIFEST).write_text(json.dumps({**manifest, "format_version": 0}))
    build(index, [2, 1, 1], force=True)
    assert Datastore.open(index).num_tokens == 3 and names(index) == ["gen-", MANIFEST]


def test_leftovers_of_a_killed_first_build_are_ours_to_delete(tmp_path: Path):
    leftover = tmp_path / "index" / ".tmp-gen-20240101T000000-deadbeef"
    (leftover / "shard-00000").mkdir(parents=True)
    (leftover / MARKER).write_text(json.dumps({"writer": "retrieval-spec build", "pid": 1, "host": "x"}))
    (tmp_path / "index" / LOCK).write_text(json.dumps({"pid": 999_999_999, "host": "x", "started": "then"}))
    build(tmp_path / "index", [1, 2])
    assert names(tmp_path / "index") == ["gen-", MANIFEST]


def test_a_held_lock_refuses_a_second_build_naming_the_holder(tmp_path: Path):
    index = tmp_path / "index"
    build(index, [1, 2])
    lock = BuildLock(index)
    try:
        with pytest.raises(InputError, match=rf"another build \(pid {os.getpid()} on .*, started .*\) is writing "
                                             rf".*index; wait for it to finish \(its lock .*index/\.build\.lock"):
            build(index, [2, 2], force=True)
    finally:
        lock.release()
    assert names(index) == ["gen-", MANIFEST] and Datastore.open(index).num_tokens == 2
    build(index, [2, 2, 2], force=True)  # released: the next build goes ahead
    assert Datastore.open(index).num_tokens == 3


def test_the_lock_of_a_dead_build_is_taken_over(tmp_path: Path):
    index = tmp_path / "index"
    build(index, [1, 2])
    (index / LOCK).write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "started": "long ago"}))
    build(index, [2, 2, 2], force=True)
    assert names(index) == ["gen-", MANIFEST]


def test_an_output_under_a_file_or_in_a_read_only_directory_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"index directory .*file/index: cannot be created, .*file is not a dir"):
        build(tmp_path / "file" / "index", [1])
    # Root may write anywhere, so a read-only directory is what os.access says it is.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    with pytest.raises(OutputError, match=rf"index directory .*index: cannot be written, directory {tmp_path} is not"):
        build(tmp_path / "index", [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_two_builds_into_one_output_never_lose_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Started together, twenty times, each held in its commit: one wins and the other is refused (or, had it
    started after, both succeed); the index always verifies and holds one build's documents."""
    monkeypatch.setenv("RETRIEVAL_SPEC_COMMIT_DELAY", "0.05")
    index = tmp_path / "index"
    documents = {0: [1, 1], 1: [2, 2, 2]}
    for _ in range(20):
        start = threading.Barrier(2)
        outcomes: dict[int, str] = {}

        def run(number: int) -> None:
            start.wait()
            try:
                build(index, documents[number], force=True)
                outcomes[number] = "built"
            except InputError as error:
                outcomes[number] = str(error)

        threads = [threading.Thread(target=run, args=(number,)) for number in documents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [number for number, outcome in outcomes.items() if outcome == "built"]
        assert winners, outcomes
        for number, outcome in outcomes.items():
            assert number in winners or "another build (pid" in outcome, outcome
        check_integrity(index)
        assert Datastore.open(index).num_tokens in {len(documents[number]) for number in winners}
        assert names(index) == ["gen-", MANIFEST]


CONCURRENT_BUILD = """
import sys
import numpy as np
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.datastore.manifest import TokenizerFingerprint
from retrieval_spec.errors import InputError

try:
    build_index_from_tokens([np.array([1, 2] * int(sys.argv[2]))], sys.argv[1],
                            TokenizerFingerprint("fake/char", 3, "0" * 64), force=True, progress=False)
except InputError as error:
    print(error)
    sys.exit(2)
"""


def test_two_build_processes_into_one_output_never_lose_the_index(tmp_path: Path):
    index = tmp_path / "index"
    environment = {**os.environ, "RETRIEVAL_SPEC_COMMIT_DELAY": "0.3", "PYTHONPATH": str(ROOT)}
    for _ in range(2):
        processes = [
            subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD, str(index), str(size)], env=environment,
                             stdout=subprocess.PIPE, text=True)
            for size in (1, 2)
        ]
        results = [(process.wait(), process.stdout.read()) for process in processes]
        assert sorted(code for code, _ in results) in ([0, 0], [0, 2]), results
        assert all(code == 0 or "another build (pid" in output for code, output in results)
        check_integrity(index)
        assert names(index) == ["gen-", MANIFEST]


STOPPED_BUILD = """
import os, signal, sys
import numpy as np
from retrieval_spec.builders import publish
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.datastore.manifest import TokenizerFingerprint

out, stage, sig = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3])
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored


def stop(*args, **kwargs):
    os.kill(os.getpid(), sig)  # SIGINT raises KeyboardInterrupt here, SIGKILL ends the process


def documents():
    for number in range(100):
        if (stage, number) in (("reading", 5), ("writing shards", 50)):  # shards of 100 tokens: none / four written
            stop()
        yield np.arange(10) % 3


real_replace = os.replace
if stage == "publishing":  # the generation is in place, the manifest still names the previous one
    publish.write_manifest = stop
elif stage == "committing":  # the new manifest is written under a temporary name, not renamed yet
    os.replace = lambda source, target: stop() if str(target).endswith("manifest.json") else real_replace(source, target)
elif stage == "cleaning up":  # committed; the previous generation is being deleted
    publish._remove = stop
build_index_from_tokens(documents(), out, TokenizerFingerprint("fake/char", 3, "0" * 64), shard_tokens=100,
                        force=True, progress=False)
"""


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("stage", ["reading", "writing shards", "publishing", "committing", "cleaning up"])
def test_a_build_stopped_at_any_stage_leaves_a_verifying_index(tmp_path: Path, stage: str, signal_name: str):
    """``kill -9`` or Ctrl-C: before the commit the previous index stays, after it the new one is in place; either
    verifies, and the next build goes ahead and leaves nothing of the stopped one."""
    index = tmp_path / "index"
    build(index, [2, 2, 1])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(STOPPED_BUILD), str(index), stage, signal_name],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if signal_name == "SIGKILL":
        assert result.returncode == -signal.SIGKILL, result.stderr
    else:
        assert result.returncode != 0 and result.stderr.rstrip().endswith("KeyboardInterrupt"), result.stderr
    check_integrity(index)
    datastore = Datastore.open(index)
    assert datastore.num_tokens == (1000 if stage == "cleaning up" else 3)
    if stage != "cleaning up":
        assert datastore.find(np.array([2, 2, 1]), 5).size == 1
    build(index, [0, 1], force=True)
    assert names(index) == ["gen-", MANIFEST] and Datastore.open(index).num_tokens == 2



class FakeEmbedder:
    """Unit vectors from a text's hash: what DenseIndex.build needs of an embedder, without the model."""

    name = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 8

    def embed(self, texts) -> np.ndarray:
        vectors = np.stack([np.random.default_rng(len(text)).standard_normal(self.dim) for text in texts])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_the_dense_index_is_published_with_the_datastore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Passages live in the datastore's generation and are published with it, by one commit: adding them again
    replaces the generation; a publish that fails before its commit keeps the previous one and leaves nothing."""
    pytest.importorskip("faiss")
    from retrieval_spec.builders.corpus import Record
    from retrieval_spec.rag import DenseIndex

    index = tmp_path / "index"
    build_index_from_tokens([np.array([1, 2]), np.array([2, 1])], index, FINGERPRINT, progress=False)
    documents = [Record("First document. " * 30, "a.txt", ""), Record("Second one. " * 40, "b.txt", "")]
    first = DenseIndex.build(index, documents, embedder=FakeEmbedder(), progress=False)
    second = DenseIndex.build(index, documents[:1], embedder=FakeEmbedder(), progress=False)
    assert names(index) == ["gen-", MANIFEST] and len(first) == 2 and len(second) == 1
    assert not first.path.exists() and second.path.parent == next(index.glob("gen-*"))
    assert Datastore.open(index).num_tokens == 4 and check_integrity(index) is None

    monkeypatch.setattr("retrieval_spec.builders.publish.write_manifest", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        DenseIndex.build(index, documents, embedder=FakeEmbedder(), progress=False)
    assert names(index) == ["gen-", MANIFEST]
    assert len(DenseIndex.open(index, embedder=FakeEmbedder())) == 1


def test_a_build_whose_dense_phase_fails_keeps_the_previous_index_and_its_passages(tmp_path: Path):
    """One publish for a whole build: a --dense build that fails after its shards are written (or is killed
    then) leaves the previous token index beside its own passages, both usable, and nothing of its own."""
    pytest.importorskip("faiss")
    from retrieval_spec.builders.corpus import Record
    from retrieval_spec.rag import DENSE, DenseIndex, dense_writer

    index = tmp_path / "index"
    documents = [Record("First document. " * 30, "a.txt", "")]
    build_index_from_tokens([np.array([1, 2])], index, FINGERPRINT, progress=False,
                            extras={DENSE: dense_writer(documents, embedder=FakeEmbedder(), progress=False)})
    before = DenseIndex.open(index, embedder=FakeEmbedder())

    def failing(folder: Path) -> dict:
        (folder / "vectors.faiss").write_bytes(b"half written")
        raise InputError("the embedding model ran out of memory")

    with pytest.raises(InputError, match="ran out of memory"):
        build_index_from_tokens([np.array([2, 2, 1])], index, FINGERPRINT, progress=False, force=True,
                                extras={DENSE: failing})
    assert names(index) == ["gen-", MANIFEST] and Datastore.open(index).num_tokens == 2
    after = DenseIndex.open(index, embedder=FakeEmbedder())
    assert after.path == before.path and len(after) == 1
