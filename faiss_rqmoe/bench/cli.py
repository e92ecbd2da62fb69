"""The benchmark's command line: ``python -m faiss_rqmoe.bench JOB ...`` (or ``faiss-rqmoe bench JOB ...``).

    faiss-rqmoe bench codec  --dataset default --bytes 8 --device cuda --out codec.json
    faiss-rqmoe bench search --dataset default --nlist 1024 --device cuda --out search.json
    faiss-rqmoe bench speed  --devices cuda cpu --out speed.json
    faiss-rqmoe bench report *.json --md table.md
    faiss-rqmoe bench render          # docs/results.md, docs/figures/ and the README's tables
"""
from __future__ import annotations

import argparse
import logging
import sys

import faiss
import torch

from .._openmp import rerun_with_passive_openmp
from .options import add_codec_options, add_data_options, add_run_options, add_train_options

PROG = "faiss-rqmoe bench"
JOBS = {
    "codec": "train or fit every codec on one split: MSE, recall@1/10/100, training time, encode/decode speed",
    "search": "our IVF index against faiss IVF-PQ, IVF-RQ and IVF-PQ FastScan+refine over an nprobe x nshort grid",
    "speed": "decode, encode and training vectors a second by batch size and execution strategy",
    "build": "fill a trained index with an on-disk database (one add, resumable shards, or a Dask cluster) and "
             "search it: time and memory a process",
    "report": "print result files as markdown tables",
    "merge": "combine codec results measured on the same split into one file",
    "plot": "draw the figures of result files as PNG",
    "render": "write docs/results.md, the README's results tables and docs/figures/ from notebooks/results/",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="JOB")
    for name in ("codec", "search"):
        p = sub.add_parser(name, help=JOBS[name], description=JOBS[name])
        add_data_options(p)
        add_codec_options(p)
        add_train_options(p)
        add_run_options(p)
    codec = sub.choices["codec"]
    codec.add_argument("--methods", nargs="+",
                       default=["pq", "opq", "rq1", "rq32", "lsq", "rabitq", "turboquant", "rqmoe", "qinco", "rq-sgd"],
                       help="codecs to run: pq opq rq1 rq32 lsq rabitq turboquant (static), rqmoe qinco rq-sgd (ours), "
                            "pretrained:NAME (a shipped flat codec, e.g. pretrained:sift-8B)")
    codec.add_argument("--static-train-max", type=int, default=None,
                       help="train static codecs on the first N training vectors only (LSQ is slow)")
    codec.add_argument("--exact-sample", type=int, default=10_000,
                       help="also measure exact and greedy encoding of our codecs on this many vectors")
    search = sub.choices["search"]
    search.add_argument("--description", default=None, help="our index's factory string (default: from the flags)")
    search.add_argument("--pretrained", default=None, help="start from a pretrained codec, e.g. sift-ivf1024-8B")
    search.add_argument("--trained-index", default=None,
                        help="an index file written by faiss-rqmoe train (trained, empty): search it instead of "
                             "training one here")
    search.add_argument("--nlist", type=int, default=1024, help="inverted lists (default 1024)")
    search.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="lists probed")
    search.add_argument("--nshort", type=int, nargs="+", default=[10, 20, 50, 100, 200],
                        help="candidates re-ranked by our decoder")
    search.add_argument("--codec", choices=["moe", "qinco", "rq"], default="moe",
                        help="condition mode: RQ-MoE, QINCo-style (partial reconstruction) or plain RQ")
    search.add_argument("--centroid", action="store_true", help="condition the codec on each vector's IVF centroid")
    search.add_argument("--faiss-train-max", type=int, default=500_000, help="training vectors for faiss's indexes")
    search.add_argument("--no-baselines", action="store_true", help="measure our index only")
    search.add_argument("--no-refine", action="store_true", help="leave out IVF-PQ FastScan + exact refinement")
    search.add_argument("--refine-k-factors", type=float, nargs="+", default=[1, 2, 5],
                        help="k_factor grid of the FastScan+refine baseline")
    search.add_argument("--cpu-points", nargs="*", default=[],
                        help="NPROBE:NSHORT points to re-run on the CPU path (with --device cuda)")
    search.add_argument("--save-bundle", default=None,
                        help="directory to write our index, the faiss baselines, queries and ground truth to")
    search.add_argument("--bundle", default=None, help="search the indexes of a --save-bundle directory instead")
    search.add_argument("--search-queries", type=int, default=None, help="time only the first N queries")
    search.add_argument("--clusters", type=int, default=1024,
                        help="Gaussian clusters of --dataset synthetic (default 1024; sizes from --n-train, "
                             "--n-db, --n-query: default 200 000, 1 000 000, 10 000)")
    search.add_argument("--latency", nargs="*", default=[],
                        help="NPROBE:NSHORT points at which to time single queries searched one at a time "
                             "(ours; faiss's at the same nprobe)")
    search.add_argument("--latency-queries", type=int, default=200, help="queries timed alone a --latency point")
    search.add_argument("--profile", nargs="*", default=[],
                        help="NPROBE:NSHORT points at which to profile one search of all queries and of one query "
                             "alone (torch.profiler: each kernel's own time, written under 'profile'); on a GPU with "
                             "search graphs also where one query's time goes (host, graph replay: "
                             "'latency_stages')")
    search.add_argument("--gpu-scans", nargs="+", choices=["auto", "fused", "gather"], default=["auto"],
                        help="with --device cuda, run the grid with each scan: fused (the Triton kernel), gather "
                             "(torch) or auto (fused where Triton is installed)")
    search.add_argument("--cpu-scans", nargs="+", choices=["auto", "compiled", "torch"], default=["auto"],
                        help="with --device cpu, run the grid with each scan: compiled (the C scan built with the "
                             "package), torch, or auto (compiled where built)")
    speed = sub.add_parser("speed", help=JOBS["speed"], description=JOBS["speed"])
    speed.add_argument("--devices", nargs="+", default=["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"],
                       help="devices to measure (default: cuda and cpu where there is a GPU, else cpu)")
    speed.add_argument("--methods", nargs="+", default=["RQ-MoE", "QINCo-style", "QINCo1-shape"],
                       help="our configurations: RQ-MoE, QINCo-style, QINCo1-shape (QINCo-style with N=1)")
    speed.add_argument("--d", type=int, default=128, help="vector dimension (default 128)")
    speed.add_argument("--M", type=int, default=8, help="steps (bytes) a code (default 8)")
    speed.add_argument("--interleaved-rounds", type=int, default=7,
                       help="on a CPU, also decode the smallest batch with every method in turns, this many "
                            "rounds, and keep the medians (ratios that hold on a shared machine); 0: off")
    speed.add_argument("--hidden", type=int, default=256,
                       help="hidden width H of every method's networks and the peers' (default 256)")
    speed.add_argument("--batches", type=int, nargs="+", default=[1024, 8192, 100_000], help="decode batch sizes")
    speed.add_argument("--kernels", nargs="+", default=["torch", "triton"], help="execution kernels on CUDA")
    speed.add_argument("--executions", nargs="+", default=None, metavar="KERNEL:PRECISION",
                       help="on CUDA, these (kernel, precision) pairs instead of every --kernels and --precisions "
                            "pair, e.g. auto:auto (the defaults) triton:bfloat16 torch:float32")
    speed.add_argument("--precisions", nargs="+", default=["float32", "tfloat32", "bfloat16"],
                       help="matmul precisions on CUDA")
    speed.add_argument("--n-encode", type=int, default=20_000, help="vectors encoded on a GPU")
    speed.add_argument("--train-steps", type=int, default=30, help="training steps timed on a GPU")
    speed.add_argument("--cpu-precisions", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                       help="matmul precisions on a CPU (bfloat16: torch's CPU autocast, fast where the processor "
                            "has AMX or AVX512-BF16)")
    speed.add_argument("--cpu-max-batch", type=int, default=8192, help="largest decode batch on a CPU")
    speed.add_argument("--cpu-n-encode", type=int, default=2_000, help="vectors encoded on a CPU")
    speed.add_argument("--cpu-train-steps", type=int, default=3, help="training steps timed on a CPU")
    speed.add_argument("--peers", default=None,
                       help="folder holding qinco_v1/model_qinco.py and rqmoe_ref/model_rqmoe.py (public code) to "
                            "measure beside ours")
    speed.add_argument("--sweep", action="store_true",
                       help="first time the fused kernel at several tile sizes (on the first device, a GPU)")
    speed.add_argument("--profile-batch", type=int, default=None,
                       help="also profile one batch size's decode on the first device (torch.profiler; on CUDA "
                            "the last --kernels and --precisions): each kernel's or operator's own time in one decode, "
                            "written under 'profile'")
    speed.add_argument("--threads", type=int, default=None, help="CPU threads for torch and faiss")
    speed.add_argument("--no-tf32", action="store_true", help="keep torch's float32 matmuls exact on CUDA")
    speed.add_argument("--out", default=None, help="JSON file to write the result to")
    build = sub.add_parser("build", help=JOBS["build"], description=JOBS["build"])
    build.add_argument("--index", required=True, help="a trained index file (write_index)")
    build.add_argument("--vectors", required=True, help="the database: .npy, .fvecs or .bvecs")
    build.add_argument("--mode", choices=["single", "sharded", "cluster"], default="sharded",
                       help="one add; shards in this process; shards on a Dask cluster (the cluster extra)")
    build.add_argument("--shard-size", type=int, default=131_072, help="rows a shard (default 131072)")
    build.add_argument("--device", default=None, help="where encoding and search run: cpu, cuda (default: cuda "
                       "if available; on a cluster, each worker's own GPU if it has one)")
    build.add_argument("--devices", nargs="+", default=None, help="as in earlier results: one device (--device), or "
                       "several for cluster mode with one local worker each")
    build.add_argument("--scheduler", default=None, help="cluster mode: a running Dask scheduler, e.g. "
                       "tcp://head:8786 (default: a local cluster of --workers processes)")
    build.add_argument("--workers", type=int, default=2, help="cluster mode: local worker processes (default 2)")
    build.add_argument("--threads-per-worker", type=int, default=1, help="cluster mode: threads a local worker")
    build.add_argument("--queries", default=None, help="query vectors (.npy, .fvecs, .bvecs): also time a search")
    build.add_argument("--nq", type=int, default=1000, help="queries searched (the first nq of --queries)")
    build.add_argument("--k", type=int, default=10, help="neighbours a query")
    build.add_argument("--nprobe", type=int, default=16, help="lists probed a query")
    build.add_argument("--nshort", type=int, default=100, help="shortlist decoded a query (a shard)")
    build.add_argument("--work-dir", default="shards", help="where shard files go (and are resumed from)")
    build.add_argument("--fresh", action="store_true", help="delete earlier shard files first")
    build.add_argument("--out", default=None, help="JSON file to write the result to")
    merge = sub.add_parser("merge", help=JOBS["merge"], description=JOBS["merge"])
    merge.add_argument("files", nargs="+", help="codec result files")
    merge.add_argument("--out", required=True, help="the merged JSON file")
    plot = sub.add_parser("plot", help=JOBS["plot"], description=JOBS["plot"])
    plot.add_argument("files", nargs="+", help="result files")
    plot.add_argument("--out-dir", default="notebooks/results", help="where the PNG files go")
    report = sub.add_parser("report", help=JOBS["report"], description=JOBS["report"])
    report.add_argument("files", nargs="+", help="result files")
    report.add_argument("--md", default=None, help="also write the tables to this markdown file")
    render = sub.add_parser("render", help=JOBS["render"], description=JOBS["render"])
    render.add_argument("--results", default="notebooks/results", help="the result files' folder")
    render.add_argument("--docs", default="docs", help="where results.md and figures/ go")
    render.add_argument("--readme", default="README.md", help="the README whose results tables are rewritten")
    render.add_argument("--no-figures", action="store_true", help="leave the figures as they are")
    render.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if results.md or the README's tables differ from a fresh rendering")
    return parser


def main(argv=None) -> int:
    """Run one benchmark job; returns the exit code."""
    from_command_line = argv is None
    argv = sys.argv[1:] if from_command_line else list(argv)
    if from_command_line:
        rerun_with_passive_openmp("faiss_rqmoe.bench", argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "build":
        from .build import run_build
        print(run_build(args)["rows"])
        return 0
    if args.command == "render":
        from .results_page import run_render
        return run_render(args)
    if args.command in ("report", "merge", "plot"):
        from .report import run_merge, run_plot, run_report
        {"report": run_report, "merge": run_merge, "plot": run_plot}[args.command](args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32  # an application-level choice, recorded in meta
    if args.command == "codec":
        from .codec import run_codec
        from .report import codec_table
        print(codec_table([run_codec(args)]))
    elif args.command == "search":
        from .report import search_table
        from .search import run_search
        print(search_table(run_search(args)))
    else:
        from .speed import run_speed, speed_table
        print(speed_table(run_speed(args)))
    return 0
