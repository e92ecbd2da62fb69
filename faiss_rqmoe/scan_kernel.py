"""A fused lookup-table scan on CUDA, in Triton (docs/design.md, "The lookup-table formula").

One program takes one query (or one share of its probed lists, for small
batches): it walks the probed lists of a list-contiguous store, reads each
stored vector's sub-codes and term once, sums the query's (M, K) table
entries they name, and keeps a running top-``KP`` of the lookup-table
distances in registers. A candidate is kept as one int64 key, the distance's
bits mapped to an order-preserving integer in the high half and its row in
the low half, so that a sort of keys sorts candidates by distance, ties by
row, and a row travels with its distance at no extra cost. A block of
candidates is merged only when one of them beats the worst kept one (after
the first lists, few do). The table is read through the L1 cache: Triton
addresses shared memory only through its own layouts, and an M × K float32
table (8 KiB at 8 × 256) stays resident there.

The store is a ``scan.CodeMirror`` segment's tensors: codes (n, M), terms (n,),
offsets (nlist + 1,); rows come back as segment rows, which the caller turns
into ids, codes and list numbers. Without Triton or CUDA the module imports
and ``available()`` says False; ``TRITON_INTERPRET=1`` runs the kernel on
CPU tensors (the tests do).
"""
from __future__ import annotations

import functools
import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch scan is used
    triton = None

logger = logging.getLogger(__name__)

# Candidates a program scores at a time, at least the kept top-k (a power of two); warps a program;
# enabled: whether scan(strategy="auto") takes this kernel on CUDA (off: the torch gather, e.g. to compare;
# turned off for the process when the kernel cannot be compiled here, see ``unusable``).
CONFIG = {"BLOCK_N": 128, "num_warps": 4, "enabled": True}
# The largest shortlist kept on chip: a program's keys (KP int64) and a block's sort stay in registers.
MAX_K = 256
# Programs a launch aims at: a batch with fewer queries splits each query's probes over several programs
# (merged after), so that a single query still spreads over the chip.
TARGET_PROGRAMS = 2048
NONE_KEY = (1 << 63) - 1  # an empty slot: after every real key


