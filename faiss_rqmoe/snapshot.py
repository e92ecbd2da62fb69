"""An IndexRQMoE as the package's file format holds it, and back: the arrays and JSON header of a trained
index, the settings of an untrained one. Functions that make an index take its class, so the index itself
can copy and pickle through them (``IndexRQMoE.__copy__``, ``__reduce__``) and ``io.py``, the public
read/write functions, builds on them. Nothing here unpickles: a header is JSON, arrays are plain numbers.
"""
from __future__ import annotations

import dataclasses
import io
import json

import faiss
import numpy as np

from .config import RQMoEConfig
from .storage import FileFormatError, arrays_to_state, is_package_file, load_arrays, save_arrays, sniff, \
    state_to_arrays
from .train import TrainConfig, TrainHistory

INDEX_FORMAT = "faiss_rqmoe.index"
INDEX_FORMAT_VERSION = 2
UNTRAINED_FORMAT = "faiss_rqmoe.untrained_index"  # the JSON that pickles and copies an untrained index
READABLE_VERSIONS = (1, 2)  # version 1 files lack the header's table of array checksums

# TrainConfig fields renamed since files were first written: {old name: new name}
RENAMED_TRAIN_OPTIONS = {"encode_candidates": "train_encode_candidates"}


def settings(index) -> dict:
    """What an index's constructor takes, and how its codec runs, as JSON (files and pickles, trained or not)."""
    return {"config": index.config.to_dict(), "nlist": index._nlist, "metric_type": int(index.metric_type),
            "hnsw_m": index.hnsw_m, "nprobe": index.nprobe, "nshort": index.nshort,
            "encode_candidates": index.encode_candidates, "encode_beam": index.encode_beam,
            "train_options": index.train_options, "execution": dataclasses.asdict(index.execution),
            "mem_budget_bytes": index.mem_budget_bytes}


def index_with_settings(cls, meta: dict, device):
    """A new, untrained index of class cls as ``settings`` describes it (KeyError, TypeError or ValueError
    where the JSON is inconsistent)."""
    train_options = dict(meta.get("train_options") or {})
    for old, new in RENAMED_TRAIN_OPTIONS.items():  # files written before the rename
        if old in train_options:
            train_options[new] = train_options.pop(old)
    index = cls(RQMoEConfig.from_dict(meta["config"]), meta["nlist"], meta["metric_type"],
                       hnsw_m=meta["hnsw_m"], nprobe=meta["nprobe"], nshort=meta["nshort"],
                       encode_candidates=meta["encode_candidates"], encode_beam=meta.get("encode_beam", 1),
                       train_config=TrainConfig.from_options(train_options), device=device)
    execution = meta.get("execution") or {}  # files written before the engine: the defaults
    return index.set_execution(kernel=execution.get("kernel"), dtype=execution.get("dtype"),
                               cuda_graphs=execution.get("cuda_graphs"),
                               mem_budget_bytes=meta.get("mem_budget_bytes"))


def arrays_and_meta(index):
    """A trained index as the file format's arrays (the codec's weights, the faiss index's bytes) and header."""
    arrays = state_to_arrays(index.model.state_dict(), "model.")
    arrays["faiss_index"] = faiss.serialize_index(index.ivf)
    meta = {"format": INDEX_FORMAT, "version": INDEX_FORMAT_VERSION, **settings(index),
            "train_history": None if index.train_history is None else index.train_history.to_dict(),
            "pretrained": index.pretrained}
    return arrays, meta


