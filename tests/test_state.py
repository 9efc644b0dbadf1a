"""Drafter state files: anything but a state file of this format is refused naming the file, and runs sharing a
state directory never crash on each other or leave a file that does not load."""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from retrieval_spec.drafters.history import OutputHistoryDrafter
from retrieval_spec.drafters.lookahead import LookaheadDrafter
from retrieval_spec.drafters.recycling import RecyclingDrafter
from retrieval_spec.drafters.registry import load_state, save_state
from retrieval_spec.drafters.state import read_state, write_state
from retrieval_spec.errors import DatastoreFormatError, TokenizerMismatchError

VOCAB = 100
TABLE = {"table": (VOCAB, 2)}  # what saved() writes by default


def saved(path: Path, **arrays: np.ndarray) -> Path:
    write_state(path, arrays or {"table": np.zeros((VOCAB, 2), np.int32)}, 1, "tok")
    return path


def test_a_state_file_reads_back(tmp_path: Path):
    table = np.arange(2 * VOCAB, dtype=np.int32).reshape(VOCAB, 2) % VOCAB
    arrays, meta = read_state(saved(tmp_path / "s.npz", table=table), 1, "tok", shapes={"table": (VOCAB, 2)},
                              vocab_size=VOCAB)
    assert np.array_equal(arrays["table"], table) and meta["tokenizer"] == "tok"
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage pickle", "truncated"])
def test_a_file_that_is_not_a_state_file_is_refused_naming_it(tmp_path: Path, content):
    path = tmp_path / "recycling.npz"
    if content == "truncated":
        data = saved(path).read_bytes()
        content = data[: len(data) - 100]
    path.write_bytes(content)
    with pytest.raises(DatastoreFormatError, match=r"recycling\.npz: not a drafter state file \(not an \.npz archive\); "
                                                   "delete it or point --state-dir elsewhere"):
        read_state(path, 1, "tok", shapes=TABLE)


def test_pickled_objects_are_never_loaded(tmp_path: Path):
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array('{"format_version": 1, "tokenizer": "tok"}'), table=np.array([{"a": 1}]))
    (tmp_path / "s.npz").write_bytes(buffer.getvalue())
    with pytest.raises(DatastoreFormatError, match=r"s\.npz: array 'table' is object, expected integers or booleans"):
        read_state(tmp_path / "s.npz", 1, "tok", shapes={"table": ("n",)}, limits={"n": 1})


def test_metadata_that_is_not_an_object_is_refused(tmp_path: Path):
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array("[1, 2]"))
    (tmp_path / "s.npz").write_bytes(buffer.getvalue())
    with pytest.raises(DatastoreFormatError, match=r"s\.npz: its metadata is not a JSON object"):
        read_state(tmp_path / "s.npz", 1, "tok", shapes=TABLE)


def test_arrays_of_other_types_shapes_or_ids_are_refused(tmp_path: Path):
    path = saved(tmp_path / "s.npz", table=np.full((VOCAB, 2), 0.5))
    with pytest.raises(DatastoreFormatError, match=r"array 'table' is float64, expected integers or booleans"):
        read_state(path, 1, "tok", shapes=TABLE)
    path = saved(tmp_path / "s.npz", table=np.zeros((VOCAB, 3), np.int32))
    with pytest.raises(DatastoreFormatError, match=r"array 'table' has shape \(100, 3\), expected \(100, 2\)"):
        read_state(path, 1, "tok", shapes={"table": (VOCAB, 2)})
    path = saved(tmp_path / "s.npz", keys=np.zeros(3, np.int32), grams=np.zeros((4, 2, 3), np.int32))
    pool = {"keys": ("n",), "grams": ("n", "g", 3)}
    with pytest.raises(DatastoreFormatError, match=r"'grams' has shape \(4, 2, 3\), expected \(3, at most 9, 3\)"):
        read_state(path, 1, "tok", shapes=pool, limits={"n": 9, "g": 9})
    with pytest.raises(DatastoreFormatError, match=r"array 'keys' has shape \(3,\), expected \(at most 2\)"):
        read_state(path, 1, "tok", shapes=pool, limits={"n": 2, "g": 9})
    with pytest.raises(DatastoreFormatError, match=r"array 'other' is missing"):
        read_state(path, 1, "tok", shapes={"other": (1,), **pool}, limits={"n": 9, "g": 9})
    with pytest.raises(DatastoreFormatError, match=r"holds array\(s\) \['grams'\] besides \['keys'\]"):
        read_state(path, 1, "tok", shapes={"keys": ("n",)}, limits={"n": 9})
    path = saved(tmp_path / "s.npz", table=np.array([[3, 520_128_418]], np.int32))
    rows = {"shapes": {"table": ("rows", 2)}, "limits": {"rows": VOCAB}}
    with pytest.raises(DatastoreFormatError, match=r"array 'table' holds token id 520128418, outside the vocabulary"):
        read_state(path, 1, "tok", vocab_size=VOCAB, **rows)
    path = saved(tmp_path / "s.npz", table=np.array([[-1, 99]], np.int32))  # -1: no token, allowed
    read_state(path, 1, "tok", vocab_size=VOCAB, **rows)
    with pytest.raises(DatastoreFormatError, match=r"holds token id -2"):
        read_state(saved(path, table=np.array([[-2, 0]], np.int32)), 1, "tok", vocab_size=VOCAB, **rows)


def test_another_version_or_tokenizer_is_refused(tmp_path: Path):
    path = saved(tmp_path / "s.npz")
    with pytest.raises(DatastoreFormatError, match="format version 1, expected 2"):
        read_state(path, 2, "tok", shapes=TABLE)
    with pytest.raises(TokenizerMismatchError, match="saved for tokenizer 'tok', not 'other'"):
        read_state(path, 1, "other", shapes=TABLE)


def test_a_drafter_refuses_a_truncated_file_through_read_state(tmp_path: Path):
    drafter = RecyclingDrafter(VOCAB)
    drafter.save(tmp_path, "tok")
    path = tmp_path / drafter.state_file
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatastoreFormatError, match=r"recycling\.npz"):
        drafter.load(tmp_path, "tok", VOCAB)


def test_two_runs_sharing_a_state_directory_never_crash_and_leave_files_that_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """What ``generate --state-dir`` does at its end, by two runs at once, twenty times, each held between
    writing its temporary file and renaming it: the last writer wins, file by file."""
    monkeypatch.setenv("RETRIEVAL_SPEC_COMMIT_DELAY", "0.02")

    def drafters(seed: int) -> list:
        recycling, lookahead, history = RecyclingDrafter(VOCAB), LookaheadDrafter(), OutputHistoryDrafter()
        recycling.table[:] = seed
        recycling.known[:] = True
        lookahead.add(seed, (seed, seed, seed))
        return [recycling, lookahead, history]

    runs = {seed: drafters(seed) for seed in (1, 2)}
    for _ in range(20):
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(seed: int) -> None:
            start.wait()
            try:
                save_state(runs[seed], tmp_path, "tok")
            except BaseException as error:  # noqa: BLE001 -- any failure of either run fails the test
                errors.append(error)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        loaded = drafters(0)
        assert sorted(load_state(loaded, tmp_path, "tok", VOCAB)) == sorted(d.state_file for d in loaded)
        assert int(loaded[0].table[0, 0]) in runs and set(loaded[1].pool) <= set(runs)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(d.state_file for d in loaded)
        for name in (d.state_file for d in loaded):
            assert zipfile.is_zipfile(tmp_path / name)
