import json

import numpy as np
import pytest

from faiss_rqmoe.bench import datasets

cv2 = pytest.importorskip("cv2")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, so no test reads or writes the user's real cache."""
    monkeypatch.setenv("FAISS_RQMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def images(tmp_path):
    """Three small synthetic photos (shapes + noise), as .png and .jpg."""
    rng = np.random.default_rng(0)
    paths = []
    for i, suffix in enumerate([".png", ".jpg", ".png"]):
        image = (rng.random((96, 120)) * 60).astype(np.uint8)
        for _ in range(8):
            center = tuple(int(v) for v in rng.integers(10, 90, 2))
            cv2.circle(image, center, int(rng.integers(4, 15)), int(rng.integers(100, 255)), -1)
        path = tmp_path / f"img{i}{suffix}"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def assert_descriptor_set(x):
    assert x.ndim == 2 and x.shape[1] == 128 and x.dtype == np.uint8 and len(x) > 100
    assert len(datasets.unique_rows(x)) == len(x)


def test_sift_descriptors_on_arbitrary_images(images):
    x = datasets.sift_descriptors(images, scales=(1,), progress=False)
    assert x.ndim == 2 and x.shape[1] == 128 and x.dtype == np.uint8 and len(x) > 100
    assert x.max() <= 255 and x.min() >= 0 and x.max() > 100  # normalised SIFT uses the byte range
    both = datasets.sift_descriptors(images[:1], scales=(1, 2), progress=False)
    assert len(both) > len(datasets.sift_descriptors(images[:1], scales=(1,), progress=False))


def test_builder_dedups_shuffles_deterministically_and_records_counts(images, cache):
    data = datasets._cached("tiny", lambda: datasets._build_sift_set(images, (1,), False))
    assert_descriptor_set(data)
    info = datasets.build_info("tiny")
    assert info["n_images"] == 3 and info["n_unique"] == len(data) <= info["n_descriptors"]
    assert json.loads((cache / "tiny.json").read_text()) == info
    # the same set whatever the image order (dedup sorts before the seeded shuffle)
    again, info2 = datasets._build_sift_set(images[::-1], (1,), False)
    np.testing.assert_array_equal(again, data)
    # exact duplicates go: the same image twice adds no row
    doubled, info3 = datasets._build_sift_set(images + images[:1], (1,), False)
    assert len(doubled) == len(data) and info3["n_descriptors"] > info["n_descriptors"]


def test_unique_rows_matches_numpy():
    x = np.random.default_rng(0).integers(0, 3, (2000, 5), dtype=np.uint8)
    np.testing.assert_array_equal(datasets.unique_rows(x), np.unique(x, axis=0))


def test_missing_wallpaper_packages_name_the_apt_get_line(monkeypatch, cache):
    installed = {"mate-backgrounds", "gnome-backgrounds"}
    monkeypatch.setattr(datasets, "_package_installed", lambda name: name in installed)
    missing = [p for p in datasets.WALLPAPER_PACKAGES if p not in installed]
    line = "apt-get install -y " + " ".join(missing)
    with pytest.raises(RuntimeError, match=line):
        datasets.wallpaper_image_paths()
    with pytest.raises(RuntimeError, match=line):  # the builder checks before any work, cache absent
        datasets.wallpaper_descriptors(progress=False)
    assert not (cache / f"{datasets.WALLPAPER_NAME}.npy").exists()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ground_truth_equals_brute_force(metric):
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((3000, 16)).astype(np.float32)
    xq = rng.standard_normal((40, 16)).astype(np.float32)
    gt = datasets.ground_truth(xb, xq, k=10, metric=metric, chunk_bytes=700 * 16 * 4)  # 5 chunks
    score = ((xq[:, None].astype(np.float64) - xb[None]) ** 2).sum(-1) if metric == "l2" else -(xq @ xb.T.astype(np.float64))
    assert gt.shape == (40, 10) and gt.dtype == np.int64
    np.testing.assert_array_equal(gt, np.argsort(score, axis=1, kind="stable")[:, :10])


def test_ground_truth_on_byte_vectors_with_ties():
    rng = np.random.default_rng(2)
    xb = rng.integers(0, 4, (2000, 8), dtype=np.uint8)  # many equal distances
    xq = rng.integers(0, 4, (30, 8), dtype=np.uint8)
    gt = datasets.ground_truth(xb, xq, k=20, chunk_bytes=300 * 8 * 4)
    dist = ((xq[:, None].astype(np.int64) - xb[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.take_along_axis(dist, gt, 1), np.sort(dist, axis=1)[:, :20])
    assert all(len(set(row)) == 20 for row in gt.tolist())


def test_split_shapes_and_order(cache):
    data = np.arange(100 * 4, dtype=np.uint8).reshape(100, 4) % 251
    ds = datasets.split("toy", data, n_train=None, n_val=10, n_db=30, n_query=5)
    assert (len(ds.xq), len(ds.xb), len(ds.xval), len(ds.xt)) == (5, 30, 10, 55)
    assert all(a.dtype == np.float32 for a in (ds.xt, ds.xval, ds.xb, ds.xq)) and ds.d == 4
    np.testing.assert_array_equal(ds.xq, data[:5])
    np.testing.assert_array_equal(ds.xt[-1], data[-1])
    assert ds.gt.shape == (5, 30)
    with pytest.raises(ValueError, match="cannot split 100 vectors"):
        datasets.split("toy", data, n_train=60, n_val=10, n_db=30, n_query=5)


@pytest.mark.parametrize("kind,dtype", [("fvecs", np.float32), ("bvecs", np.uint8), ("ivecs", np.int32)])
def test_vecs_round_trip_and_truncated_files(tmp_path, kind, dtype):
    x = (np.random.default_rng(3).random((7, 5)) * 200).astype(dtype)
    path = tmp_path / f"x.{kind}"
    getattr(datasets, f"write_{kind}")(path, x)
    back = datasets.load_vectors(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, x)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="not a valid"):
        datasets.load_vectors(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="truncated"):
        datasets.load_vectors(path)


def test_vector_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        datasets.read_fvecs(tmp_path / "absent.fvecs")
    with pytest.raises(ValueError, match="unknown vector file suffix"):
        datasets.load_vectors(tmp_path / "x.csv")
    datasets.write_bvecs(tmp_path / "bad.bvecs", np.zeros((2, 3), np.uint8))
    raw = bytearray((tmp_path / "bad.bvecs").read_bytes())
    raw[7] = 4  # second row's header: d=4 instead of 3
    (tmp_path / "bad.bvecs").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="disagree on the dimension"):
        datasets.read_bvecs(tmp_path / "bad.bvecs")


def toy_dataset(seed=4, n=3000, d=8):
    data = np.random.default_rng(seed).integers(0, 256, (n, d)).astype(np.uint8)
    return datasets.split("toy", data, n_train=None, n_val=200, n_db=1500, n_query=50)


def test_export_load_round_trip(tmp_path, cache):
    ds = toy_dataset()
    path = datasets.export_split(ds, tmp_path / "out" / "toy.npz", n_train=500, n_val=100, n_db=1000, n_query=40,
                                 k_gt=25)
    with np.load(path, allow_pickle=False) as npz:
        assert npz["xb"].dtype == np.uint8 and npz["gt"].dtype == np.int32 and npz["gt"].shape == (40, 25)
    back = datasets.load_dataset(str(path))
    assert back.name == "toy"
    for key, n in [("xt", 500), ("xval", 100), ("xb", 1000), ("xq", 40)]:
        assert getattr(back, key).dtype == np.float32
        np.testing.assert_array_equal(getattr(back, key), getattr(ds, key)[:n])
    # ground truth recomputed for the cut database
    np.testing.assert_array_equal(back.gt, datasets.ground_truth(back.xb, back.xq, 25))
    # a smaller database on load recomputes it again; smaller other parts just cut
    small = datasets.load_exported(path, n_train=100, n_db=300, n_query=10)
    assert (len(small.xt), len(small.xval), len(small.xb), len(small.xq)) == (100, 100, 300, 10)
    np.testing.assert_array_equal(small.gt, datasets.ground_truth(small.xb, small.xq, 25))
    with pytest.raises(ValueError, match="n_db=2000 is out of range"):
        datasets.load_exported(path, n_db=2000)


def test_export_keeps_full_ground_truth_and_float_data(tmp_path, cache):
    ds = toy_dataset()
    path = datasets.export_split(ds, tmp_path / "full.npz", k_gt=10)
    np.testing.assert_array_equal(datasets.load_exported(path).gt, ds.gt[:, :10])
    shifted = datasets.Dataset("f", ds.xt + 0.5, ds.xval, ds.xb, ds.xq, ds.gt)
    path = datasets.export_split(shifted, tmp_path / "float.npz", n_train=10)
    with np.load(path, allow_pickle=False) as npz:
        assert npz["xt"].dtype == np.float32
    np.testing.assert_array_equal(datasets.load_exported(path).xt, shifted.xt[:10])


def test_export_float16_halves_float_rows_and_recomputes_ground_truth(tmp_path, cache):
    ds = toy_dataset()
    rng = np.random.default_rng(5)
    floats = datasets.Dataset("f", ds.xt / 255, ds.xval / 255, ds.xb / 255 + rng.normal(0, 1e-3, ds.xb.shape),
                              ds.xq / 255, ds.gt)
    # the whole database: the split's own ground truth (of the float32 rows) would otherwise be kept
    path = datasets.export_split(floats, tmp_path / "half.npz", k_gt=10, float16=True)
    with np.load(path, allow_pickle=False) as npz:
        assert npz["xb"].dtype == np.float16 and npz["xt"].dtype == np.float16
    back = datasets.load_exported(path)
    assert back.xb.dtype == np.float32
    np.testing.assert_array_equal(back.xb, floats.xb.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(back.gt, datasets.ground_truth(back.xb, back.xq, 10))
    assert not np.array_equal(back.gt, datasets.ground_truth(floats.xb, floats.xq, 10))  # rounding moved some
    # values past float16's range are refused, not stored as inf
    huge = datasets.Dataset("h", floats.xt * 1e5, floats.xval, floats.xb, floats.xq, floats.gt)
    with pytest.raises(ValueError, match="past float16's largest value"):
        datasets.export_split(huge, tmp_path / "huge.npz", float16=True)
    assert not list(tmp_path.glob("huge*"))
    # byte rows stay bytes: float16 applies to float sets only
    path = datasets.export_split(ds, tmp_path / "bytes.npz", n_train=10, float16=True)
    with np.load(path, allow_pickle=False) as npz:
        assert npz["xt"].dtype == np.uint8


def test_export_errors(tmp_path, cache):
    ds = toy_dataset()
    with pytest.raises(ValueError, match="must end in .npz"):
        datasets.export_split(ds, tmp_path / "x.npy")
    with pytest.raises(ValueError, match="n_query=99 is out of range"):
        datasets.export_split(ds, tmp_path / "x.npz", n_query=99)
    np.savez_compressed(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not an exported split"):
        datasets.load_exported(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="gt_path must be None"):
        datasets.load_dataset(str(tmp_path / "other.npz"), gt_path="gt.ivecs")
