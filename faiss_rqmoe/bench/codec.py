"""``bench codec``: every codec on the same split, at the same code sizes.

Static codecs (faiss PQ, OPQ, RQ beam 1 and 32, LSQ, RaBitQ, TurboQuant) are
trained and measured on the CPU; our learned codecs (RQ-MoE, QINCo-style, RQ
trained by SGD) train with the run's ``TrainConfig`` on the run's device.
Rows: MSE, recall@1/10/100 of exhaustive search over the reconstructions,
training time, encode and decode vectors a second.
"""
from __future__ import annotations

import json
import logging
import time
from typing import List, Optional

import numpy as np
import torch

from . import baselines, datasets, evaluation
from ..config import Condition, RQMoEConfig
from ..devices import resolve_device
from ..engine import Engine, Execution
from ..model import RQMoE
from ..train import train_rqmoe
from .meta import dataset_meta, load_split, run_meta, timed, write_result
from .options import train_config_from_args

logger = logging.getLogger("faiss_rqmoe.bench")

DECODE_BATCHES = (1024, 100_000)
LEARNED_KEYS = ("rqmoe", "qinco", "rq-sgd")


def quality(ds: datasets.Dataset, recon: np.ndarray) -> dict:
    """MSE on the database and recall of exhaustive search over its reconstructions."""
    _, I = evaluation.knn_search_exhaustive(recon, ds.xq, 100, ds.metric)
    row = {"mse": evaluation.mse(ds.xb, recon)}
    row.update(evaluation.recall_at(I, ds.gt, ks=(1, 10, 100)))
    return row


def static_row(codec, ds: datasets.Dataset, train_max: Optional[int] = None) -> dict:
    """Train a static (faiss / data-oblivious) codec on (the first train_max of) ds.xt and measure it."""
    xt = ds.xt if train_max is None else ds.xt[:train_max]
    start = time.perf_counter()
    codec.train(xt)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    codes = codec.encode(ds.xb)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    recon = codec.decode(codes)
    decode_s = time.perf_counter() - start
    row = {"method": codec.name, "bytes": float(codec.bytes_per_vector), "train_s": train_s, "train_n": len(xt),
           "encode_vps": len(ds.xb) / encode_s, "decode_vps": len(ds.xb) / decode_s}
    row.update(quality(ds, recon))
    if getattr(codec, "native_search", False):
        native = evaluation.recall_at(codec.search(ds.xb, ds.xq, 100), ds.gt, ks=(1, 10, 100))
        row.update({f"{key} (own search)": value for key, value in native.items()})
    return row


def mse_per_step(model: RQMoE, x: np.ndarray, codes: torch.Tensor) -> List[float]:
    """MSE of the partial reconstruction after each step: x (n, d), codes (n, M) -> M floats."""
    with torch.inference_mode():
        partial = torch.cumsum(model.decode_steps(codes), dim=1) * model.scale  # (n, M, d)
        err = torch.from_numpy(x).to(partial.device).unsqueeze(1) - partial
        return [float(v) for v in (err * err).sum(-1).mean(0).cpu()]


