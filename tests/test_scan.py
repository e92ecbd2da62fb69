"""The list-independent lookup-table scan against brute force over the same static codebooks."""
import faiss
import numpy as np
import pytest
import torch

from faiss_rqmoe import lut, lutscan, scan


def setup(n=3000, nlist=12, M=4, K=16, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((nlist, d)).astype(np.float32) * 3
    books = rng.standard_normal((M, K, d)).astype(np.float32)
    codes = rng.integers(0, K, (n, M))
    lists = rng.integers(0, nlist, n)
    ids = rng.choice(10**6, n, replace=False).astype(np.int64) - 500  # negative ids too
    return centroids, books, codes, lists, ids


def brute(xq, centroids, books, codes, lists, ids, probes, k, ip, keep=None):
    """Exact distances to every stored vector of the probed lists: top-k (distances, ids) a query."""
    recon = centroids[lists] + books[np.arange(books.shape[0]), codes].sum(1)
    out_d, out_i = [], []
    for q in range(len(xq)):
        rows = np.nonzero(np.isin(lists, probes[q]) & (True if keep is None else keep))[0]
        dist = recon[rows] @ xq[q] if ip else ((recon[rows] - xq[q]) ** 2).sum(1)
        order = np.argsort(-dist if ip else dist, kind="stable")[:k]
        out_d.append(np.pad(dist[order], (0, k - len(order)), constant_values=-np.inf if ip else np.inf))
        out_i.append(np.pad(ids[rows][order], (0, k - len(order)), constant_values=-1))
    return np.array(out_d), np.array(out_i)


@pytest.mark.parametrize("strategy", ["by_list", "gather"])
@pytest.mark.parametrize("ip", [False, True])
@pytest.mark.parametrize("nprobe, k", [(1, 5), (3, 40), (12, 3000)])
def test_scan_equals_brute_force(ip, nprobe, k, strategy):
    centroids, books, codes, lists, ids = setup()
    mirror = scan.CodeMirror(len(centroids), books.shape[0], 4, torch.device("cpu"), with_terms=not ip)
    half = len(ids) // 2  # two segments, as two calls of add make
    for part in (slice(0, half), slice(half, None)):
        terms = None if ip else scan.vector_terms(torch.from_numpy(books), torch.from_numpy(centroids),
                                                  torch.from_numpy(codes[part]), torch.from_numpy(lists[part])).numpy()
        mirror.add(codes[part], lists[part], ids[part], terms)
    assert len(mirror.segments) == 2 and mirror.ntotal == len(ids)
    xq = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32) * 3
    coarse_all = xq @ centroids.T if ip else ((xq[:, None] - centroids[None]) ** 2).sum(-1)
    probes = np.argsort(-coarse_all if ip else coarse_all, axis=1)[:, :nprobe]
    coarse = np.take_along_axis(coarse_all, probes, 1).astype(np.float32)
    short = scan.scan(mirror, torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes),
                      torch.from_numpy(coarse), k, ip, strategy=strategy)
    D_ref, I_ref = brute(xq, centroids, books, codes, lists, ids, probes, k, ip)
    np.testing.assert_allclose(short.distances.numpy(), D_ref, rtol=1e-4, atol=1e-3)
    assert (short.ids.numpy() == I_ref).mean() > 0.95  # positions may swap between equal distances
    assert (short.valid.numpy() == (I_ref != -1)).all()
    # every candidate's list number and codes are its own, and it lies at the distance reported
    recon = centroids[lists] + books[np.arange(books.shape[0]), codes].sum(1)
    row_of = {int(i): r for r, i in enumerate(ids)}
    for q, j in zip(*np.nonzero(short.valid.numpy())):
        r = row_of[int(short.ids[q, j])]
        assert (lists[r], tuple(codes[r])) == (int(short.list_nos[q, j]), tuple(short.codes[q, j].tolist()))
        true = recon[r] @ xq[q] if ip else ((recon[r] - xq[q]) ** 2).sum()
        assert abs(true - float(short.distances[q, j])) <= 1e-3 + 1e-4 * abs(true)
    mirror.compact()
    again = scan.scan(mirror, torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes),
                      torch.from_numpy(coarse), k, ip, strategy=strategy)
    np.testing.assert_allclose(again.distances.numpy(), short.distances.numpy(), rtol=1e-5, atol=1e-4)