def index_from(cls, arrays, meta, device, label: str):
    """The trained index of class cls that ``arrays_and_meta`` describes, on ``device``; label names the
    source in errors."""

    if meta.get("format") != INDEX_FORMAT:
        raise FileFormatError(f"{label} is not an IndexRQMoE file (format {meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise FileFormatError(f"{label} has format version {meta.get('version')!r}; this faiss_rqmoe reads "
                              f"versions {list(READABLE_VERSIONS)}")
    try:
        history = meta.get("train_history")
        history = None if history is None else TrainHistory.from_dict(history)
        index = index_with_settings(cls, meta, device)
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(f"{label} is corrupted: its header is inconsistent: {exc}") from None
    faiss_bytes = arrays.pop("faiss_index", None)
    if faiss_bytes is None or faiss_bytes.dtype != np.uint8 or faiss_bytes.ndim != 1:
        raise FileFormatError(f"{label} is corrupted: the faiss index bytes are missing or not a uint8 array")
    try:
        state = arrays_to_state(arrays, "model.", {k: v.cpu() for k, v in index.model.state_dict().items()}, label)
        if is_package_file(io.BytesIO(faiss_bytes.tobytes())):  # a file holds no nested file of ours
            raise FileFormatError(f"{label} is corrupted: its faiss index bytes hold another IndexRQMoE file")
        ivf = faiss.deserialize_index(faiss_bytes)
    except FileFormatError:
        raise
    except (RuntimeError, TypeError, ValueError, MemoryError) as exc:
        raise FileFormatError(f"{label} is corrupted: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    return index.restore(state, ivf, history, meta.get("pretrained"), label)


def untrained_header(index) -> dict:
    """An untrained index as JSON: what its constructor took (an untrained codec's weights are not kept:
    training starts them afresh)."""
    return {"format": UNTRAINED_FORMAT, "version": 1, **settings(index), "auto_architecture": index.auto_architecture}


def untrained_from(cls, meta: dict, device):
    """The untrained index of class cls that ``untrained_header`` describes, on ``device``."""
    if meta.get("format") != UNTRAINED_FORMAT or meta.get("version") != 1:
        raise FileFormatError(f"not a pickled untrained IndexRQMoE (format {meta.get('format')!r})")
    try:
        index = index_with_settings(cls, meta, device)
        index.auto_architecture = bool(meta["auto_architecture"])
        return index
    except (KeyError, TypeError, ValueError) as exc:
        raise FileFormatError(f"a pickled untrained IndexRQMoE is corrupted: {exc}") from None


def payload(index) -> bytes:
    """What a pickle of ``index`` holds: the bytes of its file, or for an untrained index the JSON
    of its settings."""
    if index.is_trained:
        buffer = io.BytesIO()
        save_arrays(buffer, *arrays_and_meta(index))
        return buffer.getvalue()
    return json.dumps(untrained_header(index)).encode("utf-8")


def from_payload(cls, payload: bytes, device):
    """The index of class cls that ``payload``'s bytes hold, on ``device``. Parses them with this module's
    reader only: an IndexRQMoE file or the JSON of an untrained index, nothing else."""
    if not isinstance(payload, bytes):
        raise TypeError(f"a pickled IndexRQMoE holds bytes, got {type(payload).__name__}")
    buffer = package_buffer(payload)
    if buffer is not None:
        return index_from(cls, *load_arrays(buffer, "an IndexRQMoE file"), device, "<bytes>")
    try:
        meta = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FileFormatError("a pickled IndexRQMoE holds neither an IndexRQMoE file nor an untrained "
                              "index's settings") from None
    if not isinstance(meta, dict):
        raise FileFormatError("a pickled untrained IndexRQMoE is corrupted: expected a JSON object")
    return untrained_from(cls, meta, device)


def clone(index):
    """A deep copy of an IndexRQMoE, trained or not, on the same device, through the file format: search
    settings, encoding settings, execution and memory budget come along."""
    cls = type(index)
    if index.is_trained:
        buffer = io.BytesIO(payload(index))
        copy = index_from(cls, *load_arrays(buffer, "an IndexRQMoE file"), index.device, "<clone>")
    else:
        copy = untrained_from(cls, untrained_header(index), index.device)
    copy.auto_architecture = index.auto_architecture
    return copy


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
