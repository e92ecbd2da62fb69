"""``python -m faiss_rqmoe demo`` (or ``faiss-rqmoe demo``): train, fill, search and save an IVF RQ-MoE
index on the built-in real SIFT set, next to faiss IVF-RQ and IVF-PQ at the same code size.

``--quick`` runs in under a minute on 2 CPU cores on a small split; the default run takes a few
minutes on 2 cores and less on a GPU. The figures of a quick run say that the pipeline works, not
how good the codec is: training gets seconds (see the benchmark, ``python -m faiss_rqmoe.bench``).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

from ._openmp import rerun_with_passive_openmp

# (n_train, n_val, n_db, n_query, nlist, architecture, training seconds, encode candidates,
#  vectors the LUT stage is fitted on)
SIZES = {
    "quick": (5_000, 1_000, 10_000, 200, 32, "N2L1H32", 8, 8, 5_000),
    "full": (40_000, 5_000, 100_000, 1_000, 256, "N2L1H128", 120, 16, 20_000),
}
TABLE_HEADER = f"{'index':<16}{'bytes':>6}{'MSE':>11}{'R@1':>8}{'R@10':>8}{'queries/s':>11}{'build s':>9}"
# faiss's k-means prints this (from C++) whenever it gets fewer than 39 vectors a centroid; the quick
# split trains 256-codeword steps on 5 000 vectors on purpose, so the demo keeps it off the screen
_FAISS_FEW_POINTS = re.compile(rb"WARNING clustering \d+ points to \d+ centroids: please provide at least "
                               rb"\d+ training points\n")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _missing_dependency(exc: ImportError) -> int:
    return _fail(f"{exc}\nThe demo needs the package's data extras: pip install -e \".[data]\" "
                 f"(or pip install \"faiss_rqmoe[data]\")")


@contextlib.contextmanager
def _drop_from_stderr(pattern: re.Pattern):
    """Pass everything written to file descriptor 2 (C++ included) through, except ``pattern``."""
    if os.name != "posix":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                chunk = pattern.sub(b"", chunk)
                if chunk:
                    os.write(saved, chunk)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the reader sees EOF
        reader.join(timeout=5)
        os.close(saved)


@contextlib.contextmanager
def _step(what: str):
    """Print what a long step does, then how long it took."""
    print(f"- {what} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)


def _timed_search(search, xq):
    """(I, queries a second) of search(xq) after a small warm-up."""
    search(xq[:10])
    start = time.perf_counter()
    I = search(xq)
    return I, len(xq) / (time.perf_counter() - start)


def demo(args) -> int:
    """Run the demo; returns a process exit code."""
    try:
        import faiss
        import torch
        from tqdm.auto import tqdm

        import faiss_rqmoe
        from faiss_rqmoe import datasets, evaluation
        from faiss_rqmoe.devices import resolve_device
    except ImportError as exc:
        return _missing_dependency(exc)

    if args.bytes < 1:
        return _fail(f"--bytes must be >= 1, got {args.bytes}")
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        return _fail(f"--device {args.device}: {exc}")
    mode = "quick" if args.quick else "full"
    n_train, n_val, n_db, n_query, nlist, arch, budget_s, candidates, lut_train_max = SIZES[mode]
    if args.time_budget_s is not None:
        budget_s = args.time_budget_s

    with _step("loading the built-in SIFT set (built and cached on first use)"):
        try:
            ds = datasets.load_small(n_train=n_train, n_val=n_val, n_db=n_db, n_query=n_query)
        except ImportError as exc:
            return _missing_dependency(exc)
    d, n_bytes = ds.d, args.bytes
    description = f"IVF{nlist},RQMoE{n_bytes}x8_{arch}_centroid"  # codec conditioned on the IVF centroid
    print(f"  {ds.name}: {len(ds.xt)} train, {len(ds.xb)} database, {len(ds.xq)} queries, d={d}")

    rows = []
    beam = 4 if device.type == "cuda" else 1  # beam-search encoding: cheap on a GPU, 4x the cost on a CPU
    index = faiss_rqmoe.index_factory(d, description, device=device, time_budget_s=budget_s, max_epochs=1000,
                                      batch_size=512, encode_candidates=candidates, encode_beam=beam,
                                      lut_train_max=lut_train_max)
    with _drop_from_stderr(_FAISS_FEW_POINTS):
        start = time.perf_counter()
        with _step(f"training faiss_rqmoe.index_factory({d}, {description!r}) on {device} "
                   f"({budget_s:g} s of codec training)"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                index.train(ds.xt, ds.xval)
            for warning in caught:  # e.g. a quick run's training too short to beat its RQ start
                print(f"  note: {warning.message}", flush=True)
        with _step(f"adding {len(ds.xb)} vectors"):
            index.add(ds.xb)
        build_s = time.perf_counter() - start
        nprobe = max(1, nlist // 8)
        index.nprobe, index.nshort = nprobe, 50
        with _step(f"searching {len(ds.xq)} queries and measuring the reconstruction error"):
            I, qps = _timed_search(lambda xq: index.search(xq, 10)[1], ds.xq)
            mse = evaluation.mse(ds.xb, index.reconstruct_n())
        rows.append(("IVF-RQ-MoE", index.sa_code_size() - index.ivf.coarse_code_size(), mse, I, qps, build_s))

        print("- faiss baselines at the same code size, trained on the same vectors:", flush=True)
        baselines = [(f"IVF-RQ{n_bytes}x8", f"IVF{nlist},RQ{n_bytes}x8_Nqint8")]
        if d % n_bytes == 0:
            baselines.append((f"IVF-PQ{n_bytes}x8", f"IVF{nlist},PQ{n_bytes}x8np"))
        else:
            print(f"  (no IVF-PQ baseline: PQ needs d={d} to be a multiple of --bytes={n_bytes})")
        for name, factory in tqdm(baselines, desc="faiss baselines", unit="index"):
            ref = faiss.index_factory(d, factory)
            ivf = faiss.downcast_index(faiss.extract_index_ivf(ref))
            if isinstance(ivf, faiss.IndexIVFResidualQuantizer):
                # plain k-means a step: 6x faster than faiss's default progressive-dimension
                # training here, and no worse (lower MSE on this set)
                ivf.rq.train_type = faiss.ResidualQuantizer.Train_default
            start = time.perf_counter()
            ref.train(ds.xt)
            ref.add(ds.xb)
            ref_build_s = time.perf_counter() - start
            ivf.nprobe = nprobe
            I, qps = _timed_search(lambda xq: ref.search(xq, 10)[1], ds.xq)
            mse = evaluation.mse(ds.xb, ivf.reconstruct_n(0, ivf.ntotal))
            rows.append((name, ivf.code_size, mse, I, qps, ref_build_s))

    print(f"\n{mode} run: nprobe={nprobe} of nlist={nlist}, k=10; IVF-RQ-MoE re-ranks a shortlist of "
          f"nshort={index.nshort}; torch threads={torch.get_num_threads()}, codec on {index.device}")
    print("bytes: code bytes a vector (IVF-RQ and IVF-RQ-MoE include 1 byte of norm); MSE: mean squared "
          "reconstruction error\nof the database; R@k: share of queries whose true nearest neighbour is in "
          "the top k.")
    print(TABLE_HEADER)
    for name, code_bytes, mse, I, qps, seconds in rows:
        recall = evaluation.recall_at(I, ds.gt, ks=(1, 10))
        print(f"{name:<16}{code_bytes:>6}{mse:>11.5g}{recall['R@1']:>8.3f}{recall['R@10']:>8.3f}"
              f"{qps:>11.0f}{seconds:>9.1f}")
    if args.quick:
        print("(quick run: seconds of training on a small split; the default run and the benchmark "
              "train for longer)")

    out = Path(args.out)
    faiss_rqmoe.write_index(index, out)
    print(f"\nsaved to {out} ({out.stat().st_size / 1e6:.1f} MB). Load it with:\n"
          f"    import faiss_rqmoe\n    index = faiss_rqmoe.read_index({str(out)!r})\n"
          f"    D, I = index.search(xq, 10)   # xq: (nq, {d}) float32 numpy array or torch tensor")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m faiss_rqmoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train and search an IVF RQ-MoE index on the built-in SIFT set",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a sub-minute run on a smaller split")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--bytes", type=int, default=8, help="code bytes a vector, one 8-bit step a byte (default 8)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="seconds of codec training (default: 8 with --quick, 120 otherwise)")
    p.add_argument("--out", default="demo_index.rqmoe", help="where to save the index (default demo_index.rqmoe)")
    return parser


def main(argv=None) -> int:
    """Command-line entry point (``python -m faiss_rqmoe``, console script ``faiss-rqmoe``)."""
    from_command_line = argv is None
    argv = sys.argv[1:] if from_command_line else list(argv)
    args = build_parser().parse_args(argv)
    if from_command_line and args.command == "demo":
        rerun_with_passive_openmp("faiss_rqmoe", argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