def test_selector_mask_matches_faiss_is_member():
    ids = np.array([-7, 0, 3, 99, 100, 101, 5000], dtype=np.int64)
    chosen = np.array([3, 100, -7], dtype=np.int64)
    params = faiss.SearchParametersIVF(sel=faiss.IDSelectorRange(3, 100))  # holds its selector alive
    selectors = [faiss.IDSelectorRange(0, 101), faiss.IDSelectorBatch(3, faiss.swig_ptr(chosen)),
                 faiss.IDSelectorNot(faiss.IDSelectorRange(0, 101)),
                 params.sel]  # the untyped selector a SearchParameters object hands back
    for sel in selectors:
        expected = np.array([bool(sel.is_member(int(i))) for i in ids])
        np.testing.assert_array_equal(scan.selector_mask(sel, ids), expected)


@pytest.mark.parametrize("strategy", ["by_list", "gather"])
def test_scan_with_a_selector_keeps_only_selected_ids(strategy):
    centroids, books, codes, lists, ids = setup(n=800)
    mirror = scan.CodeMirror(len(centroids), books.shape[0], 4, torch.device("cpu"))
    terms = scan.vector_terms(torch.from_numpy(books), torch.from_numpy(centroids), torch.from_numpy(codes),
                              torch.from_numpy(lists)).numpy()
    mirror.add(codes, lists, ids, terms)
    sel = faiss.IDSelectorRange(0, 400_000)
    masks = mirror.selector_masks(sel)
    xq = np.random.default_rng(2).standard_normal((10, 8)).astype(np.float32)
    probes = np.tile(np.arange(len(centroids)), (10, 1))
    coarse = ((xq[:, None] - centroids[None]) ** 2).sum(-1).astype(np.float32)
    short = scan.scan(mirror, torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes),
                      torch.from_numpy(coarse), 50, False, masks, strategy=strategy)
    keep = (ids >= 0) & (ids < 400_000)
    D_ref, I_ref = brute(xq, centroids, books, codes, lists, ids, probes, 50, False, keep)
    found = short.ids.numpy()[short.valid.numpy()]
    assert ((found >= 0) & (found < 400_000)).all()
    np.testing.assert_allclose(short.distances.numpy(), D_ref, rtol=1e-4, atol=1e-3)


def test_both_strategies_give_the_same_shortlist_and_small_budgets_chunk_the_queries(monkeypatch):
    """The list-by-list scan (CPU) and the all-candidates gather (GPU) give the same shortlist, also with a
    tiny budget (one query a chunk) and a list's queries taken in small blocks; distances within float rounding (the tables' matrix product and the
    sums are shaped differently), ids equal but where two distances tie to rounding."""
    centroids, books, codes, lists, ids = setup(n=2000)
    mirror = scan.CodeMirror(len(centroids), books.shape[0], 4, torch.device("cpu"))
    mirror.add(codes, lists, ids, scan.vector_terms(torch.from_numpy(books), torch.from_numpy(centroids),
                                                    torch.from_numpy(codes), torch.from_numpy(lists)).numpy())
    xq = np.random.default_rng(3).standard_normal((25, 8)).astype(np.float32) * 3
    coarse_all = ((xq[:, None] - centroids[None]) ** 2).sum(-1)
    probes = np.argsort(coarse_all, axis=1)[:, :4]
    coarse = np.take_along_axis(coarse_all, probes, 1).astype(np.float32)
    args = (mirror, torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes),
            torch.from_numpy(coarse), 30, False)
    results = [scan.scan(*args, strategy=s, budget_bytes=b) for s in ("gather", "by_list") for b in (256 << 20, 1)]
    monkeypatch.setattr(scan, "LIST_BLOCK_ENTRIES", 300)  # a list's queries in blocks of one or two
    results.append(scan.scan(*args, strategy="by_list"))
    for other in results[1:]:
        np.testing.assert_allclose(other.distances.numpy(), results[0].distances.numpy(), rtol=1e-5, atol=1e-4)
        assert (other.ids == results[0].ids).float().mean() > 0.98
        assert torch.equal(other.valid, results[0].valid)
    with pytest.raises(ValueError, match="strategy must be one of"):
        scan.scan(*args, strategy="fast")


