"""Pretrained codecs for SIFT-like data (128-d descriptors such as BigANN's), shipped with the package.

Each was trained on a GPU on the wallpaper SIFT set (``datasets.load_wallpaper``)
with ``faiss-rqmoe train`` and exported by ``faiss-rqmoe pretrained export``;
the file records the command, the data and the date. Weights are stored as
float16 (the decoded vectors move by less than the rounding of float16, see
``docs/experiments.md``), like the lookup tables; the IVF centroids as float32.

    index = faiss_rqmoe.pretrained("sift-ivf1024-8B")   # trained, empty: add vectors, then search
    faiss_rqmoe.pretrained_codecs.available()           # the names
    index = faiss_rqmoe.index_factory(128, "IVF1024,RQMoE8x8", pretrained="sift")

``index.train(x)`` on such an index fits only what depends on the data: the
lookup tables (and nothing else; the codec and, for IVF codecs, the
centroids come from the file).
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import List

import numpy as np
import torch

from ..config import RQMoEConfig
from ..storage import FileFormatError, load_arrays, save_arrays, state_to_arrays

FORMAT = "faiss_rqmoe.pretrained/1"
FOLDER = Path(__file__).resolve().parent


def available() -> List[str]:
    """Names of the pretrained codecs shipped with the package."""
    return sorted(p.stem for p in FOLDER.glob("*.npz"))


def _path(name: str) -> Path:
    path = FOLDER / f"{name}.npz"
    if not path.is_file():
        raise ValueError(f"no pretrained codec named {name!r}; available: {available()}")
    return path


def describe(name: str) -> dict:
    """The header of a pretrained codec: config, nlist, training data, command, date, validation MSE."""
    _, meta = load_arrays(_path(name), "a pretrained codec")
    return meta


def for_description(family: str, description: str) -> str:
    """The pretrained codec that matches a factory description, e.g. ("sift", "IVF1024,RQMoE8x8") ->
    "sift-ivf1024-8B"; ValueError listing the available ones when none matches."""
    from ..factory import parse_description

    fields, nlist, _ = parse_description(description)
    name = f"{family}-{'ivf%d-' % nlist if nlist > 1 else ''}{fields['M'] * fields['nbits'] // 8}B"
    if fields.get("nbits", 8) != 8 or name not in available():
        raise ValueError(f"no pretrained {family!r} codec for {description!r} (looked for {name!r}); "
                         f"available: {available()}")
    return name


def load(name: str, device=None, **index_options):
    """A trained, empty IndexRQMoE with the named pretrained codec (``available()`` lists the names).

    index_options: nprobe, nshort, encode_candidates, encode_beam and training
    options, as for ``index_factory``.
    """
    return _load_file(_path(name), name, device, **index_options)


def _load_file(path: Path, name: str, device=None, **index_options):
    """load() of the pretrained codec file at path, recorded as ``name``."""
    from ..factory import split_options
    from ..index import IndexRQMoE
    from .. import lut

    arrays, meta = load_arrays(path, "a pretrained codec")
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{name}: not a pretrained codec (format {meta.get('format')!r})")
    config = RQMoEConfig.from_dict(meta["config"])
    index_kwargs, train_config = split_options(index_options)
    index = IndexRQMoE(config, nlist=meta["nlist"], metric=meta["metric_type"], device=device,
                       train_config=train_config, **index_kwargs)
    state = {key[len("model."):]: torch.from_numpy(value.astype(index.model.state_dict()[key[len("model."):]]
                                                                 .cpu().numpy().dtype))
             for key, value in arrays.items() if key.startswith("model.")}
    centroids = arrays["centroids"].astype(np.float32)
    codebooks = arrays["codebooks"].astype(np.float32)
    ivf = lut.build_ivf_index(index._make_quantizer(centroids), config.d, index.nlist, codebooks, config.nbits,
                              index.metric_type, arrays["norms"].astype(np.float32))
    return index.restore(state, ivf, pretrained=name)


def storage_check(index, path, name: str, x: np.ndarray) -> dict:
    """The reconstruction MSE of x (n, d) float32 with the index's own (float32) weights and with the
    ones exported to the pretrained codec file at path, on the same codes: how much the storage dtype
    moves the error."""
    from .. import evaluation

    exported = _load_file(Path(path), name, device="cpu")
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
            size = os.path.getsize(_path(name)) / 2**20
            print(json.dumps({"name": name, "MiB": round(size, 2), **{k: meta.get(k) for k in (
                "config", "nlist", "trained_on", "val_mse", "rq_start_val_mse", "storage_check", "exported",
                "command")}}))
        return 0
    index = read_index(args.index, device="cpu")
    out = export(index, args.out or FOLDER / f"{args.name}.npz", args.name, args.trained_on, args.command)
    if args.check_on:
        from ..datasets import load_dataset

        val = load_dataset(args.check_on, n_db=1000, n_query=100).xval[:5000]
        arrays, meta = load_arrays(out, "a pretrained codec")
        meta["storage_check"] = dict(storage_check(index, out, args.name, val), data=f"{args.check_on} validation vectors")
        meta.pop("arrays", None)
        save_arrays(out, arrays, meta)
        print(json.dumps(meta["storage_check"]))
    print(out, f"{os.path.getsize(out) / 2**20:.2f} MiB")
    return 0
