"""One-file storage without pickle: named arrays plus a JSON header in an .npz.

Loading uses ``np.load(allow_pickle=False)``: object arrays are refused, so
a crafted file can at worst fail to load, never run code. Index files and
training checkpoints are both written with ``save_arrays``.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

_META_KEY = "__meta_json__"


def save_arrays(path, arrays: Dict[str, np.ndarray], meta: dict) -> None:
    """Write numeric arrays and a JSON-serialisable ``meta`` dict to one file, atomically.

    arrays: name -> numpy array of a numeric dtype (no objects).
    The file is first written beside ``path`` and then renamed over it, so an
    interrupted write never leaves a half file under the final name.
    """
    path = Path(path)
    payload = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype == object:
            raise TypeError(f"array {name!r} has dtype object; only numeric arrays can be stored")
        payload[name] = array
    payload[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_arrays(path) -> Tuple[Dict[str, np.ndarray], dict]:
    """Read a file written by ``save_arrays``: returns (arrays, meta).

    Raises FileNotFoundError for a missing file and ValueError for a file
    that is truncated, corrupted or not in this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable faiss_rqmoe file (truncated or corrupted?): {exc}") from exc
    if _META_KEY not in arrays:
        raise ValueError(f"{path} has no faiss_rqmoe header; it was not written by faiss_rqmoe")
    try:
        meta = json.loads(arrays.pop(_META_KEY).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has a corrupted header: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path} has a corrupted header: expected a JSON object")
    return arrays, meta


INDEX_FORMAT = "faiss_rqmoe.index"
INDEX_FORMAT_VERSION = 1


def write_index(index, path) -> None:
    """Save an IndexRQMoE to one file: faiss index bytes, codec weights and a JSON header.

    No pickle: the file is an .npz of numeric arrays plus JSON.
    """
    import faiss
    import torch

    from .index import IndexRQMoE

    if not isinstance(index, IndexRQMoE):
        raise TypeError(f"write_index expects an IndexRQMoE, got {type(index).__name__}; "
                        "use faiss.write_index for faiss indexes")
    if not index.is_trained:
        raise ValueError("cannot write an untrained IndexRQMoE: train it first")
    arrays = {f"model.{k}": v.detach().cpu().numpy() for k, v in index.model.state_dict().items()}
    arrays["faiss_index"] = faiss.serialize_index(index.ivf)
    train_options = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in index.train_options.items()}
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_FORMAT_VERSION,
        "config": index.config.to_dict(),
        "nlist": index.nlist,
        "metric_type": int(index.metric_type),
        "hnsw_m": index.hnsw_m,
        "nprobe": index.nprobe,
        "nshort": index.nshort,
        "encode_candidates": index.encode_candidates,
        "encode_beam": index.encode_beam,
        "train_options": train_options,
        "train_history": None if index.train_history is None else index.train_history.to_dict(),
    }
    save_arrays(path, arrays, meta)


def read_index(path, device=None):
    """Load an IndexRQMoE written by ``write_index``; never executes code from the file.

    device: where the codec runs (None: cuda if available). Raises
    FileNotFoundError for a missing file and ValueError for a corrupted,
    truncated or foreign file.
    """
    import faiss
    import torch

    from .index import IndexRQMoE
    from .model import RQMoEConfig
    from .train import TrainHistory

    arrays, meta = load_arrays(path)
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not an IndexRQMoE file (format {meta.get('format')!r})")
    if meta.get("version") != INDEX_FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('version')!r}; this faiss_rqmoe reads "
                         f"version {INDEX_FORMAT_VERSION}")
    try:
        config = RQMoEConfig.from_dict(meta["config"])
        index = IndexRQMoE(config, nlist=meta["nlist"], metric=meta["metric_type"], hnsw_m=meta["hnsw_m"],
                           nprobe=meta["nprobe"], nshort=meta["nshort"],
                           encode_candidates=meta["encode_candidates"],
                           encode_beam=meta.get("encode_beam", 1), device=device,
                           train_options=meta["train_options"])
        state = {k[len("model."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")}
        index.model.load_state_dict(state, strict=True)
        ivf = faiss.deserialize_index(arrays["faiss_index"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path} is corrupted: {exc}") from exc
    if not isinstance(ivf, faiss.IndexIVFResidualQuantizer) or ivf.d != config.d:
        raise ValueError(f"{path} is corrupted: its faiss part is {type(ivf).__name__} with d={ivf.d}")
    index.ivf = ivf
    index.centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    ivf.nprobe = index.nprobe
    if meta.get("train_history") is not None:
        index.train_history = TrainHistory(**meta["train_history"])
    return index
