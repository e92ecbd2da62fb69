"""Pretrained codec files: export, load back, and the storage check measures the file it was given."""
import numpy as np

import faiss_rqmoe
from faiss_rqmoe.bench import evaluation
from faiss_rqmoe.bench.pretrained_export import export, storage_check
from faiss_rqmoe.pretrained_codecs import available, load_file


def test_storage_check_measures_the_exported_file_not_a_shipped_one(sift, tmp_path):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x6_N2L1H16", max_epochs=1, progress=False, device="cpu",
                                      keep_rq_if_better=False)
    index.train(sift.xt[:1500])
    name = "tiny-test-codec"
    assert name not in available()  # only the file in tmp_path holds it
    path = export(index, tmp_path / f"{name}.npz", name, trained_on="SIFT test split", command="test")
    x = sift.xval[:300]
    check = storage_check(index, path, name, x)
    codes = index.sa_encode(x)
    loaded = load_file(path, name, device="cpu")
    assert loaded.pretrained == name
    np.testing.assert_allclose(check["mse_float32"], evaluation.mse(x, index.sa_decode(codes)), rtol=1e-6)
    np.testing.assert_allclose(check["mse_stored"], evaluation.mse(x, loaded.sa_decode(codes)), rtol=1e-6)
    assert abs(check["relative_change"]) < 1e-2  # float16 weights: a small, measured change
