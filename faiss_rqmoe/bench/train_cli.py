"""``python -m faiss_rqmoe.train`` (or ``faiss-rqmoe train``; under ``torchrun --nproc_per_node N -m
faiss_rqmoe.train`` for data-parallel training): train an index's codec on a data set and write the
trained, empty index to one file. Load it with ``faiss_rqmoe.read_index`` and ``add`` your vectors.

    python -m faiss_rqmoe.train --dataset wallpaper --description IVF1024,RQMoE8x8 --out codec.rqmoe
    torchrun --nproc_per_node 2 -m faiss_rqmoe.train --dataset wallpaper --description RQMoE8x8 --out codec.rqmoe
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import faiss
import torch

PROG = "faiss-rqmoe train"


def build_parser() -> argparse.ArgumentParser:
    from .options import add_data_options, add_train_options

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--description", required=True, help="the index's factory string, e.g. IVF1024,RQMoE8x8")
    parser.add_argument("--metric", choices=["l2", "ip"], default=None,
                        help="L2 or inner product (default: the data set's, e.g. ip for text; l2 for a vector file)")
    parser.add_argument("--out", required=True, help="file to write the trained (empty) index to")
    parser.add_argument("--encode-candidates", dest="index_encode_candidates", default="auto",
                        help="candidates a step when the index encodes added vectors ('auto', 'none' or a number)")
    parser.add_argument("--encode-beam", dest="index_encode_beam", default="auto", help="beam when the index encodes added vectors ('auto' or a number)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available; one GPU a process)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and faiss")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_options(parser)
    add_train_options(parser)
    return parser


def _number_or_word(text: str):
    return None if text == "none" else text if text == "auto" else int(text)


def main(argv=None) -> int:
    from .. import distributed
    from ..devices import resolve_device
    from ..factory import index_factory
    from ..io import write_index
    from . import evaluation
    from .datasets import load_dataset
    from .options import train_config_from_args

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    device = resolve_device(args.device)
    distributed.init_from_environment(device)
    device = distributed.device_for_rank(device)
    rank, world = distributed.rank_and_world()
    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_db", args.n_db), ("n_query", args.n_query)) if v}
    ds = load_dataset(args.dataset, gt_path=args.gt, **sizes)
    metric = evaluation.faiss_metric(args.metric or ds.metric)
    config = train_config_from_args(args, device)
    if rank != 0:
        config = config.replace(progress=False)
    index = index_factory(ds.d, args.description, metric, train_config=config, device=device,
                          encode_candidates=_number_or_word(args.index_encode_candidates),
                          encode_beam=_number_or_word(args.index_encode_beam))
    start = time.perf_counter()
    index.train(ds.xt, ds.xval)
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # write_index, like faiss's, creates no folders
        write_index(index, args.out)
        history = index.train_history.to_dict() if index.train_history else {}
        print(json.dumps({"out": args.out, "processes": world, "train_s": time.perf_counter() - start,
                          "config": index.config.to_dict(), "best_val_mse": history.get("best_val_mse"),
                          "samples": (history.get("samples") or [0])[-1]}))
    return 0
