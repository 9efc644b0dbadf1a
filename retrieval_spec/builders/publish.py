"""Atomic publication of an index: readers see the old index or the new one, never a mix or a half.

A build writes its shards into ``index/.tmp-gen-<id>/``, renames that to ``index/gen-<id>/`` and then
replaces ``index/manifest.json``, which names the shards, by an atomic rename: that rename is the commit. A
build killed at any point before it leaves the previous manifest and the files it names untouched; after it,
the previous generation is deleted. One build per index path at a time.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from retrieval_spec.datastore.manifest import (
    GENERATION_PREFIX,
    MANIFEST,
    STAGING_PREFIX,
    fsync_directory,
    write_manifest,
)
from retrieval_spec.errors import InputError


class Staging:
    """A build in progress inside the index directory; a context manager that discards it unless committed.

    Attributes:
        directory: where to write the new shards (``directory / "shard-00000"``, ...).
    """

    def __init__(self, index: Path, *, force: bool) -> None:
        """
        Raises:
            InputError: ``index`` holds an index and ``force`` is false, or it is a file or a non-empty
                directory that holds no index.
        """
        self.index = index
        if index.exists():
            if not index.is_dir():
                raise InputError(f"{index}: exists and is not a directory")
            if (index / MANIFEST).exists():
                if not force:
                    raise InputError(f"{index}: an index exists there; pass force=True (--force) to replace it")
            elif any(not _is_build_entry(entry.name) for entry in index.iterdir()):
                raise InputError(f"{index}: exists, is not empty and holds no index; choose a new or empty directory")
        self._created = not index.exists()
        index.mkdir(parents=True, exist_ok=True)
        self.generation = f"{GENERATION_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.directory = index / f"{STAGING_PREFIX}{self.generation}"
        self.directory.mkdir()
        self._committed = False

    def commit(self, manifest: dict[str, Any]) -> None:
        """Publish the shards written under :attr:`directory`; ``manifest["shards"][i]["path"]`` are their names."""
        fsync_directory(self.directory)
        self.directory.rename(self.index / self.generation)
        fsync_directory(self.index)
        for shard in manifest["shards"]:
            shard["path"] = f"{self.generation}/{shard['path']}"
        write_manifest(self.index, manifest)
        self._committed = True
        for entry in self.index.iterdir():
            if entry.name != self.generation and _is_build_entry(entry.name):
                _remove(entry)

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._committed:
            return
        _remove(self.directory)
        if self._created and not any(self.index.iterdir()):
            self.index.rmdir()


def _is_build_entry(name: str) -> bool:
    """Generations and leftovers of builds; anything else in an index directory is not ours."""
    return name.startswith((GENERATION_PREFIX, STAGING_PREFIX))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