def faiss_lists(nbits=8, ip=False, n=2500, nlist=12, M=4, d=8, seed=0):
    """A faiss IVF index holding codes of setup()'s kind (two adds, lists 3 and 7 left empty) and the
    ListMirror kept beside it as IndexRQMoE keeps it."""
    K = 1 << nbits
    centroids, books, codes, lists, ids = setup(n, nlist, M, K, d, seed)
    lists = np.where(np.isin(lists, (3, 7)), 0, lists)
    quantizer = (faiss.IndexFlatIP if ip else faiss.IndexFlatL2)(d)
    quantizer.add(centroids)
    static = lut.static_reconstruction(books, codes)
    ivf = lut.build_ivf_index(quantizer, d, nlist, books, nbits,
                              faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2, (static ** 2).sum(1))
    mirror = scan.ListMirror(ivf, M, nbits, with_terms=not ip)
    for part in (slice(0, n // 3), slice(n // 3, None)):
        ivf.add_sa_codes(lut.encode_sa_codes(ivf, codes[part], lists[part]), ids[part])
        terms = None if ip else scan.vector_terms(torch.from_numpy(books), torch.from_numpy(centroids),
                                                  torch.from_numpy(codes[part]), torch.from_numpy(lists[part])).numpy()
        mirror.add(codes[part], lists[part], ids[part], terms)
    return ivf, mirror, centroids, books, codes, lists, ids


def probe(xq, centroids, nprobe, ip):
    """The nprobe nearest lists a query and their coarse terms; beyond nlist, -1 lists as faiss pads them."""
    coarse_all = xq @ centroids.T if ip else ((xq[:, None] - centroids[None]) ** 2).sum(-1)
    probes = np.argsort(-coarse_all if ip else coarse_all, axis=1)[:, :nprobe]
    coarse = np.take_along_axis(coarse_all, probes, 1).astype(np.float32)
    pad = nprobe - probes.shape[1]
    if pad > 0:
        probes = np.hstack([probes, np.full((len(xq), pad), -1)])
        coarse = np.hstack([coarse, np.full((len(xq), pad), -np.inf if ip else np.inf, np.float32)])
    return probes, coarse


@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("ip", [False, True])
@pytest.mark.parametrize("nprobe, k", [(1, 5), (4, 40), (15, 3000)])  # 15 > nlist, 3000 > ntotal
def test_the_cpu_scan_reads_faiss_lists_in_place_and_equals_brute_force(nbits, ip, nprobe, k):
    """The CPU store (ListMirror) keeps a term a vector and nothing else: 8-bit codes and ids are views of
    faiss's lists; its shortlist is brute force's over the probed lists, with empty lists, nprobe > nlist
    (faiss pads the probes with -1) and k > ntotal (-1 ids, infinite distances), and the shortlist of a
    CodeMirror holding the same vectors."""
    ivf, mirror, centroids, books, codes, lists, ids = faiss_lists(nbits, ip)
    assert mirror.in_step(ivf) and mirror.nbytes == (0 if ip else 4 * len(ids))
    stored = mirror.lists()
    assert stored[3] is None and stored[7] is None
    if nbits == 8:  # in place: the same memory as faiss's list
        first = next(s for s in stored if s is not None)
        list_no = stored.index(first)
        assert first.codes.data_ptr() == int(ivf.invlists.get_codes(list_no))
        assert first.ids.data_ptr() == int(ivf.invlists.get_ids(list_no))
    xq = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32) * 3
    probes, coarse = probe(xq, centroids, nprobe, ip)
    args = (torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes), torch.from_numpy(coarse), k, ip)
    short = scan.scan(mirror, *args)
    D_ref, I_ref = brute(xq, centroids, books, codes, lists, ids, probes, k, ip)
    np.testing.assert_allclose(short.distances.numpy(), D_ref, rtol=1e-4, atol=1e-3)
    assert (short.ids.numpy() == I_ref).mean() > 0.95  # positions may swap between equal distances
    assert (short.valid.numpy() == (I_ref != -1)).all() and (short.ids.numpy()[~short.valid.numpy()] == -1).all()
    assert short.codes.dtype == torch.uint8
    row_of = {int(i): r for r, i in enumerate(ids)}
    for q, j in zip(*np.nonzero(short.valid.numpy())):
        r = row_of[int(short.ids[q, j])]
        assert (lists[r], tuple(codes[r])) == (int(short.list_nos[q, j]), tuple(short.codes[q, j].tolist()))
    copy = scan.CodeMirror(len(centroids), books.shape[0], nbits, torch.device("cpu"), with_terms=not ip)
    copy.add(codes, lists, ids, None if ip else scan.vector_terms(
        torch.from_numpy(books), torch.from_numpy(centroids), torch.from_numpy(codes), torch.from_numpy(lists)).numpy())
    reference = scan.scan(copy, *args, strategy="gather")
    np.testing.assert_allclose(short.distances.numpy(), reference.distances.numpy(), rtol=1e-5, atol=1e-4)
    assert (short.ids == reference.ids).float().mean() > 0.98


