"""Command-line options shared by the benchmark's jobs. The training flags derive from TrainConfig's
fields (names, defaults, help), so a new training option appears here without being listed by hand."""
from __future__ import annotations

import argparse
import dataclasses
import typing

import torch

from ..engine import DTYPES, KERNELS
from ..train import AUTO, TRAIN_OPTION_CHOICES, TRAIN_OPTION_HELP, TrainConfig

# the spelling of a flag before its field was renamed, still read by recorded commands
_OLD_FLAGS = {"train_encode_candidates": ["--train-candidates"]}
# TrainConfig fields that the benchmark sets itself
_NOT_FLAGS = ("device", "progress")


def _optional_number(kind):
    def parse(text: str):
        low = text.strip().lower()
        if low == AUTO:
            return AUTO
        if low == "none":
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its default and its help line."""
    group = parser.add_argument_group("training (TrainConfig fields)")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in _NOT_FLAGS:
            continue
        dest = field.name
        flags = ["--" + dest.replace("_", "-")] + _OLD_FLAGS.get(dest, [])
        kind = hints[field.name]
        helptext = TRAIN_OPTION_HELP[field.name] + f" (default: {field.default})"
        if kind is bool:
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=field.default,
                               help=helptext)
        elif kind in (int, float, str):  # a word from a short list gets argparse's choices (and its error)
            group.add_argument(*flags, dest=dest, type=kind, default=field.default, help=helptext,
                               choices=TRAIN_OPTION_CHOICES.get(field.name))
        else:  # Optional / Union with "auto"
            number = int if int in typing.get_args(kind) else float if float in typing.get_args(kind) else str
            group.add_argument(*flags, dest=dest, type=_optional_number(number) if number is not str else str,
                               default=field.default, help=helptext)


def train_config_from_args(args, device: torch.device) -> TrainConfig:
    """The run's TrainConfig: every field from its flag, the device from --device, progress from --quiet."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in _NOT_FLAGS}
    return TrainConfig(**values, device=str(device), progress=not args.quiet)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="default",
                       help="default | small | wallpaper | text | synthetic (bench search: Gaussian clusters, see --clusters) | a split written by datasets.export_split (.npz) | "
                            "a .npy/.fvecs/.bvecs file")
    group.add_argument("--gt", default=None, help="ground-truth .ivecs/.npy for a dataset given as a vector file")
    group.add_argument("--n-train", type=int, default=None, help="training vectors (default: the split's)")
    group.add_argument("--n-db", type=int, default=None, help="database vectors (default: the split's)")
    group.add_argument("--n-query", type=int, default=None, help="queries (default: the split's)")


def add_codec_options(parser: argparse.ArgumentParser, bytes_help: str = "code sizes in bytes (M steps of 8 bits)"):
    group = parser.add_argument_group("codec")
    group.add_argument("--bytes", type=int, nargs="+", default=[8], help=bytes_help)
    group.add_argument("--n-experts", type=int, default=4, help="experts a step, N (default 4)")
    group.add_argument("--n-layers", type=int, default=2, help="residual blocks an expert, L (default 2)")
    group.add_argument("--hidden", type=int, default=256, help="hidden width of the experts, H (default 256)")
    group.add_argument("--instr-dim", type=int, default=None,
                       help="width De of the instruction codewords (default: d, the paper's guideline De = D)")
    group.add_argument("--routing", default="dense",
                       help="dense (every expert on every row, the paper's mixture) or top<k>, e.g. top1 (each row "
                            "runs its k highest-gated experts)")
    group.add_argument("--encode-candidates", type=_optional_number(int), default=None,
                       help="candidates a step when encoding the database (default: none = exact)")
    group.add_argument("--encode-beam", type=int, default=1, help="beam when encoding the database (default 1)")
    group.add_argument("--mem-budget-gib", type=int, default=1, help="GiB of temporaries for encode/decode")
    group.add_argument("--kernel", choices=KERNELS, default="auto",
                       help="execution of the networks at inference, training's encoding of each batch "
                            "included: auto (Triton on CUDA), torch or triton")
    group.add_argument("--precision", choices=DTYPES, default="auto",
                       help="matmul inputs at inference (training's batch encoding too with --encode-precision "
                            "model): auto (bfloat16 where the fused kernel runs, else float32), float32, "
                            "tfloat32 or bfloat16 (on a CPU: a decode's products, torch's CPU autocast)")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    group.add_argument("--threads", type=int, default=None, help="CPU threads for torch and faiss")
    group.add_argument("--no-tf32", action="store_true", help="keep torch's float32 matmuls exact on CUDA")
    group.add_argument("--out", default=None, help="JSON file to write the result to")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
