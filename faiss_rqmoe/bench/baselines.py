"""Static codecs the benchmark compares against: faiss PQ, OPQ+PQ, RQ, LSQ, RaBitQ,
and a TurboQuant-style data-oblivious scalar quantizer (implemented here).

Every codec has ``key``, ``name``, ``bytes_per_vector``, ``train(xt)``,
``encode(x) -> (n, code_size) uint8`` and ``decode(codes) -> (n, d) float32``.
"""
from __future__ import annotations

import functools
from typing import List

import faiss
import numpy as np


class FaissCodec:
    """A faiss index used as a codec through sa_encode / sa_decode."""

    def __init__(self, key: str, name: str, index: faiss.Index, native_search: bool = False):
        self.key, self.name, self.index = key, name, index
        # RaBitQ is built to estimate distances, not to reconstruct: its own search is the fair measure
        self.native_search = native_search

    def search(self, xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
        """The index's own k-NN search after adding xb (n, d): ids (nq, k) int64."""
        self.index.reset()
        self.index.add(np.ascontiguousarray(xb, dtype=np.float32))
        return self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k)[1]

    @property
    def bytes_per_vector(self) -> float:
        return float(self.index.sa_code_size())

    def train(self, xt: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(xt, dtype=np.float32))

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(codes)


def _rq(d: int, n_bytes: int, beam: int, train_type: str = "progressive_dim", encode_beam=None) -> faiss.Index:
    """A faiss RQ codec: trained with beam ``beam`` and ``train_type`` (progressive_dim is faiss's default,
    kmeans plain k-means a step), encoding with ``encode_beam`` (default: the training beam)."""
    index = faiss.IndexResidualQuantizer(d, n_bytes, 8, faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_decompress)
    index.rq.max_beam_size = beam
    index.rq.train_type = {"progressive_dim": faiss.ResidualQuantizer.Train_progressive_dim,
                           "kmeans": faiss.ResidualQuantizer.Train_default}[train_type]
    if encode_beam is not None:
        return _EncodeBeam(index, encode_beam)
    return index


class _EncodeBeam:
    """A faiss RQ index whose encoding beam differs from its training beam."""

    def __init__(self, index, encode_beam: int):
        self.index, self.encode_beam = index, encode_beam

    def __getattr__(self, name):
        return getattr(self.index, name)

    def train(self, x):
        self.index.train(x)
        self.index.rq.max_beam_size = self.encode_beam


def make_baselines(d: int, n_bytes: int) -> List:
    """Static codecs at n_bytes bytes a vector (8-bit sub-codes); at 1 bit a dimension also the
    data-oblivious RaBitQ and TurboQuant (which store a few extra bytes of scalars: see bytes_per_vector)."""
    codecs = [
        FaissCodec("pq", f"PQ{n_bytes}x8", faiss.index_factory(d, f"PQ{n_bytes}x8")),
        FaissCodec("opq", f"OPQ{n_bytes},PQ{n_bytes}x8", faiss.index_factory(d, f"OPQ{n_bytes},PQ{n_bytes}x8")),
        FaissCodec("rq1", f"RQ{n_bytes}x8 (beam 1)", _rq(d, n_bytes, 1)),
        FaissCodec("rq32", f"RQ{n_bytes}x8 (beam 32)", _rq(d, n_bytes, 32)),
        # the start of our codecs: faiss's default recipe and the cheaper ones it is measured against
        FaissCodec("rq-default", f"RQ{n_bytes}x8 (faiss default: progressive, beam 5)", _rq(d, n_bytes, 5)),
        FaissCodec("rq-pd1", f"RQ{n_bytes}x8 (progressive, train beam 1, encode beam 5)",
                   _rq(d, n_bytes, 1, encode_beam=5)),
        FaissCodec("rq-km5", f"RQ{n_bytes}x8 (k-means, beam 5)", _rq(d, n_bytes, 5, "kmeans")),
        FaissCodec("rq-km1", f"RQ{n_bytes}x8 (k-means, train beam 1, encode beam 5)",
                   _rq(d, n_bytes, 1, "kmeans", encode_beam=5)),
        FaissCodec("lsq", f"LSQ{n_bytes}x8", faiss.IndexLocalSearchQuantizer(
            d, n_bytes, 8, faiss.METRIC_L2, faiss.AdditiveQuantizer.ST_decompress)),
    ]
    if n_bytes * 8 == d:
        codecs.append(FaissCodec("rabitq", "RaBitQ (1 bit/dim)", faiss.IndexRaBitQ(d, faiss.METRIC_L2),
                                 native_search=True))
        codecs.append(TurboQuantMSE(d, 1))
    return codecs


# ---------------------------------------------------------------- TurboQuant
def sphere_coordinate_density(d: int, t: np.ndarray) -> np.ndarray:
    """Unnormalised density of one coordinate of a uniform point on the unit sphere in R^d."""
    return np.clip(1 - t * t, 0, None) ** ((d - 3) / 2)


@functools.lru_cache(maxsize=None)
def lloyd_max_codebook(d: int, bits: int, grid_size: int = 400_001, iters: int = 300):
    """Optimal scalar quantizer of a sphere coordinate: (levels (2^bits,), boundaries (2^bits-1,)) float64."""
    t = np.linspace(-1, 1, grid_size)
    w = sphere_coordinate_density(d, t)
    w /= w.sum()
    cdf = np.cumsum(w)
    levels = np.interp((np.arange(1 << bits) + 0.5) / (1 << bits), cdf, t)  # start at quantiles
    # cell j holds the grid points with bounds[j-1] < t <= bounds[j]; its mass and first moment are
    # differences of prefix sums, so an iteration costs O(2^bits log grid_size), not O(grid_size)
    mass_before = np.concatenate([[0.0], cdf])
    moment_before = np.concatenate([[0.0], np.cumsum(w * t)])
    for _ in range(iters):
        bounds = (levels[1:] + levels[:-1]) / 2
        cuts = np.concatenate([[0], np.searchsorted(t, bounds, side="right"), [grid_size]])
        mass = np.diff(mass_before[cuts])
        levels = np.diff(moment_before[cuts]) / np.maximum(mass, 1e-300)
    return levels, (levels[1:] + levels[:-1]) / 2


