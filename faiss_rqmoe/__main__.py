"""The command line: faiss-rqmoe (or python -m faiss_rqmoe) demo | data | bench | train | pretrained."""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from ._openmp import rerun_with_passive_openmp

PROG = "faiss-rqmoe"
DESCRIPTION = """\
RQ-MoE (Residual Quantization via Mixture of Experts) as a drop-in FAISS index.

  faiss-rqmoe demo --quick        a pretrained SIFT codec against faiss IVF-RQ and IVF-PQ (about a minute on 2 cores)
  faiss-rqmoe demo                the same, training the codec from scratch (a few minutes)
  faiss-rqmoe data NAME           build (once, offline) and cache a data set: default, wallpaper, text
  faiss-rqmoe bench JOB ...       the benchmark: codec, search, speed, build, report, merge, plot
  faiss-rqmoe train ...           train an index's codec on a data set and save it (torchrun-ready)
  faiss-rqmoe pretrained list     the pretrained codecs shipped with the package
"""
DEMO_DESCRIPTION = """\
Build an IVF RQ-MoE index on the built-in real SIFT set (scikit-image's photos, built and cached on first use),
add the database, search, and print a table against faiss IVF-RQ and IVF-PQ at the same code size and the same
coarse quantizer (so the table compares the codecs), then save the index and show how to load it.
--quick starts from the pretrained SIFT codec (trained on another SIFT set, the Debian wallpapers) and fits
only the lookup tables to this data; without it the codec trains from scratch with the default settings.
"""
# split sizes: (n_train, n_val, n_db, n_query)
QUICK_SPLIT = (20_000, 2_000, 20_000, 2_000)  # 2 000 queries: recall@1 within about ±0.01
FULL_SPLIT = (100_000, 5_000, 100_000, 1_000)
FULL_NLIST = 256
NPROBE = 16
TABLE_HEADER = f"{'index':<34}{'bytes':>6}{'MSE':>10}{'R@1':>8}{'R@10':>8}{'queries/s':>11}{'build s':>9}"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _missing_dependency(exc: ImportError) -> int:
    return _fail(f"{exc}\nThe demo needs the package's data extras: pip install -e \".[data]\" "
                 f"(or pip install \"faiss_rqmoe[data]\")")


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
        import torch

        import faiss_rqmoe
        from faiss_rqmoe.bench import baselines, datasets, evaluation
        from faiss_rqmoe.devices import resolve_device
    except ImportError as exc:
        return _missing_dependency(exc)
    if args.bytes not in (8, 16):
        return _fail(f"--bytes must be 8 or 16 (the pretrained codecs' sizes), got {args.bytes}")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        return _fail(f"--device {args.device}: {exc}")
    n_train, n_val, n_db, n_query = QUICK_SPLIT if args.quick else FULL_SPLIT
    print(f"data cache: {datasets.cache_dir()} (set FAISS_RQMOE_CACHE to move it)")
    with _step("loading the built-in SIFT set (built and cached on first use: about a minute)"):
        try:
            ds = datasets.load_small(n_train=n_train, n_val=n_val, n_db=n_db, n_query=n_query)
        except ImportError as exc:
            return _missing_dependency(exc)
    d, n_bytes = ds.d, args.bytes
    print(f"  {ds.name}: {len(ds.xt)} train, {len(ds.xb)} database, {len(ds.xq)} queries, d={d}")

    start = time.perf_counter()
    if args.quick:
        name = f"sift-ivf1024-{n_bytes}B"
        index = faiss_rqmoe.pretrained(name, device=device, lut_train_max=5_000)
        what = f"faiss_rqmoe.pretrained({name!r}): fitting its lookup tables to 5 000 of these vectors"
        label = "IVF-RQ-MoE (pretrained)"
    else:
        description = f"IVF{FULL_NLIST},RQMoE{n_bytes}x8"
        options = {} if args.time_budget_s is None else {"time_budget_s": args.time_budget_s}
        index = faiss_rqmoe.index_factory(d, description, device=device, **options)
        what = f"faiss_rqmoe.index_factory({d}, {description!r}) with the default settings, trained on {device}"
        label = "IVF-RQ-MoE (trained here)"
    with _step(what):
        index.train(ds.xt, ds.xval)
    with _step(f"adding {len(ds.xb)} vectors"):
        index.add(ds.xb)
    build_s = time.perf_counter() - start
    rows = []
    with _step(f"searching {len(ds.xq)} queries and measuring the reconstruction error"):
        mse = evaluation.mse(ds.xb, index.reconstruct_n())
        for nshort in (50, 10):
            I, qps = _timed_search(lambda xq: index.search(xq, 10, {"nprobe": NPROBE, "nshort": nshort})[1], ds.xq)
            rows.append((f"{label}, nshort {nshort}", index.code_size, mse, I, qps, build_s))

    print("- faiss at the same code size, over the same coarse centroids, trained on the same vectors:", flush=True)
    for name, description in baselines.ivf_baselines(d, index.nlist, n_bytes, refine=False):
        ref = baselines.build_ivf_baseline(description, d, centroids=index.centroids)
        start = time.perf_counter()
        ref.train(ds.xt)
        ref.add(ds.xb)
        ref_build_s = time.perf_counter() - start
        ivf = baselines.ivf_part(ref)
        ivf.nprobe = NPROBE
        I, qps = _timed_search(lambda xq: ref.search(xq, 10)[1], ds.xq)
        ref_mse = evaluation.mse(ds.xb, ref.reconstruct_n(0, ref.ntotal))
        rows.append((f"faiss {name}", ivf.code_size, ref_mse, I, qps, ref_build_s))
        print(f"  faiss {description} built in {ref_build_s:.1f} s", flush=True)

    print(f"\n{'quick' if args.quick else 'full'} run: IVF{index.nlist}, nprobe={NPROBE}, k=10; IVF-RQ-MoE re-ranks "
          f"nshort candidates with its decoder; torch threads={torch.get_num_threads()}, codec on {index.device}")
    print("bytes: stored a vector (IVF-RQ and IVF-RQ-MoE: codes + 1 byte of norm); MSE: mean squared reconstruction "
          "error of the database;\nR@k: share of queries whose true nearest neighbour is in the top k.")
    print(TABLE_HEADER)
    recalls = {}
    for name, code_bytes, row_mse, I, qps, seconds in rows:
        recall = evaluation.recall_at(I, ds.gt, ks=(1, 10))
        recalls[name] = (row_mse, recall["R@1"], qps)
        print(f"{name:<34}{code_bytes:>6}{row_mse:>10.5g}{recall['R@1']:>8.3f}{recall['R@10']:>8.3f}"
              f"{qps:>11.0f}{seconds:>9.1f}")
    ours, rq = recalls[rows[0][0]], recalls[f"faiss IVF-RQ{n_bytes}x8"]
    print(f"\nIVF-RQ-MoE against faiss IVF-RQ{n_bytes}x8: MSE {ours[0] / rq[0]:.2f}x, recall@1 {ours[1] - rq[1]:+.3f} "
          f"(nshort 50); at nshort 10 it runs {recalls[rows[1][0]][2] / rq[2]:.1f}x faiss's queries/s with recall@1 "
          f"{recalls[rows[1][0]][1] - rq[1]:+.3f}.")

    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "faiss_rqmoe_demo" / "demo_index.rqmoe"
    out.parent.mkdir(parents=True, exist_ok=True)  # write_index, like faiss's, creates no folders
    faiss_rqmoe.write_index(index, out)
    print(f"\nsaved to {out.resolve()} ({out.stat().st_size / 1e6:.1f} MB). Load it with:\n"
          f"    import faiss_rqmoe\n    index = faiss_rqmoe.read_index({str(out.resolve())!r})\n"
          f"    D, I = index.search(xq, 10)   # xq: (nq, {d}) float32 numpy array or torch tensor")
    return 0


