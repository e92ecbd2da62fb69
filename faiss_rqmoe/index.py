"""IndexRQMoE: a FAISS-shaped index over RQ-MoE codes (DESIGN.md §2).

Search pipeline: faiss IVF probes ``nprobe`` lists and scans them with
static additive codebooks fitted to our codes (the LUT stage), returning a
shortlist of ``nshort`` candidates with their codes; torch decodes the
shortlist with the RQ-MoE model (all steps in parallel) and re-ranks it by
exact distance to the query.
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

import faiss
import numpy as np
import torch

from . import lut
from .model import RQMoE, RQMoEConfig, check_beam_size
from .train import TrainHistory, resolve_device, train_rqmoe

logger = logging.getLogger(__name__)

METRICS = {faiss.METRIC_L2: "L2", faiss.METRIC_INNER_PRODUCT: "IP"}


def _host(x):
    """A torch tensor (any device, any grad mode) as a numpy array on the host; anything else as is."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # numpy has no bfloat16; float16 would be converted to float32 anyway
        return x.cpu().numpy()
    return x


def _to_caller(array: np.ndarray, like):
    """``array`` in the kind the caller gave: a torch tensor on ``like``'s device when ``like`` is a
    tensor, else the numpy array itself."""
    if isinstance(like, torch.Tensor):
        return torch.from_numpy(array).to(like.device)
    return array


def _deliver(result: np.ndarray, out, like, name: str):
    """Hand a result back: copied into the caller's output ``out`` (numpy array or torch tensor,
    returned) when one was given, else in the caller's kind (``_to_caller``)."""
    if out is None:
        return _to_caller(result, like)
    if tuple(out.shape) != result.shape:
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {result.shape}")
    if isinstance(out, torch.Tensor):
        out.copy_(torch.from_numpy(result))
    else:
        out[...] = result
    return out


