"""The lookup-table stage's storage side: static additive codebooks fitted to RQ-MoE codes, and the
faiss IVF additive-quantizer index that stores those codes and ids (docs/design.md, "The index").

faiss holds the codes and ids (it is the file format and the storage of
record); it never encodes a vector itself: the codes we add are RQ-MoE's.
The scan itself is ``scan.py``'s: one lookup table a query, not one a probed
list as faiss's scanner computes for by-residual codes.
"""
from __future__ import annotations

import faiss
import numpy as np
import scipy.linalg
import scipy.sparse


def fit_additive_codebooks(codes: np.ndarray, targets: np.ndarray, K: int, ridge: float = 1e-6) -> np.ndarray:
    """Least-squares static codebooks T with Σ_m T[m, codes[:, m]] ≈ targets.

    codes: (n, M) integers in [0, K); targets: (n, d) float32.
    ridge: relative Tikhonov weight (the system is singular: constants can
    move between steps, unused codewords have no data). Returns (M, K, d) float32.
    """
    n, M = codes.shape
    rows = np.repeat(np.arange(n), M)
    cols = (codes.astype(np.int64) + np.arange(M, dtype=np.int64) * K).ravel()
    onehot = scipy.sparse.csr_matrix((np.ones(n * M), (rows, cols)), shape=(n, M * K))
    gram = (onehot.T @ onehot).toarray()
    rhs = onehot.T @ targets.astype(np.float64)
    gram[np.diag_indices_from(gram)] += ridge * max(1.0, np.trace(gram) / (M * K))
    solution = scipy.linalg.solve(gram, rhs, assume_a="pos")
    return solution.reshape(M, K, -1).astype(np.float32)


def static_reconstruction(codebooks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Σ_m T[m, codes[:, m]]: codebooks (M, K, d) float32, codes (n, M) int -> (n, d) float32."""
    return codebooks[np.arange(codebooks.shape[0]), codes].sum(1)


def pack_bits(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Pack (n, M) codes of nbits each into (n, ceil(M*nbits/8)) uint8, faiss bit order (LSB first)."""
    n, M = codes.shape
    bits = (codes.astype(np.int64)[:, :, None] >> np.arange(nbits)) & 1  # (n, M, nbits)
    return np.packbits(bits.reshape(n, M * nbits).astype(np.uint8), axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, M: int, nbits: int) -> np.ndarray:
    """Inverse of ``pack_bits``: (n, nbytes) uint8 -> (n, M) int64 (extra trailing bits ignored)."""
    n = packed.shape[0]
    if nbits == 8:
        return packed[:, :M].astype(np.int64)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, :M * nbits].reshape(n, M, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(-1)


def build_ivf_index(quantizer: faiss.Index, d: int, nlist: int, codebooks: np.ndarray, nbits: int,
                    metric: int, sample_norms: np.ndarray) -> faiss.IndexIVFResidualQuantizer:
    """An empty faiss IVF residual-quantizer index that scans with the given static codebooks.

    quantizer: trained coarse quantizer holding nlist centroids (ownership
    passes to the returned index); codebooks: (M, K, d) float32;
    sample_norms: (n,) float32 squared norms of codebook reconstructions,
    to fit the 8-bit norm quantizer. The index is marked trained.
    """
    M = codebooks.shape[0]
    index = faiss.IndexIVFResidualQuantizer(quantizer, d, nlist, M, nbits, metric,
                                            faiss.AdditiveQuantizer.ST_norm_qint8)
    index.own_fields = True
    quantizer.this.disown()
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, dtype=np.float32).ravel(), index.rq.codebooks)
    index.rq.is_trained = True
    norms = np.ascontiguousarray(sample_norms, dtype=np.float32)
    index.rq.train_norm(len(norms), faiss.swig_ptr(norms))
    index.is_trained = True
    return index


def encode_sa_codes(index: faiss.IndexIVFResidualQuantizer, codes: np.ndarray, list_nos: np.ndarray) -> np.ndarray:
    """faiss standalone codes (list number + packed codes + quantized norm) for given RQ-MoE codes.

    codes: (n, M) int; list_nos: (n,) int64. The norm byte is that of the
    static-codebook reconstruction, as the LUT scanner expects.
    Returns (n, index.sa_code_size()) uint8.
    """
    n = codes.shape[0]
    rq = index.rq
    codes32 = np.ascontiguousarray(codes, dtype=np.int32)
    packed = np.empty((n, rq.code_size), dtype=np.uint8)
    rq.pack_codes(n, faiss.swig_ptr(codes32), faiss.swig_ptr(packed))
    coarse_size = index.coarse_code_size()
    listno_bytes = (list_nos.astype(np.int64)[:, None] >> (8 * np.arange(coarse_size))) & 0xFF
    return np.hstack([listno_bytes.astype(np.uint8), packed])


def decode_sa_codes(index: faiss.IndexIVFResidualQuantizer, sa_codes: np.ndarray, M: int, nbits: int):
    """Split faiss standalone codes into list numbers (n,) int64 and RQ-MoE codes (n, M) int64."""
    coarse_size = index.coarse_code_size()
    list_nos = np.zeros(sa_codes.shape[0], dtype=np.int64)
    for byte in range(coarse_size):
        list_nos |= sa_codes[:, byte].astype(np.int64) << (8 * byte)
    return list_nos, unpack_bits(sa_codes[:, coarse_size:], M, nbits)


def all_codes(index: faiss.IndexIVF):
    """Every stored entry: ids (n,) int64, list numbers (n,) int64, raw codes (n, code_size) uint8."""
    invlists = index.invlists
    ids, list_nos, codes = [], [], []
    for list_no in range(index.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        ids.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
        codes.append(faiss.rev_swig_ptr(invlists.get_codes(list_no), size * invlists.code_size)
                     .copy().reshape(size, invlists.code_size))
        list_nos.append(np.full(size, list_no, dtype=np.int64))
    if not ids:
        return (np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, invlists.code_size), np.uint8))
    return np.concatenate(ids), np.concatenate(list_nos), np.concatenate(codes)