class Unusable(RuntimeError):
    """The fused scan could not be compiled or launched here (e.g. a Triton release whose language lacks
    something it uses); the torch scan computes the same shortlist."""


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the fused scan can run here: Triton importable and a CUDA device present."""
    return triton is not None and torch.cuda.is_available()


def unusable(error: Exception) -> None:
    """Stop choosing the fused scan in this process after ``error`` (an ``Unusable``), saying why once."""
    if CONFIG["enabled"]:
        CONFIG["enabled"] = False
        logger.warning("the fused GPU scan cannot run with this Triton (%s); searches use the torch scan, "
                       "which returns the same shortlists", str(error).splitlines()[0] if str(error) else error)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, for tests without a GPU)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def kept_slots(k: int) -> int:
    """The top-k buffer a program keeps: the next power of two >= k, at least 16."""
    return max(16, 1 << (max(1, k) - 1).bit_length())


if triton is not None:
    @triton.jit
    def _smallest(keys, K: tl.constexpr):
        # the K smallest int64 keys: tl.topk keeps the largest (its order argument is newer than Triton
        # 3.6), and ~ reverses the order of int64 without overflow
        return ~tl.topk(~keys, K)

    @triton.jit
    def _scan_kernel(luts_ptr, probes_ptr, coarse_ptr, offsets_ptr, codes_ptr, terms_ptr, mask_ptr, keys_ptr,
                     P, n_split, M: tl.constexpr, K: tl.constexpr, MP: tl.constexpr, KP: tl.constexpr,
                     BLOCK_N: tl.constexpr, INNER_PRODUCT: tl.constexpr, HAS_MASK: tl.constexpr):
        q = tl.program_id(0)
        share = tl.program_id(1)
        steps = tl.arange(0, MP)
        step_ok = steps < M
        lanes = tl.arange(0, BLOCK_N)
        lut_row = luts_ptr + q.to(tl.int64) * (M * K) + steps * K
        best = tl.full((KP,), 0x7FFFFFFFFFFFFFFF, tl.int64)
        worst_kept = tl.max(best, axis=0)
        for p in range(share, P, n_split):
            list_no = tl.load(probes_ptr + q.to(tl.int64) * P + p)
            coarse = tl.load(coarse_ptr + q.to(tl.int64) * P + p)
            probed = list_no >= 0
            safe_list = tl.where(probed, list_no, 0)
            start = tl.load(offsets_ptr + safe_list).to(tl.int32)
            end = tl.where(probed, tl.load(offsets_ptr + safe_list + 1).to(tl.int32), start)
            for r0 in range(start, end, BLOCK_N):
                rows = r0 + lanes
                row_ok = rows < end
                both_ok = row_ok[:, None] & step_ok[None, :]
                codes = tl.load(codes_ptr + rows.to(tl.int64)[:, None] * M + steps[None, :], mask=both_ok, other=0)
                entries = tl.load(lut_row[None, :] + codes.to(tl.int32), mask=both_ok, other=0.0)
                table = tl.sum(entries, axis=1)
                if INNER_PRODUCT:  # larger is better: keys order the negated similarity
                    dist = -(coarse + table)
                else:
                    dist = coarse + tl.load(terms_ptr + rows, mask=row_ok, other=0.0) - 2.0 * table
                keep = row_ok
                if HAS_MASK:
                    keep = keep & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
                bits = dist.to(tl.int32, bitcast=True)
                ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-integer order == float order
                keys = (ordered.to(tl.int64) << 32) | rows.to(tl.int64)
                keys = tl.where(keep, keys, 0x7FFFFFFFFFFFFFFF)
                if tl.min(keys, axis=0) < worst_kept:
                    if BLOCK_N > KP:
                        merged = tl.reshape(tl.join(best, _smallest(keys, KP)), (2 * KP,))
                    else:
                        merged = tl.reshape(tl.join(best, keys), (2 * KP,))
                    best = _smallest(merged, KP)
                    worst_kept = tl.max(best, axis=0)
        out = keys_ptr + (q.to(tl.int64) * n_split + share) * KP + tl.arange(0, KP)
        tl.store(out, tl.sort(best, descending=False))


def decode_keys(keys: torch.Tensor, inner_product: bool):
    """Distances (float32) and rows (int64, -1 for an empty slot) of packed keys (any shape, int64)."""
    empty = keys == NONE_KEY
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    dist = bits.view(torch.float32)
    if inner_product:
        dist = -dist
    worst = -torch.inf if inner_product else torch.inf
    dist = dist.masked_fill(empty, worst)
    rows = (keys & 0xFFFFFFFF).masked_fill(empty, -1)
    return dist, rows


def scan_segment(luts: torch.Tensor, probes: torch.Tensor, coarse: torch.Tensor, offsets: torch.Tensor,
                 codes: torch.Tensor, terms, mask, k: int, inner_product: bool, n_split: int = 0):
    """The k best rows of one list-contiguous store for a batch of queries, by the lookup-table distance.

    luts: (B, M, K) float32 tables ⟨q, T_m[i]⟩; probes: (B, P) int64 (-1: none); coarse: (B, P) float32,
    ||q - c||² (L2) or ⟨q, c⟩ (IP); offsets: (nlist + 1,) int64, rows offsets[l]:offsets[l+1] of list l;
    codes: (n, M) uint8/int16/int32 sub-codes; terms: (n,) float32 (L2) or None (IP); mask: (n,) bool of
    the rows a selector keeps, or None; k <= ``MAX_K``; n_split: programs a query (0: from the batch size).
    All on one device. Returns distances (B, k) float32 (worst where empty) and rows (B, k) int64
    (-1 where empty), best first.
    """
    if triton is None:
        raise RuntimeError("the fused scan needs Triton (pip install triton) and a CUDA device")
    B, P = probes.shape
    M, K = luts.shape[1], luts.shape[2]
    if k > MAX_K:
        raise ValueError(f"the fused scan keeps at most {MAX_K} candidates a query, got k={k}")
    if codes.shape[0] >= 1 << 31:  # a key holds its row in 32 bits; the store adds in segments well below
        raise ValueError(f"the fused scan addresses at most 2^31 - 1 rows a segment, got {codes.shape[0]}")
    KP = kept_slots(k)
    if n_split <= 0:
        n_split = min(P, max(1, -(-TARGET_PROGRAMS // max(1, B))))
    n_split = max(1, min(n_split, P))
    keys = torch.empty((B, n_split, KP), dtype=torch.int64, device=luts.device)
    if B:
        dummy = codes.new_zeros(1)
        terms_arg = terms if terms is not None else luts
        mask_arg = mask.view(torch.uint8) if mask is not None else dummy
        try:
            _scan_kernel[(B, n_split)](
                luts.contiguous(), probes.contiguous(), coarse.contiguous(), offsets, codes, terms_arg, mask_arg,
                keys, P, n_split, M=M, K=K, MP=triton.next_power_of_2(M), KP=KP,
                BLOCK_N=max(KP, CONFIG["BLOCK_N"]), INNER_PRODUCT=inner_product, HAS_MASK=mask is not None,
                num_warps=CONFIG["num_warps"])
        except triton.CompilationError as exc:
            raise Unusable(str(exc)) from exc
    keys = keys.view(B, n_split * KP)
    if n_split > 1:
        keys = keys.topk(KP, dim=1, largest=False).values
    return decode_keys(keys[:, :k], inner_product)