DATA_SETS = {  # name: (what it is, the extra or packages its build needs)
    "default": ("SIFT on the photos scikit-image ships (about a minute)", 'pip install -e ".[data]"'),
    "wallpaper": ("SIFT on Debian's wallpaper packages (about 20 minutes on 2 cores)",
                  'pip install -e ".[data]" and the wallpaper packages its error message names'),
    "text": ("all-MiniLM-L6-v2 embeddings of Debian package descriptions and manual pages (1-2 hours on 2 cores)",
             'pip install -e ".[text]" and the manual-page packages its error message names'),
}


def build_data(args) -> int:
    """faiss-rqmoe data NAME: build the data set NAME into the cache (or find it there) and describe it."""
    import json
    import logging

    import numpy as np

    from .bench import datasets, textset

    logging.getLogger("faiss_rqmoe").setLevel(logging.INFO)

    sizes = {"n_train": args.n_train, "n_val": args.n_val, "n_db": args.n_db, "n_query": args.n_query}
    if args.export is None and (args.float16 or any(n is not None for n in sizes.values())):
        return _fail("--n-train, --n-val, --n-db, --n-query and --float16 describe an export: "
                     "add --export FILE.npz")
    if args.export is not None and not args.export.endswith(".npz"):
        return _fail(f"--export {args.export}: the file name must end in .npz")
    what, needs = DATA_SETS[args.name]
    build, cache_name = {"default": (datasets.default_descriptors, datasets.DEFAULT_NAME),
                         "wallpaper": (datasets.wallpaper_descriptors, datasets.WALLPAPER_NAME),
                         "text": (textset.text_embeddings, textset.TEXT_NAME)}[args.name]
    print(f"{args.name}: {what}; cache: {datasets.cache_dir()}", flush=True)
    try:
        data, info = build(progress=True), datasets.build_info(cache_name)
    except ImportError as exc:
        return _fail(f"{exc}\nbuilding the {args.name} set needs: {needs}")
    print(f"{args.name}: {data.shape[0]} vectors of {data.shape[1]} dimensions, {data.dtype}"
          + (f", built in {info['build_s']:.0f} s" if info and "build_s" in info else ""))
    if args.export is None:
        return 0
    try:
        ds = datasets.load_dataset(args.name, **{key: n for key, n in sizes.items() if n is not None})
        path = datasets.export_split(ds, args.export, float16=args.float16)
        with np.load(path, allow_pickle=False) as npz:  # the small meta member only, not the rows
            stored = json.loads(str(npz["meta"]))["dtype"]
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"--export {args.export}: {exc}")
    print(f"{args.name}: split of {len(ds.xt)} train / {len(ds.xval)} validation / {len(ds.xb)} database / "
          f"{len(ds.xq)} queries written to {path} as {stored} ({path.stat().st_size / 1e6:.1f} MB); "
          f"read it with --dataset {path}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faiss_rqmoe")
    except PackageNotFoundError:
        from . import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="an IVF RQ-MoE index on the built-in SIFT set against faiss, in one table",
                       description=DEMO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="start from the pretrained SIFT codec (about a minute on 2 CPU cores)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--bytes", type=int, default=8, help="code bytes a vector: 8 or 16 (default 8)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="seconds of codec training without --quick (default: the library's, 30 s on a CPU)")
    p.add_argument("--out", default=None,
                   help="where to save the index (default: a faiss_rqmoe_demo folder in the temporary directory)")
    p = sub.add_parser("data", help="build and cache a data set (default, wallpaper, text)",
                       description="Build a data set offline, once, into the cache (FAISS_RQMOE_CACHE, default "
                                   "~/.cache/faiss_rqmoe); the benchmark's --dataset NAME then loads it. "
                                   "Already built: prints its size.")
    p.add_argument("name", choices=sorted(DATA_SETS), help="which set")
    p.add_argument("--export", default=None, metavar="FILE.npz",
                   help="also write a split of it to one .npz file (e.g. to carry it to another machine), "
                        "which --dataset FILE.npz reads")
    for part in ("train", "val", "db", "query"):
        p.add_argument(f"--n-{part}", type=int, default=None,
                       help=f"with --export: {part} vectors (default: the split's)")
    p.add_argument("--float16", action="store_true",
                   help="with --export: store a float set as float16 (half the size, 11 significant bits; "
                        "the ground truth is recomputed on the rounded rows)")
    for name, helptext in (("bench", "the benchmark (faiss-rqmoe bench --help)"),
                           ("train", "train an index's codec and save it (faiss-rqmoe train --help)"),
                           ("pretrained", "list or export pretrained codecs (faiss-rqmoe pretrained --help)")):
        q = sub.add_parser(name, help=helptext, add_help=False)
        q.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv=None) -> int:
    """Command-line entry point (console script faiss-rqmoe, and python -m faiss_rqmoe)."""
    import logging

    from_command_line = argv is None
    argv = sys.argv[1:] if from_command_line else list(argv)
    if from_command_line:
        rerun_with_passive_openmp("faiss_rqmoe", argv)
    if argv and argv[0] in ("bench", "train", "pretrained"):  # their own parsers, --help included
        if argv[0] == "bench":
            from .bench.cli import main as run
        elif argv[0] == "train":
            from .bench.train_cli import main as run
        else:
            from .bench.pretrained_export import main as run
        return run(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return build_data(args) if args.command == "data" else demo(args)


if __name__ == "__main__":
    sys.exit(main())
