"""IndexRQMoE: a FAISS-shaped index over RQ-MoE codes (docs/design.md, "The index").

Search: the coarse quantizer picks ``nprobe`` lists; the list-independent
lookup-table scan (``scan.py``) ranks their codes with static additive
codebooks fitted to our codes and keeps ``nshort`` candidates; the RQ-MoE
model decodes them (all steps in parallel) and re-ranks them by exact
distance. On a CUDA codec every stage runs on the GPU; on a CPU codec the
coarse search is faiss's and the rest runs in torch on the CPU threads.
faiss's IVF additive-quantizer index stores the codes and ids and is what
the file holds.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from typing import Optional

import faiss
import numpy as np
import torch

from . import distributed, kernels, lut, scan, scan_kernel, snapshot
from .arrays import (as_id_list, as_ids, as_vectors, as_vectors_on, check_positive_int, fill_output,
                     returns_like, to_host)
from .config import Condition, RQMoEConfig
from .devices import resolve_device
from .engine import DEFAULT_MEM_BUDGET_BYTES, Engine, Execution
from .graphs import GraphCache, stamp
from .model import RQMoE, autocast_enabled
from .progress import folded_faiss_warnings, matmul_rate, timed_stage
from .train import AUTO, TrainConfig, TrainHistory, reconstruction_mse, train_faiss_rq, train_rqmoe

logger = logging.getLogger(__name__)

METRICS = {faiss.METRIC_L2: "L2", faiss.METRIC_INNER_PRODUCT: "IP"}
SEARCH_PARAMETERS = ("nprobe", "nshort", "sel")
SEARCH_GRAPH_MAX_QUERIES = 64  # GPU searches of up to this many queries replay a recorded CUDA graph
# Database encoding when the caller chooses nothing: (cpu, cuda)
AUTO_ENCODE_CANDIDATES = (16, 32)
AUTO_ENCODE_BEAM = (1, 4)
# a plain-RQ codec (condition 'none', e.g. the RQ start kept after training) encodes exactly with at least
# faiss's default beam; on the CPU through faiss's own encoder, the same search in C++
RQ_ENCODE_BEAM = 5
ENCODE_CHUNK = 16_384


def auto_architecture(device: torch.device, n_train: int) -> dict:
    """The model size used when the description names none (e.g. "IVF1024,RQMoE8x8").

    On a GPU: the paper's N=4 experts of L=2 blocks, hidden 256, from 200 000
    training vectors; hidden 128 below that, 64 below 30 000 (fewer
    parameters where there is little data to fit them). On a CPU: N=2, L=1,
    hidden 64, so that training and encoding of 20 000-100 000 vectors take
    about a minute on two cores. Returns RQMoEConfig fields.
    """
    if device.type == "cuda":
        hidden = 256 if n_train >= 200_000 else 128 if n_train >= 30_000 else 64
        return {"n_experts": 4, "n_layers": 2, "hidden": hidden}
    return {"n_experts": 2, "n_layers": 1, "hidden": 64}


def parse_search_params(params, nprobe: int, nshort: int):
    """(nprobe, nshort, sel) for one call from a dict, a ParameterSpace-style string
    ("nprobe=16,nshort=50") or an object such as faiss.SearchParametersIVF; unknown keys raise."""
    sel = None
    if params is None:
        return nprobe, nshort, sel
    if isinstance(params, str):
        values = {}
        for item in filter(None, (p.strip() for p in params.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"params: expected 'name=value' items such as 'nprobe=16,nshort=50', got {item!r}")
            try:
                values[key.strip()] = int(value)
            except ValueError:
                raise ValueError(f"params: {key.strip()} must be an integer, got {value!r}") from None
        params = values
    if isinstance(params, dict):
        unknown = sorted(set(params) - set(SEARCH_PARAMETERS))
        if unknown:
            raise ValueError(f"unknown search parameter(s) {unknown}; IndexRQMoE takes {list(SEARCH_PARAMETERS)}")
        get = params.get
    else:
        get = lambda key, default: getattr(params, key, default)  # noqa: E731
    nprobe = get("nprobe", nprobe)
    nshort = get("nshort", nshort)
    sel = get("sel", None)
    nprobe = check_positive_int(nprobe, "params: nprobe")
    nshort = check_positive_int(nshort, "params: nshort")
    if sel is not None and not isinstance(sel, faiss.IDSelector):
        raise TypeError(f"params: sel must be a faiss.IDSelector, got {type(sel).__name__}")
    return nprobe, nshort, sel


class IndexRQMoE:
    """A compressed vector index with the FAISS interface, backed by an RQ-MoE codec.

    config: the codec (d, M, nbits, architecture). nlist: inverted lists;
    0 builds the flat variant (one list, centred on the training mean,
    every code scanned). metric:
    faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT. hnsw_m: > 0 uses an HNSW
    coarse quantizer with that many links (on the CPU path; a GPU assigns
    exactly). nprobe: lists probed a query; nshort: shortlist re-ranked by
    the neural decoder (at least k is used). encode_candidates,
    encode_beam: candidates a step and beam size for encoding added vectors
    ("auto": 16 and 1 on a CPU, 32 and 4 on a GPU; see ``RQMoE.encode``).
    device: torch device of the codec and of search (None: cuda if
    available). train_config: a ``TrainConfig`` (or ``train_options``, a
    dict of its fields). auto_architecture: choose the network's size at
    ``train`` from the device and the training-set size (``index_factory``
    sets it when the description names no size).

    Arrays in and out follow faiss's Python layer (see ``arrays``): vectors
    are (n, d) float32 numpy arrays; other real dtypes, layouts and nested
    lists are converted; torch tensors on any device are accepted, and a
    method whose input is a tensor returns tensors on that tensor's device
    (``search``, ``range_search``, ``sa_encode``, ``sa_decode``,
    ``reconstruct_batch``). Concurrent searches from several threads are
    safe; ``train``, ``add``, ``remove_ids`` and ``reset`` must not run
    while another thread uses the index (as in faiss).
    """

    def __init__(self, config: RQMoEConfig, nlist: int = 0, metric: int = faiss.METRIC_L2, *,
                 hnsw_m: int = 0, nprobe: int = 1, nshort: int = 100, encode_candidates=AUTO,
                 encode_beam=AUTO, device=None, train_config: Optional[TrainConfig] = None,
                 train_options: Optional[dict] = None, auto_architecture: bool = False):
        if not isinstance(config, RQMoEConfig):
            raise TypeError(f"config must be an RQMoEConfig, got {type(config).__name__}")
        if metric not in METRICS:
            raise ValueError(f"metric must be faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT, got {metric!r}")
        if isinstance(nlist, bool) or int(nlist) != nlist or int(nlist) < 0 \
                or isinstance(hnsw_m, bool) or int(hnsw_m) != hnsw_m or int(hnsw_m) < 0:
            raise ValueError(f"nlist and hnsw_m must be integers >= 0, got nlist={nlist!r}, hnsw_m={hnsw_m!r}")
        if config.ctx_dim not in (0, config.d) or (config.ctx_dim and int(nlist) <= 1):
            raise ValueError(f"config.ctx_dim={config.ctx_dim}: the index conditions its codec on the IVF "
                             f"centroid, so ctx_dim must be 0 or d={config.d}, and d needs nlist > 1 "
                             f"(got nlist={nlist})")
        if train_config is not None and train_options:
            raise ValueError("give train_config or train_options, not both")
        if train_config is not None and not isinstance(train_config, TrainConfig):
            raise TypeError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
        self.config = config
        self.d = config.d
        self._nlist = int(nlist)
        self.metric_type = metric
        self.hnsw_m = int(hnsw_m)
        self.device = resolve_device(device)
        self.encode_candidates = encode_candidates
        self.encode_beam = encode_beam
        self.train_config = train_config or TrainConfig.from_options(dict(train_options or {}))
        self.auto_architecture = bool(auto_architecture)
        self.model = RQMoE(config).to(self.device)
        self.execution = Execution()
        self.mem_budget_bytes = DEFAULT_MEM_BUDGET_BYTES
        self._engine: Optional[Engine] = None
        self.ivf: Optional[faiss.IndexIVFResidualQuantizer] = None
        self.centroids: Optional[np.ndarray] = None
        self.static_codebooks: Optional[np.ndarray] = None  # (M, K, d): the lookup-table codebooks
        self.train_history: Optional[TrainHistory] = None
        self.pretrained: Optional[str] = None  # name of the pretrained codec this index started from
        self._mirror = None  # scan.ListMirror (CPU) or scan.CodeMirror (GPU), built at the first search
        self._mirror_lock = threading.Lock()
        self._device_cache = {}
        self._search_graphs = GraphCache()  # small GPU searches, one recorded graph a shape (``_graphed_search``)
        self._nprobe = 1
        self.nprobe = nprobe
        self.nshort = nshort

    # ----------------------------------------------------------- properties
    @property
    def is_trained(self) -> bool:
        return self.ivf is not None

    @property
    def ntotal(self) -> int:
        return 0 if self.ivf is None else int(self.ivf.ntotal)

    @property
    def nlist(self) -> int:
        """Inverted lists (1 for the flat variant), as faiss's IVF indexes report it."""
        return max(1, self._nlist)

    @property
    def code_size(self) -> int:
        """Bytes stored a vector in the inverted lists: M·nbits bits of codes + 1 byte of quantized norm."""
        return int(self.ivf.code_size) if self.ivf is not None else self.config.code_size + 1

    @property
    def quantizer(self) -> Optional[faiss.Index]:
        """The coarse quantizer (a faiss index over the nlist centroids) once trained."""
        return None if self.ivf is None else self.ivf.quantizer

    @property
    def invlists(self):
        """faiss's inverted lists: ``invlists.list_size(i)``, as for a faiss IVF index."""
        return None if self.ivf is None else self.ivf.invlists

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int):
        self._nprobe = check_positive_int(value, "nprobe")
        if self.ivf is not None:
            self.ivf.nprobe = self._nprobe

    @property
    def nshort(self) -> int:
        return self._nshort

    @nshort.setter
    def nshort(self, value: int):
        self._nshort = check_positive_int(value, "nshort")

    @property
    def encode_candidates(self):
        return self._encode_candidates

    @encode_candidates.setter
    def encode_candidates(self, value):
        self._encode_candidates = value if value is None or value == AUTO else \
            check_positive_int(value, "encode_candidates")

    @property
    def encode_beam(self):
        return self._encode_beam

    @encode_beam.setter
    def encode_beam(self, value):
        self._encode_beam = value if value == AUTO else check_positive_int(value, "encode_beam")

    @property
    def train_options(self) -> dict:
        """The training options that differ from TrainConfig's defaults."""
        return self.train_config.to_dict(non_default_only=True)

    def set_params(self, description: str) -> None:
        """Set search parameters from a faiss ParameterSpace-style string, e.g. "nprobe=16,nshort=50"."""
        self.nprobe, self.nshort, sel = parse_search_params(description, self._nprobe, self._nshort)

    def __repr__(self) -> str:
        return (f"IndexRQMoE(d={self.d}, M={self.config.M}, nbits={self.config.nbits}, nlist={self._nlist}, "
                f"metric={METRICS[self.metric_type]}, ntotal={self.ntotal}, is_trained={self.is_trained}, "
                f"device={self.device})")

    # ---------------------------------------------------- copy and pickle
    def __copy__(self) -> "IndexRQMoE":
        """An independent index (``snapshot.clone``): faiss's ``copy.copy`` of an index is one too, and
        a copy that shared the storage would see the original's ``add`` and ``reset``."""
        return snapshot.clone(self)

    def __deepcopy__(self, memo) -> "IndexRQMoE":
        clone = snapshot.clone(self)
        memo[id(self)] = clone
        return clone

    def __reduce__(self):
        """Pickles hold the bytes of the package's file format (``snapshot.payload``); unpickling reads
        them with its reader onto the default device, as ``read_index`` does."""
        return index_from_pickle, (snapshot.payload(self),)

    def merge_from(self, other: "IndexRQMoE", add_id: int = 0) -> None:
        """Move the vectors of ``other`` into this index, as faiss's ``IndexIVF.merge_from`` does: their
        ids become id + add_id, and ``other`` is left empty (trained).

        other: an IndexRQMoE with the same d, metric, codec (config and weights), lookup-table
        codebooks and coarse centroids, e.g. a ``clone_index`` of the same trained index, filled
        apart. ValueError names the first difference; TypeError for another kind of index.
        """
        if not isinstance(other, IndexRQMoE):
            raise TypeError(f"merge_from expects an IndexRQMoE, got {type(other).__name__}: "
                            "indexes of different types cannot be merged")
        if other is self:
            raise ValueError("merge_from: cannot merge an index into itself")
        if isinstance(add_id, bool) or not isinstance(add_id, (int, np.integer)):
            raise TypeError(f"merge_from: add_id must be an integer, got {add_id!r}")
        self._require_trained("merge_from")
        other._require_trained("being merged")
        mismatch = self._merge_mismatch(other)
        if mismatch:
            raise ValueError(f"merge_from: the indexes differ in {mismatch}; only indexes that share one "
                             "trained codec and its lists (e.g. clones of one trained index) can be merged")
        self.ivf.merge_from(other.ivf, int(add_id))
        self._mirror = None  # rebuilt from the lists at the next search
        if other._mirror is not None:
            other._mirror.reset()

    def _merge_mismatch(self, other: "IndexRQMoE") -> str:
        """What keeps ``other``'s codes from meaning the same here ('' when nothing does)."""
        pairs = (("d", self.d, other.d), ("metric_type", self.metric_type, other.metric_type),
                 ("config", self.config, other.config), ("nlist", self.nlist, other.nlist))
        for name, mine, theirs in pairs:
            if mine != theirs:
                return f"{name}: {mine} here, {theirs} in other"
        if not np.array_equal(self.centroids, other.centroids):
            return "coarse centroids"
        if not np.array_equal(self.static_codebooks, other.static_codebooks):
            return "lookup-table codebooks"
        mine, theirs = self.model.state_dict(), other.model.state_dict()
        for key, value in mine.items():
            if not torch.equal(value.cpu(), theirs[key].cpu()):
                return f"codec weights ({key})"
        return ""

    def _require_trained(self, what: str):
        if not self.is_trained:
            raise RuntimeError(f"IndexRQMoE must be trained before {what}: call index.train(x) first")

    def _encoding(self):
        """(candidates, beam) for database encoding on the codec's device ("auto" resolved). A plain-RQ
        codec is encoded exactly with at least faiss's beam, so it is never worse than faiss's RQ."""
        gpu = self.model.device.type == "cuda"
        candidates = AUTO_ENCODE_CANDIDATES[gpu] if self.encode_candidates == AUTO else self.encode_candidates
        beam = AUTO_ENCODE_BEAM[gpu] if self.encode_beam == AUTO else self.encode_beam
        if self.config.mode is Condition.NONE:
            return None, max(beam, RQ_ENCODE_BEAM)
        return candidates, beam

    # ---------------------------------------------------------------- device
    @property
    def engine(self) -> Engine:
        """The inference engine the index encodes and decodes with: its model, ``execution`` and
        ``mem_budget_bytes``, built once and again after any of them changes."""
        engine = self._engine
        if engine is None or engine.model is not self.model or engine.execution != self.execution \
                or engine.mem_budget_bytes != self.mem_budget_bytes:
            engine = self._engine = Engine(self.model, self.execution, self.mem_budget_bytes)
        return engine

    def set_execution(self, kernel: Optional[str] = None, dtype: Optional[str] = None,
                      cuda_graphs: Optional[bool] = None, mem_budget_bytes: Optional[int] = None) -> "IndexRQMoE":
        """Choose how the codec runs (``Execution``'s fields; None keeps a setting) and the byte budget of
        one chunk's temporaries. Returns self."""
        changes = {k: v for k, v in (("kernel", kernel), ("dtype", dtype), ("cuda_graphs", cuda_graphs))
                   if v is not None}
        self.execution = dataclasses.replace(self.execution, **changes)
        if mem_budget_bytes is not None:
            self.mem_budget_bytes = check_positive_int(mem_budget_bytes, "mem_budget_bytes")
        return self

    def to(self, device) -> "IndexRQMoE":
        """Move the codec and search to ``device`` ('cpu', 'cuda', ...); the code mirror follows."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        self._engine = None
        self._device_cache = {}
        self._mirror = None
        return self

    def _on_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        """A numpy array of the index (centroids, static codebooks) as a tensor on the codec's device, cached."""
        cached = self._device_cache.get(name)
        if cached is None or cached[0] is not array:
            cached = (array, torch.from_numpy(array).to(self.model.device))
            self._device_cache[name] = cached
        return cached[1]

    def _centroid_norms(self, centroids: torch.Tensor) -> torch.Tensor:
        """||c||² (nlist,) float32 of the centroids on the codec's device (``_on_device``), cached with them."""
        cached = self._device_cache.get("centroid norms")
        if cached is None or cached[0] is not centroids:
            cached = (centroids, (centroids * centroids).sum(1))
            self._device_cache["centroid norms"] = cached
        return cached[1]

    def _code_mirror(self):
        """What the scan reads beside faiss's lists: on the CPU a ``scan.ListMirror`` (the terms only; codes
        and ids read in place from the lists), on a GPU a ``scan.CodeMirror`` (codes, ids and terms there).
        Rebuilt from the faiss index when it no longer matches it."""
        with self._mirror_lock:
            if self._mirror is not None and not self._mirror.in_step(self.ivf):
                self._mirror = None
            if self._mirror is None:
                self._search_graphs.clear()  # they read the store being replaced
                with_terms = self.metric_type == faiss.METRIC_L2
                if self.model.device.type == "cpu":
                    self._mirror = scan.ListMirror.from_faiss(
                        self.ivf, self.static_codebooks, self.centroids, self.config.M, self.config.nbits,
                        with_terms)
                else:
                    self._mirror = scan.CodeMirror.from_faiss(
                        self.ivf, self.static_codebooks, self.centroids, self.config.M, self.config.nbits,
                        self.model.device, with_terms)
            return self._mirror

    def restore(self, state: dict, ivf, history: Optional[TrainHistory] = None, pretrained: Optional[str] = None,
                label: str = "the index") -> "IndexRQMoE":
        """Install a trained codec state dict and its faiss storage (``read_index``, pretrained codecs).

        ivf: a faiss IndexIVFResidualQuantizer holding the lookup-table codebooks, codes and ids; it
        must agree with this index's config, nlist and metric (FileFormatError naming ``label`` if not).
        Returns self.
        """
        from .storage import FileFormatError

        c = self.config
        if not isinstance(ivf, faiss.IndexIVFResidualQuantizer):
            raise FileFormatError(f"{label} is corrupted: its faiss part is a {type(ivf).__name__}, "
                                  "expected an IndexIVFResidualQuantizer")
        nbits = [int(b) for b in faiss.vector_to_array(ivf.rq.nbits)]
        found = (ivf.d, ivf.nlist, ivf.rq.M, ivf.metric_type)
        if found != (c.d, self.nlist, c.M, self.metric_type) or any(b != c.nbits for b in nbits):
            raise FileFormatError(f"{label} is corrupted: its faiss part has d={ivf.d}, nlist={ivf.nlist}, "
                                  f"M={ivf.rq.M}, nbits={nbits}, metric={ivf.metric_type}; the header says "
                                  f"d={c.d}, nlist={self.nlist}, M={c.M}, nbits={c.nbits}, metric={self.metric_type}")
        self.model.load_state_dict(state, strict=True)
        self.model.to(self.device)
        self.ivf = ivf
        ivf.nprobe = self._nprobe
        self.centroids = np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist), dtype=np.float32)
        self.static_codebooks = faiss.vector_to_array(ivf.rq.codebooks).reshape(c.M, c.K, c.d).copy()
        self.train_history = history
        self.pretrained = pretrained
        self._device_cache = {}
        self._mirror = None
        return self

    # ------------------------------------------------------------- training
    def _make_quantizer(self, centroids: np.ndarray) -> faiss.Index:
        if self.hnsw_m > 0:
            quantizer = faiss.IndexHNSWFlat(self.d, self.hnsw_m, self.metric_type)
        elif self.metric_type == faiss.METRIC_INNER_PRODUCT:
            quantizer = faiss.IndexFlatIP(self.d)
        else:
            quantizer = faiss.IndexFlatL2(self.d)
        quantizer.add(centroids)
        return quantizer

    def _assign(self, x: np.ndarray, quantizer: Optional[faiss.Index] = None) -> np.ndarray:
        """Inverted list of each vector (n, d) float32: (n,) int64."""
        quantizer = quantizer if quantizer is not None else self.ivf.quantizer
        if quantizer.ntotal == 1:
            return np.zeros(len(x), dtype=np.int64)
        return quantizer.search(x, 1)[1][:, 0]

    def _train_coarse(self, x: np.ndarray) -> np.ndarray:
        """The nlist centroids (nlist, d) float32: faiss k-means on x, or, when flat, the mean of x (what
        faiss's IVF1 finds): the codec then encodes centred vectors, which matters for data far from the
        origin, e.g. sentence embeddings."""
        nlist, config = self.nlist, self.train_config
        if self._nlist <= 1:
            return x.mean(0, dtype=np.float64, keepdims=True).astype(np.float32)
        if len(x) < nlist:
            raise ValueError(f"training IVF{nlist} needs at least nlist={nlist} vectors, got {len(x)}")
        if len(x) < 30 * nlist:
            warnings.warn(f"training IVF{nlist} on {len(x)} vectors: faiss recommends at least "
                          f"{30 * nlist} (30 per list); lists will be poorly placed", stacklevel=3)
        kmeans = faiss.Kmeans(self.d, nlist, niter=20, seed=config.seed + 1234, spherical=False, verbose=False,
                              max_points_per_centroid=256)
        sample = min(len(x), 256 * nlist)
        expected = sample * nlist * self.d * 20 / (0.05 * matmul_rate()) + 0.2  # faiss's k-means: ~5 % of a GEMM's rate
        with timed_stage(f"k-means IVF{nlist} ({sample} vectors)", expected, config.progress), \
                folded_faiss_warnings(f"training IVF{nlist}"):
            kmeans.train(x)
        return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)

    def train(self, x, xval=None) -> None:
        """Train the coarse quantizer, the RQ-MoE codec and the lookup-table stage.

        x: (n, d) float32 (other real dtypes and torch tensors are
        converted). xval: optional (nv, d) validation vectors for the codec's
        schedule and the final choice (default: the last min(10 000, n // 10)
        vectors of x are held out). Retraining discards stored vectors. The
        codec replaces its faiss RQ start only when it encodes the
        validation vectors better with the index's encoding settings.
        An index made from a pretrained codec trains only what depends on
        the data: the coarse quantizer if it has no centroids, and the
        lookup tables.
        """
        x = as_vectors(x, self.d, allow_empty=False)
        config = self.train_config
        if xval is None:
            n_val = min(10_000, len(x) // 10)
            if n_val == 0:
                raise ValueError(f"x has {len(x)} vectors: too few to hold out validation vectors; pass xval")
            x, xval = x[:-n_val], x[-n_val:]
        else:
            xval = as_vectors(xval, self.d, "xval", allow_empty=False)
        start = time.perf_counter()
        pretrained_centroids = self.centroids if self.pretrained is not None else None
        if pretrained_centroids is not None:
            centroids = pretrained_centroids
        else:  # under torch.distributed, k-means runs once, on rank 0, and every process takes its centroids
            centroids = self._train_coarse(x) if distributed.rank_and_world()[0] == 0 else \
                np.zeros((self.nlist, self.d), dtype=np.float32)
            centroids = distributed.broadcast_array(centroids)
        quantizer = self._make_quantizer(centroids)
        list_nos, val_lists = self._assign(x, quantizer), self._assign(xval, quantizer)
        residuals, val_residuals = x - centroids[list_nos], xval - centroids[val_lists]
        ctx = (centroids[list_nos], centroids[val_lists]) if self.config.ctx_dim else (None, None)
        if self.pretrained is None:
            self._train_codec(residuals, val_residuals, ctx)
        rows = np.arange(len(residuals))
        if len(rows) > config.lut_train_max:
            rows = np.sort(np.random.default_rng(config.seed).choice(len(rows), config.lut_train_max, replace=False))
        self.centroids = centroids
        codes = self._encode(residuals[rows], list_nos[rows], desc="encode for the lookup tables")
        self._build_storage(quantizer, codes, residuals[rows])
        logger.info("trained %r in %.1f s", self, time.perf_counter() - start)

    def _train_codec(self, residuals: np.ndarray, val_residuals: np.ndarray, ctx) -> None:
        """Train the codec on residuals, then keep it or its faiss RQ start, whichever encodes the
        validation residuals better with the index's encoding settings."""
        config = self.train_config
        if self.auto_architecture:
            size = auto_architecture(self.device, len(residuals))
            fields = {**self.config.to_dict(), **size}
            if self.config.top_k is not None and self.config.top_k >= fields["n_experts"]:
                fields["routing"] = "dense"  # top-k of k or fewer experts runs them all
            self.config = RQMoEConfig(**fields)
            logger.info("model size for %d training vectors on %s: %s", len(residuals), self.device, size)
        with torch.random.fork_rng(devices=[]):  # the networks' start follows the seed, not the caller's RNG
            torch.manual_seed(config.seed)
            self.model = RQMoE(self.config).to(self.device)
        start = time.perf_counter()
        if distributed.rank_and_world()[0] == 0:  # the faiss start is trained once and broadcast
            rq = train_faiss_rq(residuals, self.config.M, self.config.nbits, config.rq_beam, config.rq_train_type,
                                config.rq_train_max, config.seed, config.progress)
            self.model.init_from_rq(rq, scale=float(np.abs(residuals).max()) or 1.0, instr_init=config.instr_init)
        distributed.broadcast_module(self.model)
        rq_init_s = time.perf_counter() - start
        rq_model = RQMoE(RQMoEConfig(**{**self.config.to_dict(), "condition": "none", "ctx_dim": 0})).to(self.device)
        with torch.no_grad():
            rq_model.codebooks.copy_(self.model.codebooks)
            rq_model.scale.copy_(self.model.scale)
            rq_model.initialized.fill_(True)
        self.train_history = train_rqmoe(self.model, residuals, val_residuals, config.replace(device=str(self.device)),
                                         ctx=ctx[0], ctx_val=ctx[1], execution=self.execution)
        self.train_history.rq_init_s = rq_init_s
        learned = self._val_mse(self.model, val_residuals, ctx[1])
        start_mse = self._val_mse(rq_model, val_residuals, None, plain=True)
        self.train_history.learned_val_mse = learned
        self.train_history.rq_val_mse = start_mse
        if config.keep_rq_if_better and not learned < start_mse:
            history = self.train_history
            warnings.warn(f"the learned codec did not encode the validation vectors better than its faiss RQ "
                          f"start (MSE {learned:.6g} vs {start_mse:.6g}) after {len(history.epoch)} epoch(s) "
                          f"(stop: {history.stop_reason}): the index keeps the RQ start (did not improve on its "
                          "RQ initialisation); train longer (time_budget_s, max_epochs) or on more vectors",
                          stacklevel=3)
            self.config, self.model = rq_model.config, rq_model

    def _val_mse(self, model: RQMoE, x: np.ndarray, ctx: Optional[np.ndarray], plain: bool = False) -> float:
        candidates, beam = self._encoding()
        if plain:
            if model.device.type == "cpu":
                rq = self._faiss_rq(model)
                return float(((rq.decode(rq.compute_codes(x)) - x) ** 2).sum(1).mean())
            candidates, beam = None, max(beam, RQ_ENCODE_BEAM)
        xs = torch.from_numpy(x).to(model.device) / model.scale
        ctx_s = None if ctx is None else model.normalize_ctx(torch.from_numpy(ctx).to(model.device))
        with torch.inference_mode():
            engine = self.engine if model is self.model else Engine(model, self.execution, self.mem_budget_bytes)
            return reconstruction_mse(engine, xs, candidates, ctx=ctx_s, beam_size=beam)

    def _build_storage(self, quantizer: faiss.Index, codes: np.ndarray, residuals: np.ndarray) -> None:
        """The faiss index that stores codes, with lookup-table codebooks fitted to (codes, residuals)."""
        if self.config.mode is Condition.NONE:  # plain RQ: its own codebooks are the exact lookup tables
            codebooks = self.model.rq_codebooks()
        else:
            codebooks = lut.fit_additive_codebooks(codes, residuals, self.config.K)
        static = lut.static_reconstruction(codebooks, codes)
        self.ivf = lut.build_ivf_index(quantizer, self.d, self.nlist, codebooks, self.config.nbits,
                                       self.metric_type, (static ** 2).sum(1))
        self.ivf.nprobe = self._nprobe
        self.static_codebooks = codebooks
        self._device_cache = {}
        self._mirror = None

    # --------------------------------------------------------------- codec
    def _encode(self, residuals: np.ndarray, list_nos: np.ndarray, desc: str = "encode") -> np.ndarray:
        """Codes (n, M) int64 numpy of residuals (n, d) float32 to the centroids of lists list_nos (n,),
        in chunks, with a progress bar for runs of more than two seconds."""
        from tqdm.auto import tqdm

        model, engine = self.model, self.engine
        candidates, beam = self._encoding()
        out = np.empty((len(residuals), self.config.M), dtype=np.int64)
        rq = self._faiss_rq(model) if self.config.mode is Condition.NONE and model.device.type == "cpu" else None
        bar = tqdm(total=len(residuals), desc=desc, unit="vec", delay=2.0, disable=not self.train_config.progress)
        with torch.inference_mode(), bar:
            for i0 in range(0, len(residuals), ENCODE_CHUNK):
                if rq is not None:
                    chunk = residuals[i0:i0 + ENCODE_CHUNK]
                    out[i0:i0 + ENCODE_CHUNK] = lut.unpack_bits(rq.compute_codes(chunk), self.config.M,
                                                                self.config.nbits)
                    bar.update(len(chunk))
                    continue
                chunk = torch.from_numpy(residuals[i0:i0 + ENCODE_CHUNK]).to(model.device)
                ctx = None
                if self.config.ctx_dim:
                    ctx = model.normalize_ctx(self._on_device("centroids", self.centroids)[
                        torch.from_numpy(list_nos[i0:i0 + ENCODE_CHUNK]).to(model.device)])
                out[i0:i0 + ENCODE_CHUNK] = engine.encode_scaled(chunk / model.scale, candidates, beam,
                                                                 ctx).cpu().numpy()
                bar.update(len(chunk))
        return out

    def _faiss_rq(self, model: RQMoE) -> faiss.ResidualQuantizer:
        """faiss's residual quantizer on a plain-RQ codec's codebooks (raw units), encoding with beam
        RQ_ENCODE_BEAM: the CPU's encoder for such a codec."""
        c = model.config
        rq = faiss.ResidualQuantizer(c.d, c.M, c.nbits)
        faiss.copy_array_to_vector(np.ascontiguousarray(model.rq_codebooks(), dtype=np.float32).ravel(),
                                   rq.codebooks)
        rq.is_trained = True
        rq.max_beam_size = RQ_ENCODE_BEAM
        return rq

    def _decode_on_device(self, codes: torch.Tensor, list_nos: torch.Tensor) -> torch.Tensor:
        """Reconstructions (n, d) float32 on the codec's device of codes (n, M) stored in lists list_nos (n,)."""
        centroids = self._on_device("centroids", self.centroids)[list_nos.to(self.model.device)]
        if codes.is_cuda:  # the index's own codes and centroids: no check that would wait for the device
            ctx_s = self.model.normalize_ctx(centroids) if self.config.ctx_dim else None
            return self.engine.decode_checked(codes.long(), ctx_s) + centroids
        return self.engine.decode(codes, ctx=centroids if self.config.ctx_dim else None) + centroids

    def _decode(self, codes: np.ndarray, list_nos: np.ndarray) -> np.ndarray:
        """Reconstructions (n, d) float32 numpy of codes (n, M) stored in lists list_nos (n,)."""
        if len(codes) == 0:
            return np.empty((0, self.d), dtype=np.float32)
        return self._decode_on_device(torch.from_numpy(codes), torch.from_numpy(list_nos)).cpu().numpy()

    def sa_code_size(self) -> int:
        """Bytes of one standalone code: list number + M*nbits bits + 8-bit norm."""
        self._require_trained("sa_code_size")
        return int(self.ivf.sa_code_size())

    @returns_like("x")
    def sa_encode(self, x):
        """Standalone codes of vectors: x (n, d) float32 -> (n, sa_code_size()) uint8."""
        self._require_trained("sa_encode")
        x = as_vectors(x, self.d)
        if len(x) == 0:
            return np.empty((0, self.sa_code_size()), dtype=np.uint8)
        list_nos = self._assign(x)
        codes = self._encode(x - self.centroids[list_nos], list_nos)
        return lut.encode_sa_codes(self.ivf, codes, list_nos)

    @returns_like("codes")
    def sa_decode(self, codes):
        """Vectors from standalone codes: (n, sa_code_size()) uint8 -> (n, d) float32."""
        self._require_trained("sa_decode")
        codes = np.asarray(to_host(codes))
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.sa_code_size():
            raise ValueError(f"codes must be uint8 of shape (n, {self.sa_code_size()}), "
                             f"got {codes.dtype} {codes.shape}")
        list_nos, rq_codes = lut.decode_sa_codes(self.ivf, codes, self.config.M, self.config.nbits)
        if (list_nos >= self.ivf.nlist).any():
            raise ValueError(f"codes name inverted lists beyond nlist={self.ivf.nlist}")
        return self._decode(rq_codes, list_nos)

    # ---------------------------------------------------------------- adding
    def add(self, x) -> None:
        """Encode and store vectors with sequential ids ntotal, ntotal+1, ...: x (n, d) float32.

        Either every vector is added or none (an error or an interrupt while
        encoding leaves the index as it was).
        """
        self._add(x, None)

    def add_with_ids(self, x, ids) -> None:
        """Encode and store vectors under given ids: x (n, d) float32, ids (n,) int64.

        Any int64 id but -1 is stored and returned as given (faiss's search
        output uses -1 for 'no result'); all or nothing, as ``add``.
        """
        self._add(x, ids)

    def _add(self, x, ids) -> None:
        self._require_trained("adding vectors")
        x = as_vectors(x, self.d)
        if ids is not None:
            ids = as_ids(ids, len(x))
        if len(x) == 0:
            return
        list_nos = self._assign(x)
        codes = self._encode(x - self.centroids[list_nos], list_nos, desc="add RQ-MoE")
        sa_codes = lut.encode_sa_codes(self.ivf, codes, list_nos)
        new_ids = np.arange(self.ntotal, self.ntotal + len(x), dtype=np.int64) if ids is None else ids
        mirror = self._mirror
        if mirror is not None and not mirror.in_step(self.ivf):  # the lists changed elsewhere: rebuilt at search
            mirror = self._mirror = None
        terms = None
        if mirror is not None and mirror.with_terms:
            terms = scan.vector_terms(self._on_device("codebooks", self.static_codebooks),
                                      self._on_device("centroids", self.centroids),
                                      torch.from_numpy(codes).to(mirror.device),
                                      torch.from_numpy(list_nos).to(mirror.device)).cpu().numpy()
        self.ivf.add_sa_codes(sa_codes, ids)
        if mirror is not None:
            mirror.add(codes, list_nos, new_ids, terms)

    # -------------------------------------------------------------- searching
    def _coarse(self, xq: torch.Tensor, nprobe: int):
        """Probed lists and their coarse terms: (nq, P) int64 and (nq, P) float32 on the codec's device.

        On a GPU: an exact search over the centroids (a matmul); on the CPU: faiss's quantizer (flat or
        HNSW). L2: ||q - c||²; inner product: <q, c>.
        """
        nprobe = min(nprobe, self.nlist)
        inner_product = self.metric_type == faiss.METRIC_INNER_PRODUCT
        if xq.is_cuda:
            centroids = self._on_device("centroids", self.centroids)
            if inner_product:
                scores = xq @ centroids.T
            else:
                scores = torch.addmm(self._centroid_norms(centroids)[None, :], xq, centroids.T, alpha=-2)
                scores += (xq * xq).sum(1, keepdim=True)
            coarse, probes = scores.topk(nprobe, dim=1, largest=inner_product)
            return probes, coarse
        coarse, probes = self.ivf.quantizer.search(xq.numpy(), nprobe)
        return torch.from_numpy(probes), torch.from_numpy(coarse)

    def _selector_masks(self, mirror, sel):
        return None if sel is None else mirror.selector_masks(sel)

    def _shortlist_distances(self, mirror, xq: torch.Tensor, nshort: int, nprobe: int,
                             masks=None, decode_every_slot: Optional[bool] = None):
        """Scan, decode and score: xq (nq, d) float32 on the codec's device -> exact distances (nq, nshort)
        float32 (worst where empty) and ids (nq, nshort) int64 (-1 where empty), on that device.
        masks: the mirror's ``selector_masks`` (None: all vectors). decode_every_slot (default: on a GPU)
        decodes empty slots too, masking them after, instead of selecting the valid ones first: no host
        synchronisation, which a CUDA graph needs."""
        inner_product = self.metric_type == faiss.METRIC_INNER_PRODUCT
        probes, coarse = self._coarse(xq, nprobe)
        if not probes.is_cuda:  # faiss's CPU IVF indexes count their scans; its GPU ones do not
            scan.count_ivf_search(probes.numpy(), mirror.list_offsets())
        device = self.model.device
        shortlist = scan.scan(mirror, self._on_device("codebooks", self.static_codebooks), xq,
                              probes.to(device), coarse.to(device), nshort, inner_product, masks)
        if self.config.mode is Condition.NONE:
            # a plain-RQ codec (e.g. the RQ start kept after training) reconstructs with the very codebooks the
            # table holds: its table distance is the exact one, and decoding to re-rank would change nothing
            return shortlist.distances, shortlist.ids
        worst = -torch.inf if inner_product else torch.inf
        valid = shortlist.valid
        if xq.is_cuda if decode_every_slot is None else decode_every_slot:
            nq, width = valid.shape
            recons = self._decode_on_device(shortlist.codes.reshape(nq * width, -1),
                                            shortlist.list_nos.reshape(-1)).view(nq, width, -1)
            exact = (xq.unsqueeze(1) * recons).sum(2) if inner_product else ((xq.unsqueeze(1) - recons) ** 2).sum(2)
            return torch.where(valid, exact, torch.full_like(exact, worst)), shortlist.ids
        dist = torch.full(shortlist.ids.shape, worst, device=device)
        if bool(valid.any()):
            recons = self._decode_on_device(shortlist.codes[valid], shortlist.list_nos[valid])
            queries = xq.unsqueeze(1).expand(-1, valid.shape[1], -1)[valid]
            exact = (queries * recons).sum(1) if inner_product else ((queries - recons) ** 2).sum(1)
            dist[valid] = exact
        return dist, shortlist.ids

    def _query_chunk(self, nshort: int) -> int:
        return max(1, (64 << 20) // (nshort * (self.d + self.config.M + 4) * 4))

    @returns_like("x", outputs=("D", "I"))
    def search(self, x, k: int, params=None, D=None, I=None):
        """k nearest neighbours of each query.

        x: (nq, d) float32 (see ``arrays`` for what is converted); k: int > 0;
        params: optional search parameters for this call: a dict, a string
        "nprobe=16,nshort=50", or an object with ``nprobe``/``nshort``/``sel``
        attributes such as ``faiss.SearchParametersIVF(nprobe=8, sel=...)``
        (the selector is honoured; unknown dict keys raise); D, I: optional
        (nq, k) outputs to fill, numpy or torch. Returns D (nq, k) float32 and
        I (nq, k) int64, best first; missing results have id -1 and distance
        +inf (L2) or -inf (inner product). A torch x gives torch D, I on x's
        device; with a CUDA codec and a CUDA x nothing crosses to the host.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        self._require_trained("searching")
        nprobe, nshort, sel = parse_search_params(params, self._nprobe, self._nshort)
        device = self.model.device
        xq = as_vectors_on(x, self.d, device)
        nq = xq.shape[0]
        for name, out in (("D", D), ("I", I)):
            if out is not None and tuple(out.shape) != (nq, k):
                raise ValueError(f"{name} has shape {tuple(out.shape)}, expected ({nq}, {k})")
        D_out, I_out = self._search_on_device(xq, k, max(nshort, k), nprobe, sel)
        if not (isinstance(x, torch.Tensor) and x.device == device):
            D_out, I_out = D_out.cpu().numpy(), I_out.cpu().numpy()
        return fill_output(D_out, D, "D"), fill_output(I_out, I, "I")

    def _no_results(self, nq: int, k: int, device: torch.device):
        """D (nq, k) float32 of the metric's worst distance and I (nq, k) int64 of -1, as faiss fills missing
        results."""
        worst = -torch.inf if self.metric_type == faiss.METRIC_INNER_PRODUCT else torch.inf
        return (torch.full((nq, k), worst, device=device), torch.full((nq, k), -1, dtype=torch.int64, device=device))

    def _search_on_device(self, xq: torch.Tensor, k: int, nshort: int, nprobe: int, sel):
        """D (nq, k) float32 and I (nq, k) int64 on the codec's device."""
        nq, device = xq.shape[0], xq.device
        if nq == 0 or self.ntotal == 0:
            return self._no_results(nq, k, device)
        # every row is written below, by the graph's copy-out or a block's assignment: no fill first
        D_out = torch.empty((nq, k), device=device)
        I_out = torch.empty((nq, k), dtype=torch.int64, device=device)
        mirror = self._code_mirror()
        if sel is None and self._graphed_search(mirror, xq, k, nshort, nprobe, D_out, I_out) is not None:
            return D_out, I_out
        bs = self._query_chunk(nshort)
        masks = self._selector_masks(mirror, sel)
        with torch.inference_mode():
            for i0 in range(0, nq, bs):
                D_out[i0:i0 + bs], I_out[i0:i0 + bs] = self._search_block(mirror, xq[i0:i0 + bs], k, nshort,
                                                                          nprobe, masks)
        return D_out, I_out

    def _search_block(self, mirror, xq: torch.Tensor, k: int, nshort: int, nprobe: int, masks=None):
        """One chunk of queries xq (b, d) -> D (b, k) float32 and I (b, k) int64 on the codec's device."""
        inner_product = self.metric_type == faiss.METRIC_INNER_PRODUCT
        dist, ids = self._shortlist_distances(mirror, xq, nshort, nprobe, masks)
        top = min(k, dist.shape[1])
        best, order = dist.topk(top, dim=1, largest=inner_product)
        best_ids = torch.where(torch.isfinite(best), ids.gather(1, order), -1)
        if top == k:  # the usual case: no padding, and no fill and copy kernels in a single query's chain
            return best, best_ids
        D, I = self._no_results(xq.shape[0], k, xq.device)
        D[:, :top], I[:, :top] = best, best_ids
        return D, I

    def _graphed_search(self, mirror, xq: torch.Tensor, k: int, nshort: int, nprobe: int, D_out, I_out):
        """A small search on a GPU (up to ``SEARCH_GRAPH_MAX_QUERIES`` queries, no selector) replayed as one
        CUDA graph recorded for its shape: a query alone is otherwise bound by the host launching some
        eighty kernels (docs/experiments.md, section 8). Fills D_out, I_out and returns them, or None where
        that does not apply (CPU, graphs off, larger batches, a search that cannot be recorded)."""
        nq = xq.shape[0]
        if not (xq.is_cuda and self.execution.cuda_graphs and nq <= SEARCH_GRAPH_MAX_QUERIES):
            return None
        rows = 1 << (nq - 1).bit_length()
        if rows > self._query_chunk(nshort):
            return None
        # the graph reads the store's and the codec's tensors where they were when it was recorded: any new
        # one (an add, a removal, a move, new weights) records it again
        centroids = self._on_device("centroids", self.centroids)
        tensors = [self._on_device("codebooks", self.static_codebooks), centroids, self._centroid_norms(centroids)]
        tensors += [t for seg in mirror.segments for t in (seg.codes, seg.ids, seg.terms, seg.offsets) if t is not None]
        # (the mirror and the engine themselves: the entry keeps them, and what the graph read, alive)
        engine = self.engine
        state = (mirror, engine, stamp(tensors), tuple(tuple(t.shape) for t in tensors), engine._weights_stamp())
        # what else changes the recorded arithmetic or launches (see Engine._graphed_decode)
        key = ("search", rows, k, nshort, min(nprobe, self.nlist), self.execution, xq.device,
               torch.backends.cuda.matmul.allow_tf32, autocast_enabled("cuda"), kernels.launch_key(),
               tuple(sorted(scan_kernel.CONFIG.items())))

        def block(queries):
            with torch.inference_mode():
                return self._search_block(mirror, queries, k, nshort, nprobe)
        return self._search_graphs.run(key, state, block, (xq,), (D_out, I_out), rows)

    @returns_like("x")
    def range_search(self, x, radius: float, params=None):
        """All stored vectors within ``radius`` of each query, among the nshort re-ranked candidates.

        x: (nq, d) float32; radius: float. L2: squared distance < radius;
        inner product: similarity > radius. Returns (lims (nq+1,) uint64,
        D float32, I int64) as faiss does (lims int64 for a torch x, as
        faiss.contrib.torch_utils gives): the results of query q are
        D[lims[q]:lims[q+1]], I[lims[q]:lims[q+1]].
        """
        self._require_trained("range_search")
        nprobe, nshort, sel = parse_search_params(params, self._nprobe, self._nshort)
        device = self.model.device
        xq = as_vectors_on(x, self.d, device)
        nshort = min(nshort, max(1, self.ntotal))
        D, I = self._search_on_device(xq, nshort, nshort, nprobe, sel)
        D, I = D.cpu().numpy(), I.cpu().numpy()
        keep = (I >= 0) & np.isfinite(D) & ((D > radius) if self.metric_type == faiss.METRIC_INNER_PRODUCT
                                            else (D < radius))
        # faiss's dtypes: lims uint64 for numpy callers, int64 for torch ones (as faiss.contrib.torch_utils)
        lims = np.zeros(len(D) + 1, dtype=np.int64 if isinstance(x, torch.Tensor) else np.uint64)
        lims[1:] = np.cumsum(keep.sum(1))
        return lims, D[keep].astype(np.float32), I[keep].astype(np.int64)

    # ---------------------------------------------------------- reconstruct
    @returns_like("ids", outputs=("x",))
    def reconstruct_batch(self, ids, x=None):
        """Decoded vectors for stored ids: ids (n,) int64 -> (n, d) float32. Unknown id: KeyError.

        x: optional (n, d) output to fill (numpy or torch), returned.
        """
        return fill_output(self._reconstruct_ids(as_id_list(ids, "reconstruct_batch: ids")), x, "x")

    def _reconstruct_ids(self, ids: np.ndarray) -> np.ndarray:
        """Decoded vectors (n, d) float32 numpy of stored ids (n,) int64."""
        self._require_trained("reconstruct")
        stored_ids, list_nos, raw_codes = lut.all_codes(self.ivf)
        if len(stored_ids) == 0:
            if len(ids):
                raise KeyError(f"id {int(ids[0])} is not in the index")
            return np.empty((0, self.d), dtype=np.float32)
        order = np.argsort(stored_ids, kind="stable")
        pos = np.minimum(np.searchsorted(stored_ids, ids, sorter=order), len(order) - 1)
        found = stored_ids[order[pos]] == ids
        if not np.all(found):
            raise KeyError(f"id {int(ids[~found][0])} is not in the index")
        rows = order[pos]
        codes = lut.unpack_bits(raw_codes[rows], self.config.M, self.config.nbits)
        return self._decode(codes, list_nos[rows])

    def reconstruct(self, key: int, x=None):
        """Decoded vector of one stored id: (d,) float32 numpy, or ``x`` (a (d,) output, numpy or torch)
        filled and returned. A 0-d torch tensor as key gives a torch tensor on its device."""
        key_array = as_id_list(key, "reconstruct: key")
        if key_array.shape != (1,):
            raise ValueError(f"reconstruct: key must be one id, got {key_array.shape[0]}; use reconstruct_batch")
        result = self._reconstruct_ids(key_array)[0]
        if x is None and isinstance(key, torch.Tensor):
            return torch.from_numpy(result).to(key.device)
        return fill_output(result, x, "x")

    def reconstruct_n(self, n0: int = 0, ni: Optional[int] = None, x=None):
        """Decoded vectors of ids n0 .. n0+ni-1: (ni, d) float32 numpy (or ``x`` filled and returned).

        ni: None or -1 (faiss's default) means all ids from n0 to ntotal-1.
        """
        n0 = int(n0)
        ni = self.ntotal - n0 if ni is None or int(ni) == -1 else int(ni)
        if n0 < 0 or ni < 0:
            raise ValueError(f"reconstruct_n: n0 and ni must be >= 0, got n0={n0}, ni={ni}")
        return fill_output(self._reconstruct_ids(np.arange(n0, n0 + ni, dtype=np.int64)), x, "x")

    # --------------------------------------------------------------- editing
    def remove_ids(self, ids) -> int:
        """Remove stored vectors; returns how many were removed.

        ids: (n,) int64 ids (list, numpy array or torch tensor; ids that are
        not stored are ignored) or a faiss.IDSelector.
        """
        self._require_trained("remove_ids")
        if isinstance(ids, faiss.IDSelector):
            removed = int(self.ivf.remove_ids(ids))
        else:
            ids = as_id_list(ids, "remove_ids: ids")
            removed = int(self.ivf.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))
        if removed:
            self._mirror = None  # rebuilt from the lists at the next search
        return removed

    def reset(self) -> None:
        """Remove every stored vector; the trained codec is kept."""
        if self.ivf is not None:
            self.ivf.reset()
        if self._mirror is not None:
            self._mirror.reset()


def index_from_pickle(payload: bytes) -> IndexRQMoE:
    """The index of a pickle's payload (pickle's reconstructor for IndexRQMoE), on the default device (cuda
    if available), as ``read_index`` loads one. Parses the bytes with the package's reader only: an
    IndexRQMoE file or the JSON of an untrained index, nothing else."""
    return snapshot.from_payload(IndexRQMoE, payload, resolve_device(None))
