"""What every benchmark run records about itself, shared timing helpers, and result files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Optional, Sequence

import faiss
import numpy as np
import torch

from . import datasets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1, warmup: bool = True):
    """Run fn once to warm up (unless warmup=False), then ``repeats`` times: (last result, seconds a run)."""
    if warmup:
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    sync(device)
    return result, (time.perf_counter() - start) / repeats


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_meta(argv: Sequence[str], device: torch.device) -> dict:
    """Who/what/where/when of a run: the command that re-runs it, date, device, threads, versions."""
    return {
        "command": "python -m faiss_rqmoe.bench " + shlex.join(argv),  # quoted: it re-runs as it is
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }


def load_split(args) -> datasets.Dataset:
    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_db", args.n_db), ("n_query", args.n_query))
             if v is not None}
    return datasets.load_dataset(args.dataset, gt_path=args.gt, **sizes)


def dataset_meta(ds: datasets.Dataset) -> dict:
    return {"name": ds.name, "d": ds.d, "n_train": len(ds.xt), "n_val": len(ds.xval), "n_db": len(ds.xb),
            "n_query": len(ds.xq), "metric": ds.metric}

def write_result(result: dict, out: Optional[str]) -> None:
    """Write a result as JSON (atomically: a half-written file never replaces a whole one)."""
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
