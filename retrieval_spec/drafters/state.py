"""Drafter state saved between processes: one ``.npz`` per drafter, versioned, tokenizer-pinned.

Writes are atomic and safe to run concurrently: each writer writes its own temporary file (a unique name),
fsyncs it and renames it over the target, so two runs sharing a state directory never see a half-written
file; the last to finish wins. Reads refuse, with a message naming the file, anything that is not a state
file of this format: empty, truncated or foreign files, pickled objects, arrays of other types or shapes,
and token ids outside the model's vocabulary.

The contract of the arrays: integer arrays hold token ids, -1 where there is none (padding, separators);
boolean arrays hold flags. Nothing else is saved.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import strict_json
from ..datastore.manifest import check_token_ids
from ..errors import DatastoreFormatError, TokenizerMismatchError
from ..files import open_atomically

NO_TOKEN = -1  # the one integer value besides token ids that a state array may hold

Shape = tuple[int | str | None, ...]  # per axis: its exact length, a name that must agree across arrays, or any


def write_state(target: Path, arrays: dict[str, np.ndarray], format_version: int, tokenizer: str, **meta) -> None:
    """Write ``arrays`` and their metadata to ``target`` atomically (its directory is created)."""
    header = json.dumps({"format_version": format_version, "tokenizer": tokenizer, **meta})
    with open_atomically(target) as f:
        np.savez(f, meta=np.array(header), **arrays)


def read_state(
    target: Path,
    format_version: int,
    tokenizer: str,
    *,
    shapes: Mapping[str, Shape] | None = None,
    vocab_size: int | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Read what :func:`write_state` wrote, refusing anything else.

    Args:
        shapes: when given, the arrays the file must hold and their shapes (see :data:`Shape`); e.g.
            ``{"keys": ("n",), "grams": ("n", None, 3)}``.
        vocab_size: when given, integer arrays must hold ids in ``[0, vocab_size)`` or :data:`NO_TOKEN`.

    Raises:
        DatastoreFormatError: missing or unreadable file, another format version, an array that is neither
            integer nor boolean, of another shape, or holding an id outside the vocabulary.
        TokenizerMismatchError: saved for another tokenizer (both names in the message).
    """
    arrays, meta = _read(target, tokenizer)
    if meta.get("format_version") != format_version:
        raise DatastoreFormatError(f"{target}: format version {meta.get('format_version')}, expected {format_version}")
    if shapes is not None:
        _check_shapes(target, arrays, shapes)
    if vocab_size is not None:
        for name, array in arrays.items():
            if array.dtype.kind in "iu":
                check_token_ids(array, vocab_size, f"{target}: array {name!r}", lowest=NO_TOKEN,
                                error=DatastoreFormatError, hint="the file is damaged, delete it")
    return arrays, meta


def _read(target: Path, tokenizer: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of a state file saved for ``tokenizer``, every array integer or boolean."""
    if not target.is_file():
        raise DatastoreFormatError(f"{target}: missing, or not a regular file")
    try:
        if not zipfile.is_zipfile(target):
            raise DatastoreFormatError(f"{target}: not a drafter state file (not an .npz archive); delete it or "
                                       "point --state-dir elsewhere")
        with np.load(target, allow_pickle=False) as data:
            meta = strict_json.loads(str(data["meta"]), f"{target}: its metadata", DatastoreFormatError)
            arrays = {name: data[name] for name in data.files if name != "meta"}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DatastoreFormatError(f"{target}: not a readable drafter state ({type(e).__name__}: {e}); delete it "
                                   "or point --state-dir elsewhere") from None
    if not isinstance(meta, dict):
        raise DatastoreFormatError(f"{target}: its metadata is not a JSON object; delete it")
    if meta.get("tokenizer") != tokenizer:
        raise TokenizerMismatchError(f"{target} was saved for tokenizer {meta.get('tokenizer')!r}, not {tokenizer!r}")
    for name, array in arrays.items():
        if array.dtype.kind not in "iub":
            raise DatastoreFormatError(f"{target}: array {name!r} is {array.dtype}, expected integers or booleans")
    return arrays, meta


def _check_shapes(target: Path, arrays: Mapping[str, np.ndarray], shapes: Mapping[str, Shape]) -> None:
    named: dict[str, int] = {}
    for name, shape in shapes.items():
        if name not in arrays:
            raise DatastoreFormatError(f"{target}: array {name!r} is missing")
        actual = arrays[name].shape
        fits = len(actual) == len(shape) and all(
            expected is None or (actual[axis] == expected if isinstance(expected, int)
                                 else named.setdefault(expected, actual[axis]) == actual[axis])
            for axis, expected in enumerate(shape)
        )
        if not fits:
            expected = _describe(shape, named)
            raise DatastoreFormatError(f"{target}: array {name!r} has shape {actual}, expected {expected}")


def _describe(shape: Shape, named: Mapping[str, int]) -> str:
    axes = ["any" if axis is None else str(named.get(axis, axis)) if isinstance(axis, str) else str(axis)
            for axis in shape]
    return f"({', '.join(axes)})"
