"""Torch tensors and faiss-style array conversion at IndexRQMoE's boundary.

The truth for every torch call is the same call with numpy arrays: a tensor in must give the same
numbers back, as tensors on the input's device (faiss.contrib.torch_utils' rule).
"""
import faiss
import numpy as np
import pytest
import torch

import faiss_rqmoe

from conftest import assert_same_neighbours

TRAIN = dict(max_epochs=1, batch_size=256, progress=False, device="cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def index(sift):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x6_N2L1H16", **TRAIN)
    index.train(sift.xt[:1500], sift.xval[:200])
    index.add(sift.xb[:1000])
    index.nprobe, index.nshort = 4, 50
    return index


@pytest.fixture(scope="module")
def xq(sift):
    return sift.xq[:20]


def test_search_with_cpu_tensor_returns_tensors(index, xq):
    D, I = index.search(xq, 5)
    Dt, It = index.search(torch.from_numpy(xq), 5)
    assert isinstance(Dt, torch.Tensor) and isinstance(It, torch.Tensor)
    assert Dt.dtype == torch.float32 and It.dtype == torch.int64 and Dt.device.type == "cpu"
    assert tuple(Dt.shape) == tuple(It.shape) == (20, 5)
    np.testing.assert_array_equal(Dt.numpy(), D)
    np.testing.assert_array_equal(It.numpy(), I)


@pytest.mark.parametrize("convert", [
    lambda x: torch.from_numpy(x).double(),
    lambda x: torch.from_numpy(x).t().contiguous().t(),  # non-contiguous view
    lambda x: torch.from_numpy(x).requires_grad_(True),
    lambda x: torch.from_numpy(x).to(torch.int32),  # SIFT components are integers
    lambda x: x.astype(np.uint8),
    lambda x: x.astype(np.float64)[:, ::-1][:, ::-1],  # float64, negative strides
    lambda x: x.tolist(),
], ids=["torch-float64", "torch-strided", "torch-grad", "torch-int32", "numpy-uint8", "numpy-f64-strided",
        "list"])
def test_other_dtypes_and_layouts_give_the_float32_result(index, xq, convert):
    D, I = index.search(xq, 5)
    D2, I2 = index.search(convert(xq), 5)
    np.testing.assert_array_equal(np.asarray(I2), I)
    np.testing.assert_array_equal(np.asarray(D2.detach() if isinstance(D2, torch.Tensor) else D2), D)


def test_float16_tensor_is_searched_as_float32(index, xq):
    half = torch.from_numpy(xq).half()
    D, I = index.search(half.float().numpy(), 5)
    Dt, It = index.search(half, 5)
    np.testing.assert_array_equal(It.numpy(), I)
    np.testing.assert_array_equal(Dt.numpy(), D)


def test_preallocated_outputs_are_filled_and_returned(index, xq):
    D, I = index.search(xq, 4)
    D_buf, I_buf = torch.empty(20, 4), torch.empty(20, 4, dtype=torch.int64)
    D_out, I_out = index.search(torch.from_numpy(xq), 4, D=D_buf, I=I_buf)
    assert D_out is D_buf and I_out is I_buf
    np.testing.assert_array_equal(I_buf.numpy(), I)
    D_np, I_np = np.empty((20, 4), np.float32), np.empty((20, 4), np.int64)
    D_out, I_out = index.search(xq, 4, D=D_np, I=I_np)
    assert D_out is D_np and I_out is I_np
    np.testing.assert_array_equal(D_np, D)
    with pytest.raises(ValueError, match=r"D has shape \(20, 3\), expected \(20, 4\)"):
        index.search(xq, 4, D=np.empty((20, 3), np.float32))
    with pytest.raises(ValueError, match=r"I has shape \(19, 4\), expected \(20, 4\)"):
        index.search(xq, 4, I=torch.empty(19, 4, dtype=torch.int64))


def test_range_search_with_tensor(index, xq):
    D, _ = index.search(xq, 10)
    radius = float(np.median(D[:, -1]))
    lims, Dr, Ir = index.range_search(xq, radius)
    lims_t, Dr_t, Ir_t = index.range_search(torch.from_numpy(xq), radius)
    for ref, got, dtype in ((lims, lims_t, torch.int64), (Dr, Dr_t, torch.float32), (Ir, Ir_t, torch.int64)):
        assert isinstance(got, torch.Tensor) and got.dtype == dtype
        np.testing.assert_array_equal(got.numpy(), ref)


def test_reconstruct_returns_numpy_unless_a_tensor_is_given(index):
    # the same ids decoded in the same batch give bit-identical vectors; other batchings agree to
    # float rounding (the decoder's matmuls block differently)
    close = dict(rtol=1e-5, atol=1e-4)
    ref = index.reconstruct_n(0, 10)
    assert isinstance(ref, np.ndarray) and ref.shape == (10, 128) and ref.dtype == np.float32
    np.testing.assert_allclose(index.reconstruct(3), ref[3], **close)
    out = torch.empty(128)
    assert index.reconstruct(3, x=out) is out
    np.testing.assert_array_equal(out.numpy(), index.reconstruct(3))
    one = index.reconstruct(torch.tensor(3))  # e.g. an entry of a torch I
    assert isinstance(one, torch.Tensor) and one.shape == (128,)
    np.testing.assert_array_equal(one.numpy(), index.reconstruct(3))
    out_n = torch.empty(10, 128)
    assert index.reconstruct_n(0, 10, x=out_n) is out_n
    np.testing.assert_array_equal(out_n.numpy(), ref)
    batch = index.reconstruct_batch(torch.tensor([7, 2]))
    assert isinstance(batch, torch.Tensor)
    np.testing.assert_array_equal(batch.numpy(), index.reconstruct_batch(np.array([7, 2], np.int32)))
    np.testing.assert_allclose(batch.numpy(), ref[[7, 2]], **close)
    assert index.reconstruct_n(0, -1).shape == (index.ntotal, 128)  # faiss's "all" default
    assert index.reconstruct_n(990).shape == (10, 128)


