"""``index_factory``: build an IndexRQMoE from a faiss-style description string.

Grammar (tokens separated by ',' ; architecture options by '_')::

    description := [ coarse "," ] codec
    coarse      := "IVF" nlist [ "_HNSW" links ]
    codec       := "RQMoE" M "x" nbits { "_" option }
    option      := "N" experts | "L" layers | "H" hidden | "E" instr_dim
                 | "N" experts "L" layers "H" hidden     (e.g. _N4L2H256)
                 | "qinco" | "rq"                         (condition mode)
                 | "centroid"          (condition on the IVF centroid; needs IVF)

Examples: "RQMoE8x8", "IVF1024,RQMoE8x8", "IVF4096_HNSW32,RQMoE16x8_N4L2H256",
"IVF1024,RQMoE8x8_centroid".
"""
from __future__ import annotations

import re

import faiss

from .index import IndexRQMoE
from .model import RQMoEConfig

GRAMMAR = __doc__[__doc__.index("Grammar"):__doc__.index("Examples")].rstrip()

_COARSE = re.compile(r"IVF(\d+)(?:_HNSW(\d+))?")
_CODEC = re.compile(r"RQMoE(\d+)x(\d+)((?:_[A-Za-z0-9]+)*)")
_ARCH = re.compile(r"([NLHE])(\d+)")
_CONDITIONS = {"qinco": "reconstruction", "rq": "none", "moe": "instruction"}

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
    nlist, hnsw_m = 0, 0
    if len(tokens) > 2:
        raise _bad(description, tokens[2], "expected at most a coarse quantizer and a codec")
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
        if option.lower() in _CONDITIONS:
            fields["condition"] = _CONDITIONS[option.lower()]
            continue
        if option.lower() == "centroid":
            if nlist <= 1:
                raise _bad(description, option, "conditioning on the centroid needs an IVF coarse quantizer "
                                                "with nlist > 1, e.g. IVF1024,RQMoE8x8_centroid")
            fields["ctx_dim"] = None
            continue
        parts = _ARCH.findall(option)
        if not parts or "".join(a + b for a, b in parts) != option:
            raise _bad(description, option, "architecture options are N<experts>, L<layers>, H<hidden>, "
                                            "E<instr_dim>, qinco, rq or centroid")
        for letter, value in parts:
            fields[names[letter]] = int(value)
    return fields, nlist, hnsw_m


def index_factory(d: int, description: str, metric: int = faiss.METRIC_L2, **options) -> IndexRQMoE:
    """Build an untrained IndexRQMoE from a description string (see the module grammar).

    d: vector dimension; metric: faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT.
    options: ``nprobe``, ``nshort``, ``encode_candidates``, ``encode_beam``, ``device`` go to
    the index (``encode_candidates`` is for encoding added vectors); ``train_encode_candidates``
    is the candidate count of training's encoding (train_rqmoe's ``encode_candidates``);
    everything else (max_epochs, time_budget_s, seed, progress, batch_size, lr, ...) is passed
    to ``train_rqmoe`` when the index trains.
    """
    fields, nlist, hnsw_m = parse_description(description)
    if "ctx_dim" in fields:
        fields["ctx_dim"] = d
    try:
        config = RQMoEConfig(d=d, **fields)
    except ValueError as exc:
        raise ValueError(f"index_factory: {description!r}: {exc}") from exc
    index_options = {key: options.pop(key) for key in INDEX_OPTIONS if key in options}
    if "train_encode_candidates" in options:
        options["encode_candidates"] = options.pop("train_encode_candidates")
    return IndexRQMoE(config, nlist=nlist, metric=metric, hnsw_m=hnsw_m, train_options=options, **index_options)