@pytest.mark.parametrize("ip", [False, True])
def test_the_cpu_scan_after_removals_and_with_a_selector(ip):
    """Removed ids are gone once the store is rebuilt from the lists faiss reordered; a selector keeps only
    what it selects, as brute force over the kept vectors."""
    ivf, mirror, centroids, books, codes, lists, ids = faiss_lists(8, ip)
    gone = ids[::3].copy()
    assert ivf.remove_ids(faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(gone))) == len(gone)
    assert not mirror.in_step(ivf)
    mirror = scan.ListMirror.from_faiss(ivf, books, centroids, books.shape[0], 8, with_terms=not ip)
    assert mirror.in_step(ivf) and mirror.nbytes == (0 if ip else 4 * (len(ids) - len(gone)))
    xq = np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32) * 3
    probes, coarse = probe(xq, centroids, 5, ip)
    sel = faiss.IDSelectorRange(0, 400_000)
    kept = ~np.isin(ids, gone)
    args = (torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes), torch.from_numpy(coarse), 50, ip)
    for masks, keep in ((None, kept), (mirror.selector_masks(sel), kept & (ids >= 0) & (ids < 400_000))):
        short = scan.scan(mirror, *args, masks=masks)
        D_ref, I_ref = brute(xq, centroids, books, codes, lists, ids, probes, 50, ip, keep)
        np.testing.assert_allclose(short.distances.numpy(), D_ref, rtol=1e-4, atol=1e-3)
        assert (short.ids.numpy() == I_ref).mean() > 0.95
        assert not np.isin(short.ids.numpy(), gone).any()


def test_lists_that_cannot_be_read_in_place_are_copied(monkeypatch):
    """Inverted lists other than faiss's ArrayInvertedLists (on disk, memory-mapped) may hand out temporary
    pointers: the CPU store copies them and scans the copies to the same shortlist."""
    ivf, mirror, centroids, books, codes, lists, ids = faiss_lists(8, False, n=600)
    xq = np.random.default_rng(6).standard_normal((10, 8)).astype(np.float32) * 3
    probes, coarse = probe(xq, centroids, 4, False)
    args = (torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes), torch.from_numpy(coarse),
            30, False)
    in_place = scan.scan(mirror, *args)
    monkeypatch.setattr(scan.faiss, "ArrayInvertedLists", type("OtherLists", (), {}))
    copied = scan.ListMirror.from_faiss(ivf, books, centroids, 4, 8, with_terms=True)
    first = next(s for s in copied.lists() if s is not None)
    assert first.codes.data_ptr() != int(ivf.invlists.get_codes(copied.lists().index(first)))
    same_shortlist(scan.scan(copied, *args), in_place)


