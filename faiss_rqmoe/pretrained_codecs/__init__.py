"""Pretrained codecs for SIFT-like data (128-d descriptors such as BigANN's), shipped with the package.

Each was trained on a GPU on the wallpaper SIFT set (``datasets.load_wallpaper``)
with ``faiss-rqmoe train`` and exported by ``faiss-rqmoe pretrained export``;
the file records the command, the data and the date. Weights are stored as
float16 (the decoded vectors move by less than the rounding of float16, see
``docs/experiments.md``), like the lookup tables; the IVF centroids as float32.

    index = faiss_rqmoe.pretrained("sift-ivf1024-8B")   # trained, empty: add vectors, then search
    faiss_rqmoe.pretrained_codecs.available()           # the names
    index = faiss_rqmoe.index_factory(128, "IVF1024,RQMoE8x8", pretrained="sift")

``index.train(x)`` on such an index fits only what depends on the data: the
lookup tables (and nothing else; the codec and, for IVF codecs, the
centroids come from the file).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch

from ..config import RQMoEConfig
from ..description import parse_description, split_options
from ..storage import FileFormatError, load_arrays

FORMAT = "faiss_rqmoe.pretrained/1"
FOLDER = Path(__file__).resolve().parent


def available() -> List[str]:
    """Names of the pretrained codecs shipped with the package."""
    return sorted(p.stem for p in FOLDER.glob("*.npz"))


def codec_path(name: str) -> Path:
    path = FOLDER / f"{name}.npz"
    if not path.is_file():
        raise ValueError(f"no pretrained codec named {name!r}; available: {available()}")
    return path


def describe(name: str) -> dict:
    """The header of a pretrained codec: config, nlist, training data, command, date, validation MSE."""
    _, meta = load_arrays(codec_path(name), "a pretrained codec")
    return meta


def for_description(family: str, description: str) -> str:
    """The pretrained codec that matches a factory description, e.g. ("sift", "IVF1024,RQMoE8x8") ->
    "sift-ivf1024-8B"; ValueError listing the available ones when none matches."""

    fields, nlist, _ = parse_description(description)
    name = f"{family}-{'ivf%d-' % nlist if nlist > 1 else ''}{fields['M'] * fields['nbits'] // 8}B"
    if fields.get("nbits", 8) != 8 or name not in available():
        raise ValueError(f"no pretrained {family!r} codec for {description!r} (looked for {name!r}); "
                         f"available: {available()}")
    return name


def load(name: str, device=None, train_config=None, **index_options):
    """A trained, empty IndexRQMoE with the named pretrained codec (``available()`` lists the names).

    index_options: nprobe, nshort, encode_candidates, encode_beam and training
    options, as for ``index_factory``.
    """
    return load_file(codec_path(name), name, device, train_config, **index_options)


def load_file(path: Path, name: str, device=None, train_config=None, **index_options):
    """load() of the pretrained codec file at path, recorded as ``name``."""
    from ..index import IndexRQMoE
    from .. import lut

    arrays, meta = load_arrays(path, "a pretrained codec")
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{name}: not a pretrained codec (format {meta.get('format')!r})")
    config = RQMoEConfig.from_dict(meta["config"])
    index_kwargs, options_config = split_options(index_options)
    if train_config is None:
        train_config = options_config
    elif options_config != type(train_config)():
        raise ValueError("give training options as keywords or as train_config, not both")
    index = IndexRQMoE(config, nlist=meta["nlist"], metric=meta["metric_type"], device=device,
                       train_config=train_config, **index_kwargs)
    state = {key[len("model."):]: torch.from_numpy(value.astype(index.model.state_dict()[key[len("model."):]]
                                                                 .cpu().numpy().dtype))
             for key, value in arrays.items() if key.startswith("model.")}
    centroids = arrays["centroids"].astype(np.float32)
    codebooks = arrays["codebooks"].astype(np.float32)
    ivf = lut.build_ivf_index(index._make_quantizer(centroids), config.d, index.nlist, codebooks, config.nbits,
                              index.metric_type, arrays["norms"].astype(np.float32))
    return index.restore(state, ivf, pretrained=name)
