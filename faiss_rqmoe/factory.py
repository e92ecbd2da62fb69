"""``index_factory``: build an IndexRQMoE from a faiss-style description string such as
"IVF1024,RQMoE8x8" (the grammar: ``description.GRAMMAR``). A description without an RQMoE codec
("IVF64,PQ8", "Flat", ...) is faiss's: it is passed to ``faiss.index_factory`` unchanged.
"""
from __future__ import annotations

import faiss

from . import pretrained_codecs
from .config import RQMoEConfig
from .description import GRAMMAR, parse_description, split_options
from .index import IndexRQMoE
from .train import TrainConfig


def index_factory(d: int, description: str, metric: int = faiss.METRIC_L2, *, train_config=None,
                  pretrained=None, **options):
    """Build an untrained IndexRQMoE from a description string (see the module grammar).

    d: vector dimension; metric: faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT.
    options: ``nprobe``, ``nshort``, ``encode_candidates``, ``encode_beam``,
    ``device`` set the index (``encode_candidates`` is for encoding added
    vectors); every ``TrainConfig`` field (max_epochs, time_budget_s, seed,
    progress, batch_size, lr, ...) sets training, with
    ``train_encode_candidates`` for training's candidate count. Unknown
    names raise ValueError. ``train_config``: a whole ``TrainConfig`` instead
    of training keywords. ``pretrained``: a shipped codec's name
    (``faiss_rqmoe.pretrained_codecs.available()``) or family ("sift"), which
    picks the codec matching the description; the index comes back trained
    and empty. A description with no RQMoE codec is faiss's own and returns
    ``faiss.index_factory(d, description, metric)``.
    """
    if isinstance(description, str) and "RQMoE" not in description:
        if options or train_config is not None:
            raise ValueError(f"index_factory: options {sorted(options)} apply to RQMoE indexes; "
                             f"{description!r} is a faiss index description")
        try:
            return faiss.index_factory(d, description, metric)
        except RuntimeError as exc:
            raise ValueError(f"index_factory: faiss cannot build {description!r}: "
                             f"{str(exc).splitlines()[0]}\n(RQMoE descriptions: {GRAMMAR})") from None
    if pretrained is not None:
        return _pretrained_index(d, description, metric, pretrained, train_config, options)
    fields, nlist, hnsw_m = parse_description(description)
    if "ctx_dim" in fields:
        fields["ctx_dim"] = d
    auto = not any(key in fields for key in ("n_experts", "n_layers", "hidden"))
    try:
        config = RQMoEConfig(d=d, **fields)
    except ValueError as exc:
        raise ValueError(f"index_factory: {description!r}: {exc}") from exc
    index_options, options_config = split_options(options)
    if train_config is not None:
        if options_config != TrainConfig():
            raise ValueError("index_factory: give training options as keywords or as train_config, not both")
        options_config = train_config
    return IndexRQMoE(config, nlist=nlist, metric=metric, hnsw_m=hnsw_m, train_config=options_config,
                      auto_architecture=auto, **index_options)


def _pretrained_index(d: int, description: str, metric: int, pretrained: str, train_config, options: dict):
    name = pretrained if pretrained in pretrained_codecs.available() else \
        pretrained_codecs.for_description(pretrained, description)
    header = pretrained_codecs.describe(name)
    if header["config"]["d"] != d or header["metric_type"] != metric:
        raise ValueError(f"index_factory: the pretrained codec {name!r} is for d={header['config']['d']} and "
                         f"metric {header['metric_type']}, not d={d} and metric {metric}")
    return pretrained_codecs.load(name, train_config=train_config, **options)
