"""The description strings of ``index_factory``: their grammar, parsed into an ``RQMoEConfig``'s fields,
and its keyword options split into the index's and training's.

Grammar (tokens separated by ',' ; architecture options by '_')::

    description := [ coarse "," ] codec
    coarse      := "IVF" nlist [ "_HNSW" links ]
    codec       := "RQMoE" M "x" nbits { "_" option }
    option      := "N" experts | "L" layers | "H" hidden | "E" instr_dim
                 | "N" experts "L" layers "H" hidden     (e.g. _N4L2H256)
                 | "qinco" | "rq"                         (condition mode)
                 | "top" k             (each row runs its k highest-gated experts, e.g. _top1)
                 | "centroid"          (condition on the IVF centroid; needs IVF)

Examples: "RQMoE8x8", "IVF1024,RQMoE8x8", "IVF4096_HNSW32,RQMoE16x8_N4L2H256",
"IVF1024,RQMoE8x8_centroid", "IVF1024,RQMoE8x8_N4L2H256_top1". Without N/L/H the network's size follows the
device and the training set (``index.auto_architecture``). A description
without an RQMoE codec ("IVF64,PQ8", "Flat", ...) is faiss's: it is passed
to ``faiss.index_factory`` unchanged.
"""
from __future__ import annotations

import re

from .config import Condition
from .train import TrainConfig

GRAMMAR = __doc__[__doc__.index("Grammar"):__doc__.index("Examples")].rstrip()

_COARSE = re.compile(r"IVF(\d+)(?:_HNSW(\d+))?")
_CODEC = re.compile(r"RQMoE(\d+)x(\d+)((?:_[A-Za-z0-9]+)*)")
_ARCH = re.compile(r"([NLHE])(\d+)")
_ROUTING = re.compile(r"top\d+")
_PRE_TRANSFORM = re.compile(r"(OPQ|PCAR?W?|RR|ITQ|L2norm)\d*(_\d+)?")

INDEX_OPTIONS = ("nprobe", "nshort", "encode_candidates", "encode_beam", "device")


def _bad(description: str, token: str, why: str) -> ValueError:
    return ValueError(f"index_factory: cannot parse {token!r} in {description!r}: {why}\n{GRAMMAR}")


def parse_description(description: str):
    """Parse a description string into (RQMoEConfig fields without d, nlist, hnsw_m).

    The "centroid" option comes back as fields["ctx_dim"] = None, to be set to d.
    """
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"index_factory: description must be a non-empty string, got {description!r}\n{GRAMMAR}")
    tokens = [t.strip() for t in description.split(",")]
    for token in tokens[:-1]:
        if _PRE_TRANSFORM.fullmatch(token):
            raise _bad(description, token, "pre-transforms (OPQ, PCA, RR, ...) are not supported before an RQMoE "
                                           "codec: its networks learn their own transform; drop it, or apply a "
                                           "faiss.VectorTransform to the vectors yourself")
    nlist, hnsw_m = 0, 0
    if len(tokens) > 2:
        raise _bad(description, tokens[0], "expected at most a coarse quantizer and a codec")
    if len(tokens) == 2:
        match = _COARSE.fullmatch(tokens[0])
        if not match:
            raise _bad(description, tokens[0], "expected a coarse quantizer such as IVF1024 or IVF4096_HNSW32")
        nlist, hnsw_m = int(match.group(1)), int(match.group(2) or 0)
        if nlist < 1:
            raise _bad(description, tokens[0], "nlist must be >= 1")
    match = _CODEC.fullmatch(tokens[-1])
    if not match:
        raise _bad(description, tokens[-1], "expected a codec such as RQMoE8x8 or RQMoE16x8_N4L2H256")
    fields = {"M": int(match.group(1)), "nbits": int(match.group(2))}
    names = {"N": "n_experts", "L": "n_layers", "H": "hidden", "E": "instr_dim"}
    for option in filter(None, match.group(3).split("_")):
        if option.lower() == "centroid":
            if nlist <= 1:
                raise _bad(description, option, "conditioning on the centroid needs an IVF coarse quantizer "
                                                "with nlist > 1, e.g. IVF1024,RQMoE8x8_centroid")
            fields["ctx_dim"] = None
            continue
        if _ROUTING.fullmatch(option.lower()):
            fields["routing"] = option.lower()
            continue
        try:
            fields["condition"] = Condition.parse(option).value
            continue
        except ValueError:
            pass
        parts = _ARCH.findall(option)
        if not parts or "".join(a + b for a, b in parts) != option:
            raise _bad(description, option, "architecture options are N<experts>, L<layers>, H<hidden>, "
                                            "E<instr_dim>, qinco, rq, top<k> or centroid")
        for letter, value in parts:
            fields[names[letter]] = int(value)
    return fields, nlist, hnsw_m


def split_options(options: dict):
    """(index keyword arguments, TrainConfig) from index_factory's options; unknown names raise,
    listing the known ones."""
    options = dict(options)
    index_options = {key: options.pop(key) for key in INDEX_OPTIONS if key in options}
    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise ValueError(f"index_factory: unknown option{'s' if len(unknown) > 1 else ''} {unknown}; "
                         f"index options: {list(INDEX_OPTIONS)}, training options: "
                         f"{TrainConfig.field_names()}")
    return index_options, TrainConfig.from_options(options)