def _as_vectors(x, d: int, name: str = "x") -> np.ndarray:
    """Validate and convert vectors the way faiss's Python layer does: (n, d) C-contiguous float32.

    Accepts numpy arrays of any real dtype and layout, nested lists, and torch tensors on any device
    (copied to the host); rejects other dtypes (TypeError), other shapes and NaN/inf (ValueError).
    """
    x = np.asarray(_host(x))
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n, {d}), got shape {x.shape}")
    if x.shape[1] != d:
        raise ValueError(f"{name} has {x.shape[1]} columns, index expects d={d}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must be a numeric array (float32), got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _as_id_list(ids, what: str = "ids") -> np.ndarray:
    """A scalar or 1-D collection of ids (numpy, list, torch on any device) as (n,) int64.

    Integer dtypes are taken as they are and floats are cast, as faiss's Python layer does;
    other dtypes raise TypeError, arrays of 2 or more dimensions ValueError.
    """
    ids = np.asarray(_host(ids))
    if ids.ndim > 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {ids.shape}")
    if ids.size and not (np.issubdtype(ids.dtype, np.integer) or np.issubdtype(ids.dtype, np.floating)):
        raise TypeError(f"{what} must be integers (int64), got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64).ravel()


def _as_ids(ids, n: int) -> np.ndarray:
    """Ids of n vectors being added: (n,) int64 (see ``_as_id_list`` for what is accepted)."""
    if ids is None:
        raise ValueError(f"ids must have shape ({n},), got None")
    shape = tuple(ids.shape) if hasattr(ids, "shape") else np.shape(ids)
    if shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {shape}")
    return _as_id_list(ids)


class IndexRQMoE:
    """A compressed vector index with the FAISS interface, backed by an RQ-MoE codec.

    config: the codec (d, M, nbits, architecture). nlist: inverted lists;
    0 builds the flat variant (one list, every code scanned by the LUT
    stage). metric: faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT.
    hnsw_m: > 0 uses an HNSW coarse quantizer with that many links.
    nprobe: lists probed a query; nshort: shortlist length re-ranked by the
    neural decoder (at least k is used). A config with ``ctx_dim = d``
    conditions the codec on each vector's IVF centroid (DESIGN §3).
    encode_candidates, encode_beam:
    candidates a step and beam size used to encode added vectors (see
    ``RQMoE.encode``; a beam of 4-8 lowers the error by several percent at
    4-8x the encoding cost; training is unaffected). device: torch device
    for the codec (None: cuda if available). train_options: keyword
    arguments for ``train_rqmoe``.

    Arrays in and out follow faiss's Python layer: vectors are (n, d)
    float32 numpy arrays; other real dtypes, non-contiguous arrays and
    nested lists are converted, other dtypes raise TypeError. Torch tensors
    (CPU or CUDA, whatever the codec's device) are accepted everywhere an
    array is, and, as with ``faiss.contrib.torch_utils``, a method whose
    input is a tensor returns tensors on that tensor's device (``search``,
    ``range_search``, ``sa_encode``, ``sa_decode``, ``reconstruct_batch``).
    ``reconstruct`` and ``reconstruct_n`` take no array, so they return
    numpy unless the caller passes an output ``x`` to fill (numpy or torch).
    """

    def __init__(self, config: RQMoEConfig, nlist: int = 0, metric: int = faiss.METRIC_L2, *,
                 hnsw_m: int = 0, nprobe: int = 1, nshort: int = 100, encode_candidates: Optional[int] = None,
                 encode_beam: int = 1, device=None, train_options: Optional[dict] = None):
        if not isinstance(config, RQMoEConfig):
            raise TypeError(f"config must be an RQMoEConfig, got {type(config).__name__}")
        if metric not in METRICS:
            raise ValueError(f"metric must be faiss.METRIC_L2 or faiss.METRIC_INNER_PRODUCT, got {metric}")
        if int(nlist) < 0 or int(hnsw_m) < 0:
            raise ValueError(f"nlist and hnsw_m must be >= 0, got nlist={nlist}, hnsw_m={hnsw_m}")
        if config.ctx_dim not in (0, config.d) or (config.ctx_dim and int(nlist) <= 1):
            raise ValueError(f"config.ctx_dim={config.ctx_dim}: the index conditions its codec on the IVF "
                             f"centroid, so ctx_dim must be 0 or d={config.d}, and d needs nlist > 1 "
                             f"(got nlist={nlist})")
        self.config = config
        self.d = config.d
        self.nlist = int(nlist)
        self.metric_type = metric
        self.hnsw_m = int(hnsw_m)
        self.encode_candidates = encode_candidates
        self.encode_beam = check_beam_size(encode_beam, "encode_beam")
        self.train_options = dict(train_options or {})
        self.device = resolve_device(device)
        self.model = RQMoE(config).to(self.device)
        self.ivf: Optional[faiss.IndexIVFResidualQuantizer] = None
        self.centroids: Optional[np.ndarray] = None
        self._centroids_cache = None  # (centroids array, the same as a tensor on the codec's device)
        self.train_history: Optional[TrainHistory] = None
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
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int):
        if int(value) < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self._nprobe = int(value)
        if self.ivf is not None:
            self.ivf.nprobe = self._nprobe

    @property
    def nshort(self) -> int:
        return self._nshort

    @nshort.setter
    def nshort(self, value: int):
        if int(value) < 1:
            raise ValueError(f"nshort must be >= 1, got {value}")
        self._nshort = int(value)

    def __repr__(self) -> str:
        return (f"IndexRQMoE(d={self.d}, M={self.config.M}, nbits={self.config.nbits}, nlist={self.nlist}, "
                f"metric={METRICS[self.metric_type]}, ntotal={self.ntotal}, is_trained={self.is_trained})")

    def _require_trained(self, what: str):
        if not self.is_trained:
            raise RuntimeError(f"IndexRQMoE must be trained before {what}: call index.train(x) first")

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

    def _assign(self, x: np.ndarray) -> np.ndarray:
        """Inverted list of each vector: (n,) int64."""
        if self.ivf.nlist == 1:
            return np.zeros(len(x), dtype=np.int64)
        _, assign = self.ivf.quantizer.search(x, 1)
        return assign[:, 0]

    def train(self, x, xval=None) -> None:
        """Train the coarse quantizer, the RQ-MoE codec and the LUT stage.

        x: (n, d) float32 (float64, integer, non-contiguous arrays and torch
        tensors on any device are converted). xval: optional (nv, d) validation vectors for the
        codec's schedule. Retraining discards stored vectors.
        """
        x = _as_vectors(x, self.d)
        if len(x) == 0:
            raise ValueError("cannot train on an empty set of vectors")
        options = dict(self.train_options)
        seed = int(options.get("seed", 0))
        nlist = max(1, self.nlist)
        if self.nlist > 1:
            if len(x) < nlist:
                raise ValueError(f"training needs at least nlist={nlist} vectors, got {len(x)}")
            if len(x) < 30 * nlist:
                warnings.warn(f"training IVF{nlist} on {len(x)} vectors: faiss recommends at least "
                              f"{30 * nlist} (30 per list); lists will be poorly placed", stacklevel=2)
            kmeans = faiss.Kmeans(self.d, nlist, niter=20, seed=seed + 1234, spherical=False,
                                  verbose=False, max_points_per_centroid=256)
            kmeans.train(x)
            centroids = kmeans.centroids
        else:
            centroids = np.zeros((1, self.d), dtype=np.float32)
        quantizer = self._make_quantizer(centroids)
        list_nos = np.zeros(len(x), dtype=np.int64) if nlist == 1 else quantizer.search(x, 1)[1][:, 0]
        residuals = x - centroids[list_nos]
        xval_residuals = None
        if xval is not None:
            xval = _as_vectors(xval, self.d, "xval")
            val_lists = np.zeros(len(xval), dtype=np.int64) if nlist == 1 else quantizer.search(xval, 1)[1][:, 0]
            xval_residuals = xval - centroids[val_lists]
        options.setdefault("device", self.device)
        options.setdefault("encode_candidates", self.encode_candidates)
        lut_train_max = int(options.pop("lut_train_max", 200_000))
        self.model = RQMoE(self.config, mem_budget_bytes=self.model.mem_budget_bytes).to(self.device)
        if self.config.ctx_dim:
            options["ctx"] = centroids[list_nos]
            if xval is not None:
                options["ctx_val"] = centroids[val_lists]
        self.train_history = train_rqmoe(self.model, residuals, xval_residuals, **options)
        if self.train_history.best_epoch == 0:
            history = self.train_history
            warnings.warn(f"RQ-MoE training did not improve on its RQ initialisation in {len(history.epoch)} "
                          f"epoch(s) (stop: {history.stop_reason}): the codec is plain residual "
                          "quantization; train longer (time_budget_s, max_epochs) or on more vectors",
                          stacklevel=2)

        rows = np.arange(len(residuals))
        if len(rows) > lut_train_max:
            rows = np.sort(np.random.default_rng(seed).choice(len(rows), lut_train_max, replace=False))
        sample = residuals[rows]
        codes = self._encode(sample, list_nos[rows], centroids)
        codebooks = lut.fit_additive_codebooks(codes, sample, self.config.K)
        static_recons = codebooks[np.arange(self.config.M), codes].sum(1)
        self.ivf = lut.build_ivf_index(quantizer, self.d, nlist, codebooks, self.config.nbits, self.metric_type,
                                       (static_recons ** 2).sum(1))
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.ivf.nprobe = self._nprobe

    # --------------------------------------------------------------- codec
    def _encode(self, residuals: np.ndarray, list_nos: np.ndarray, centroids: Optional[np.ndarray] = None):
        """Codes (n, M) int64 numpy of residuals (n, d) float32 to the centroids of lists list_nos (n,).

        centroids: the (nlist, d) table while training builds it, else the index's.
        """
        centroids = self.centroids if centroids is None else centroids
        ctx = centroids[list_nos] if self.config.ctx_dim else None
        return self.model.encode(residuals, self.encode_candidates, self.encode_beam, ctx=ctx).cpu().numpy()

    def _decode_on_device(self, codes: np.ndarray, list_nos: np.ndarray) -> torch.Tensor:
        """Reconstructions (n, d) float32 on the codec's device of codes (n, M) stored in lists list_nos (n,)."""
        device = self.model.device
        centroids = self._device_centroids()[torch.from_numpy(list_nos).to(device)]
        return self.model.decode(codes, ctx=centroids if self.config.ctx_dim else None) + centroids

    def _decode(self, codes: np.ndarray, list_nos: np.ndarray) -> np.ndarray:
        """Reconstructions (n, d) float32 numpy of codes (n, M) stored in lists list_nos (n,)."""
        if len(codes) == 0:
            return np.empty((0, self.d), dtype=np.float32)
        return self._decode_on_device(codes, list_nos).cpu().numpy()

    def sa_code_size(self) -> int:
        """Bytes of one standalone code: list number + M*nbits bits + 8-bit norm."""
        self._require_trained("sa_code_size")
        return int(self.ivf.sa_code_size())

    def sa_encode(self, x):
        """Standalone codes of vectors: x (n, d) float32 -> (n, sa_code_size()) uint8.

        A torch x (any device) gives a torch uint8 tensor on its device.
        """
        self._require_trained("sa_encode")
        like = x
        x = _as_vectors(x, self.d)
        if len(x) == 0:
            return _to_caller(np.empty((0, self.sa_code_size()), dtype=np.uint8), like)
        list_nos = self._assign(x)
        codes = self._encode(x - self.centroids[list_nos], list_nos)
        return _to_caller(lut.encode_sa_codes(self.ivf, codes, list_nos), like)

    def sa_decode(self, codes):
        """Vectors from standalone codes: (n, sa_code_size()) uint8 -> (n, d) float32.

        Torch codes (any device) give a torch float32 tensor on their device.
        """
        self._require_trained("sa_decode")
        like = codes
        codes = np.asarray(_host(codes))
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.sa_code_size():
            raise ValueError(f"codes must be uint8 of shape (n, {self.sa_code_size()}), "
                             f"got {codes.dtype} {codes.shape}")
        list_nos, rq_codes = lut.decode_sa_codes(self.ivf, codes, self.config.M, self.config.nbits)
        if (list_nos >= self.ivf.nlist).any():
            raise ValueError(f"codes name inverted lists beyond nlist={self.ivf.nlist}")
        return _to_caller(self._decode(rq_codes, list_nos), like)

    # ---------------------------------------------------------------- adding
    def add(self, x) -> None:
        """Encode and store vectors with sequential ids ntotal, ntotal+1, ...

        x: (n, d) float32 numpy (other real dtypes and layouts are converted)
        or a torch tensor on any device.
        """
        self._add(x, None)

    def add_with_ids(self, x, ids) -> None:
        """Encode and store vectors under given ids: x (n, d) float32, ids (n,) int64.

        x and ids may be numpy arrays or torch tensors (any device), as in ``add``.
        """
        self._add(x, ids)

    def _add(self, x, ids) -> None:
        from tqdm.auto import tqdm

        self._require_trained("adding vectors")
        x = _as_vectors(x, self.d)
        if ids is not None:
            ids = _as_ids(ids, len(x))
        bs = 65_536
        progress = bool(self.train_options.get("progress", True)) and len(x) > bs
        for i0 in tqdm(range(0, len(x), bs), desc="add RQ-MoE", unit="chunk", disable=not progress):
            chunk = x[i0:i0 + bs]
            list_nos = self._assign(chunk)
            codes = self._encode(chunk - self.centroids[list_nos], list_nos)
            sa_codes = lut.encode_sa_codes(self.ivf, codes, list_nos)
            self.ivf.add_sa_codes(sa_codes, None if ids is None else ids[i0:i0 + bs])

    # -------------------------------------------------------------- searching
    def _search_options(self, params):
        nprobe, nshort = self._nprobe, self._nshort
        if params is not None:
            get = params.get if isinstance(params, dict) else (lambda key, default: getattr(params, key, default))
            nprobe = int(get("nprobe", nprobe))
            nshort = int(get("nshort", nshort))
            if nprobe < 1 or nshort < 1:
                raise ValueError(f"params: nprobe and nshort must be >= 1, got nprobe={nprobe}, nshort={nshort}")
        return nprobe, nshort

    def _shortlist_distances(self, xq: np.ndarray, nshort: int, nprobe: int):
        """LUT shortlist re-ranked by exact distance: returns (dist (nq, nshort), ids (nq, nshort)).

        The shortlist is decoded and scored on the codec's device; only the
        (nq, nshort) distances come back to the host.
        """
        nq = len(xq)
        worst = np.inf if self.metric_type == faiss.METRIC_L2 else -np.inf
        ids, list_nos, raw_codes = lut.search_shortlist(self.ivf, xq, nshort, nprobe)
        valid = ids >= 0
        dist = np.full((nq, nshort), worst, dtype=np.float32)
        if not valid.any():
            return dist, ids
        codes = lut.unpack_bits(raw_codes, self.config.M, self.config.nbits)
        recons = self._decode_on_device(codes, list_nos)
        device = recons.device
        query_rows = torch.from_numpy(np.nonzero(valid)[0]).to(device)
        queries = torch.from_numpy(xq).to(device)[query_rows]
        if self.metric_type == faiss.METRIC_L2:
            exact = ((queries - recons) ** 2).sum(1)
        else:
            exact = (queries * recons).sum(1)
        dist[valid] = exact.cpu().numpy()
        return dist, ids

    def _device_centroids(self) -> torch.Tensor:
        """The IVF centroids (nlist, d) float32 on the codec's device, cached."""
        cached = self._centroids_cache
        if cached is None or cached[0] is not self.centroids or cached[1].device != self.model.device:
            cached = (self.centroids, torch.from_numpy(self.centroids).to(self.model.device))
            self._centroids_cache = cached
        return cached[1]

    def search(self, x, k: int, params=None, D=None, I=None):
        """k nearest neighbours of each query.

        x: (nq, d) float32 numpy array (other real dtypes and layouts are
        converted) or a torch tensor on any device; k: int > 0; params:
        optional dict or object with ``nprobe``/``nshort`` for this call
        (e.g. ``faiss.SearchParametersIVF(nprobe=8)``); D, I: optional
        (nq, k) outputs to fill, numpy or torch.
        Returns D (nq, k) float32 and I (nq, k) int64, best first; missing
        results have id -1 and distance +inf (L2) or -inf (inner product).
        A torch x gives torch D, I on x's device (as with
        ``faiss.contrib.torch_utils``); D, I passed in are filled and returned.
        """
        if isinstance(k, bool) or int(k) != k or int(k) <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        self._require_trained("searching")
        like = x
        x = _as_vectors(x, self.d)
        nprobe, nshort = self._search_options(params)
        nshort = max(nshort, k)
        nq = len(x)
        largest = self.metric_type == faiss.METRIC_INNER_PRODUCT
        for name, out in (("D", D), ("I", I)):
            if out is not None and tuple(out.shape) != (nq, k):
                raise ValueError(f"{name} has shape {tuple(out.shape)}, expected ({nq}, {k})")
        D_out = np.empty((nq, k), dtype=np.float32)
        I_out = np.empty((nq, k), dtype=np.int64)
        if nq == 0:
            return _deliver(D_out, D, like, "D"), _deliver(I_out, I, like, "I")
        if self.ntotal == 0:
            D_out[:] = -np.inf if largest else np.inf
            I_out[:] = -1
            return _deliver(D_out, D, like, "D"), _deliver(I_out, I, like, "I")
        bs = max(1, (64 << 20) // (nshort * self.d * 4))
        for i0 in range(0, nq, bs):
            dist, ids = self._shortlist_distances(x[i0:i0 + bs], nshort, nprobe)
            order = np.argsort(-dist if largest else dist, axis=1, kind="stable")[:, :k]
            D_out[i0:i0 + bs] = np.take_along_axis(dist, order, 1)
            I_out[i0:i0 + bs] = np.where(np.isfinite(D_out[i0:i0 + bs]), np.take_along_axis(ids, order, 1), -1)
        return _deliver(D_out, D, like, "D"), _deliver(I_out, I, like, "I")

    def range_search(self, x, radius: float, params=None):
        """All stored vectors within ``radius`` of each query, among the nshort re-ranked candidates.

        x: (nq, d) float32 (converted like ``search``'s x); radius: float.
        L2: squared distance < radius; inner product: similarity > radius.
        Returns (lims (nq+1,) int64, D float32, I int64) as faiss does: the
        results of query q are D[lims[q]:lims[q+1]], I[lims[q]:lims[q+1]].
        A torch x gives torch lims, D, I on x's device.
        """
        self._require_trained("range_search")
        like = x
        x = _as_vectors(x, self.d)
        nprobe, nshort = self._search_options(params)
        nshort = min(nshort, max(1, self.ntotal))
        if self.ntotal == 0 or len(x) == 0:
            return (_to_caller(np.zeros(len(x) + 1, dtype=np.int64), like),
                    _to_caller(np.empty(0, np.float32), like), _to_caller(np.empty(0, np.int64), like))
        D, I = self.search(x, nshort, params={"nprobe": nprobe, "nshort": nshort})
        keep = (I >= 0) & ((D > radius) if self.metric_type == faiss.METRIC_INNER_PRODUCT else (D < radius))
        lims = np.zeros(len(x) + 1, dtype=np.int64)
        lims[1:] = np.cumsum(keep.sum(1))
        return (_to_caller(lims, like), _to_caller(D[keep].astype(np.float32), like),
                _to_caller(I[keep].astype(np.int64), like))

    # ---------------------------------------------------------- reconstruct
    def reconstruct_batch(self, ids, x=None):
        """Decoded vectors for stored ids: ids (n,) int64 -> (n, d) float32. Unknown id: KeyError.

        ids may be a list, a numpy array or a torch tensor; a torch tensor of
        ids gives a torch tensor on its device. x: optional (n, d) output to
        fill (numpy or torch), returned.
        """
        like = ids
        recons = self._reconstruct_ids(_as_id_list(ids, "reconstruct_batch: ids"))
        return _deliver(recons, x, like, "x")

    def _reconstruct_ids(self, ids: np.ndarray) -> np.ndarray:
        """Decoded vectors (n, d) float32 numpy of stored ids (n,) int64."""
        self._require_trained("reconstruct")
        stored_ids, list_nos, raw_codes = lut.all_codes(self.ivf)
        order = np.argsort(stored_ids, kind="stable")
        pos = np.searchsorted(stored_ids, ids, sorter=order)
        pos = np.minimum(pos, max(len(order) - 1, 0))
        found = (len(order) > 0) & (stored_ids[order[pos]] == ids) if len(order) else np.zeros(len(ids), bool)
        if not np.all(found):
            raise KeyError(f"id {int(ids[~found][0])} is not in the index")
        rows = order[pos]
        codes = lut.unpack_bits(raw_codes[rows], self.config.M, self.config.nbits)
        return self._decode(codes, list_nos[rows])

    def reconstruct(self, key: int, x=None):
        """Decoded vector of one stored id: (d,) float32 numpy.

        Returns numpy (there is no input array to take the kind from) unless
        ``x``, a (d,) output to fill, is given: a torch x (any device) is
        filled and returned, as with ``faiss.contrib.torch_utils``. A 0-d
        torch tensor as key gives a torch tensor on its device.
        """
        key_array = _as_id_list(key, "reconstruct: key")
        if key_array.shape != (1,):
            raise ValueError(f"reconstruct: key must be one id, got {key_array.shape[0]}; use reconstruct_batch")
        return _deliver(self._reconstruct_ids(key_array)[0], x, key, "x")

    def reconstruct_n(self, n0: int = 0, ni: Optional[int] = None, x=None):
        """Decoded vectors of ids n0 .. n0+ni-1: (ni, d) float32 numpy.

        ni: None or -1 (faiss's default) means all ids from n0 to ntotal-1.
        Returns numpy unless ``x``, an (ni, d) output to fill, is given
        (numpy or a torch tensor on any device), as ``reconstruct``.
        """
        n0 = int(n0)
        ni = self.ntotal - n0 if ni is None or int(ni) == -1 else int(ni)
        if n0 < 0 or ni < 0:
            raise ValueError(f"reconstruct_n: n0 and ni must be >= 0, got n0={n0}, ni={ni}")
        return _deliver(self._reconstruct_ids(np.arange(n0, n0 + ni, dtype=np.int64)), x, None, "x")

    # --------------------------------------------------------------- editing
    def remove_ids(self, ids) -> int:
        """Remove stored vectors; returns how many were removed.

        ids: (n,) int64 ids (list, numpy array or torch tensor on any device;
        ids that are not stored are ignored) or a faiss.IDSelector.
        """
        self._require_trained("remove_ids")
        if isinstance(ids, faiss.IDSelector):
            return int(self.ivf.remove_ids(ids))
        ids = _as_id_list(ids, "remove_ids: ids")
        return int(self.ivf.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))

    def reset(self) -> None:
        """Remove every stored vector; the trained codec is kept."""
        if self.ivf is not None:
            self.ivf.reset()
