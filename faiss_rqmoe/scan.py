"""The list-independent lookup-table scan, on the CPU or a GPU (docs/design.md, "The lookup-table formula").

For codes of residuals to IVF centroids and static additive codebooks T,

    ||q - c - r̂||² = ||q - c||² - 2 <q, r̂> + (||r̂||² + 2 <c, r̂>),   r̂ = Σ_m T_m[i_m],

is exact: ||q - c||² comes from the coarse search, <q, r̂> from one M × K
table a query (not one a probed list, as faiss computes for by-residual
codes), and the last term is one float a stored vector, computed when it is
added (for inner product: <q, c> + <q, r̂>, no stored term).

``CodeMirror`` holds a copy of the stored codes, ids and terms on the
device that scans them, grouped by inverted list, in a few segments (one an
``add``; merged when they grow many). The faiss index stays the storage of
record and the file format; the mirror is rebuilt from it on load.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import faiss
import numpy as np
import torch

from . import lut

MAX_SEGMENTS = 8


def code_dtype(nbits: int, device: torch.device) -> torch.dtype:
    """How a mirror stores sub-codes: on a GPU the narrowest dtype that holds nbits bits; on the CPU
    int64 positions m * K + i_m in the flattened (M * K) table, ready to gather (converting and offsetting
    uint8 codes at every scan cost more than the gather itself on two cores)."""
    if device.type == "cpu":
        return torch.int64
    return torch.uint8 if nbits <= 8 else torch.int32


@dataclasses.dataclass
class Segment:
    """Stored vectors grouped by list: rows offsets[l]:offsets[l+1] belong to list l.

    codes (n, M) as ``code_dtype`` stores them (on the CPU already offset by m * K), ids (n,) int64,
    terms (n,) float32 (L2) or None (IP), all on the scan device; offsets (nlist+1,) int64 there too;
    ids_host (n,) int64 numpy for selectors."""

    codes: torch.Tensor
    ids: torch.Tensor
    terms: Optional[torch.Tensor]
    offsets: torch.Tensor
    ids_host: np.ndarray
    K: int

    @property
    def offset(self) -> bool:
        """Whether codes hold positions in the flattened table (m * K + i_m) rather than sub-codes."""
        return self.codes.dtype == torch.int64

    @property
    def sub_code_dtype(self) -> torch.dtype:
        """The dtype ``sub_codes`` returns: as stored on a GPU (uint8 for 8-bit codes, which a decode takes
        without a range check), int64 on the CPU."""
        return torch.int64 if self.offset else self.codes.dtype

    def sub_codes(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sub-codes i_m of some rows (all without ``rows``), as ``sub_code_dtype``."""
        codes = self.codes if rows is None else self.codes[rows]
        if self.offset:
            codes = codes - torch.arange(codes.shape[-1], device=codes.device) * self.K
        return codes

    def table_positions(self, rows) -> torch.Tensor:
        """The positions m * K + i_m (int64) of some rows' sub-codes in a flattened (M * K) table: rows
        are an index tensor or a slice; the inverse of ``sub_codes``."""
        codes = self.codes[rows]
        if self.offset:
            return codes
        return codes.long() + torch.arange(codes.shape[-1], device=codes.device) * self.K

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Device bytes of the segment's arrays."""
        parts = [self.codes, self.ids, self.offsets] + ([self.terms] if self.terms is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


def vector_terms(codebooks: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, list_nos: torch.Tensor,
                 chunk: int = 65_536) -> torch.Tensor:
    """||r̂||² + 2 <c, r̂> for each stored vector: codebooks (M, K, d), centroids (nlist, d), codes (n, M)
    int64 and list_nos (n,) int64, all on one device. Returns (n,) float32."""
    M = codebooks.shape[0]
    steps = torch.arange(M, device=codes.device)
    out = torch.empty(codes.shape[0], dtype=torch.float32, device=codes.device)
    for i0 in range(0, codes.shape[0], chunk):
        recon = codebooks[steps, codes[i0:i0 + chunk]].sum(1)  # (b, d)
        out[i0:i0 + chunk] = (recon * (recon + 2 * centroids[list_nos[i0:i0 + chunk]])).sum(1)
    return out


class CodeMirror:
    """The codes, ids and per-vector terms of an IVF index, on one device, grouped by list.

    nlist: lists; M, nbits: the codes' shape; device: where the scan runs;
    with_terms: keep the L2 term a vector (False for inner product).
    """

    def __init__(self, nlist: int, M: int, nbits: int, device: torch.device, with_terms: bool = True):
        self.nlist, self.M, self.nbits, self.device, self.with_terms = nlist, M, nbits, device, with_terms
        self.segments: List[Segment] = []

    @property
    def ntotal(self) -> int:
        return sum(s.n for s in self.segments)

    @property
    def nbytes(self) -> int:
        """Device bytes held: (M sub-codes + 8 id bytes + 4 term bytes) a vector + 8 (nlist+1) a segment; a
        sub-code is 1 byte on a GPU (nbits <= 8), 8 on the CPU (see ``code_dtype``)."""
        return sum(s.nbytes for s in self.segments)

    def add(self, codes: np.ndarray, list_nos: np.ndarray, ids: np.ndarray, terms: Optional[np.ndarray]) -> None:
        """Append vectors as a new segment: codes (n, M) int, list_nos (n,) int64, ids (n,) int64,
        terms (n,) float32 or None."""
        if len(ids) == 0:
            return
        order = np.argsort(list_nos, kind="stable")
        counts = np.bincount(list_nos, minlength=self.nlist)
        offsets = np.zeros(self.nlist + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        as_device = lambda a, dtype=None: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)  # noqa
        dtype = code_dtype(self.nbits, self.device)
        stored = codes[order].astype(np.int64)
        if dtype == torch.int64:
            stored += np.arange(self.M, dtype=np.int64) * (1 << self.nbits)
        self.segments.append(Segment(
            codes=as_device(stored, dtype), ids=as_device(ids[order]),
            terms=as_device(terms[order]) if self.with_terms else None, offsets=as_device(offsets),
            ids_host=np.ascontiguousarray(ids[order]), K=1 << self.nbits))
        if len(self.segments) > MAX_SEGMENTS:
            self.compact()

    def compact(self) -> None:
        """Merge all segments into one (same contents, one list order)."""
        if len(self.segments) <= 1:
            return
        parts = self.segments
        list_nos = np.concatenate([np.repeat(np.arange(self.nlist), np.diff(s.offsets.cpu().numpy()))
                                   for s in parts])
        codes = np.concatenate([s.sub_codes().cpu().numpy() for s in parts])
        ids = np.concatenate([s.ids_host for s in parts])
        terms = np.concatenate([s.terms.cpu().numpy() for s in parts]) if self.with_terms else None
        self.segments = []
        self.add(codes, list_nos, ids, terms)

    def reset(self) -> None:
        self.segments = []

    @classmethod
    def from_faiss(cls, ivf, codebooks: np.ndarray, centroids: np.ndarray, M: int, nbits: int,
                   device: torch.device, with_terms: bool) -> "CodeMirror":
        """The mirror of everything an IVF index stores: codebooks (M, K, d) and centroids (nlist, d) float32."""
        mirror = cls(ivf.nlist, M, nbits, device, with_terms)
        ids, list_nos, raw = lut.all_codes(ivf)
        codes = lut.unpack_bits(raw, M, nbits)
        terms = None
        if with_terms and len(ids):
            terms = vector_terms(torch.from_numpy(codebooks).to(device), torch.from_numpy(centroids).to(device),
                                 torch.from_numpy(codes).to(device), torch.from_numpy(list_nos).to(device)).cpu().numpy()
        mirror.add(codes, list_nos, ids, terms)
        return mirror


def selector_mask(sel: faiss.IDSelector, ids: np.ndarray) -> np.ndarray:
    """Which of ids (n,) int64 a faiss IDSelector selects, (n,) bool, evaluated by faiss itself.

    Any selector works, including the untyped one a SearchParameters object hands back: faiss applies
    it in one C++ pass (a range search over an id map whose vectors are all at distance 0).
    """
    if len(ids) == 0:
        return np.zeros(0, dtype=bool)
    id_map = faiss.IndexIDMap(faiss.IndexFlatL2(1))
    id_map.add_with_ids(np.zeros((len(ids), 1), dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    _, _, selected = id_map.range_search(np.zeros((1, 1), dtype=np.float32), 1.0,
                                         params=faiss.SearchParameters(sel=sel))
    return np.isin(ids, selected)


@dataclasses.dataclass
class Shortlist:
    """The best candidates a query by the lookup-table distance: all (nq, k), k columns sorted.

    valid: False where a query had fewer than k candidates (ids -1 there); codes (nq, k, M) sub-codes,
    int64 on the CPU, as the mirror stores them on a GPU (uint8 for 8-bit codes).
    """

    distances: torch.Tensor
    ids: torch.Tensor
    list_nos: torch.Tensor
    codes: torch.Tensor
    valid: torch.Tensor


def _segment_candidates(seg: Segment, luts: torch.Tensor, probes: torch.Tensor, coarse: torch.Tensor, k: int,
                        inner_product: bool, mask: Optional[torch.Tensor], K: int):
    """Top-k of one segment for a chunk of queries: luts (B, M, K), probes/coarse (B, P)."""
    B, P = probes.shape
    M = luts.shape[1]
    device = luts.device
    sizes = (seg.offsets[probes + 1] - seg.offsets[probes])  # (B, P)
    starts = seg.offsets[probes]
    ends_cum = torch.cumsum(sizes, dim=1)  # (B, P)
    n_cand = ends_cum[:, -1]
    worst = -torch.inf if inner_product else torch.inf
    width = int(n_cand.max()) if B else 0
    if width == 0:
        empty = torch.empty(B, 0, device=device)
        return empty, empty.long(), empty.long(), torch.empty(B, 0, M, dtype=seg.sub_code_dtype, device=device)
    j = torch.arange(width, device=device).expand(B, width)
    probe_of = torch.searchsorted(ends_cum, j.contiguous(), right=True).clamp_(max=P - 1)  # (B, C)
    valid = j < n_cand.unsqueeze(1)
    first_of = (ends_cum - sizes).gather(1, probe_of)
    rows = torch.where(valid, starts.gather(1, probe_of) + j - first_of, torch.zeros_like(j))  # segment rows
    flat = seg.table_positions(rows)  # (B, C, M)
    table = luts.reshape(B, M * K).gather(1, flat.reshape(B, width * M)).reshape(B, width, M).sum(-1)
    if inner_product:
        scores = coarse.gather(1, probe_of) + table
    else:
        scores = coarse.gather(1, probe_of) + seg.terms[rows] - 2 * table
    keep = valid if mask is None else valid & mask[rows]
    scores = torch.where(keep, scores, torch.full_like(scores, worst))
    top = min(k, width)
    best, where = scores.topk(top, dim=1, largest=inner_product)
    picked = rows.gather(1, where)
    return best, seg.ids[picked].masked_fill(~torch.isfinite(best), -1), probes.gather(1, probe_of.gather(1, where)), \
        seg.sub_codes(picked)


def _segment_candidates_by_list(seg: Segment, luts: torch.Tensor, probes: torch.Tensor, coarse: torch.Tensor,
                                k: int, inner_product: bool, mask: Optional[torch.Tensor], K: int):
    """The same top-k as ``_segment_candidates``, list by list: the queries that probe a list share its
    codes as one gather index into their tables, which keeps the scan in cache on a CPU (a few ns a
    candidate instead of tens). luts (B, M, K), probes/coarse (B, P)."""
    B, P = probes.shape
    M = luts.shape[1]
    device = luts.device
    worst = -torch.inf if inner_product else torch.inf
    flat_luts = luts.reshape(B, M * K)
    pair_lists = probes.reshape(-1)
    order = torch.argsort(pair_lists, stable=True)
    lists, counts = torch.unique_consecutive(pair_lists[order], return_counts=True)
    offsets = seg.offsets.tolist()
    pair_coarse = coarse.reshape(-1)
    best_d = torch.full((B * P, k), worst, device=device)
    best_r = torch.zeros((B * P, k), dtype=torch.int64, device=device)
    start = 0
    for l, count in zip(lists.tolist(), counts.tolist()):
        list_pairs = order[start:start + count]
        start += count
        r0, r1 = offsets[l], offsets[l + 1]
        if r1 == r0:
            continue
        positions = seg.table_positions(slice(r0, r1)).T.contiguous()  # (M, n_l): one gather index a step
        block = max(1, LIST_BLOCK_ENTRIES // (r1 - r0))  # queries at a time: their (block, n_l) sums stay in cache
        for b0 in range(0, count, block):
            pairs = list_pairs[b0:b0 + block]
            tables = flat_luts.index_select(0, pairs // P)  # (b, M * K)
            table = tables.index_select(1, positions[0])  # (b, n_l), summed a step at a time in place
            for m in range(1, M):
                table += tables.index_select(1, positions[m])
            if inner_product:
                scores = pair_coarse[pairs].unsqueeze(1) + table
            else:
                scores = pair_coarse[pairs].unsqueeze(1) + seg.terms[r0:r1] - 2 * table
            if mask is not None:
                scores.masked_fill_(~mask[r0:r1], worst)
            top = min(k, r1 - r0)
            d, where = scores.topk(top, dim=1, largest=inner_product)
            best_d[pairs, :top] = d
            best_r[pairs, :top] = where + r0
    top = min(k, P * k)
    best, where = best_d.view(B, P * k).topk(top, dim=1, largest=inner_product)
    picked = best_r.view(B, P * k).gather(1, where)
    return best, seg.ids[picked].masked_fill(~torch.isfinite(best), -1), probes.gather(1, where // k), \
        seg.sub_codes(picked)


STRATEGIES = ("auto", "by_list", "gather")
LIST_BLOCK_ENTRIES = 1 << 20  # by_list: distances computed at once for one list (4 MB of float32)


def scan(mirror: CodeMirror, codebooks: torch.Tensor, xq: torch.Tensor, probes: torch.Tensor,
         coarse: torch.Tensor, k: int, inner_product: bool, masks: Optional[List[torch.Tensor]] = None,
         budget_bytes: int = 256 << 20, strategy: str = "auto") -> Shortlist:
    """The k best stored vectors a query by the lookup-table distance, over the probed lists.

    codebooks: (M, K, d) float32 static codebooks on the mirror's device; xq: (nq, d) float32 there;
    probes: (nq, P) int64 list numbers (-1: none); coarse: (nq, P) float32, ||q - c||² (L2) or <q, c>
    (IP) of each probe; masks: per segment, (n,) bool of the vectors a selector keeps, or None.
    strategy: "gather" (all candidates of a query chunk in a few large gathers: the GPU's), "by_list"
    (one list at a time, its codes shared by the queries that probe it: the CPU's) or "auto" (by device).
    Temporaries stay near ``budget_bytes`` (queries are taken in chunks). Returns a ``Shortlist``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    M, K = codebooks.shape[0], codebooks.shape[1]
    nq = xq.shape[0]
    device = xq.device
    by_list = strategy == "by_list" or (strategy == "auto" and device.type == "cpu")
    worst = -torch.inf if inner_product else torch.inf
    missing = probes < 0
    probes = probes.clamp(min=0)
    coarse = torch.where(missing, torch.full_like(coarse, worst), coarse)
    flat_books = codebooks.reshape(M * K, -1)
    if by_list:
        # a chunk's tables and candidate buffers, and one list's temporaries if every query probed the largest
        largest = max([int((seg.offsets[1:] - seg.offsets[:-1]).max()) for seg in mirror.segments] or [1])
        per_query = 8 * M * K + 12 * probes.shape[1] * k + largest * 24
        candidates = _segment_candidates_by_list
    else:
        sizes = torch.zeros(nq, dtype=torch.int64, device=device)
        for seg in mirror.segments:
            sizes += (seg.offsets[probes + 1] - seg.offsets[probes]).masked_fill(missing, 0).sum(1)
        per_query = max(1, int(sizes.max()) if nq else 1) * (8 * M + 48) + 4 * M * K
        candidates = _segment_candidates
    chunk = max(1, budget_bytes // per_query)
    out_d = torch.full((nq, k), worst, device=device)
    out_i = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    out_l = torch.zeros((nq, k), dtype=torch.int64, device=device)
    sub_dtype = mirror.segments[0].sub_code_dtype if mirror.segments else torch.int64
    out_c = torch.zeros((nq, k, M), dtype=sub_dtype, device=device)
    for i0 in range(0, nq, chunk):
        sl = slice(i0, i0 + chunk)
        luts = (xq[sl] @ flat_books.T).reshape(-1, M, K)
        parts = [candidates(seg, luts, probes[sl], coarse[sl], k, inner_product,
                            None if masks is None else masks[s], K)
                 for s, seg in enumerate(mirror.segments)]
        dist = torch.cat([p[0] for p in parts], 1)
        if dist.shape[1] == 0:
            continue
        top = min(k, dist.shape[1])
        best, where = dist.topk(top, dim=1, largest=inner_product)
        out_d[sl, :top] = best
        out_i[sl, :top] = torch.cat([p[1] for p in parts], 1).gather(1, where)
        out_l[sl, :top] = torch.cat([p[2] for p in parts], 1).gather(1, where)
        out_c[sl, :top] = torch.cat([p[3] for p in parts], 1).gather(1, where.unsqueeze(-1).expand(-1, top, M))
    valid = torch.isfinite(out_d)
    out_i.masked_fill_(~valid, -1)
    return Shortlist(out_d, out_i, out_l, out_c, valid)
