"""The benchmark (``python -m faiss_rqmoe.bench`` or ``faiss-rqmoe bench``): one module a job.

codec: every codec on one split (MSE, recall, speeds); search: our index against faiss's IVF indexes
over an nprobe x nshort grid; speed: decode, encode and training throughput by batch size; report,
merge, plot: tables and figures of result files. Every run writes JSON whose ``meta.command`` re-runs it.
"""
from .cli import build_parser, main
from .report import merge_codec_results

__all__ = ["build_parser", "main", "merge_codec_results"]
