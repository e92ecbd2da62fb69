"""The IVF-conditioned codec (docs/design.md, "Conditioning on the IVF centroid"): a context vector per code (the IVF centroid) starts the
instruction stream, I_1 = A · ctx, or joins the QINCo-style partial reconstruction, and morphs step 1 too."""
import faiss
import numpy as np
import pytest
import torch

import faiss_rqmoe
from faiss_rqmoe import RQMoE, RQMoEConfig, train_rqmoe
from faiss_rqmoe import lut
from faiss_rqmoe.lut import unpack_bits

from conftest import assert_same_neighbours, clustered
from test_index import TRAIN, brute_force
from test_model import faiss_rq, perturb

CONDITIONS = ["instruction", "reconstruction"]


def contexts(n, d, n_groups=5, seed=3):
    """(n, d) float32 contexts drawn from n_groups distinct rows, as IVF centroids are."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((n_groups, d)).astype(np.float32) * 2
    return table[rng.integers(0, n_groups, n)]


@pytest.mark.parametrize("condition", CONDITIONS)
def test_untrained_context_model_is_faiss_rq(condition):
    """Whatever the context, the initialised model encodes and decodes exactly as the faiss RQ it came from."""
    x = clustered(3000, d=16)
    rq = faiss_rq(x, 3, 5)
    model = RQMoE(RQMoEConfig(16, 3, 5, n_experts=2, n_layers=1, hidden=16, condition=condition, ctx_dim=16))
    model.init_from_rq(rq, scale=float(np.abs(x).max()))
    ctx = contexts(len(x), 16)
    codes = model.encode(x, ctx=ctx).numpy()
    faiss_codes = unpack_bits(rq.compute_codes(x), 3, 5)
    assert (codes == faiss_codes).mean() > 0.999
    np.testing.assert_allclose(model.decode(faiss_codes, ctx=ctx).numpy(), rq.decode(rq.compute_codes(x)),
                               rtol=1e-4, atol=1e-4)


def test_decode_with_context_matches_hand_computed_steps():
    """M=2, N=1, L=1: step 1 is morphed with I_1 = A·ctx, step 2 with I_2 = I_1 + E_1[i_1] (docs/design.md, "The quantizer")."""
    cfg = RQMoEConfig(3, 2, 1, n_experts=1, n_layers=1, hidden=2, instr_dim=2, ctx_dim=3)
    model = perturb(RQMoE(cfg), scale=0.3)
    with torch.no_grad():
        model.scale.fill_(2.0)
        model.ctx_mean.copy_(torch.tensor([0.5, 0.0, -1.0]))
        model.ctx_scale.fill_(4.0)
    ctx = torch.tensor([[1.0, -2.0, 0.5]])
    codes = torch.tensor([[1, 0]])

    def expert(step, c, instr):
        z = c @ model.proj_code[step] + instr @ model.proj_cond[step] + model.proj_bias[step]
        h = torch.relu(z @ model.expert_w1[0, step, 0] + model.expert_b1[0, step, 0, 0])
        return z + h @ model.expert_w2[0, step, 0] + model.expert_b2[0, step, 0, 0]  # one expert: weight 1

    with torch.no_grad():
        i1 = ((ctx[0] - torch.tensor([0.5, 0.0, -1.0])) / 4.0) @ model.ctx_proj  # normalised context
        i2 = i1 + model.instr_codebooks[0, 1]
        expected = (expert(0, model.codebooks[0, 1], i1) + expert(1, model.codebooks[1, 0], i2)) * 2.0
    torch.testing.assert_close(model.decode(codes, ctx=ctx)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("condition", CONDITIONS)
def test_parallel_decode_with_context_equals_sequential(condition, M):
    model = perturb(RQMoE(RQMoEConfig(24, M, 5, n_experts=3, n_layers=2, hidden=20, condition=condition,
                                      ctx_dim=24)))
    codes = torch.randint(0, 32, (300, M))
    ctx = contexts(300, 24)
    parallel = model.decode(codes, ctx=ctx)
    torch.testing.assert_close(parallel, model.decode_sequential(codes, ctx=ctx), rtol=1e-5, atol=1e-5)
    # the context matters: the same codes in other lists decode to other vectors
    other = model.decode(codes, ctx=np.roll(ctx, 1, axis=0))
    moved = (ctx != np.roll(ctx, 1, axis=0)).any(1)
    assert (parallel - other).abs().sum(1)[torch.from_numpy(moved)].min() > 1e-3


@pytest.mark.parametrize("condition", CONDITIONS)
def test_beam_search_with_context_finds_the_best_code(condition):
    """A beam that keeps every prefix reaches the brute-force optimum over all K^M codes, per context."""
    cfg = RQMoEConfig(8, 3, 2, n_experts=2, n_layers=1, hidden=16, condition=condition, ctx_dim=8)
    model = perturb(RQMoE(cfg), scale=0.3)
    x = torch.randn(200, 8) * 0.5
    ctx = torch.from_numpy(contexts(200, 8, n_groups=3))
    every_code = torch.cartesian_prod(*[torch.arange(cfg.K)] * cfg.M)  # (64, 3)
    best_error = torch.stack([((x[i] - model.decode(every_code, ctx=ctx[i].expand(64, 8))) ** 2).sum(1).min()
                              for i in range(len(x))])
    beam = model.encode(x, beam_size=cfg.K ** (cfg.M - 1), ctx=ctx)
    torch.testing.assert_close(((x - model.decode(beam, ctx=ctx)) ** 2).sum(1), best_error, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("condition", CONDITIONS)
def test_greedy_encoding_of_mixed_contexts_matches_one_vector_at_a_time(condition):
    """Rows share morphed codebooks only when both prefix and context agree: encoding a batch that mixes
    contexts gives the codes each vector gets alone; preselecting all K candidates changes nothing."""
    cfg = RQMoEConfig(16, 3, 4, n_experts=2, n_layers=1, hidden=16, condition=condition, ctx_dim=16)
    model = perturb(RQMoE(cfg), scale=0.2)
    x = torch.randn(60, 16)
    ctx = torch.from_numpy(contexts(60, 16, n_groups=4))
    codes = model.encode(x, ctx=ctx)
    alone = torch.cat([model.encode(x[i:i + 1], ctx=ctx[i:i + 1]) for i in range(len(x))])
    assert torch.equal(codes, alone)
    assert torch.equal(model.encode(x, n_candidates=cfg.K, ctx=ctx), codes)
    assert torch.equal(model.encode(x, beam_size=1, ctx=ctx), codes)


def test_context_errors_are_clear():
    plain = RQMoE(RQMoEConfig(8, 2, 2, n_experts=1, n_layers=1, hidden=4))
    conditioned = RQMoE(RQMoEConfig(8, 2, 2, n_experts=1, n_layers=1, hidden=4, ctx_dim=8))
    x = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="takes no context"):
        plain.encode(x, ctx=x)
    with pytest.raises(ValueError, match="conditioned on a context of width 8"):
        conditioned.encode(x)
    with pytest.raises(ValueError, match="conditioned on a context of width 8"):
        conditioned.decode(np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="ctx has 5 columns, expected d=8"):
        conditioned.encode(x, ctx=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="ctx has 2 rows"):
        conditioned.encode(x, ctx=np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="ctx contains NaN"):
        conditioned.encode(x, ctx=np.full((3, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="needs a conditioning vector"):
        RQMoEConfig(8, 2, condition="none", ctx_dim=8)
    with pytest.raises(ValueError, match="pass ctx"):
        train_rqmoe(conditioned, clustered(200, d=8), max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="pass ctx"):  # contexts for a model that takes none
        train_rqmoe(plain, clustered(200, d=8), clustered(50, d=8), ctx_val=clustered(50, d=8), progress=False)


def test_context_normalisation_is_fixed_for_a_caller_initialised_model():
    x = clustered(2000, d=16)
    model = RQMoE(RQMoEConfig(16, 2, 4, n_experts=1, n_layers=1, hidden=8, ctx_dim=16))
    model.init_from_rq(faiss_rq(x, 2, 4), scale=float(np.abs(x).max()))
    assert not model.has_context_stats()
    ctx = contexts(2000, 16) + 50  # far from the identity normalisation
    train_rqmoe(model, x, ctx=ctx, max_epochs=1, batch_size=500, progress=False, device="cpu")
    assert model.has_context_stats()
    assert float(model.normalize_ctx(torch.from_numpy(ctx[:1800])).mean(0).abs().max()) < 1e-3


def test_training_with_centroid_context_lowers_validation_mse_on_real_sift(sift):
    """IVF residuals of real SIFT with their centroids as contexts, as the index trains them."""
    kmeans = faiss.Kmeans(128, 16, niter=10, seed=1)
    kmeans.train(sift.xt[:4000])
    lists_t = kmeans.index.search(sift.xt[:4000], 1)[1][:, 0]
    lists_v = kmeans.index.search(sift.xval[:500], 1)[1][:, 0]
    xt, ctx = sift.xt[:4000] - kmeans.centroids[lists_t], kmeans.centroids[lists_t]
    xval, ctx_val = sift.xval[:500] - kmeans.centroids[lists_v], kmeans.centroids[lists_v]
    model = RQMoE(RQMoEConfig(128, 4, 6, n_experts=2, n_layers=1, hidden=32, ctx_dim=128))
    history = train_rqmoe(model, xt, xval, ctx=ctx, ctx_val=ctx_val, max_epochs=5, batch_size=256,
                          progress=False, device="cpu", train_encode_candidates=16)
    assert history.best_val_mse < history.init_val_mse * 0.998
    # training fixed the context normalisation from the training contexts: mean 0, entries of RMS 0.1
    normalised = model.normalize_ctx(torch.from_numpy(ctx))
    assert normalised.mean(0).abs().max() < 1e-3
    assert float(normalised.pow(2).mean().sqrt()) == pytest.approx(0.1, rel=1e-3)
    # the history's validation MSE is the model's own error with those contexts (and training's candidates)
    recon = model.decode(model.encode(xval, 16, ctx=ctx_val), ctx=ctx_val).numpy()
    assert ((recon - xval) ** 2).sum(1).mean() == pytest.approx(history.best_val_mse, rel=1e-4)


@pytest.fixture(scope="module")
def conditioned_index(sift):
    index = faiss_rqmoe.index_factory(128, "IVF16,RQMoE4x6_N2L1H32_centroid", keep_rq_if_better=False, **TRAIN)
    index.train(sift.xt[:3000], sift.xval[:300])
    perturb(index.model, scale=0.02)  # seconds of training barely move it: make sure the centroid matters
    index.add(sift.xb[:2000])
    return index


def test_conditioned_index_decodes_each_code_with_its_own_centroid(conditioned_index):
    index = conditioned_index
    ids, list_nos, raw = lut.all_codes(index.ivf)
    codes = unpack_bits(raw, index.config.M, index.config.nbits)
    centroids = index.centroids[list_nos]
    expected = index.model.decode(codes, ctx=centroids).numpy() + centroids
    np.testing.assert_allclose(index.reconstruct_batch(ids), expected, rtol=1e-5, atol=1e-4)
    elsewhere = index.centroids[(list_nos + 1) % index.nlist]  # the same codes in the next list
    shifted = index.model.decode(codes, ctx=elsewhere).numpy() + centroids
    assert np.abs(shifted - expected).sum(1).min() > 1e-3


def test_conditioned_index_search_equals_brute_force(conditioned_index, sift):
    index = conditioned_index
    assert index.config.ctx_dim == 128
    xq = sift.xq[:40]
    D, I = index.search(xq, 10, params={"nprobe": 16, "nshort": index.ntotal})
    recons = index.reconstruct_n(0, index.ntotal)
    D_ref, _ = brute_force(recons, xq, 10, faiss.METRIC_L2)
    assert_same_neighbours(D, I, xq, recons, D_ref)
    # standalone codes carry the list number, so they decode with the right centroid as context
    np.testing.assert_allclose(index.sa_decode(index.sa_encode(sift.xb[:50])), index.reconstruct_n(0, 50),
                               rtol=1e-5, atol=1e-3)


def test_conditioned_index_write_read_is_bit_identical(conditioned_index, sift, tmp_path):
    path = tmp_path / "conditioned.rqmoe"
    faiss_rqmoe.write_index(conditioned_index, path)
    loaded = faiss_rqmoe.read_index(path, device="cpu")
    assert loaded.config == conditioned_index.config
    params = {"nprobe": 4, "nshort": 30}
    for a, b in zip(conditioned_index.search(sift.xq[:30], 5, params), loaded.search(sift.xq[:30], 5, params)):
        np.testing.assert_array_equal(a, b)


def test_context_needs_an_ivf_index():
    with pytest.raises(ValueError, match="needs an IVF coarse quantizer"):
        faiss_rqmoe.index_factory(128, "RQMoE8x8_centroid")
    with pytest.raises(ValueError, match="ctx_dim must be 0 or d=16"):
        faiss_rqmoe.IndexRQMoE(RQMoEConfig(16, 2, ctx_dim=8), nlist=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("condition", CONDITIONS)
def test_gpu_context_encode_decode_match_cpu(condition):
    cfg = RQMoEConfig(16, 4, 5, n_experts=2, n_layers=2, hidden=16, condition=condition, ctx_dim=16)
    model = perturb(RQMoE(cfg))
    x, ctx = torch.randn(300, 16), torch.from_numpy(contexts(300, 16))
    codes = model.encode(x, ctx=ctx)
    gpu = RQMoE(cfg).cuda()
    gpu.load_state_dict(model.state_dict())
    assert (gpu.encode(x, ctx=ctx).cpu() == codes).float().mean() > 0.99
    torch.testing.assert_close(gpu.decode(codes, ctx=ctx.cuda()).cpu(), model.decode(codes, ctx=ctx),
                               rtol=1e-4, atol=1e-4)
    beam_cpu = model.encode(x, 8, beam_size=4, ctx=ctx)
    assert (gpu.encode(x, 8, beam_size=4, ctx=ctx).cpu() == beam_cpu).float().mean() > 0.98
