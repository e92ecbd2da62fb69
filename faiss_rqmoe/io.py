"""``write_index`` / ``read_index`` / ``serialize_index`` / ``deserialize_index`` / ``clone_index`` for
IndexRQMoE and for plain faiss indexes.

An IndexRQMoE file is one ``storage`` file (no pickle): the faiss IVF index
as ``faiss.serialize_index`` bytes, the codec's weights, and a JSON header
(format, version, config, search and training settings, history). Plain
faiss indexes go to and come from ``faiss.write_index`` / ``faiss.read_index``,
so replacing ``faiss.`` by ``faiss_rqmoe.`` in those calls switches a
program over. ``serialize_index`` gives the same bytes as the file, in memory;
pickle and ``copy`` go through them too (``IndexRQMoE.__reduce__``), so
unpickling an index runs this module's reader and nothing else.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os

import faiss
import numpy as np

from .config import RQMoEConfig
from .storage import (FileFormatError, arrays_to_state, is_package_file, load_arrays, save_arrays, sniff,
                      state_to_arrays)

INDEX_FORMAT = "faiss_rqmoe.index"
INDEX_FORMAT_VERSION = 2
UNTRAINED_FORMAT = "faiss_rqmoe.untrained_index"  # the JSON that pickles and copies an untrained index
READABLE_VERSIONS = (1, 2)  # version 1 files lack the header's table of array checksums

# TrainConfig fields renamed since files were first written: {old name: new name}
RENAMED_TRAIN_OPTIONS = {"encode_candidates": "train_encode_candidates"}


def _settings(index) -> dict:
    """What an index's constructor takes, and how its codec runs, as JSON (files and pickles, trained or not)."""
    return {"config": index.config.to_dict(), "nlist": index._nlist, "metric_type": int(index.metric_type),
            "hnsw_m": index.hnsw_m, "nprobe": index.nprobe, "nshort": index.nshort,
            "encode_candidates": index.encode_candidates, "encode_beam": index.encode_beam,
            "train_options": index.train_options, "execution": dataclasses.asdict(index.execution),
            "mem_budget_bytes": index.mem_budget_bytes}


def _index_with_settings(meta: dict, device):
    """A new, untrained IndexRQMoE as ``_settings`` describes it (KeyError, TypeError or ValueError where
    the JSON is inconsistent)."""
    from .index import IndexRQMoE
    from .train import TrainConfig

    train_options = dict(meta.get("train_options") or {})
    for old, new in RENAMED_TRAIN_OPTIONS.items():  # files written before the rename
        if old in train_options:
            train_options[new] = train_options.pop(old)
    index = IndexRQMoE(RQMoEConfig.from_dict(meta["config"]), meta["nlist"], meta["metric_type"],
                       hnsw_m=meta["hnsw_m"], nprobe=meta["nprobe"], nshort=meta["nshort"],
                       encode_candidates=meta["encode_candidates"], encode_beam=meta.get("encode_beam", 1),
                       train_config=TrainConfig.from_options(train_options), device=device)
    execution = meta.get("execution") or {}  # files written before the engine: the defaults
    return index.set_execution(kernel=execution.get("kernel"), dtype=execution.get("dtype"),
                               cuda_graphs=execution.get("cuda_graphs"),
                               mem_budget_bytes=meta.get("mem_budget_bytes"))


def _index_arrays_and_meta(index):
    arrays = state_to_arrays(index.model.state_dict(), "model.")
    arrays["faiss_index"] = faiss.serialize_index(index.ivf)
    meta = {"format": INDEX_FORMAT, "version": INDEX_FORMAT_VERSION, **_settings(index),
            "train_history": None if index.train_history is None else index.train_history.to_dict(),
            "pretrained": index.pretrained}
    return arrays, meta


