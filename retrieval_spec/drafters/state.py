"""Drafter state saved between processes: one ``.npz`` per drafter, versioned, tokenizer-pinned, written
atomically (temporary file, fsync, rename), so a crash never leaves a half-written file at the path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import DatastoreFormatError, TokenizerMismatchError


def write_state(target: Path, arrays: dict[str, np.ndarray], format_version: int, tokenizer: str, **meta) -> None:
    """Write ``arrays`` and their metadata to ``target`` atomically (its directory is created)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    header = json.dumps({"format_version": format_version, "tokenizer": tokenizer, **meta})
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.array(header), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def read_state(target: Path, format_version: int, tokenizer: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read what :func:`write_state` wrote, refusing another format version or tokenizer.

    Raises:
        DatastoreFormatError: missing or unreadable file, or another format version.
        TokenizerMismatchError: saved for another tokenizer (both names in the message).
    """
    try:
        with np.load(target) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {name: data[name] for name in data.files if name != "meta"}
    except (OSError, ValueError, KeyError) as e:
        raise DatastoreFormatError(f"{target}: not a readable drafter state ({e})") from None
    if meta.get("format_version") != format_version:
        raise DatastoreFormatError(f"{target}: format version {meta.get('format_version')}, expected {format_version}")
    if meta.get("tokenizer") != tokenizer:
        raise TokenizerMismatchError(f"{target} was saved for tokenizer {meta.get('tokenizer')!r}, not {tokenizer!r}")
    return arrays, meta
