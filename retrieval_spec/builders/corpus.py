"""Read documents from JSONL files, plain text files and directories of them, streaming, in a stable order.

JSONL (``.jsonl`` or ``.ndjson``, in any case): one document per non-blank line, a JSON object with a text
field (``text`` unless configured), or a chat as ``messages`` (``[{"role", "content"}]``) or ShareGPT
``conversations`` (``[{"from", "value"}]``), rendered with the tokenizer's chat template. Every other field is
kept, as JSON, in the document table; JSON that :mod:`retrieval_spec.strict_json` refuses (nested too deeply,
lone surrogate escapes) is a malformed line. Any other file is one document of UTF-8 text (a byte-order mark
is dropped). Directories are walked in name order, depth first, however deep, hidden entries and symbolic links
to directories skipped; files there that are not UTF-8 text or cannot be read (and folders that cannot be
listed) are skipped and counted.

A document longer than :data:`MAX_DOCUMENT_CHARS` characters is cut into consecutive documents of at most
that size, after a newline or before a space where there is one, so that tokenizing a document (about 140
bytes a character in a fast tokenizer) stays bounded whatever one line holds.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from retrieval_spec import strict_json
from retrieval_spec.errors import InputError
from retrieval_spec.files import check_input_file

JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_DOCUMENT_CHARS = 1 << 20

CHAT_FIELDS = ("messages", "conversations")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class Record:
    """One document before tokenization.

    Attributes:
        text: the document (a chat already rendered with the chat template).
        source: where it came from: ``file:line`` for JSONL, the path for a text file.
        meta: the record's other fields as a JSON object, ``""`` when there are none.
    """

    text: str
    source: str
    meta: str


class _BadLine(Exception):
    """A JSONL line that cannot be used; an :class:`InputError`, or skipped and counted."""


class Corpus:
    """The documents of some input paths, read lazily; iterate it once.

    Attributes:
        skipped_lines: JSONL lines skipped so far (only with ``skip_bad_lines``).
        skipped_files: entries of input directories skipped so far: files that are not UTF-8 text, cannot be
            read or are not regular files (FIFOs, devices), and folders that cannot be listed.
    """

    def __init__(
        self,
        inputs: Sequence[str | Path],
        render_chat: Callable[[list[dict[str, str]]], str],
        *,
        text_field: str = "text",
        skip_bad_lines: bool = False,
        exclude: Sequence[str | Path] = (),
    ) -> None:
        """
        Args:
            inputs: JSONL files (``.jsonl``, ``.ndjson``), text files and directories.
            render_chat: turns ``[{"role", "content"}]`` into text (``tokenizer.apply_chat_template`` untokenized).
            text_field: the JSONL field holding a document's text.
            skip_bad_lines: skip malformed JSONL lines and count them instead of raising :class:`InputError`.
            exclude: directories never read when walking an input directory (the index being built inside
                it), compared as files, not names.

        Raises:
            InputError: an input path that does not exist, or a named file that is not a readable regular file.
        """
        self.inputs = [Path(path) for path in inputs]
        for path in self.inputs:
            if not path.exists():
                raise InputError(f"{path}: no such file or directory")
            if not path.is_dir():
                check_input_file(path, "input")
        self.render_chat = render_chat
        self.text_field = text_field
        self.skip_bad_lines = skip_bad_lines
        self.exclude = [Path(path) for path in exclude]
        self.skipped_lines = 0
        self.skipped_files = 0

    def __iter__(self) -> Iterator[Record]:
        for path, in_directory in self.files():
            yield from self._read(path, in_directory=in_directory)

    def files(self) -> Iterator[tuple[Path, bool]]:
        """Every file to read, in reading order, and whether it was found in an input directory."""
        excluded = {_identity(path.stat()) for path in self.exclude if path.is_dir()}
        for path in self.inputs:
            if path.is_dir():
                for file in self._files_under(path, excluded):
                    yield file, True
            else:
                yield path, False

    def read(
        self, path: Path, *, in_directory: bool, start: int = 0, end: int | None = None, first_line: int = 1
    ) -> Iterator[Record]:
        """The documents of one file of :meth:`files`; of a JSONL file, those of the lines in bytes
        ``[start, end)`` (cut at line ends), the first of which is line ``first_line``."""
        if path.suffix.lower() in JSONL_SUFFIXES:
            return self._jsonl(path, in_directory=in_directory, start=start, end=end, first_line=first_line)
        return self._read(path, in_directory=in_directory)

    def _files_under(self, directory: Path, excluded: set[tuple[int, int]]) -> Iterator[Path]:
        """Regular files under ``directory`` in name order, depth first, walked without recursion (a folder
        thousands of levels deep is read like any other); see the module docstring for what is skipped."""
        stack = [self._entries(directory)]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if _identity(entry.stat(follow_symlinks=False)) not in excluded:
                        stack.append(self._entries(Path(entry.path)))
                elif entry.is_symlink() and entry.is_dir():
                    continue
                elif stat.S_ISREG(entry.stat().st_mode):
                    yield Path(entry.path)
                else:
                    self.skipped_files += 1
            except OSError:  # a dangling link, or an entry gone or unreadable since the listing
                self.skipped_files += 1

    def _entries(self, directory: Path) -> Iterator[os.DirEntry]:
        """The entries of a folder in name order; none (and one more skipped) when it cannot be listed."""
        try:
            with os.scandir(directory) as entries:
                return iter(sorted(entries, key=lambda entry: entry.name))
        except OSError:
            self.skipped_files += 1
            return iter(())

    def unreadable(self, path: Path, in_directory: bool, why: str) -> None:
        """A file that cannot be read: skipped and counted when found in an input folder, else refused naming it.

        Raises:
            InputError: ``path`` was named as an input.
        """
        if not in_directory:
            raise InputError(f"{path}: {why}") from None
        self.skipped_files += 1

    def _read(self, path: Path, *, in_directory: bool) -> Iterator[Record]:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from self._jsonl(path, in_directory=in_directory)
            return
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        except UnicodeDecodeError as error:
            self.unreadable(path, in_directory, f"not UTF-8 text ({error.reason} at byte {error.start})")
            return
        except OSError as error:
            self.unreadable(path, in_directory, f"cannot be read ({error.strerror})")
            return
        for piece in split_document(text):
            yield Record(text=piece, source=str(path), meta="")

    def _jsonl(
        self, path: Path, *, in_directory: bool, start: int = 0, end: int | None = None, first_line: int = 1
    ) -> Iterator[Record]:
        try:
            f = open(path, "rb")
        except OSError as error:
            self.unreadable(path, in_directory, f"cannot be read ({error.strerror})")
            return
        with f:
            f.seek(start)
            lines = f if end is None else _lines_before(f, end)
            for number, line in enumerate(lines, start=first_line):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = self._record(line, where)
                except _BadLine as error:
                    if not self.skip_bad_lines:
                        raise InputError(f"{where}: {error} (skip_bad_lines / --skip-bad-lines skips such lines)")
                    self.skipped_lines += 1
                    continue
                for piece in split_document(record.text):
                    yield Record(text=piece, source=record.source, meta=record.meta)

    def _record(self, line: bytes, where: str) -> Record:
        try:
            record = strict_json.parse(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise _BadLine(f"not UTF-8 ({error.reason})") from None
        except strict_json.JsonProblem as error:
            raise _BadLine(str(error)) from None
        if not isinstance(record, dict):
            raise _BadLine(f"expected a JSON object, got {type(record).__name__}")
        if self.text_field in record:
            text = record[self.text_field]
            if not isinstance(text, str):
                raise _BadLine(f"field {self.text_field!r} is {type(text).__name__}, expected a string")
        elif "messages" in record:
            text = self._render(_messages(record["messages"]))
        elif "conversations" in record:
            text = self._render(_sharegpt(record["conversations"]))
        else:
            raise _BadLine(f"no {self.text_field!r}, 'messages' or 'conversations' field")
        meta = {key: value for key, value in record.items() if key not in (self.text_field, *CHAT_FIELDS)}
        return Record(text=text, source=where, meta=json.dumps(meta, ensure_ascii=False) if meta else "")

    def _render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.render_chat(messages)
        # Chat templates are Jinja programs that raise their own exception types (e.g. on roles that do not
        # alternate); to the user it is one bad line either way.
        except Exception as error:  # noqa: BLE001
            raise _BadLine(f"the tokenizer's chat template cannot render it ({error})") from None


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _BadLine("'messages' must be a non-empty list")
    for turn in messages:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise _BadLine("each of 'messages' must be an object with string 'role' and 'content'")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def _sharegpt(conversations: Any) -> list[dict[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise _BadLine("'conversations' must be a non-empty list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _BadLine("each of 'conversations' must be an object with a string 'value'")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            expected = ", ".join(sorted(SHAREGPT_ROLES))
            raise _BadLine(f"unknown speaker {turn.get('from')!r} in 'conversations', expected one of {expected}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def split_document(text: str, limit: int | None = None) -> list[str]:
    """``text`` cut into consecutive pieces of at most ``limit`` characters (:data:`MAX_DOCUMENT_CHARS`).

    Each cut falls after the last newline, else before the last space, of the piece's second half (so a
    byte-level BPE tokenizes the pieces as it does the whole), else at the limit.

    >>> split_document("one two three four", limit=8)
    ['one two', ' three', ' four']
    """
    limit = limit or MAX_DOCUMENT_CHARS
    pieces, start = [], 0
    while len(text) - start > limit:
        end, half = start + limit, start + limit // 2
        newline = text.rfind("\n", half, end)
        space = text.rfind(" ", half + 1, end + 1)
        cut = newline + 1 if newline >= 0 else space if space >= 0 else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _lines_before(f: BinaryIO, end: int) -> Iterator[bytes]:
    """The lines of ``f`` from its position up to byte ``end``, a line end (or the end of the file)."""
    while f.tell() < end and (line := f.readline()):
        yield line
