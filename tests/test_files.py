"""The one atomic write: a whole new file or the old one, synced to disk, and nothing left behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from retrieval_spec.files import open_atomically, replace_atomically


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What os.fsync was called on, in order: 'file' or 'directory'."""
    calls: list[str] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        calls.append("directory" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_text_and_bytes_replace_the_file_synced_then_its_folder(tmp_path: Path, synced: list[str]):
    path = tmp_path / "new" / "a.json"  # the folder is created
    replace_atomically(path, "é\n")
    assert path.read_bytes() == "é\n".encode("utf-8") and synced == ["file", "directory"]
    replace_atomically(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["a.json"]


def test_numpy_writes_through_the_file_form(tmp_path: Path):
    path = tmp_path / "state.npz"
    with open_atomically(path) as f:
        np.savez(f, ids=np.arange(3))
    with np.load(path) as data:
        assert data["ids"].tolist() == [0, 1, 2]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    path = tmp_path / "a.txt"
    replace_atomically(path, "old")
    with pytest.raises(ZeroDivisionError):
        with open_atomically(path) as f:
            f.write(b"half")
            1 / 0
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_a_failed_rename_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def refuse(source, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        replace_atomically(tmp_path / "a.txt", "new")
    assert os.listdir(tmp_path) == []


def test_the_temporary_file_is_written_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    staging = tmp_path / "staging"
    staging.mkdir()
    seen: list[Path] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: (seen.append(Path(source)), real_replace(source, target)))
    replace_atomically(tmp_path / "manifest.json", "{}", temporary_directory=staging)
    assert seen[0].parent == staging and (tmp_path / "manifest.json").read_text() == "{}"
    assert os.listdir(staging) == []
