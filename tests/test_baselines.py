import numpy as np
import pytest

from faiss_rqmoe.bench import baselines, evaluation


def random_unit_vectors(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("d,bits", [(128, 1), (32, 2)])
def test_turboquant_mse_matches_analytic_distortion(d, bits):
    x = random_unit_vectors(4000, d)
    codec = baselines.TurboQuantMSE(d, bits, seed=1, center=False)
    codec.train(x)
    codes = codec.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (len(x), codec.bytes_per_vector)
    measured = evaluation.mse(x, codec.decode(codes))
    analytic = baselines.analytic_mse_unit(d, bits)
    assert measured == pytest.approx(analytic, rel=0.05)


def test_turboquant_analytic_distortion_known_values():
    # 1 bit: levels ±E|t|, distortion 1 - d E[|t|]^2 -> 1 - 2/pi for large d (the Gaussian limit)
    assert baselines.analytic_mse_unit(1024, 1) == pytest.approx(1 - 2 / np.pi, rel=2e-3)
    assert baselines.analytic_mse_unit(128, 2) < baselines.analytic_mse_unit(128, 1)


def test_turboquant_keeps_norm_and_mean():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((500, 16)) * 5 + 40).astype(np.float32)
    codec = baselines.TurboQuantMSE(16, 3, seed=0)
    codec.train(x)
    recon = codec.decode(codec.encode(x))
    assert recon.shape == x.shape and recon.dtype == np.float32
    # relative error ≈ the unit-vector distortion of 3 bits (small), not the scale of the raw data
    centred = x - x.mean(0)
    assert evaluation.mse(x, recon) / (centred ** 2).sum(1).mean() < 2 * baselines.analytic_mse_unit(16, 3)


def test_make_baselines_names_and_sizes():
    codecs = baselines.make_baselines(16, 2)
    keys = [codec.key for codec in codecs]
    assert keys == ["pq", "opq", "rq1", "rq32", "rq-default", "rq-pd1", "rq-km5", "rq-km1", "lsq", "rabitq",
                    "turboquant"]
    assert [codec.bytes_per_vector for codec in codecs[:9]] == [2.0] * 9
    assert "rabitq" not in [codec.key for codec in baselines.make_baselines(16, 4)]


def test_faiss_rq_codec_round_trip():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    codec = {c.key: c for c in baselines.make_baselines(8, 2)}["rq1"]
    codec.index.rq.cp.niter = 5  # a few k-means iterations are enough to beat the zero codec
    codec.train(x)
    codes = codec.encode(x)
    assert codes.shape == (3000, 2) and codes.dtype == np.uint8
    assert evaluation.mse(x, codec.decode(codes)) < 0.9 * (x ** 2).sum(1).mean()


def test_rq_recipes_train_with_one_beam_and_encode_with_another():
    x = np.random.default_rng(5).standard_normal((2000, 8)).astype(np.float32)
    codec = {c.key: c for c in baselines.make_baselines(8, 2)}["rq-km1"]
    assert codec.index.rq.max_beam_size == 1
    assert codec.index.rq.train_type == baselines.faiss.ResidualQuantizer.Train_default
    codec.train(x)
    assert codec.index.rq.max_beam_size == 5  # the database is encoded with faiss's default beam
    assert codec.encode(x).shape == (2000, 2)
