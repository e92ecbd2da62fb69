"""Writing pretrained codec files (``faiss-rqmoe pretrained export``) and listing the shipped ones
(``faiss-rqmoe pretrained list``); ``faiss_rqmoe.pretrained_codecs`` reads them."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from ..pretrained_codecs import FOLDER, FORMAT, load_file, codec_path, available, describe
from ..storage import load_arrays, save_arrays, state_to_arrays


def storage_check(index, path, name: str, x: np.ndarray) -> dict:
    """The reconstruction MSE of x (n, d) float32 with the index's own (float32) weights and with the
    ones exported to the pretrained codec file at path, on the same codes: how much the storage dtype
    moves the error."""
    from . import evaluation

    exported = load_file(Path(path), name, device="cpu")
    codes = index.sa_encode(x)
    full, stored = evaluation.mse(x, index.sa_decode(codes)), evaluation.mse(x, exported.sa_decode(codes))
    return {"n": len(x), "mse_float32": full, "mse_stored": stored, "relative_change": stored / full - 1}


def export(index, path, name: str, trained_on: str, command: str, dtype=np.float16) -> Path:
    """Write a trained IndexRQMoE's codec, centroids and lookup tables as a pretrained codec file.

    Floating weights are stored as ``dtype`` (float16 by default); buffers that set the data's scale
    stay float32. Returns the path.
    """
    if not index.is_trained:
        raise ValueError("export needs a trained index")
    state = index.model.state_dict()
    arrays = {}
    for key, value in state_to_arrays(state, "model.").items():
        keep = value.dtype.kind != "f" or key.split(".", 1)[1] in ("scale", "ctx_mean", "ctx_scale")
        arrays[key] = value if keep else value.astype(dtype)
    static = index.static_codebooks
    sample = np.random.default_rng(0).integers(0, index.config.K, (20_000, index.config.M))
    from .. import lut

    arrays.update(centroids=index.centroids.astype(np.float32), codebooks=static.astype(dtype),
                  norms=(lut.static_reconstruction(static, sample) ** 2).sum(1).astype(np.float32))
    history = index.train_history.to_dict() if index.train_history else {}
    meta = {"format": FORMAT, "name": name, "config": index.config.to_dict(), "nlist": index.nlist,
            "metric_type": int(index.metric_type), "trained_on": trained_on, "command": command,
            "exported": datetime.date.today().isoformat(), "weights_dtype": np.dtype(dtype).name,
            "val_mse": history.get("learned_val_mse"), "rq_start_val_mse": history.get("rq_val_mse"),
            "train_samples": (history.get("samples") or [0])[-1], "train_s": (history.get("time_s") or [0])[-1]}
    save_arrays(path, arrays, meta)
    return Path(path)


def main(argv=None) -> int:
    """``faiss-rqmoe pretrained list`` | ``faiss-rqmoe pretrained export INDEX --name NAME --trained-on TEXT``."""
    import argparse
    import json
    import sys

    from ..io import read_index

    parser = argparse.ArgumentParser(prog="faiss-rqmoe pretrained", description="list or export pretrained codecs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the shipped codecs and their headers")
    p = sub.add_parser("export", help="write a trained index file as a pretrained codec")
    p.add_argument("index", help="a trained index written by faiss-rqmoe train")
    p.add_argument("--name", required=True, help="the codec's name, e.g. sift-8B")
    p.add_argument("--trained-on", required=True, help="what it was trained on, in words")
    p.add_argument("--command", default="", help="the command that trained it")
    p.add_argument("--out", default=None, help=f"file to write (default: {FOLDER}/NAME.npz)")
    p.add_argument("--check-on", default=None,
                   help="a data set (e.g. wallpaper): record how much float16 storage moves the MSE of its "
                        "validation vectors (first 5 000) in the file's header")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "list":
        for name in available():
            meta = describe(name)
            size = os.path.getsize(codec_path(name)) / 2**20
            print(json.dumps({"name": name, "MiB": round(size, 2), **{k: meta.get(k) for k in (
                "config", "nlist", "trained_on", "val_mse", "rq_start_val_mse", "storage_check", "exported",
                "command")}}))
        return 0
    index = read_index(args.index, device="cpu")
    out = export(index, args.out or FOLDER / f"{args.name}.npz", args.name, args.trained_on, args.command)
    if args.check_on:
        from .datasets import load_dataset

        val = load_dataset(args.check_on, n_db=1000, n_query=100).xval[:5000]
        arrays, meta = load_arrays(out, "a pretrained codec")
        meta["storage_check"] = dict(storage_check(index, out, args.name, val), data=f"{args.check_on} validation vectors")
        meta.pop("arrays", None)
        save_arrays(out, arrays, meta)
        print(json.dumps(meta["storage_check"]))
    print(out, f"{os.path.getsize(out) / 2**20:.2f} MiB")
    return 0