def test_a_gpu_store_keeps_ids_as_int32_offsets_where_they_span_less_than_2_31():
    """M + 8 bytes a vector for 8-bit codes (codes, an int32 id offset, the term); ids spanning 2^31 or more
    stay int64; either way the scan returns the ids as added."""
    centroids, books, codes, lists, ids = setup(n=500, K=256)
    terms = scan.vector_terms(torch.from_numpy(books), torch.from_numpy(centroids), torch.from_numpy(codes),
                              torch.from_numpy(lists)).numpy()
    xq = np.random.default_rng(5).standard_normal((10, 8)).astype(np.float32) * 3
    probes, coarse = probe(xq, centroids, 4, False)
    results = []
    for shift in (0, 1 << 40):
        wide = ids.copy()
        wide[0] += shift
        mirror = scan.CodeMirror(len(centroids), 4, 8, torch.device("cpu"))
        mirror.add(codes, lists, wide, terms)
        seg, = mirror.segments
        assert seg.ids.dtype == (torch.int32 if shift == 0 else torch.int64)
        assert mirror.nbytes == len(ids) * (4 + (4 if shift == 0 else 8) + 4) + 8 * (len(centroids) + 1)
        short = scan.scan(mirror, torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes),
                          torch.from_numpy(coarse), 20, False, strategy="gather")
        found = short.ids.numpy()
        assert np.isin(found[found >= 0], wide).all()
        results.append(np.where(found == wide[0], ids[0], found))
    np.testing.assert_array_equal(results[0], results[1])


FUSED_CHECK = """
import sys
import faiss, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from faiss_rqmoe import scan, scan_kernel
from test_scan import faiss_lists, probe, same_shortlist

# (inner product, selector, probes, k, programs a launch, candidates a block): the probes cover empty lists and
# go beyond nlist (-1 padding); k > ntotal in the last case; a query's probes split over programs and blocks
# wider than the kept top-k in the second
cases = ((False, False, 14, 20, 1, 16), (True, True, 4, 10, 12, 64), (False, True, 3, 40, 1, 16))
for ip, with_sel, nprobe, k, programs, block in cases:
    scan_kernel.TARGET_PROGRAMS, scan_kernel.CONFIG["BLOCK_N"] = programs, block
    n = 40 if k == 40 else 240
    ivf, _, centroids, books, codes, lists, ids = faiss_lists(8, ip, n=n, nlist=12, M=3)
    gone = ids[::5].copy()  # removed ids: the store is rebuilt from the lists faiss reordered
    ivf.remove_ids(faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(gone)))
    store = scan.CodeMirror.from_faiss(ivf, books, centroids, 3, 8, torch.device("cpu"), with_terms=not ip)
    extra = np.arange(3) + 10**7  # a second segment, as a later add makes
    terms = scan.vector_terms(torch.from_numpy(books), torch.from_numpy(centroids), torch.from_numpy(codes[:3]),
                              torch.from_numpy(lists[:3])).numpy()
    store.add(codes[:3], lists[:3], extra, None if ip else terms)
    xq = np.random.default_rng(k).standard_normal((3, 8)).astype(np.float32) * 3
    probes, coarse = probe(xq, centroids, nprobe, ip)
    masks = store.selector_masks(faiss.IDSelectorRange(0, 500_000)) if with_sel else None
    args = (torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes), torch.from_numpy(coarse), k, ip)
    reference = scan.scan(store, *args, masks=masks, strategy="gather")
    fused = scan.scan(store, *args, masks=masks, strategy="fused")
    same_shortlist(fused, reference)
    assert not np.isin(fused.ids.numpy(), gone).any()
    if with_sel:
        found = fused.ids.numpy()[fused.valid.numpy()]
        assert ((found >= 0) & (found < 500_000)).all()
    if k == 40:
        assert not fused.valid.numpy().all()
print("fused scan ok")
"""


