"""``write_index`` / ``read_index`` / ``serialize_index`` / ``deserialize_index`` / ``clone_index`` for
IndexRQMoE and for plain faiss indexes.

An IndexRQMoE file is one ``storage`` file (no pickle): the faiss IVF index
as ``faiss.serialize_index`` bytes, the codec's weights, and a JSON header
(format, version, config, search and training settings, history;
``snapshot.py`` says what they hold). Plain faiss indexes go to and come from
``faiss.write_index`` / ``faiss.read_index``, so replacing ``faiss.`` by
``faiss_rqmoe.`` in those calls switches a program over. ``serialize_index``
gives the same bytes as the file, in memory; pickle and ``copy`` go through
them too (``IndexRQMoE.__reduce__``), so unpickling an index runs this
package's reader and nothing else.
"""
from __future__ import annotations

import io
import os

import faiss
import numpy as np

from . import snapshot
from .devices import resolve_device
from .index import IndexRQMoE, index_from_pickle  # noqa: F401  (index_from_pickle: the pickles' reader)
from .snapshot import package_buffer
from .storage import FileFormatError, load_arrays, save_arrays


def write_index(index, path) -> None:
    """Save an IndexRQMoE to one file (atomically: an interrupted write leaves the old file intact), or a
    plain faiss index with ``faiss.write_index``.

    path: a file path, or a binary file object for an IndexRQMoE. A path whose folder does not exist
    raises ``storage.MissingFolderError`` (a FileNotFoundError and a RuntimeError, as faiss raises).
    """
    if isinstance(index, faiss.Index):
        faiss.write_index(index, os.fspath(path))
        return
    if not isinstance(index, IndexRQMoE):
        raise TypeError(f"write_index expects an IndexRQMoE or a faiss.Index, got {type(index).__name__}")
    if not index.is_trained:
        raise ValueError("cannot write an untrained IndexRQMoE: train it first")
    arrays, meta = snapshot.arrays_and_meta(index)
    save_arrays(path, arrays, meta, make_parents=False)


def read_index(path, device=None):
    """Load an index written by ``write_index``: an IndexRQMoE, or the faiss index of a faiss file.

    Never executes code from the file. device: where an IndexRQMoE's codec
    and search run (None: cuda if available). Raises FileNotFoundError,
    IsADirectoryError, PermissionError naming the path, ValueError (a
    ``FileFormatError``) for a truncated, corrupted or foreign file, and
    ValueError for a bad ``device``.
    """
    device = resolve_device(device)  # a bad device is the caller's mistake, not the file's
    try:
        arrays, meta = load_arrays(path, "an IndexRQMoE file")
    except FileFormatError as exc:
        if exc.kind == "faiss" and isinstance(path, (str, os.PathLike)):
            try:
                return faiss.read_index(os.fspath(path))
            except RuntimeError as faiss_error:
                raise FileFormatError(f"{path} looks like a faiss index but faiss cannot read it: "
                                      f"{str(faiss_error).splitlines()[0]}") from None
        raise
    label = str(path) if isinstance(path, (str, os.PathLike)) else "<file>"
    return snapshot.index_from(IndexRQMoE, arrays, meta, device, label)


def serialize_index(index) -> np.ndarray:
    """The bytes of ``write_index``'s file as a (n,) uint8 array, or ``faiss.serialize_index`` of a faiss
    index."""
    if isinstance(index, faiss.Index):
        return faiss.serialize_index(index)
    if not isinstance(index, IndexRQMoE):
        raise TypeError(f"serialize_index expects an IndexRQMoE or a faiss.Index, got {type(index).__name__}")
    buffer = io.BytesIO()
    write_index(index, buffer)
    return np.frombuffer(buffer.getbuffer(), dtype=np.uint8).copy()


def is_serialized_index(data) -> bool:
    """Whether ``data`` (a (n,) uint8 array or bytes-like) holds a file of the package's format, as
    ``serialize_index`` gives; faiss's serialized indexes never do."""
    return package_buffer(data) is not None


def deserialize_index(data, device=None):
    """An index from ``serialize_index``'s bytes: data, a (n,) uint8 array or bytes-like. IndexRQMoE bytes
    give an IndexRQMoE on ``device`` (None: cuda if available); faiss's bytes go to
    ``faiss.deserialize_index``. Never executes code from the data."""
    buffer = package_buffer(data)
    if buffer is None:
        return faiss.deserialize_index(data)
    return index_from_buffer(buffer, resolve_device(device))


def index_from_buffer(buffer, device):
    """The IndexRQMoE of a binary file object that ``package_buffer`` accepted, on ``device``."""
    arrays, meta = load_arrays(buffer, "an IndexRQMoE file")
    return snapshot.index_from(IndexRQMoE, arrays, meta, device, "<bytes>")


def clone_index(index):
    """A deep copy of an IndexRQMoE, trained or not, on the same device (or of a faiss index, with
    ``faiss.clone_index``). Search settings, encoding settings, execution and memory budget come along."""
    if isinstance(index, faiss.Index):
        return faiss.clone_index(index)
    if not isinstance(index, IndexRQMoE):
        raise TypeError(f"clone_index expects an IndexRQMoE or a faiss.Index, got {type(index).__name__}")
    return snapshot.clone(index)
