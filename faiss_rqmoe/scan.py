"""The list-independent lookup-table scan, on the CPU or a GPU (docs/design.md, "The lookup-table formula").

For codes of residuals to IVF centroids and static additive codebooks T,

    ||q - c - r̂||² = ||q - c||² - 2 <q, r̂> + (||r̂||² + 2 <c, r̂>),   r̂ = Σ_m T_m[i_m],

is exact: ||q - c||² comes from the coarse search, <q, r̂> from one M × K
table a query (not one a probed list, as faiss computes for by-residual
codes), and the last term is one float a stored vector, computed when it is
added (for inner product: <q, c> + <q, r̂>, no stored term).

Two stores feed the scan:

- ``ListMirror`` (the CPU's) keeps only the term a vector, list by list,
  beside faiss's inverted lists, and reads the codes and ids from those
  lists in place: 4 bytes a vector (none for inner product) beyond what
  faiss stores.
- ``CodeMirror`` (a GPU's) holds a copy of the codes, ids and terms on the
  device that scans them, grouped by inverted list, in a few segments (one
  an ``add``; merged when they grow many): M + 8 bytes a vector for 8-bit
  codes whose ids span less than 2^31 (stored as int32 offsets from the
  segment's smallest id), M + 12 otherwise.

The faiss index stays the storage of record and the file format; either
store is rebuilt from it on load.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, List, Optional, Tuple

import faiss
import numpy as np
import torch

from . import lut, lutscan, scan_kernel

MAX_SEGMENTS = 8
INT32_SPAN = 1 << 31


def code_dtype(nbits: int) -> torch.dtype:
    """The narrowest dtype that holds a sub-code of nbits bits (uint8 for 8-bit codes, which a decode takes
    without a range check)."""
    return torch.uint8 if nbits <= 8 else torch.int16 if nbits <= 15 else torch.int32


def narrow_ids(ids: np.ndarray) -> Tuple[np.ndarray, int]:
    """ids (n,) int64 as (stored, base) with ids == stored + base: int32 offsets from the smallest id where
    the ids span less than 2^31 (sequential ids always do), else the int64 ids themselves and base 0."""
    if len(ids) and int(ids.max()) - int(ids.min()) < INT32_SPAN:
        base = int(ids.min())
        return (ids - base).astype(np.int32), base
    return np.ascontiguousarray(ids, dtype=np.int64), 0


@dataclasses.dataclass
class Segment:
    """Stored vectors grouped by list: rows offsets[l]:offsets[l+1] belong to list l.

    codes (n, M) as ``code_dtype`` stores them; ids (n,) int32 offsets from id_base, or int64 ids
    (id_base 0); terms (n,) float32 (L2) or None (IP); offsets (nlist+1,) int64; all on the scan device.
    """

    codes: torch.Tensor
    ids: torch.Tensor
    id_base: int
    terms: Optional[torch.Tensor]
    offsets: torch.Tensor
    K: int

    def ids_of(self, rows) -> torch.Tensor:
        """The int64 ids of some rows: an index tensor or a slice."""
        ids = self.ids[rows]
        return ids.long() + self.id_base if ids.dtype != torch.int64 else ids

    def table_positions(self, rows) -> torch.Tensor:
        """The positions m * K + i_m (int64) of some rows' sub-codes in a flattened (M * K) table."""
        codes = self.codes[rows]
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
    integers and list_nos (n,) int64, all on one device. Returns (n,) float32."""
    M = codebooks.shape[0]
    steps = torch.arange(M, device=codes.device)
    out = torch.empty(codes.shape[0], dtype=torch.float32, device=codes.device)
    for i0 in range(0, codes.shape[0], chunk):
        recon = codebooks[steps, codes[i0:i0 + chunk].long()].sum(1)  # (b, d)
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
        """Device bytes held: (M sub-codes + 4 id bytes + 4 term bytes) a vector for 8-bit codes whose ids span
        less than 2^31 (8 id bytes otherwise; no term for inner product) + 8 (nlist+1) a segment."""
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
        stored_ids, id_base = narrow_ids(np.asarray(ids, dtype=np.int64)[order])
        self.segments.append(Segment(
            codes=as_device(np.asarray(codes)[order], code_dtype(self.nbits)), ids=as_device(stored_ids),
            id_base=id_base, terms=as_device(terms[order]) if self.with_terms else None,
            offsets=as_device(offsets), K=1 << self.nbits))
        if len(self.segments) > MAX_SEGMENTS:
            self.compact()

    def compact(self) -> None:
        """Merge all segments into one (same contents, one list order)."""
        if len(self.segments) <= 1:
            return
        parts = self.segments
        list_nos = np.concatenate([np.repeat(np.arange(self.nlist), np.diff(s.offsets.cpu().numpy()))
                                   for s in parts])
        codes = np.concatenate([s.codes.cpu().numpy() for s in parts])
        ids = np.concatenate([s.ids_of(slice(None)).cpu().numpy() for s in parts])
        terms = np.concatenate([s.terms.cpu().numpy() for s in parts]) if self.with_terms else None
        self.segments = []
        self.add(codes, list_nos, ids, terms)

    def reset(self) -> None:
        self.segments = []

    def in_step(self, ivf) -> bool:
        """Whether the mirror holds as many vectors as the faiss index (the index keeps it in step)."""
        return self.ntotal == ivf.ntotal

    def list_offsets(self) -> List[np.ndarray]:
        """Per segment, (nlist+1,) int64 host offsets of its lists."""
        return [seg.offsets.cpu().numpy() for seg in self.segments]

    def selector_masks(self, sel: faiss.IDSelector) -> List[torch.Tensor]:
        """Per segment, (n,) bool on the device: the vectors ``sel`` keeps."""
        return [torch.from_numpy(selector_mask(sel, seg.ids_of(slice(None)).cpu().numpy())).to(self.device)
                for seg in self.segments]

    @classmethod
    def from_faiss(cls, ivf, codebooks: np.ndarray, centroids: np.ndarray, M: int, nbits: int,
                   device: torch.device, with_terms: bool) -> "CodeMirror":
        """The mirror of everything an IVF index stores: codebooks (M, K, d) and centroids (nlist, d) float32."""
        mirror = cls(ivf.nlist, M, nbits, device, with_terms)
        ids, list_nos, raw = lut.all_codes(ivf)
        # 8-bit codes are faiss's first M bytes: kept as bytes, not widened to int64 (8x the host memory)
        codes = raw[:, :M] if nbits == 8 else lut.unpack_bits(raw, M, nbits)
        terms = None
        if with_terms and len(ids):
            terms = vector_terms(torch.from_numpy(codebooks).to(device), torch.from_numpy(centroids).to(device),
                                 torch.from_numpy(codes).to(device), torch.from_numpy(list_nos).to(device)).cpu().numpy()
        mirror.add(codes, list_nos, ids, terms)
        return mirror


@dataclasses.dataclass
class StoredList:
    """One inverted list as the CPU scan reads it: codes (n, M) sub-codes (a view into faiss's list for 8-bit
    codes), ids (n,) int64 (a view into faiss's list), terms (n,) float32 or None (inner product)."""

    codes: torch.Tensor
    ids: torch.Tensor
    terms: Optional[torch.Tensor]


class ListMirror:
    """The per-vector terms of an IVF index, list by list, on the CPU; codes and ids are read in place from the
    faiss index's inverted lists (``lists``), so the scan adds 4 bytes a vector to what faiss stores (none for
    inner product).

    In-place reads need faiss's ``ArrayInvertedLists`` (what ``add`` and ``read_index`` build) and 8-bit codes;
    other lists (on disk, other code widths) are copied into bytes when first scanned. faiss appends entries
    to a list in the order they are added, which ``add`` follows; removals reorder lists, after which the
    mirror is rebuilt (``from_faiss``). Views are refreshed after every ``add``, since faiss may move a
    list's storage when it grows.
    """

    def __init__(self, ivf, M: int, nbits: int, with_terms: bool = True):
        self.ivf, self.nlist, self.M, self.nbits, self.with_terms = ivf, ivf.nlist, M, nbits, with_terms
        self.device = torch.device("cpu")
        self.terms: Optional[List[np.ndarray]] = [np.empty(0, np.float32)] * self.nlist if with_terms else None
        self.ntotal = 0
        self._lists: Optional[List[Optional[StoredList]]] = None
        self._table: Optional[lutscan.ListTable] = None
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Host bytes the mirror holds beside faiss's lists: 4 a vector for L2 (its term), 0 for inner
        product; copies of lists that cannot be read in place are not counted."""
        return sum(t.nbytes for t in self.terms) if self.with_terms else 0

    def add(self, codes: np.ndarray, list_nos: np.ndarray, ids: np.ndarray, terms: Optional[np.ndarray]) -> None:
        """Record vectors just added to the faiss index, in the order they were added: list_nos (n,) int64,
        terms (n,) float32 or None (codes and ids are read from faiss's lists)."""
        self.ntotal += len(list_nos)
        self._lists = None
        if not self.with_terms or len(list_nos) == 0:
            return
        order = np.argsort(list_nos, kind="stable")
        counts = np.bincount(list_nos, minlength=self.nlist)
        parts = np.split(np.asarray(terms, dtype=np.float32)[order], np.cumsum(counts)[:-1])
        for list_no in np.nonzero(counts)[0]:
            self.terms[list_no] = np.concatenate([self.terms[list_no], parts[list_no]])

    def reset(self) -> None:
        self.terms = [np.empty(0, np.float32)] * self.nlist if self.with_terms else None
        self.ntotal = 0
        self._lists = None

    def in_step(self, ivf) -> bool:
        """Whether the mirror describes this faiss index as it is now (same object, as many vectors)."""
        return ivf is self.ivf and ivf.ntotal == self.ntotal

    def lists(self) -> List[Optional[StoredList]]:
        """Every list as the scan reads it (None where empty), cached until the next ``add``."""
        with self._lock:
            if self._lists is None:
                self._lists = self._read_lists()
            return self._lists

    def list_table(self) -> "lutscan.ListTable":
        """The lists' addresses for the compiled scan, cached with ``lists``."""
        stored = self.lists()
        table = self._table
        if table is None or table.lists is not stored:
            table = self._table = lutscan.ListTable(stored)
        return table

    def _read_lists(self) -> List[Optional[StoredList]]:
        invlists = faiss.downcast_InvertedLists(self.ivf.invlists)
        in_place = isinstance(invlists, faiss.ArrayInvertedLists)
        code_size, dtype = invlists.code_size, code_dtype(self.nbits)
        out = []
        for list_no in range(self.nlist):
            size = invlists.list_size(list_no)
            if size == 0:
                out.append(None)
                continue
            raw = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * code_size).reshape(size, code_size)
            ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
            if not in_place:  # the pointers may be temporary: keep copies
                raw, ids = raw.copy(), ids.copy()
            if self.nbits == 8:
                codes = torch.from_numpy(raw)[:, :self.M]
            else:
                codes = torch.from_numpy(lut.unpack_bits(raw, self.M, self.nbits)).to(dtype)
            terms = torch.from_numpy(self.terms[list_no]) if self.with_terms else None
            out.append(StoredList(codes, torch.from_numpy(ids), terms))
        return out

    def list_offsets(self) -> List[np.ndarray]:
        """The lists' offsets in one (nlist+1,) int64 array, as if they were one segment (the shape a
        ``CodeMirror`` gives)."""
        sizes = [0 if s is None else s.codes.shape[0] for s in self.lists()]
        return [np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])]

    def selector_masks(self, sel: faiss.IDSelector) -> List[Optional[torch.Tensor]]:
        """Per list, (n,) bool: the vectors ``sel`` keeps (None where the list is empty)."""
        stored = self.lists()
        sizes = [0 if s is None else s.ids.shape[0] for s in stored]
        if not any(sizes):
            return [None] * self.nlist
        keep = selector_mask(sel, np.concatenate([s.ids.numpy() for s in stored if s is not None]))
        parts = np.split(keep, np.cumsum(sizes)[:-1])
        return [None if s is None else torch.from_numpy(p) for s, p in zip(stored, parts)]

    @classmethod
    def from_faiss(cls, ivf, codebooks: np.ndarray, centroids: np.ndarray, M: int, nbits: int,
                   with_terms: bool) -> "ListMirror":
        """The terms of everything an IVF index stores, computed list by list: codebooks (M, K, d) and
        centroids (nlist, d) float32."""
        mirror = cls(ivf, M, nbits, with_terms)
        mirror.ntotal = int(ivf.ntotal)
        if with_terms:
            books, cents = torch.from_numpy(codebooks), torch.from_numpy(centroids)
            for list_no, stored in enumerate(mirror.lists()):
                if stored is not None:
                    list_nos = torch.full((stored.codes.shape[0],), list_no, dtype=torch.int64)
                    mirror.terms[list_no] = vector_terms(books, cents, stored.codes, list_nos).numpy()
            mirror._lists = None  # the views hold the empty terms read before
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

    valid: False where a query had fewer than k candidates (ids -1 there); codes (nq, k, M) sub-codes as
    ``code_dtype`` holds them (uint8 for 8-bit codes).
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
        return empty, empty.long(), empty.long(), torch.empty(B, 0, M, dtype=seg.codes.dtype, device=device)
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
    return best, seg.ids_of(picked).masked_fill(~torch.isfinite(best), -1), \
        probes.gather(1, probe_of.gather(1, where)), seg.codes[picked]