def same_shortlist(got, want, tolerance=1e-5):
    """Two shortlists agree: same validity, distances within tolerance (relative, and absolute near 0), the
    same ids and codes but where two candidates tie to within that tolerance (either may come first)."""
    assert torch.equal(got.valid, want.valid)
    torch.testing.assert_close(got.distances, want.distances, rtol=tolerance, atol=tolerance * 10)
    d = want.distances.numpy()
    for q in range(d.shape[0]):
        for j in np.nonzero(got.ids[q].numpy() != want.ids[q].numpy())[0]:
            ties = np.abs(d[q] - d[q, j]) <= tolerance * max(1.0, abs(d[q, j])) * 10
            assert ties.sum() > 1 or (j == d.shape[1] - 1), (q, j)
    same = (got.ids == want.ids) & want.valid
    assert torch.equal(got.codes[same], want.codes[same]) and torch.equal(got.list_nos[same], want.list_nos[same])


def test_fused_scan_in_the_triton_interpreter():
    """The Triton scan (scan_kernel) returns the torch scan's shortlist on the CPU through Triton's
    interpreter: both metrics, a selector, removed ids, empty lists, nprobe > nlist, k > the stored vectors,
    two segments, a query's probes split over programs; skipped where Triton is not installed."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FUSED_CHECK, os.path.dirname(__file__)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0 and "fused scan ok" in run.stdout, run.stderr[-3000:]


def test_fused_scan_compiles_for_hopper():
    """The Triton scan compiles to Hopper machine code (sm_90) without a GPU, for both metrics, with and
    without a selector, at the largest kept top-k, with blocks as wide as the top-k and wider."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as compile_kernel

    from faiss_rqmoe import scan_kernel

    pointers = dict(luts_ptr="*fp32", probes_ptr="*i64", coarse_ptr="*fp32", offsets_ptr="*i64", codes_ptr="*u8",
                    terms_ptr="*fp32", mask_ptr="*u8", keys_ptr="*i64", P="i32", n_split="i32")
    for ip, with_mask, kept, block in ((False, False, 64, 128), (True, True, 64, 64),
                                       (False, True, scan_kernel.MAX_K, scan_kernel.MAX_K)):
        constexprs = dict(M=8, K=256, MP=8, KP=kept, BLOCK_N=block, INNER_PRODUCT=ip, HAS_MASK=with_mask)
        signature = dict(pointers, **{name: "constexpr" for name in constexprs})
        compiled = compile_kernel(ASTSource(scan_kernel._scan_kernel, signature, constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=scan_kernel.CONFIG["num_warps"]))
        assert compiled.asm["cubin"], (ip, with_mask, kept, block)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ip", [False, True])
def test_fused_scan_on_a_gpu_equals_the_torch_scan(ip):
    """On CUDA at a real shape (8 bytes of 8 bits, a few thousand vectors a list): the fused scan's shortlist is
    the torch gather's, for a batch, a single query (its probes split over programs), a selector and the
    largest on-chip k; and scan(strategy="auto") takes the kernel."""
    pytest.importorskip("triton")
    from faiss_rqmoe import scan_kernel

    centroids, books, codes, lists, ids = setup(n=100_000, nlist=32, M=8, K=256, d=32)
    device = torch.device("cuda")
    store = scan.CodeMirror(32, 8, 8, device, with_terms=not ip)
    terms = scan.vector_terms(torch.from_numpy(books), torch.from_numpy(centroids), torch.from_numpy(codes),
                              torch.from_numpy(lists)).numpy()
    store.add(codes, lists, ids, None if ip else terms)
    xq = np.random.default_rng(7).standard_normal((300, 32)).astype(np.float32) * 3
    probes, coarse = probe(xq, centroids, 8, ip)
    masks = store.selector_masks(faiss.IDSelectorRange(0, 500_000))
    for rows, k, with_sel in ((slice(None), 50, False), (slice(0, 1), 50, False), (slice(None), 10, True),
                              (slice(None), scan_kernel.MAX_K, False)):
        args = (torch.from_numpy(books).to(device), torch.from_numpy(xq[rows]).to(device),
                torch.from_numpy(probes[rows]).to(device), torch.from_numpy(coarse[rows]).to(device), k, ip)
        kept = masks if with_sel else None
        want = scan.scan(store, *args, masks=kept, strategy="gather")
        got = scan.scan(store, *args, masks=kept, strategy="fused")
        same_shortlist(_on_host(got), _on_host(want), tolerance=1e-4)
    auto = scan.scan(store, *args, strategy="auto")
    assert torch.equal(auto.ids, got.ids)


