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
import math
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import strict_json
from ..datastore.manifest import check_token_ids
from ..errors import DatastoreFormatError, TokenizerMismatchError
from ..files import open_atomically

NO_TOKEN = -1  # the one integer value besides token ids that a state array may hold

# Per axis: its exact length, or a name: axes of one name agree across arrays, and ``limits`` bounds them.
Shape = tuple[int | str, ...]
MAX_META_CHARS = 1 << 16  # the metadata is a few fields of JSON


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
    shapes: Mapping[str, Shape],
    limits: Mapping[str, int] | None = None,
    vocab_size: int | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Read what :func:`write_state` wrote, refusing anything else.

    Every array's type and shape are read from its header and checked before its data is read, so a file
    that declares more than the drafter keeps (or a deflate bomb) is refused before anything is allocated.

    Args:
        shapes: the arrays the file must hold, and only those, and their shapes (see :data:`Shape`); e.g.
            ``{"keys": ("n",), "grams": ("n", 4, 3)}``.
        limits: the most each named axis may hold, e.g. ``{"n": 200_000}``; every named axis needs one.
        vocab_size: when given, integer arrays must hold ids in ``[0, vocab_size)`` or :data:`NO_TOKEN`.

    Raises:
        DatastoreFormatError: missing or unreadable file, another format version, an array missing, extra, of
            another type or shape, or holding an id outside the vocabulary.
        TokenizerMismatchError: saved for another tokenizer (both names in the message).
    """
    arrays, meta = _read(target, tokenizer, shapes, limits or {})
    if meta.get("format_version") != format_version:
        raise DatastoreFormatError(f"{target}: format version {meta.get('format_version')}, expected {format_version}")
    if vocab_size is not None:
        for name, array in arrays.items():
            if array.dtype.kind in "iu":
                check_token_ids(array, vocab_size, f"{target}: array {name!r}", lowest=NO_TOKEN,
                                error=DatastoreFormatError, hint="the file is damaged, delete it")
    return arrays, meta


def _read(target: Path, tokenizer: str, shapes: Mapping[str, Shape], limits: Mapping[str, int]
          ) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata of a state file saved for ``tokenizer``, every array checked before it is read."""
    if not target.is_file():
        raise DatastoreFormatError(f"{target}: missing, or not a regular file")
    try:
        if not zipfile.is_zipfile(target):
            raise DatastoreFormatError(f"{target}: not a drafter state file (not an .npz archive); delete it or "
                                       "point --state-dir elsewhere")
        with zipfile.ZipFile(target) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            extra = sorted(set(members) - set(shapes) - {"meta"})
            if extra:
                raise DatastoreFormatError(f"{target}: holds array(s) {extra} besides {sorted(shapes)}; delete it")
            header = _read_array(target, archive, members, "meta", (), {}, {})
            meta = strict_json.loads(str(header), f"{target}: its metadata", DatastoreFormatError)
            if not isinstance(meta, dict):
                raise DatastoreFormatError(f"{target}: its metadata is not a JSON object; delete it")
            if meta.get("tokenizer") != tokenizer:
                raise TokenizerMismatchError(f"{target} was saved for tokenizer {meta.get('tokenizer')!r}, not "
                                             f"{tokenizer!r}")
            named: dict[str, int] = {}
            arrays = {name: _read_array(target, archive, members, name, shape, limits, named)
                      for name, shape in shapes.items()}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError) as e:  # what zipfile raises for damaged, encrypted or oddly compressed members
        raise DatastoreFormatError(f"{target}: not a readable drafter state ({type(e).__name__}: {e}); delete it "
                                   "or point --state-dir elsewhere") from None
    return arrays, meta


def _read_array(target: Path, archive: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], name: str,
                shape: Shape, limits: Mapping[str, int], named: dict[str, int]) -> np.ndarray:
    """One array of the archive: its header read and checked (type, ``shape``, ``limits``), then its data.

    ``meta`` is a 0-d string of at most :data:`MAX_META_CHARS` characters; every other array holds integers or
    booleans. ``named`` collects the lengths of named axes, which must agree across arrays.
    """
    if name not in members:
        raise DatastoreFormatError(f"{target}: array {name!r} is missing")
    with archive.open(members[name]) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise DatastoreFormatError(f"{target}: array {name!r} is in .npy format {version}, expected 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        actual, fortran_order, dtype = read_header(f)
        if name == "meta":
            if dtype.kind != "U" or actual != () or dtype.itemsize > 4 * MAX_META_CHARS:
                raise DatastoreFormatError(f"{target}: its metadata is {dtype} of shape {actual}, expected a string "
                                           f"of at most {MAX_META_CHARS} characters; delete it")
        elif dtype.kind not in "iub" or dtype.itemsize > 8:
            raise DatastoreFormatError(f"{target}: array {name!r} is {dtype}, expected integers or booleans")
        else:
            _check_shape(target, name, actual, shape, limits, named)
        size = math.prod(actual) * dtype.itemsize
        data = f.read(size)
    if len(data) != size:
        raise DatastoreFormatError(f"{target}: array {name!r} is truncated ({len(data)} of {size} bytes)")
    array = np.frombuffer(data, dtype=dtype)  # read-only: every reader copies what it keeps
    return array.reshape(actual, order="F" if fortran_order else "C")


def _check_shape(target: Path, name: str, actual: tuple[int, ...], shape: Shape, limits: Mapping[str, int],
                 named: dict[str, int]) -> None:
    fits = len(actual) == len(shape) and all(
        length == expected if isinstance(expected, int)
        else 0 <= length <= limits[expected] and named.setdefault(expected, length) == length
        for length, expected in zip(actual, shape)
    )
    if not fits:
        axes = [str(expected) if isinstance(expected, int)
                else str(named[expected]) if expected in named else f"at most {limits[expected]}"
                for expected in shape]
        raise DatastoreFormatError(f"{target}: array {name!r} has shape {actual}, expected ({', '.join(axes)})")