def test_sa_encode_decode_with_tensors(index, sift):
    x = sift.xb[:30]
    codes = index.sa_encode(x)
    codes_t = index.sa_encode(torch.from_numpy(x))
    assert isinstance(codes_t, torch.Tensor) and codes_t.dtype == torch.uint8
    np.testing.assert_array_equal(codes_t.numpy(), codes)
    decoded_t = index.sa_decode(codes_t)
    assert isinstance(decoded_t, torch.Tensor) and decoded_t.dtype == torch.float32
    np.testing.assert_array_equal(decoded_t.numpy(), index.sa_decode(codes))


def test_add_and_add_with_ids_with_tensors(sift, index, tmp_path):
    faiss_rqmoe.write_index(index, tmp_path / "copy.rqmoe")
    other = faiss_rqmoe.read_index(tmp_path / "copy.rqmoe", device="cpu")
    other.reset()
    other.add(torch.from_numpy(sift.xb[:100]))
    np.testing.assert_array_equal(other.reconstruct_n(0, 100), index.reconstruct_n(0, 100))
    ids = torch.arange(5000, 5050)
    other.add_with_ids(torch.from_numpy(sift.xb[:50]), ids)
    np.testing.assert_array_equal(other.reconstruct_batch(ids).numpy(), index.reconstruct_n(0, 50))
    assert other.remove_ids(ids[:10]) == 10 and other.ntotal == 140


def test_train_with_tensors_matches_numpy(sift):
    def trained(xt, xval):
        index = faiss_rqmoe.index_factory(128, "RQMoE2x4_N1L1H8", **TRAIN)
        index.train(xt, xval)
        return index.sa_encode(sift.xb[:50])

    xt, xval = sift.xt[:600], sift.xval[:100]
    np.testing.assert_array_equal(trained(torch.from_numpy(xt), torch.from_numpy(xval)), trained(xt, xval))


@pytest.mark.parametrize("call, error, message", [
    (lambda ix, x: ix.search(torch.from_numpy(x) > 0, 5), TypeError, "numeric array"),
    (lambda ix, x: ix.search(torch.from_numpy(x).to(torch.complex64), 5), TypeError, "numeric array"),
    (lambda ix, x: ix.search(torch.from_numpy(x)[:, :100], 5), ValueError, "100 columns, expected d=128"),
    (lambda ix, x: ix.add_with_ids(x, np.array(["a"] * len(x))), TypeError, "ids must be integers"),
    (lambda ix, x: ix.add_with_ids(x, torch.zeros(len(x), 2)), ValueError, "ids must have shape"),
    (lambda ix, x: ix.reconstruct_batch(np.zeros((2, 2), np.int64)), ValueError, "must be a 1-D array"),
    (lambda ix, x: ix.reconstruct([1, 2]), ValueError, "key must be one id"),
    (lambda ix, x: ix.reconstruct_n(-1, 3), ValueError, "n0 and ni must be >= 0"),
    (lambda ix, x: ix.reconstruct(0, x=torch.empty(3)), ValueError, r"x has shape \(3,\), expected \(128,\)"),
])
def test_documented_boundary_errors(index, xq, call, error, message):
    ntotal = index.ntotal
    with pytest.raises(error, match=message):
        call(index, xq)
    assert index.ntotal == ntotal


@cuda_only
def test_cuda_tensors_come_back_on_cuda(index, xq, sift):
    x = torch.from_numpy(xq).cuda()
    D, I = index.search(xq, 5)
    Dc, Ic = index.search(x, 5)
    assert Dc.device.type == "cuda" and Ic.device.type == "cuda"
    np.testing.assert_array_equal(Ic.cpu().numpy(), I)
    np.testing.assert_allclose(Dc.cpu().numpy(), D, rtol=1e-5)
    codes = index.sa_encode(torch.from_numpy(sift.xb[:10]).cuda())
    assert codes.device.type == "cuda" and codes.dtype == torch.uint8
    decoded = index.sa_decode(codes)
    assert decoded.device.type == "cuda"
    out = torch.empty(128, device="cuda")
    assert index.reconstruct(0, x=out) is out
    lims, Dr, Ir = index.range_search(x, float(D[:, -1].max()))
    assert lims.device.type == Dr.device.type == Ir.device.type == "cuda"


@cuda_only
def test_codec_on_cuda_takes_numpy_and_tensors_from_any_device(sift):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x6_N2L1H16", **dict(TRAIN, device="cuda"))
    index.train(torch.from_numpy(sift.xt[:1500]).cuda(), sift.xval[:200])
    index.add(torch.from_numpy(sift.xb[:1000]))
    xq = sift.xq[:20]
    D, I = index.search(xq, 5, params={"nprobe": 8, "nshort": 1000})
    assert isinstance(D, np.ndarray)
    Dc, Ic = index.search(torch.from_numpy(xq).cuda(), 5, params={"nprobe": 8, "nshort": 1000})
    assert Ic.device.type == "cuda"
    np.testing.assert_array_equal(Ic.cpu().numpy(), I)
    # exhaustive search equals brute force over the reconstructions, decoded on the GPU
    flat = faiss.IndexFlatL2(128)
    recons = index.reconstruct_n()
    flat.add(recons)
    D_ref, _ = flat.search(xq, 5)
    assert_same_neighbours(D, I, xq, recons, D_ref)