def _on_host(short):
    return scan.Shortlist(*(t.cpu() for t in (short.distances, short.ids, short.list_nos, short.codes, short.valid)))


def test_a_fused_scan_that_cannot_compile_falls_back_to_the_torch_scan(monkeypatch, caplog):
    """Where "auto" chose the fused scan and this Triton cannot compile it, the search runs the torch scan
    (the same shortlist) and stops choosing the kernel, saying so once; asked for by name, it raises."""
    import logging

    from faiss_rqmoe import scan as scan_module, scan_kernel

    calls = []

    def fake_scan(*args):
        calls.append(args[-1])
        if args[-1] in ("auto", "fused"):  # the kernel would run: it cannot compile
            raise scan_kernel.Unusable("topk() got an unexpected keyword argument")
        return "the torch scan's shortlist"

    monkeypatch.setattr(scan_module, "_scan", fake_scan)
    monkeypatch.setitem(scan_kernel.CONFIG, "enabled", True)
    with caplog.at_level(logging.WARNING, logger="faiss_rqmoe.scan_kernel"):
        got = scan_module.scan(None, None, None, None, None, 5, False)
    assert got == "the torch scan's shortlist" and calls == ["auto", "gather"]
    assert not scan_kernel.CONFIG["enabled"] and "cannot run with this Triton" in caplog.text
    calls.clear()
    with pytest.raises(scan_kernel.Unusable):
        scan_module.scan(None, None, None, None, None, 5, False, strategy="fused")


@pytest.mark.skipif(not lutscan.built(), reason="the compiled scan is not built in this install")
@pytest.mark.parametrize("ip", [False, True])
def test_the_compiled_cpu_scan_equals_the_torch_scan_bit_for_bit(monkeypatch, ip):
    """The C scan (lutscan) does the torch scan's float32 operations in the same order: the same distances
    exactly, the same ids and codes but where distances tie, with a selector, empty lists and k above some
    queries' candidates; splitting the queries over threads changes nothing."""
    ivf, mirror, centroids, books, codes, lists, ids = faiss_lists(8, ip, n=3000, M=8)
    xq = np.random.default_rng(7).standard_normal((41, 8)).astype(np.float32) * 3
    probes, coarse = probe(xq, centroids, 3, ip)
    args = (torch.from_numpy(books), torch.from_numpy(xq), torch.from_numpy(probes), torch.from_numpy(coarse),
            700, ip)  # 700 > the candidates of some queries (3 lists of about 270)
    for masks in (None, mirror.selector_masks(faiss.IDSelectorRange(500, 1_000_000))):
        compiled = scan.scan(mirror, *args, masks=masks)
        monkeypatch.setitem(lutscan.CONFIG, "enabled", False)
        reference = scan.scan(mirror, *args, masks=masks)
        monkeypatch.setitem(lutscan.CONFIG, "enabled", True)
        assert torch.equal(compiled.distances, reference.distances)
        assert compiled.valid.any() and not compiled.valid.all()
        same_shortlist(compiled, reference, tolerance=0)
        if masks is not None:
            assert (compiled.ids[compiled.valid] >= 500).all()
    luts = (torch.from_numpy(xq) @ torch.from_numpy(books).reshape(-1, 8).T).reshape(41, 8, 256)
    masks_at, _ = lutscan.mask_addresses(None, mirror.nlist)
    runs = [lutscan.scan_lists(mirror.list_table(), masks_at, luts, torch.from_numpy(probes),
                               torch.from_numpy(coarse), 50, ip, threads=t) for t in (1, 3)]
    for one, three in zip(*runs):
        assert torch.equal(one, three)
