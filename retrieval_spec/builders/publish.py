"""Atomic, exclusive publication of an index: readers see the old index or the new one, never a mix or a half;
one build writes into a directory at a time, and a build deletes only what builds wrote.

A build takes the directory's lock (:class:`BuildLock`), writes its files into ``index/.tmp-gen-<id>/`` next
to a marker file saying a build wrote them, renames that to ``index/gen-<id>/`` and then replaces
``index/manifest.json``, which names the generation, by an atomic rename: that rename is the commit. A build
killed at any point before it leaves the previous manifest and the files it names untouched; after it, the
previous generation is deleted. The same publication serves a datastore (its manifest names each shard as
``gen-<id>/shard-00000``), with the dense passage index of a ``--dense`` build inside the same generation.

What a build may delete: generations and staging directories whose marker, a file a build writes into its
staging directory, names them (the previous generation, leftovers of killed builds). What a manifest names is
not enough: a manifest is data anyone can edit. Everything else in the directory is kept, and a directory
holding anything else is refused unless it holds an index of ours: an unrelated ``manifest.json``, a folder
that happens to be called ``gen-2024``, or a ``.build.lock`` that holds something other than a lock is never
touched. Files of ours are opened without following symbolic links and created exclusively where they are
new, so a crafted directory (a tarball's) cannot make a build write through a link to another file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from retrieval_spec.datastore.manifest import (
    FORMAT_NAME,
    GENERATION_PREFIX,
    MANIFEST,
    STAGING_PREFIX,
    write_manifest,
)
from retrieval_spec import strict_json
from retrieval_spec.errors import InputError
from retrieval_spec.files import check_output_directory, commit_delay, fsync_directory

LOCK = ".build.lock"
MARKER = ".retrieval-spec-build"  # inside every staging directory, and so in every generation, a build writes
WRITER = "retrieval-spec build"  # the marker's "writer"


class BuildLock:
    """The exclusive right to build into an index directory, held until :meth:`release` or the holder's exit.

    It is an ``flock`` on ``index/.build.lock``, a file that also records the holder's pid, host and start
    time for the message a second build gets. The kernel drops an ``flock`` when its holder exits, however it
    exits (``kill -9`` included), so the lock of a dead build is stale by construction and the next build
    takes it over: no pid to probe, no pid reuse, no race between two builds breaking the same stale lock.
    A lock file is ours by its content (empty, or a holder record): anything else there is refused, never
    overwritten or removed.

    Attributes:
        path: the lock file.
    """

    def __init__(self, index: Path) -> None:
        """
        Raises:
            InputError: another live build holds the lock (its pid, host and start time in the message), or the
                lock's path holds something that is not a lock of ours (a link, a folder, a file of the user's).
        """
        self.path = index / LOCK
        while True:
            descriptor = _open_lock(self.path)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(descriptor)
                os.close(descriptor)
                raise InputError(f"another build ({holder}) is writing {index}; wait for it to finish (its lock "
                                 f"{self.path} is released when it exits)") from None
            if _is_linked_at(descriptor, self.path):
                break
            os.close(descriptor)  # its holder released and unlinked it between our open and our flock: again
        if _read_holder(descriptor) is None and os.fstat(descriptor).st_size:
            os.close(descriptor)
            raise InputError(f"{self.path}: holds something that is not a build lock; build-index never "
                             "overwrites a file it did not write: move it away or choose another output directory")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(holder).encode())
        self._descriptor = descriptor

    def release(self) -> None:
        """Unlink the lock file, then unlock it (in that order: a waiting build then locks a fresh file); a file
        put in its place meanwhile is not ours and stays."""
        if _is_linked_at(self._descriptor, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self._descriptor)


class Staging:
    """A build in progress inside the index directory; a context manager that discards it unless committed.

    Attributes:
        directory: where to write the new files (``directory / "shard-00000"``, ...).
        generation: the name ``directory`` is published under; the manifest names the files through it.
    """

    def __init__(self, index: Path, *, force: bool) -> None:
        """Check ``index``, create it if needed, take its lock and create the staging directory.

        Args:
            index: the directory to publish into.
            force: replace an index already there.

        Raises:
            InputError: ``index`` holds an index and ``force`` is false; it holds a ``manifest.json`` that is not
                a datastore's (``FORMAT_NAME``), or entries no build wrote without an index of ours; another build
                holds its lock.
            OutputError: ``index`` cannot be created or written.
        """
        check_output_directory(index, "index directory")
        self.index = index
        self._created = not index.exists()
        index.mkdir(parents=True, exist_ok=True)
        self._committed = False
        self._lock: BuildLock | None = None
        try:
            self._lock = BuildLock(index)
            _check_ownership(index, force)
            self.generation = f"{GENERATION_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
            self.directory = index / f"{STAGING_PREFIX}{self.generation}"
            self.directory.mkdir()
            marker = {"writer": WRITER, "generation": self.generation, "pid": os.getpid(),
                      "host": socket.gethostname()}
            descriptor = os.open(self.directory / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                f.write(json.dumps(marker))
        except BaseException:
            self._close()
            raise

    def commit(self, manifest: dict[str, Any]) -> None:
        """Publish what was written under :attr:`directory` as :attr:`generation`, with ``manifest`` naming it.

        Then delete the previous generation and leftovers of killed builds: what their markers name (see the
        module docstring).
        """
        fsync_directory(self.directory)
        commit_delay()
        self.directory.rename(self.index / self.generation)
        self.directory = self.index / self.generation  # still discarded on exit until the manifest names it
        fsync_directory(self.index)
        # The temporary manifest lives in the new generation: a build killed before the rename leaves nothing
        # outside a directory that is already ours to delete.
        write_manifest(self.index, manifest, temporary_directory=self.index / self.generation)
        self._committed = True
        for entry in self.index.iterdir():
            if entry.name != self.generation and _is_marked(entry):
                _remove(entry)

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self._committed:
            _remove(self.directory)
        self._close()

    def _close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._created:
            try:
                self.index.rmdir()  # only if empty: nothing of a failed first build, or of anyone else, is left
            except OSError:
                pass


def _check_ownership(index: Path, force: bool) -> None:
    """Refuse a directory that holds something a build of ours did not write, unless it holds our index."""
    manifest = index / MANIFEST
    if manifest.exists():
        if not _is_our_manifest(manifest):
            raise InputError(f"{manifest}: not a retrieval-spec index manifest; build-index writes only into a new "
                             "or empty directory or over an index it built: choose another output directory")
        if not force:
            raise InputError(f"{index}: an index exists there; pass force=True (--force) to replace it")
        return
    foreign = sorted(entry.name for entry in index.iterdir() if entry.name != LOCK and not _is_marked(entry))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InputError(f"{index}: exists, is not empty and holds no index (it holds {foreign[0]!r}{more}); "
                         "build-index writes only into a new or empty directory or over an index it built")


def _is_our_manifest(path: Path) -> bool:
    """Whether ``path`` is a datastore manifest (``FORMAT_NAME``, of any version: an older index may be replaced)."""
    try:
        manifest = strict_json.parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, or JSON we refuse (JsonProblem)
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME


def _is_marked(entry: Path) -> bool:
    """A generation or staging directory (not a link) holding the marker a build wrote into it, naming it."""
    if not entry.name.startswith((GENERATION_PREFIX, STAGING_PREFIX)):
        return False
    try:
        if not stat.S_ISDIR(entry.lstat().st_mode):
            return False
        descriptor = os.open(entry / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        marker = _json_of(descriptor) if _is_regular(descriptor) else None
    finally:
        os.close(descriptor)
    generation = entry.name.removeprefix(STAGING_PREFIX)
    # Markers written before they named their generation are read as naming theirs.
    return (isinstance(marker, dict) and marker.get("writer") == WRITER
            and marker.get("generation", generation) == generation)


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file for reading and writing, without following a link at its name.

    Raises:
        InputError: a link, a folder or anything else than a regular file is there.
    """
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        kind = "a symbolic link" if error.errno == errno.ELOOP else "not a regular file"
        raise InputError(f"{path}: {kind}, not a build lock; build-index never writes through it: move it away or "
                         "choose another output directory") from None
    if not _is_regular(descriptor):
        os.close(descriptor)
        raise InputError(f"{path}: not a regular file, not a build lock; build-index never writes through it: move "
                         "it away or choose another output directory")
    return descriptor


def _is_regular(descriptor: int) -> bool:
    return stat.S_ISREG(os.fstat(descriptor).st_mode)


def _json_of(descriptor: int) -> Any:
    """The JSON value of a small file of ours (its first 4 KiB), or None when it holds anything else."""
    try:
        return strict_json.parse(os.pread(descriptor, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, or not JSON (JsonProblem)
        return None


def _read_holder(descriptor: int) -> dict[str, Any] | None:
    """The holder record of a lock file (pid, host, start time), or None when it holds anything else."""
    holder = _json_of(descriptor)
    return holder if isinstance(holder, dict) and set(holder) == {"pid", "host", "started"} else None


def _holder(descriptor: int) -> str:
    """"pid N on HOST, started T" from a lock file, as far as it can be read."""
    holder = _read_holder(descriptor)
    if holder is None:
        return "pid unknown: it has just started"
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"


def _is_linked_at(descriptor: int, path: Path) -> bool:
    """Whether the open file is still the one at ``path`` (a releasing build unlinks its lock file)."""
    try:
        at_path = path.lstat()
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