def learned_row(key: str, ds: datasets.Dataset, n_bytes: int, args, device: torch.device):
    """Train one of our learned codecs with the run's TrainConfig and measure it. Returns (row, extras)."""
    mode = Condition.parse(key)
    config = RQMoEConfig(ds.d, n_bytes, 8, condition=mode, n_experts=args.n_experts, n_layers=args.n_layers,
                         hidden=args.hidden, routing=args.routing,
                         instr_dim=args.instr_dim if mode is Condition.INSTRUCTION else None)
    torch.manual_seed(args.seed)
    # training encodes its batches with the run's kernel choice (and its precision under --encode-precision model)
    execution = Execution(kernel=args.kernel, dtype=args.precision)
    model = RQMoE(config)
    train_config = train_config_from_args(args, device)
    start = time.perf_counter()
    history = train_rqmoe(model, ds.xt, ds.xval, train_config, execution=execution)
    train_s = time.perf_counter() - start
    model.to(device)
    model = Engine(model, execution, mem_budget_bytes=args.mem_budget_gib << 30)
    candidates, beam = args.encode_candidates, args.encode_beam
    model.encode(ds.xb[:4096], candidates, beam)  # warm-up
    codes, encode_s = timed(lambda: model.encode(ds.xb, candidates, beam), device, warmup=False)
    recon = model.decode(codes)
    name = mode.display_name + ("" if config.routing == "dense" else f" {config.routing}")
    row = {"method": name, "bytes": float(config.code_size), "train_s": train_s,
           "encode_vps": len(ds.xb) / encode_s, "encode_candidates": candidates, "encode_beam": beam,
           "config": config.to_dict(), "train_config": train_config.to_dict(non_default_only=True),
           "epochs": len(history.epoch), "samples": history.samples[-1] if history.samples else 0,
           "stop_reason": history.stop_reason, "best_val_mse": history.best_val_mse,
           "init_val_mse": history.init_val_mse}
    for bs in DECODE_BATCHES:
        batch = codes[:bs]
        _, par_s = timed(lambda: model.decode(batch), device, repeats=5)
        _, seq_s = timed(lambda: model.model.decode_sequential(batch), device, repeats=5)
        row[f"decode_vps_bs{bs}"] = len(batch) / par_s
        row[f"decode_seq_vps_bs{bs}"] = len(batch) / seq_s
    row["decode_vps"] = row[f"decode_vps_bs{DECODE_BATCHES[-1]}"]
    if args.exact_sample > 0:
        sample = ds.xb[:args.exact_sample]
        for name, codes_sample in (("exact", lambda: model.encode(sample)),
                                   ("greedy", lambda: model.encode(sample, candidates))):
            row[f"mse_{name}_encode_sample"] = evaluation.mse(sample, model.decode(codes_sample()).cpu().numpy())
        row["mse_run_encode_sample"] = evaluation.mse(sample, recon[:args.exact_sample].cpu().numpy())
    row.update(quality(ds, recon.cpu().numpy()))
    extras = {"history": history.to_dict(), "mse_per_step": mse_per_step(model.model, ds.xb[:20_000], codes[:20_000])}
    return row, extras


def pretrained_row(name: str, ds: datasets.Dataset, args, device: torch.device) -> tuple:
    """A shipped flat codec (e.g. sift-8B) measured on this split as it is: no training. Returns (row, extras)."""
    from ..pretrained_codecs import load

    index = load(name, device=device)
    if index.nlist != 1:
        raise ValueError(f"bench codec measures flat codecs; {name} is an IVF codec (use bench search --pretrained)")
    model = Engine(index.model, Execution(kernel=args.kernel, dtype=args.precision))
    candidates, beam = args.encode_candidates, args.encode_beam
    codes, encode_s = timed(lambda: model.encode(ds.xb, candidates, beam), device, warmup=False)
    recon, decode_s = timed(lambda: model.decode(codes), device)
    row = {"method": f"pretrained {name}", "bytes": float(index.config.code_size), "train_s": 0.0,
           "encode_vps": len(ds.xb) / encode_s, "decode_vps": len(ds.xb) / decode_s, "config": index.config.to_dict(),
           "encode_candidates": candidates, "encode_beam": beam}
    row.update(quality(ds, recon.cpu().numpy()))
    return row, {"mse_per_step": mse_per_step(index.model, ds.xb[:20_000], codes[:20_000])}


def run_codec(args) -> dict:
    """The codec table: every requested method at every requested code size."""
    device = resolve_device(args.device)
    ds = load_split(args)
    result = {"kind": "codec", "meta": run_meta(args.argv, device), "dataset": dataset_meta(ds), "rows": [],
              "extras": {}}
    for n_bytes in args.bytes:
        static = {codec.key: codec for codec in baselines.make_baselines(ds.d, n_bytes)}
        for key in args.methods:
            if key.startswith("pretrained:"):
                name = key.split(":", 1)[1]
                if int(name.rsplit("-", 1)[-1].rstrip("B")) != n_bytes:
                    continue
                row, extras = pretrained_row(name, ds, args, device)
                result["extras"][f"{row['method']}@{n_bytes}"] = extras
            elif key in LEARNED_KEYS:
                logger.info("%d bytes: training %s", n_bytes, Condition.parse(key).display_name)
                row, extras = learned_row(key, ds, n_bytes, args, device)
                result["extras"][f"{row['method']}@{n_bytes}"] = extras
            elif key in static:
                logger.info("%d bytes: %s", n_bytes, static[key].name)
                row = static_row(static[key], ds, args.static_train_max)
            else:
                continue  # e.g. RaBitQ exists only at 1 bit a dimension
            row["code_bytes"] = n_bytes
            result["rows"].append(row)
            logger.info("%s", json.dumps(row))
            write_result(result, args.out)
    return result
