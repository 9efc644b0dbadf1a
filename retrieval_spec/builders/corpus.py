"""Read documents from JSONL files, plain text files and directories of them, streaming, in a stable order.

JSONL: one document per non-blank line, a JSON object with a text field (``text`` unless configured), or a
chat as ``messages`` (``[{"role", "content"}]``) or ShareGPT ``conversations`` (``[{"from", "value"}]``),
rendered with the tokenizer's chat template. Every other field is kept, as JSON, in the document table.
Any other file is one document of UTF-8 text. Directories are walked recursively in name order, hidden
entries skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from retrieval_spec.errors import InputError

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
        skipped_files: files in input directories skipped so far because they are not UTF-8 text.
    """

    def __init__(
        self,
        inputs: Sequence[str | Path],
        render_chat: Callable[[list[dict[str, str]]], str],
        *,
        text_field: str = "text",
        skip_bad_lines: bool = False,
    ) -> None:
        """
        Args:
            inputs: JSONL files (``.jsonl``), text files and directories.
            render_chat: turns ``[{"role", "content"}]`` into text (``tokenizer.apply_chat_template`` untokenized).
            text_field: the JSONL field holding a document's text.
            skip_bad_lines: skip malformed JSONL lines and count them instead of raising :class:`InputError`.

        Raises:
            InputError: an input path that does not exist.
        """
        self.inputs = [Path(path) for path in inputs]
        for path in self.inputs:
            if not path.exists():
                raise InputError(f"{path}: no such file or directory")
        self.render_chat = render_chat
        self.text_field = text_field
        self.skip_bad_lines = skip_bad_lines
        self.skipped_lines = 0
        self.skipped_files = 0

    def __iter__(self) -> Iterator[Record]:
        for path, in_directory in self.files():
            yield from self._read(path, in_directory=in_directory)

    def files(self) -> Iterator[tuple[Path, bool]]:
        """Every file to read, in reading order, and whether it was found in an input directory."""
        for path in self.inputs:
            if path.is_dir():
                for file in _files_under(path):
                    yield file, True
            else:
                yield path, False

    def read(
        self, path: Path, *, in_directory: bool, start: int = 0, end: int | None = None, first_line: int = 1
    ) -> Iterator[Record]:
        """The documents of one file of :meth:`files`; of a JSONL file, those of the lines in bytes
        ``[start, end)`` (cut at line ends), the first of which is line ``first_line``."""
        if path.suffix == ".jsonl":
            return self._jsonl(path, start, end, first_line)
        return self._read(path, in_directory=in_directory)

    def _read(self, path: Path, *, in_directory: bool) -> Iterator[Record]:
        if path.suffix == ".jsonl":
            yield from self._jsonl(path)
            return
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            if in_directory:
                self.skipped_files += 1
                return
            raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        yield Record(text=text, source=str(path), meta="")

    def _jsonl(self, path: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[Record]:
        with open(path, "rb") as f:
            f.seek(start)
            lines = f if end is None else _lines_before(f, end)
            for number, line in enumerate(lines, start=first_line):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield self._record(line, where)
                except _BadLine as error:
                    if not self.skip_bad_lines:
                        raise InputError(f"{where}: {error} (skip_bad_lines / --skip-bad-lines skips such lines)")
                    self.skipped_lines += 1

    def _record(self, line: bytes, where: str) -> Record:
        try:
            record = json.loads(line)
        except UnicodeDecodeError as error:
            raise _BadLine(f"not UTF-8 ({error.reason})") from None
        except json.JSONDecodeError as error:
            raise _BadLine(f"not valid JSON ({error.msg} at column {error.colno})") from None
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


def _files_under(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts):
            yield path


def _lines_before(f: BinaryIO, end: int) -> Iterator[bytes]:
    """The lines of ``f`` from its position up to byte ``end``, a line end (or the end of the file)."""
    while f.tell() < end and (line := f.readline()):
        yield line