def _segment_lists(seg: Segment, mask: Optional[torch.Tensor]) -> Callable:
    """A segment's lists as ``_candidates_by_list`` reads them: list_no -> (StoredList, mask) or None."""
    offsets = seg.offsets.tolist()

    def read(list_no: int):
        r0, r1 = offsets[list_no], offsets[list_no + 1]
        if r1 == r0:
            return None
        terms = None if seg.terms is None else seg.terms[r0:r1]
        return StoredList(seg.codes[r0:r1], seg.ids_of(slice(r0, r1)), terms), \
            None if mask is None else mask[r0:r1]
    return read


def _mirror_lists(mirror: ListMirror, masks: Optional[List[Optional[torch.Tensor]]]) -> Callable:
    stored = mirror.lists()

    def read(list_no: int):
        if stored[list_no] is None:
            return None
        return stored[list_no], None if masks is None else masks[list_no]
    return read


def _candidates_by_list(read: Callable, luts: torch.Tensor, probes: torch.Tensor, coarse: torch.Tensor, k: int,
                        inner_product: bool, K: int, code_type: torch.dtype):
    """Top-k over the probed lists for a chunk of queries, list by list: the queries that probe a list share
    its codes as one gather index into their tables, which keeps the scan in cache on a CPU (a few ns a
    candidate instead of tens). read: list_no -> (StoredList, mask or None) or None for an empty list;
    luts (B, M, K), probes/coarse (B, P)."""
    B, P = probes.shape
    M = luts.shape[1]
    device = luts.device
    worst = -torch.inf if inner_product else torch.inf
    flat_luts = luts.reshape(B, M * K)
    pair_lists = probes.reshape(-1)
    order = torch.argsort(pair_lists, stable=True)
    lists, counts = torch.unique_consecutive(pair_lists[order], return_counts=True)
    pair_coarse = coarse.reshape(-1)
    best_d = torch.full((B * P, k), worst, device=device)
    best_i = torch.full((B * P, k), -1, dtype=torch.int64, device=device)
    best_c = torch.zeros((B * P, k, M), dtype=code_type, device=device)
    step_offsets = (torch.arange(M, device=device) * K).unsqueeze(1)
    start = 0
    for l, count in zip(lists.tolist(), counts.tolist()):
        list_pairs = order[start:start + count]
        start += count
        entry = read(l)
        if entry is None:
            continue
        stored, mask = entry
        size = stored.codes.shape[0]
        # one gather index a step, (M, n_l) int64, built once for all the queries of the chunk that probe it
        positions = stored.codes.T.long() + step_offsets
        block = max(1, LIST_BLOCK_ENTRIES // size)  # queries at a time: their (block, n_l) sums stay in cache
        for b0 in range(0, count, block):
            pairs = list_pairs[b0:b0 + block]
            tables = flat_luts.index_select(0, pairs // P)  # (b, M * K)
            table = tables.index_select(1, positions[0])  # (b, n_l), summed a step at a time in place
            for m in range(1, M):
                table += tables.index_select(1, positions[m])
            if inner_product:
                scores = pair_coarse[pairs].unsqueeze(1) + table
            else:
                scores = pair_coarse[pairs].unsqueeze(1) + stored.terms - 2 * table
            if mask is not None:
                scores.masked_fill_(~mask, worst)
            top = min(k, size)
            d, where = scores.topk(top, dim=1, largest=inner_product)
            best_d[pairs, :top] = d
            best_i[pairs, :top] = stored.ids[where]
            best_c[pairs, :top] = stored.codes[where].to(code_type)
    top = min(k, P * k)
    best, where = best_d.view(B, P * k).topk(top, dim=1, largest=inner_product)
    ids = best_i.view(B, P * k).gather(1, where).masked_fill(~torch.isfinite(best), -1)
    codes = best_c.view(B, P * k, M).gather(1, where.unsqueeze(-1).expand(-1, -1, M))
    return best, ids, probes.gather(1, where // k), codes


def _segment_candidates_fused(seg: Segment, luts: torch.Tensor, probes: torch.Tensor, coarse: torch.Tensor, k: int,
                              inner_product: bool, mask: Optional[torch.Tensor]):
    """The same top-k as ``_segment_candidates``, from the fused Triton scan (``scan_kernel``): luts (B, M, K),
    probes (B, P) with -1 for none, coarse (B, P)."""
    dist, rows = scan_kernel.scan_segment(luts, probes, coarse, seg.offsets, seg.codes, seg.terms, mask, k,
                                          inner_product)
    found = rows >= 0
    rows = rows.clamp(min=0)
    list_nos = torch.searchsorted(seg.offsets, rows, right=True) - 1  # empty lists share their offset
    return dist, seg.ids_of(rows).masked_fill(~found, -1), list_nos, seg.codes[rows]


STRATEGIES = ("auto", "by_list", "gather", "fused")
LIST_BLOCK_ENTRIES = 1 << 20  # by_list: distances computed at once for one list (4 MB of float32)


def scan(mirror, codebooks: torch.Tensor, xq: torch.Tensor, probes: torch.Tensor,
         coarse: torch.Tensor, k: int, inner_product: bool, masks: Optional[list] = None,
         budget_bytes: int = 256 << 20, strategy: str = "auto") -> Shortlist:
    """The k best stored vectors a query by the lookup-table distance, over the probed lists.

    mirror: a ``CodeMirror`` or a ``ListMirror``; codebooks: (M, K, d) float32 static codebooks on the
    mirror's device; xq: (nq, d) float32 there; probes: (nq, P) int64 list numbers (-1: none); coarse: (nq, P)
    float32, ||q - c||² (L2) or <q, c> (IP) of each probe; masks: the mirror's ``selector_masks`` or None.
    strategy (a ``CodeMirror``'s): "fused" (the Triton scan of ``scan_kernel``, one program a query keeping
    its top k on chip: a GPU's where Triton is installed and k <= ``scan_kernel.MAX_K``), "gather" (all
    candidates of a query chunk in a few large torch gathers: a GPU's otherwise), "by_list" (one list at a
    time, its codes shared by the queries that probe it: the CPU's) or "auto" (by device, Triton and k); a
    ``ListMirror`` is scanned list by list: with "auto", by the compiled scan (``lutscan``) where it is
    built and codes have 8 bits, else by torch.
    Temporaries stay near ``budget_bytes`` (queries are taken in chunks). Returns a ``Shortlist``.
    """
    try:
        return _scan(mirror, codebooks, xq, probes, coarse, k, inner_product, masks, budget_bytes, strategy)
    except scan_kernel.Unusable as exc:
        if strategy == "fused":
            raise
        scan_kernel.unusable(exc)  # "auto" chose it: the torch scan gives the same shortlist
        return _scan(mirror, codebooks, xq, probes, coarse, k, inner_product, masks, budget_bytes, "gather")


def _scan(mirror, codebooks: torch.Tensor, xq: torch.Tensor, probes: torch.Tensor, coarse: torch.Tensor, k: int,
          inner_product: bool, masks: Optional[list], budget_bytes: int, strategy: str) -> Shortlist:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    M, K = codebooks.shape[0], codebooks.shape[1]
    nq = xq.shape[0]
    device = xq.device
    lists_mirror = isinstance(mirror, ListMirror)
    compiled = lists_mirror and strategy == "auto" and lutscan.usable(mirror.nbits)
    by_list = lists_mirror or strategy == "by_list" or (strategy == "auto" and device.type == "cpu")
    fused = not by_list and (strategy == "fused" or (
        strategy == "auto" and device.type == "cuda" and scan_kernel.CONFIG["enabled"] and scan_kernel.available()
        and k <= scan_kernel.MAX_K))
    if fused and k > scan_kernel.MAX_K:
        raise ValueError(f"strategy 'fused' keeps at most {scan_kernel.MAX_K} candidates a query, got k={k}")
    worst = -torch.inf if inner_product else torch.inf
    unclamped = probes
    if not (compiled or fused):  # (those two scans skip the -1 probes themselves)
        missing = probes < 0
        probes = probes.clamp(min=0)
        coarse = torch.where(missing, torch.full_like(coarse, worst), coarse)
    flat_books = codebooks.reshape(M * K, -1)
    sub_dtype = code_dtype(mirror.nbits)
    if compiled:
        table = mirror.list_table()
        masks_at, kept_masks = lutscan.mask_addresses(masks, mirror.nlist)
    elif lists_mirror:
        sources = [_mirror_lists(mirror, masks)]
        sizes = [0 if s is None else s.codes.shape[0] for s in mirror.lists()]
    elif by_list:
        sources = [_segment_lists(seg, None if masks is None else masks[s]) for s, seg in enumerate(mirror.segments)]
        sizes = [int((seg.offsets[1:] - seg.offsets[:-1]).max()) for seg in mirror.segments]
    if compiled:  # a chunk's tables and outputs
        per_query = 4 * M * K + (20 + M) * k
    elif fused:  # a chunk's tables, the kernel's keys and the candidates' rows, ids and codes
        per_query = 4 * M * K + 8 * scan_kernel.kept_slots(k) * probes.shape[1] + (M + 40) * k * 2
    elif by_list:
        # a chunk's tables and candidate buffers, and one list's temporaries if every query probed the largest
        per_query = 8 * M * K + (20 + M) * probes.shape[1] * k + max(sizes + [1]) * 24
    else:
        cand = torch.zeros(nq, dtype=torch.int64, device=device)
        for seg in mirror.segments:
            cand += (seg.offsets[probes + 1] - seg.offsets[probes]).masked_fill(missing, 0).sum(1)
        per_query = max(1, int(cand.max()) if nq else 1) * (8 * M + 48) + 4 * M * K
    chunk = max(1, budget_bytes // per_query)

    def empty():  # distances, ids, list numbers, codes of an all-empty shortlist
        return (torch.full((nq, k), worst, device=device), torch.full((nq, k), -1, dtype=torch.int64, device=device),
                torch.zeros((nq, k), dtype=torch.int64, device=device),
                torch.zeros((nq, k, M), dtype=sub_dtype, device=device))

    out_d = out_i = out_l = out_c = None  # made at the first chunk that needs them
    for i0 in range(0, nq, chunk):
        sl = slice(i0, i0 + chunk)
        luts = (xq[sl] @ flat_books.T).reshape(-1, M, K)
        if compiled:
            parts = [lutscan.scan_lists(table, masks_at, luts, unclamped[sl], coarse[sl], k, inner_product)]
        elif fused:
            parts = [_segment_candidates_fused(seg, luts, unclamped[sl], coarse[sl], k, inner_product,
                                               None if masks is None else masks[s])
                     for s, seg in enumerate(mirror.segments)]
        elif by_list:
            parts = [_candidates_by_list(read, luts, probes[sl], coarse[sl], k, inner_product, K, sub_dtype)
                     for read in sources]
        else:
            parts = [_segment_candidates(seg, luts, probes[sl], coarse[sl], k, inner_product,
                                         None if masks is None else masks[s], K)
                     for s, seg in enumerate(mirror.segments)]
        if len(parts) == 1 and nq <= chunk and parts[0][0].shape[1] == k:
            # one chunk from one store, sorted already: the shortlist as it is (a single query's fewest launches)
            out_d, out_i, out_l, out_c = parts[0]
            out_c = out_c.to(sub_dtype)  # (a no-op where the scan kept them so)
            break
        if out_d is None:
            out_d, out_i, out_l, out_c = empty()
        if not parts:
            continue
        if len(parts) == 1:  # one store's candidates come sorted already: no merge (fewer launches on a GPU)
            dist, ids, list_nos, codes = parts[0]
            top = dist.shape[1]
            out_d[sl, :top], out_i[sl, :top], out_l[sl, :top], out_c[sl, :top] = dist, ids, list_nos, codes
            continue
        dist = torch.cat([p[0] for p in parts], 1)
        if dist.shape[1] == 0:
            continue
        top = min(k, dist.shape[1])
        best, where = dist.topk(top, dim=1, largest=inner_product)
        out_d[sl, :top] = best
        out_i[sl, :top] = torch.cat([p[1] for p in parts], 1).gather(1, where)
        out_l[sl, :top] = torch.cat([p[2] for p in parts], 1).gather(1, where)
        out_c[sl, :top] = torch.cat([p[3] for p in parts], 1).gather(1, where.unsqueeze(-1).expand(-1, top, M))
    if out_d is None:  # no queries
        out_d, out_i, out_l, out_c = empty()
    valid = torch.isfinite(out_d)
    out_i = out_i.masked_fill(~valid, -1)
    return Shortlist(out_d, out_i, out_l, out_c, valid)


def count_ivf_search(probes: np.ndarray, segment_offsets: List[np.ndarray]) -> None:
    """Add a search's scans to ``faiss.cvar.indexIVF_stats`` as faiss's CPU IVF indexes do: queries
    (nq), non-empty lists probed (nlist) and codes scanned in them (ndis).

    probes: (nq, nprobe) int64 list numbers, -1 for none; segment_offsets: per stored segment,
    (nlist+1,) int64 offsets of its lists."""
    stats = faiss.cvar.indexIVF_stats
    stats.nq += int(probes.shape[0])
    if not segment_offsets:
        return
    sizes = sum(np.diff(offsets) for offsets in segment_offsets)
    valid = probes[probes >= 0]
    scanned = sizes[valid]
    stats.nlist += int(np.count_nonzero(scanned))
    stats.ndis += int(scanned.sum())
