"""Files a user names, writing results to them, and the one way a file of ours is replaced.

Inputs must be readable regular files of UTF-8 text; outputs writable (or creatable) places that are not an
input. The checks run before any work starts and create nothing, so that a run that cannot write its result
fails in its first second rather than after its last prompt; :class:`JsonlWriter` then writes results line by
line as they finish.

Every file the package replaces whole — a datastore manifest, drafter state, cached cost curves and kernel
choices — goes through :func:`open_atomically`: temporary file, fsync, rename, fsync of the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Iterable, Iterator

from retrieval_spec.errors import InputError, OutputError


def check_input_file(path: Path, what: str) -> None:
    """Raise :class:`InputError` unless ``path`` is a readable regular file.

    A FIFO or a device would block or never end, so they are refused rather than read.
    """
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise InputError(f"{what} {path}: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path}: {_kind(mode)}, expected a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path}: not readable (permission denied)")


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a regular file (without a byte-order mark); :class:`InputError` naming the file and the
    first bad byte otherwise."""
    check_input_file(path, what)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark in front is not text
    except UnicodeDecodeError as error:
        raise InputError(f"{what} {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def check_output_file(
    path: Path, what: str, inputs: Iterable[Path | None] = (), folders: Iterable[tuple[str, Path | None]] = ()
) -> None:
    """Raise :class:`OutputError` unless ``path`` can be created or overwritten, is none of ``inputs`` and lies in
    none of ``folders``.

    Args:
        inputs: files the run reads.
        folders: ``(what it is, folder)`` pairs: folders the run reads or writes (an index, a state directory, a
            model, the cache), whose files the results must not replace.

    An input or a folder is recognised however it is reached (same path, symbolic links anywhere in either
    path, hard links), so that nothing is truncated while it is still to be read or written.
    """
    for source in inputs:
        if source is not None and _same_file(path, source):
            raise OutputError(f"{what} {path} is the input file {source}: the input would be overwritten before "
                              "it is read; write the results to another file")
    for name, folder in folders:
        if folder is not None and _lies_in(path, folder):
            raise OutputError(f"{what} {path} lies in the {name} {folder}, which this run reads or writes: the "
                              "results would destroy it; write them outside it")
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a directory, expected a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise OutputError(f"{what} {path}: not writable (permission denied)")
        return
    _check_creatable(path.parent, what, path)


def check_output_directory(path: Path, what: str) -> None:
    """Raise :class:`OutputError` unless ``path`` is a writable directory or one can be created there."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a directory")
    _check_creatable(path, what, path)


def _check_creatable(directory: Path, what: str, target: Path) -> None:
    """``directory`` exists and is writable, or its nearest existing ancestor is a writable directory."""
    base = Path(os.path.abspath(directory))
    while not base.exists() and not base.is_symlink():
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{what} {target}: cannot be created, {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {target}: cannot be written, directory {base} is not writable")


def _lies_in(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it once every link is resolved, or is a hard link of a file
    under it."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real.is_relative_to(base):
        return True
    try:
        status = path.stat()
    except OSError:
        return False  # not there yet: nothing to share an inode with
    if status.st_nlink < 2 or not base.is_dir():
        return False
    for directory, _, names in os.walk(base):
        for name in names:
            with contextlib.suppress(OSError):
                other = os.stat(os.path.join(directory, name))
                if (other.st_dev, other.st_ino) == (status.st_dev, status.st_ino):
                    return True
    return False


def disk_cache_dir() -> Path:
    """The folder on disk where converted models, measured cost curves and kernel choices live (not the KV cache);
    ``$RETRIEVAL_SPEC_CACHE`` overrides it."""
    root = os.environ.get("RETRIEVAL_SPEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "retrieval-spec"
    )
    return Path(root)


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:  # either does not exist (yet): not the same file
        return False


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def commit_delay() -> None:
    """Sleep ``$RETRIEVAL_SPEC_COMMIT_DELAY`` seconds (unset: not at all) just before an atomic replace.

    A test hook, read by every :func:`open_atomically` and by index publishes: concurrency tests set it so that
    concurrent writers overlap at their commit every time instead of once in many runs.
    """
    delay = os.environ.get("RETRIEVAL_SPEC_COMMIT_DELAY")
    if delay:
        time.sleep(float(delay))


class JsonlWriter:
    """Writes one JSON object per line as each is produced, so that a failure keeps every finished line.

    Opening creates the file's directory when missing (:func:`check_output_file` checked it can be).

    Lines go straight to the file (no buffer); when a write fails (a full disk), the file is cut back to its
    last complete line and :class:`OutputError` says how many lines it keeps.

    Attributes:
        path: the file; None writes to standard output.
        written: complete lines written so far.
    """

    def __init__(self, path: Path | None, what: str = "--output") -> None:
        self.path = path
        self.what = what
        self.written = 0
        self._end = 0  # offset just past the last complete line

    def __enter__(self) -> JsonlWriter:
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "wb", buffering=0)
            except OSError as error:
                raise OutputError(f"{self.what} {self.path}: {error.strerror}") from None
        return self

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if self.path is None:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.written += 1
            return
        encoded = line.encode("utf-8")
        data = memoryview(encoded)
        try:
            while data:
                data = data[self._file.write(data) :]
        except OSError as error:
            try:
                os.ftruncate(self._file.fileno(), self._end)
            except OSError:
                pass  # not a regular file (a device, a pipe): nothing to cut back
            raise OutputError(f"{self.what} {self.path}: {error.strerror} after {self.written} complete line(s), "
                              "which are kept") from None
        self._end += len(encoded)
        self.written += 1

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.path is not None:
            self._file.close()


@contextlib.contextmanager
def open_atomically(path: Path, temporary_directory: Path | None = None) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` as a whole when the ``with`` block ends without an error.

    The data goes to a temporary file of a name no other writer uses, in ``temporary_directory`` (on the same
    file system; default: beside ``path``, whose folder is created); then the file is flushed and fsynced,
    renamed over ``path`` and the folder fsynced. Readers see the old file or the new one, never a part, also
    after a crash; of two writers the last to rename wins. On an error nothing is renamed and no temporary file
    is left.

    The temporary file is created exclusively (never through a link someone put at its name), and temporary
    files of ``path`` that a writer killed before its rename left behind (their process is gone) are removed.

    Raises:
        OSError: the file cannot be written, synced or renamed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    directory = temporary_directory or path.parent
    _remove_abandoned_temporaries(directory, path.name)
    tmp = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(descriptor, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit_delay()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def _remove_abandoned_temporaries(directory: Path, name: str) -> None:
    """Remove the temporary files of :func:`open_atomically` for ``name`` whose writer's process is gone (killed
    between creating and renaming it). A writer on another host sharing the folder is taken for gone only
    when no process of this host has its pid."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return  # not listable: the write that follows says why
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _process_exists(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid we can ask about: not ours to judge
    return True


def replace_atomically(path: Path, data: str | bytes, temporary_directory: Path | None = None) -> None:
    """Replace ``path`` by ``data`` (text is written as UTF-8) as :func:`open_atomically` does."""
    with open_atomically(path, temporary_directory) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def fsync_directory(path: Path) -> None:
    """Make the entries of a folder (files created, renamed or removed in it) survive a crash."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder below ``directory`` and the folder itself, so that renaming it publishes
    contents that survive a crash."""
    for folder, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(Path(folder))