def write_index(index, path) -> None:
    """Save an IndexRQMoE to one file (atomically: an interrupted write leaves the old file intact), or a
    plain faiss index with ``faiss.write_index``.

    path: a file path, or a binary file object for an IndexRQMoE. A path whose folder does not exist
    raises ``storage.MissingFolderError`` (a FileNotFoundError and a RuntimeError, as faiss raises).
    """
    from .index import IndexRQMoE

    if isinstance(index, faiss.Index):
        faiss.write_index(index, os.fspath(path))
        return
    if not isinstance(index, IndexRQMoE):
        raise TypeError(f"write_index expects an IndexRQMoE or a faiss.Index, got {type(index).__name__}")
    if not index.is_trained:
        raise ValueError("cannot write an untrained IndexRQMoE: train it first")
    arrays, meta = _index_arrays_and_meta(index)
    save_arrays(path, arrays, meta, make_parents=False)


def read_index(path, device=None):
    """Load an index written by ``write_index``: an IndexRQMoE, or the faiss index of a faiss file.

    Never executes code from the file. device: where an IndexRQMoE's codec
    and search run (None: cuda if available). Raises FileNotFoundError,
    IsADirectoryError, PermissionError naming the path, ValueError (a
    ``FileFormatError``) for a truncated, corrupted or foreign file, and
    ValueError for a bad ``device``.
    """
    from .devices import resolve_device

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
    return _index_from(arrays, meta, device, str(path) if isinstance(path, (str, os.PathLike)) else "<file>")


