"""The compiled CPU scan of 8-bit codes in faiss's inverted lists (``_lutscan.c``, loaded with ctypes).

It computes what the torch list-by-list scan of ``scan`` computes, the same
float32 operations in the same order, one query at a time with its table in
L1 and a bounded heap of the k best, instead of torch's gathers, sums and
top-k over temporaries. The library is built with the package (``setup.py``,
an optional extension: an install without a C compiler still works, and the
torch scan is used). Queries are split over ``torch.get_num_threads()``
threads; ctypes releases the GIL while the C code runs.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import numpy as np
import torch

# enabled: whether the CPU scan takes the compiled path where it is built (off: the torch scan, to compare)
CONFIG = {"enabled": True}

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_lock = threading.Lock()
_library = None
_loaded = False
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _load():
    global _library, _loaded
    with _lock:
        if not _loaded:
            _loaded = True
            here = os.path.dirname(os.path.abspath(__file__))
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                path = os.path.join(here, "_lutscan" + suffix)
                if os.path.exists(path):
                    try:
                        lib = ctypes.CDLL(path)
                    except OSError:
                        continue
                    lib.rqmoe_lutscan.restype = ctypes.c_int
                    lib.rqmoe_lutscan.argtypes = [_I64, _I64, _I64, _I64, ctypes.c_int32] + [_PTR] * 13
                    _library = lib
                    break
    return _library


def built() -> bool:
    """Whether the compiled scan was built with this install (it needs a C compiler at install time)."""
    return _load() is not None


def usable(nbits: int) -> bool:
    """Whether a CPU scan of nbits-bit codes takes the compiled path: built, enabled, 8-bit codes."""
    return CONFIG["enabled"] and nbits == 8 and built()


class ListTable:
    """The addresses of every list's codes, ids and terms, as the C scan reads them.

    lists: per list a ``scan.StoredList`` (codes (n, M) uint8 rows of a common byte stride, ids (n,) int64,
    terms (n,) float32 or None) or None where empty. Holds the lists, so the addresses stay valid while it
    lives.
    """

    def __init__(self, lists: list):
        self.lists = lists
        nlist = len(lists)
        self.codes_at = np.zeros(nlist, np.int64)
        self.ids_at = np.zeros(nlist, np.int64)
        self.terms_at = np.zeros(nlist, np.int64)
        self.sizes = np.zeros(nlist, np.int64)
        self.stride = 0
        for l, stored in enumerate(lists):
            if stored is None or stored.codes.shape[0] == 0:
                continue
            codes = stored.codes
            if codes.dtype != torch.uint8 or codes.stride(1) != 1 or stored.ids.dtype != torch.int64 \
                    or not stored.ids.is_contiguous():
                raise ValueError("the compiled scan reads uint8 code rows and int64 ids")
            if self.stride and codes.stride(0) != self.stride:
                raise ValueError("the compiled scan needs one code stride for all lists")
            self.stride = codes.stride(0)
            self.codes_at[l] = codes.data_ptr()
            self.ids_at[l] = stored.ids.data_ptr()
            if stored.terms is not None:
                if not stored.terms.is_contiguous():
                    raise ValueError("the compiled scan reads contiguous terms")
                self.terms_at[l] = stored.terms.data_ptr()
            self.sizes[l] = codes.shape[0]


def mask_addresses(masks: Optional[List[Optional[torch.Tensor]]], nlist: int) -> Tuple[np.ndarray, list]:
    """(nlist,) int64 addresses of per-list (n,) bool selector masks, 0 where a list has none, and the
    tensors they point into (keep them while the addresses are used)."""
    out, kept = np.zeros(nlist, np.int64), []
    if masks is not None:
        for l, mask in enumerate(masks):
            if mask is not None and mask.numel():
                mask = mask.contiguous()
                kept.append(mask)
                out[l] = mask.data_ptr()
    return out, kept


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lutscan"), threads
        return _pool


def scan_lists(table: ListTable, masks_at: np.ndarray, luts: torch.Tensor, probes: torch.Tensor,
               coarse: torch.Tensor, k: int, inner_product: bool, threads: int = 0
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best stored vectors a query by the lookup-table distance, best first.

    table: a ``ListTable``; masks_at: ``mask_addresses`` of the selector's masks; luts (B, M, 256) float32;
    probes (B, P) int64 (-1: none); coarse (B, P) float32 (L2: ||q - c||², IP: <q, c>); threads: 0 for
    ``torch.get_num_threads()``. All on the CPU. Returns distances (B, k) float32 (+inf L2 / -inf IP where
    empty), ids (B, k) int64 (-1), list numbers (B, k) int64 and codes (B, k, M) uint8.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError("the compiled scan is not built (reinstall faiss_rqmoe with a C compiler)")
    B, P = probes.shape
    M = luts.shape[1]
    if luts.shape[2] != 256:
        raise ValueError(f"the compiled scan reads 8-bit codes (tables of 256), got {luts.shape[2]}")
    luts = np.ascontiguousarray(luts.numpy(), dtype=np.float32)
    probes = np.ascontiguousarray(probes.numpy(), dtype=np.int64)
    coarse = np.ascontiguousarray(coarse.numpy(), dtype=np.float32)
    dist = np.empty((B, k), np.float32)
    ids = np.empty((B, k), np.int64)
    lists = np.empty((B, k), np.int64)
    codes = np.empty((B, k, M), np.uint8)

    def run(q0: int, q1: int) -> int:
        if q1 <= q0:
            return 0
        return lib.rqmoe_lutscan(q1 - q0, P, M, k, int(inner_product), luts[q0:q1].ctypes.data,
                                 probes[q0:q1].ctypes.data, coarse[q0:q1].ctypes.data, table.codes_at.ctypes.data,
                                 table.ids_at.ctypes.data, table.terms_at.ctypes.data, masks_at.ctypes.data,
                                 table.sizes.ctypes.data, table.stride, dist[q0:q1].ctypes.data,
                                 ids[q0:q1].ctypes.data, lists[q0:q1].ctypes.data, codes[q0:q1].ctypes.data)

    threads = min(B, threads or torch.get_num_threads())
    if threads <= 1:
        status = [run(0, B)]
    else:
        bounds = np.linspace(0, B, threads + 1).astype(int)
        status = list(_executor(threads).map(run, bounds[:-1], bounds[1:]))
    if any(status):
        raise MemoryError("the compiled scan could not allocate its top-k buffers")
    return torch.from_numpy(dist), torch.from_numpy(ids), torch.from_numpy(lists), torch.from_numpy(codes)