def analytic_mse_unit(d: int, bits: int) -> float:
    """Expected ||x - x^||² of the TurboQuant-MSE quantizer for a uniformly random unit vector in R^d."""
    levels, bounds = lloyd_max_codebook(d, bits)
    t = np.linspace(-1, 1, 400_001)
    w = sphere_coordinate_density(d, t)
    w /= w.sum()
    return float(d * (w * (t - levels[np.searchsorted(bounds, t)]) ** 2).sum())


class TurboQuantMSE:
    """TurboQuant-style codec, MSE variant: random rotation, then a per-coordinate Lloyd–Max
    quantizer for the rotated-coordinate distribution of unit vectors.

    Vectors are centred on the training mean (``center``) and normalised; the
    norm is stored as float32, so bytes_per_vector = d*bits/8 + 4.
    """

    key = "turboquant"

    def __init__(self, d: int, bits: int = 1, seed: int = 0, center: bool = True):
        self.d, self.bits, self.center = d, bits, center
        self.name = f"TurboQuant-MSE ({bits} bit/dim)"
        gaussian = np.random.default_rng(seed).standard_normal((d, d))
        q, r = np.linalg.qr(gaussian)
        self.rotation = (q * np.sign(np.diag(r))).astype(np.float32)  # Haar-distributed orthogonal
        self.levels, self.bounds = (a.astype(np.float32) for a in lloyd_max_codebook(d, bits))
        self.mean = np.zeros(d, dtype=np.float32)

    @property
    def bytes_per_vector(self) -> float:
        return self.d * self.bits / 8 + 4

    def train(self, xt: np.ndarray) -> None:
        if self.center:
            self.mean = np.asarray(xt, dtype=np.float64).mean(0).astype(np.float32)

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32) - self.mean
        norms = np.linalg.norm(x, axis=1, keepdims=True).astype(np.float32)
        rotated = (x / np.maximum(norms, 1e-30)) @ self.rotation.T
        idx = np.searchsorted(self.bounds, rotated).astype(np.uint8)  # (n, d) in [0, 2^bits)
        bits = ((idx[:, :, None] >> np.arange(self.bits, dtype=np.uint8)) & 1).reshape(len(x), -1)
        return np.hstack([np.packbits(bits, axis=1, bitorder="little"), norms.view(np.uint8)])

    def decode(self, codes: np.ndarray) -> np.ndarray:
        n, nb = len(codes), self.d * self.bits // 8
        bits = np.unpackbits(codes[:, :nb], axis=1, bitorder="little").reshape(n, self.d, self.bits)
        idx = (bits.astype(np.int64) << np.arange(self.bits)).sum(-1)
        norms = np.ascontiguousarray(codes[:, nb:nb + 4]).view(np.float32)
        return (self.levels[idx] @ self.rotation) * norms + self.mean


# ---------------------------------------------------------------- IVF indexes
def ivf_baselines(d: int, nlist: int, n_bytes: int, refine: bool = True) -> List[tuple]:
    """The faiss IVF indexes our IVF index is compared with at n_bytes code bytes a vector, as
    (name, faiss.index_factory description): IVF-PQ, IVF-RQ with 8-bit norms (the same layout ours
    stores) and, with ``refine``, IVF-PQ FastScan (4-bit codes) with exact re-ranking on the raw vectors
    (it stores the float vectors too: see ``stored_bytes``). faiss's default training for each."""
    rows = [(f"IVF-RQ{n_bytes}x8", f"IVF{nlist},RQ{n_bytes}x8_Nqint8")]
    if d % n_bytes == 0:
        rows.insert(0, (f"IVF-PQ{n_bytes}x8", f"IVF{nlist},PQ{n_bytes}x8"))
    if refine and d % (2 * n_bytes) == 0:
        rows.append((f"IVF-PQ{2 * n_bytes}x4fs+RFlat", f"IVF{nlist},PQ{2 * n_bytes}x4fs,RFlat"))
    return rows


def build_ivf_baseline(description: str, d: int, centroids=None, metric: int = faiss.METRIC_L2) -> faiss.Index:
    """An untrained faiss IVF index from its description; with ``centroids`` (nlist, d) float32 its coarse
    quantizer holds them already, so ``train`` fits only the codec (the comparison is then the codec's)."""
    index = faiss.index_factory(d, description, metric)
    if centroids is not None:
        ivf = ivf_part(index)
        if len(centroids) != ivf.nlist:
            raise ValueError(f"{description}: {len(centroids)} centroids for nlist={ivf.nlist}")
        ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def ivf_part(index: faiss.Index) -> faiss.IndexIVF:
    """The IndexIVF inside a faiss index (itself, or the base of an IndexRefine)."""
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def stored_bytes(index: faiss.Index) -> int:
    """Bytes a faiss index stores a vector: the IVF codes, plus the refinement vectors of an IndexRefine."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        return ivf_part(index).code_size + faiss.downcast_index(index.refine_index).code_size
    return ivf_part(index).code_size


def search_params(index: faiss.Index, nprobe: int, k_factor: float = 1.0):
    """faiss search parameters with nprobe for an IVF index (and k_factor for an IndexRefine)."""
    ivf_params = faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        return faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=ivf_params)
    return ivf_params