def _index_from(arrays, meta, device, label: str):
    from .faiss_hooks import faiss_function
    from .train import TrainHistory

    if meta.get("format") != INDEX_FORMAT:
        raise FileFormatError(f"{label} is not an IndexRQMoE file (format {meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise FileFormatError(f"{label} has format version {meta.get('version')!r}; this faiss_rqmoe reads "
                              f"versions {list(READABLE_VERSIONS)}")
    try:
        history = meta.get("train_history")
        history = None if history is None else TrainHistory.from_dict(history)
        index = _index_with_settings(meta, device)
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(f"{label} is corrupted: its header is inconsistent: {exc}") from None
    faiss_bytes = arrays.pop("faiss_index", None)
    if faiss_bytes is None or faiss_bytes.dtype != np.uint8 or faiss_bytes.ndim != 1:
        raise FileFormatError(f"{label} is corrupted: the faiss index bytes are missing or not a uint8 array")
    try:
        state = arrays_to_state(arrays, "model.", {k: v.cpu() for k, v in index.model.state_dict().items()}, label)
        ivf = faiss_function("deserialize_index")(faiss_bytes)  # faiss's own: a file holds no nested file
    except FileFormatError:
        raise
    except (RuntimeError, TypeError, ValueError, MemoryError) as exc:
        raise FileFormatError(f"{label} is corrupted: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    return index.restore(state, ivf, history, meta.get("pretrained"), label)


def serialize_index(index) -> np.ndarray:
    """The bytes of ``write_index``'s file as a (n,) uint8 array, or ``faiss.serialize_index`` of a faiss
    index."""
    from .index import IndexRQMoE

    if isinstance(index, faiss.Index):
        return faiss.serialize_index(index)
    if not isinstance(index, IndexRQMoE):
        raise TypeError(f"serialize_index expects an IndexRQMoE or a faiss.Index, got {type(index).__name__}")
    buffer = io.BytesIO()
    write_index(index, buffer)
    return np.frombuffer(buffer.getbuffer(), dtype=np.uint8).copy()


def package_buffer(data):
    """A binary file object over ``data`` (a (n,) uint8 array or bytes-like) when it holds a file of the
    package's format, else None. Only bytes that start as a zip archive are copied: faiss's never do."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            return None
        head = data[:8].tobytes()
    elif isinstance(data, (bytes, bytearray, memoryview)):
        head = bytes(data[:8])
    else:
        return None
    if sniff(head)[0] != "npz":
        return None
    buffer = io.BytesIO(data.tobytes() if isinstance(data, np.ndarray) else data)
    return buffer if is_package_file(buffer) else None


def is_serialized_index(data) -> bool:
    """Whether ``data`` (a (n,) uint8 array or bytes-like) holds a file of the package's format, as
    ``serialize_index`` gives; faiss's serialized indexes never do."""
    return package_buffer(data) is not None


def deserialize_index(data, device=None):
    """An index from ``serialize_index``'s bytes: data, a (n,) uint8 array or bytes-like. IndexRQMoE bytes
    give an IndexRQMoE on ``device`` (None: cuda if available); faiss's bytes go to
    ``faiss.deserialize_index``. Never executes code from the data."""
    from .devices import resolve_device

    buffer = package_buffer(data)
    if buffer is None:
        return faiss.deserialize_index(data)
    return index_from_buffer(buffer, resolve_device(device))


def index_from_buffer(buffer, device):
    """The IndexRQMoE of a binary file object that ``package_buffer`` accepted, on ``device``."""
    arrays, meta = load_arrays(buffer, "an IndexRQMoE file")
    return _index_from(arrays, meta, device, "<bytes>")


def clone_index(index):
    """A deep copy of an IndexRQMoE, trained or not, on the same device (or of a faiss index, with
    ``faiss.clone_index``). Search settings, encoding settings, execution and memory budget come along."""
    if isinstance(index, faiss.Index):
        return faiss.clone_index(index)
    if index.is_trained:
        buffer = io.BytesIO()
        write_index(index, buffer)
        buffer.seek(0)
        arrays, meta = load_arrays(buffer, "an IndexRQMoE file")
        clone = _index_from(arrays, meta, index.device, "<clone>")
    else:
        clone = _untrained_from(_untrained_header(index), index.device)
    clone.auto_architecture = index.auto_architecture
    return clone


# ---------------------------------------------------------------- pickle
def _untrained_header(index) -> dict:
    """An untrained index as JSON: what its constructor took (an untrained codec's weights are not kept:
    training starts them afresh)."""
    return {"format": UNTRAINED_FORMAT, "version": 1, **_settings(index), "auto_architecture": index.auto_architecture}


def _untrained_from(meta: dict, device):
    if meta.get("format") != UNTRAINED_FORMAT or meta.get("version") != 1:
        raise FileFormatError(f"not a pickled untrained IndexRQMoE (format {meta.get('format')!r})")
    try:
        index = _index_with_settings(meta, device)
        index.auto_architecture = bool(meta["auto_architecture"])
        return index
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(f"a pickled untrained IndexRQMoE is corrupted: {exc}") from None


def pickle_payload(index) -> bytes:
    """What a pickle of ``index`` holds: ``serialize_index``'s bytes, or for an untrained index the JSON
    of its settings."""
    if index.is_trained:
        buffer = io.BytesIO()
        write_index(index, buffer)
        return buffer.getvalue()
    return json.dumps(_untrained_header(index)).encode("utf-8")


def index_from_pickle(payload: bytes):
    """The index of ``pickle_payload``'s bytes (pickle's reconstructor for IndexRQMoE), on the default
    device (cuda if available), as ``read_index`` loads one. Parses the bytes with this module's reader
    only: an IndexRQMoE file or the JSON of an untrained index, nothing else."""
    from .devices import resolve_device

    if not isinstance(payload, bytes):
        raise TypeError(f"a pickled IndexRQMoE holds bytes, got {type(payload).__name__}")
    buffer = package_buffer(payload)
    if buffer is not None:
        return index_from_buffer(buffer, resolve_device(None))
    try:
        meta = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileFormatError("a pickled IndexRQMoE holds neither an IndexRQMoE file nor an untrained "
                              "index's settings") from None
    if not isinstance(meta, dict):
        raise FileFormatError("a pickled untrained IndexRQMoE is corrupted: expected a JSON object")
    return _untrained_from(meta, resolve_device(None))
