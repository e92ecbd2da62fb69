import faiss
import numpy as np
import pytest
import torch

from faiss_rqmoe import Engine, Execution, RQMoE, RQMoEConfig
from faiss_rqmoe.lut import unpack_bits
from faiss_rqmoe.streams import instruction_stream

from conftest import clustered


def faiss_rq(x, M, nbits):
    rq = faiss.ResidualQuantizer(x.shape[1], M, nbits)
    rq.max_beam_size = 1
    rq.train(x)
    return rq


def perturb(model, scale=0.05, seed=1):
    """Move every weight off its initial value so morphing is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


# the network's reference paths and the engine's fast ones, held to the same results
THROUGH = {"network": lambda model: model, "engine": lambda model: Engine(model)}


@pytest.mark.parametrize("through", THROUGH)
@pytest.mark.parametrize("condition", ["instruction", "reconstruction", "none"])
def test_untrained_model_is_faiss_rq(condition, through):
    x = clustered(4000, d=32)
    M, nbits = 4, 6
    rq = faiss_rq(x, M, nbits)
    faiss_codes = unpack_bits(rq.compute_codes(x), M, nbits)
    model = RQMoE(RQMoEConfig(32, M, nbits, n_experts=2, n_layers=2, hidden=16, condition=condition))
    model.init_from_rq(rq, scale=float(np.abs(x).max()))
    model = THROUGH[through](model)
    codes = model.encode(x).numpy()
    assert (codes == faiss_codes).mean() > 0.999
    recon = model.decode(codes).numpy()
    np.testing.assert_allclose(recon, rq.decode(rq.compute_codes(x)), rtol=1e-4, atol=1e-4)
    mse_model = ((recon - x) ** 2).sum(1).mean()
    mse_faiss = ((rq.decode(rq.compute_codes(x)) - x) ** 2).sum(1).mean()
    assert mse_model == pytest.approx(mse_faiss, rel=1e-5)


@pytest.mark.parametrize("instr_dim", [None, 5, 40])
def test_instructions_started_from_codebooks_carry_the_partial_reconstruction(instr_dim):
    """instr_init="codebooks": the instruction stream I_m starts as the RQ partial reconstruction (mapped
    to De columns), and the model is still exactly faiss RQ."""
    x = clustered(3000, d=16)
    rq = faiss_rq(x, 3, 5)
    model = RQMoE(RQMoEConfig(16, 3, 5, n_experts=2, n_layers=1, hidden=8, instr_dim=instr_dim))
    model.init_from_rq(rq, scale=float(np.abs(x).max()), instr_init="codebooks")
    codes = torch.randint(0, 32, (50, 3))
    books = torch.from_numpy(faiss.vector_to_array(rq.codebooks).reshape(3, 32, 16)) / model.scale
    partial = torch.cumsum(books[torch.arange(2), codes[:, :2]], dim=1)  # (50, 2, d): after steps 1 and 2
    mapping = model.codeword_map()
    assert mapping.shape == (16, model.config.De)
    torch.testing.assert_close(mapping.T @ mapping if model.config.De <= 16 else mapping @ mapping.T,
                               torch.eye(min(16, model.config.De)), rtol=0, atol=1e-5)
    stream = instruction_stream(model.instr_codebooks.detach(), codes, None, include_first=False)
    torch.testing.assert_close(stream, partial @ mapping, rtol=1e-5, atol=1e-6)
    rq_recon = books[torch.arange(3), codes].sum(1) * model.scale  # plain RQ's decode, by hand
    torch.testing.assert_close(model.decode(codes), rq_recon, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="instr_init must be one of"):
        model.init_from_rq(rq, instr_init="zeros")


@pytest.mark.parametrize("condition", ["instruction", "reconstruction", "none"])
def test_parallel_decode_equals_sequential(condition):
    model = perturb(RQMoE(RQMoEConfig(24, 5, 5, n_experts=3, n_layers=2, hidden=20, condition=condition)))
    codes = torch.randint(0, 32, (300, 5))
    parallel = model.decode(codes)
    sequential = model.decode_sequential(codes)
    torch.testing.assert_close(parallel, sequential, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Engine(model).decode(codes), sequential, rtol=1e-5, atol=1e-5)
    # morphing actually changed something
    base = model.codebooks[torch.arange(5), codes].sum(1) * model.scale
    assert condition == "none" or (parallel - base).abs().max() > 1e-3


@pytest.mark.parametrize("condition", ["instruction", "reconstruction"])
def test_inference_decode_equals_the_differentiable_one_bit_for_bit(condition):
    """The engine's decode (no autograd: in-place morphing, step inputs summed from tables) and the training forward
    (autograd, step inputs projected) do the same arithmetic up to the order of summation."""
    model = perturb(RQMoE(RQMoEConfig(16, 4, 5, n_experts=3, n_layers=2, hidden=12, condition=condition,
                                      ctx_dim=16)))
    codes = torch.from_numpy(np.random.default_rng(0).integers(0, 32, (300, 4)))
    ctx = torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    with torch.enable_grad():
        differentiable = model(codes, model.normalize_ctx(ctx)).sum(1)
    assert differentiable.requires_grad
    # the same operations (in place or not): equal to float32 rounding of one order of summation
    torch.testing.assert_close(Engine(model).decode(codes, ctx=ctx), differentiable.detach() * model.scale,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ctx_dim", [0, 16])
def test_decode_sums_step_inputs_from_tables_as_the_projection_computes_them(monkeypatch, ctx_dim):
    from faiss_rqmoe import kernels

    model = perturb(RQMoE(RQMoEConfig(16, 5, 5, n_experts=3, n_layers=2, hidden=12, ctx_dim=ctx_dim)))
    codes = torch.from_numpy(np.random.default_rng(3).integers(0, 32, (200, 5)))
    ctx = torch.randn(200, 16, generator=torch.Generator().manual_seed(4)) if ctx_dim else None
    engine = Engine(model)
    assert engine._z_from_tables()
    from_tables = engine.decode(codes, ctx=ctx)
    monkeypatch.setattr(kernels, "DECODE_TABLES_MAX_BYTES", 0)  # tables over the cap: projected
    assert not engine._z_from_tables()
    torch.testing.assert_close(from_tables, engine.decode(codes, ctx=ctx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_tables, model.decode(codes, ctx=ctx), rtol=1e-5, atol=1e-5)


def test_decode_matches_hand_computed_single_step():
    """M=2, N=1, L=1: the morphed codeword follows the formula of docs/design.md, "The quantizer"."""
    cfg = RQMoEConfig(3, 2, 1, n_experts=1, n_layers=1, hidden=2, instr_dim=2)
    model = perturb(RQMoE(cfg), scale=0.3)
    codes = torch.tensor([[1, 0]])
    with torch.no_grad():
        c1 = model.codebooks[0, 1]
        c2 = model.codebooks[1, 0]
        instr = model.instr_codebooks[0, 1]
        z = c2 @ model.proj_code[0] + instr @ model.proj_cond[0] + model.proj_bias[0]
        h = torch.relu(z @ model.expert_w1[0, 0, 0] + model.expert_b1[0, 0, 0, 0])
        expert = z + h @ model.expert_w2[0, 0, 0] + model.expert_b2[0, 0, 0, 0]
        expected = c1 + expert  # one expert: gate weight is 1
    torch.testing.assert_close(model.decode(codes)[0], expected, rtol=1e-5, atol=1e-6)


def test_encode_is_greedy_argmin():
    """Each code is the nearest morphed codeword to the current residual (brute force)."""
    cfg = RQMoEConfig(8, 3, 3, n_experts=2, n_layers=1, hidden=8)
    model = perturb(RQMoE(cfg), scale=0.2)
    x = torch.randn(50, 8)
    codes = model.encode(x)
    K = cfg.K
    for i in range(len(x)):
        prefix = codes[i:i + 1].clone()
        residual = x[i].clone()
        for m in range(cfg.M):
            candidates = prefix.repeat(K, 1)
            candidates[:, m] = torch.arange(K)
            candidates[:, m + 1:] = 0
            steps = model.decode_steps(candidates).detach()[:, m]
            best = ((residual - steps) ** 2).sum(1).argmin()
            assert int(best) == int(codes[i, m])
            residual = residual - steps[best]


@pytest.mark.parametrize("budget", [20_000, 300_000, 1 << 30])
def test_encode_chunking_gives_identical_codes(budget):
    cfg = RQMoEConfig(16, 4, 5, n_experts=2, n_layers=2, hidden=16)
    reference = perturb(RQMoE(cfg))
    x = torch.randn(700, 16)
    expected = reference.encode(x)
    model = Engine(reference, mem_budget_bytes=budget)
    # other chunk sizes mean other matrix shapes, so BLAS may round differently: a code can flip only
    # between two codewords at the same distance (to float32 rounding), so the errors must agree
    for candidates in (None, 8):
        chunked, whole = model.encode(x, n_candidates=candidates), reference.encode(x, n_candidates=candidates)
        assert (chunked == whole).all(1).float().mean() > 0.98
        error = lambda codes: ((x - reference.decode(codes)) ** 2).sum(1)  # noqa: E731
        torch.testing.assert_close(error(chunked), error(whole), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.decode(expected), reference.decode(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("through", THROUGH)
def test_candidate_preselection_with_all_candidates_is_exact(through):
    cfg = RQMoEConfig(16, 3, 4, n_experts=2, n_layers=1, hidden=8)
    model = THROUGH[through](perturb(RQMoE(cfg)))
    x = torch.randn(200, 16)
    assert torch.equal(model.encode(x, n_candidates=cfg.K), model.encode(x))


@pytest.mark.parametrize("through", THROUGH)
@pytest.mark.parametrize("condition", ["instruction", "reconstruction", "none"])
def test_beam_search_as_wide_as_all_prefixes_finds_the_best_code(condition, through):
    """M=3, K=4: a beam of K^2 keeps every prefix, so beam search must reach the brute-force optimum over
    all 64 codes; it never does worse than greedy, and a beam of 1 is greedy."""
    cfg = RQMoEConfig(8, 3, 2, n_experts=2, n_layers=1, hidden=16, condition=condition)
    model = THROUGH[through](perturb(RQMoE(cfg), scale=0.3))
    x = torch.randn(300, 8) * 0.5
    every_code = torch.cartesian_prod(*[torch.arange(cfg.K)] * cfg.M)  # (64, 3)
    best_error = ((x[:, None] - model.decode(every_code)[None]) ** 2).sum(-1).min(1).values

    def error(codes):
        return ((x - model.decode(codes)) ** 2).sum(1)

    greedy = model.encode(x)
    beam = model.encode(x, beam_size=cfg.K ** (cfg.M - 1))
    torch.testing.assert_close(error(beam), best_error, rtol=1e-5, atol=1e-6)
    assert (error(beam) <= error(greedy) + 1e-6).all()
    assert torch.equal(model.encode(x, beam_size=1), greedy)
    if condition != "none":
        assert (error(beam) < error(greedy) - 1e-4).any()  # the premise: greedy is not optimal here


def test_cpu_chunks_encode_and_decode_as_one_chunk(monkeypatch):
    from faiss_rqmoe import engine as engine_module

    cfg = RQMoEConfig(16, 4, 5, n_experts=2, n_layers=2, hidden=16)
    model = Engine(perturb(RQMoE(cfg)))
    x = torch.randn(300, 16)
    encodings = {"greedy": (8, 1), "exact": (None, 1), "beam": (8, 3)}
    whole = {name: model.encode(x, n_candidates=a, beam_size=b) for name, (a, b) in encodings.items()}
    decoded = model.decode(whole["exact"])
    monkeypatch.setattr(engine_module, "CPU_CHUNK_BYTES", 60_000)
    assert model.rows_per_chunk(8) < 20 and model.rows_per_chunk(cfg.K) == 1  # every call below is chunked
    error = lambda codes: ((x - model.decode(codes)) ** 2).sum(1)  # noqa: E731
    for name, (a, b) in encodings.items():
        chunked = model.encode(x, n_candidates=a, beam_size=b)
        # other matrix shapes may round differently: a code flips only between words at the same distance
        assert (chunked == whole[name]).all(1).float().mean() > 0.98
        torch.testing.assert_close(error(chunked), error(whole[name]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.decode(whole["exact"]), decoded, rtol=1e-5, atol=1e-6)


def test_kept_temporaries_change_no_result_and_are_per_thread(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from faiss_rqmoe import engine as engine_module

    model = Engine(perturb(RQMoE(RQMoEConfig(16, 4, 5, n_experts=2, n_layers=3, hidden=16, ctx_dim=8))))
    x = torch.randn(400, 16)
    ctx = torch.randn(400, 8, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(engine_module, "CPU_CHUNK_BYTES", 200_000)  # many chunks, the last one smaller
    codes = model.encode(x, n_candidates=8, ctx=ctx)  # CPU calls keep their temporaries themselves
    decoded = model.decode(codes, ctx=ctx)
    with model.temporaries():  # nested, and across calls of other shapes
        assert torch.equal(model.encode(x, n_candidates=8, ctx=ctx), codes)
        model.decode(codes[:7], ctx=ctx[:7])
        torch.testing.assert_close(model.decode(codes, ctx=ctx), decoded, rtol=1e-6, atol=1e-6)
    assert model._spare(torch.device("cpu")) is None  # released
    # against a reference without any kept tensor: the products' out= changes no value
    monkeypatch.setattr(Engine, "_spare", lambda self, device: None)
    torch.testing.assert_close(model.decode(codes, ctx=ctx), decoded, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.encode(x, n_candidates=8, ctx=ctx), codes)
    monkeypatch.undo()
    monkeypatch.setattr(engine_module, "CPU_CHUNK_BYTES", 200_000)
    # threads sharing the model each keep their own: interleaved steps corrupt nothing
    parts = [slice(i * 100, (i + 1) * 100) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        encoded = list(pool.map(lambda p: model.encode(x[p], n_candidates=8, ctx=ctx[p]), parts * 3))
        decodes = list(pool.map(lambda p: model.decode(codes[p], ctx=ctx[p]), parts * 3))
    for i, p in enumerate(parts * 3):
        assert (encoded[i] == codes[p]).all(1).float().mean() > 0.98
        torch.testing.assert_close(decodes[i], decoded[p], rtol=1e-5, atol=1e-5)


def test_fast_paths_follow_the_callers_precision_and_grad_mode():
    reference = perturb(RQMoE(RQMoEConfig(16, 4, 5, n_experts=2, n_layers=2, hidden=16)))
    network = RQMoE(reference.config)
    network.load_state_dict(reference.state_dict())
    model = Engine(network)
    codes = torch.randint(0, 32, (100, 4), generator=torch.Generator().manual_seed(6))
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(7))
    expected = reference.encode(x, n_candidates=8)
    decoded = reference.decode(codes)
    # a first encode under the caller's autocast caches no bfloat16 table for the float32 calls after it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode(x, n_candidates=8)
    assert torch.equal(model.encode(x, n_candidates=8), expected)
    # temporaries kept under inference mode are not written again under no_grad (training's encodes)
    with model.temporaries():
        model.decode(codes)
        model.encode(x, n_candidates=8)
        with torch.no_grad():
            assert torch.equal(model.encode_scaled(x / network.scale, 8, 1, None), expected)
            torch.testing.assert_close(network(codes).sum(1) * network.scale, decoded, rtol=1e-5, atol=1e-5)
    # a float64 model decodes without the float32 tables
    as_double = RQMoE(network.config)
    as_double.load_state_dict(network.state_dict())
    torch.testing.assert_close(Engine(as_double.double()).decode(codes), decoded, rtol=1e-5, atol=1e-5,
                               check_dtype=False)


@pytest.mark.parametrize("budget", [20_000, 1 << 30])
def test_beam_search_chunking_and_preselection(budget):
    cfg = RQMoEConfig(16, 4, 5, n_experts=2, n_layers=2, hidden=16)
    reference = perturb(RQMoE(cfg))
    x = torch.randn(500, 16)
    model = Engine(reference, mem_budget_bytes=budget)
    assert torch.equal(model.encode(x, n_candidates=8, beam_size=4), reference.encode(x, 8, beam_size=4))
    # pre-selecting all K candidates is the exact beam search
    assert torch.equal(model.encode(x, n_candidates=cfg.K, beam_size=3), reference.encode(x, beam_size=3))


@pytest.mark.parametrize("beam", [0, -2, 1.5, True])
def test_encode_rejects_bad_beam_size(beam):
    model = RQMoE(RQMoEConfig(8, 2, 2, n_experts=1, n_layers=1, hidden=4))
    with pytest.raises(ValueError, match="beam_size must be an integer >= 1"):
        model.encode(np.zeros((3, 8), np.float32), beam_size=beam)


def test_scale_is_a_buffer_in_the_state_dict():
    model = RQMoE(RQMoEConfig(8, 2, 2, n_experts=1, n_layers=1, hidden=4))
    rq = faiss_rq(clustered(500, d=8) * 100, 2, 2)
    model.init_from_rq(rq, scale=250.0)
    state = model.state_dict()
    assert float(state["scale"]) == 250.0 and bool(state["initialized"])


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((4, 7), np.float32), ValueError, "7 columns, expected d=8"),
    (np.zeros((4, 8), bool), TypeError, "real numeric array"),
    (np.full((4, 8), np.nan, np.float32), ValueError, "NaN"),
    (np.full((4, 8), np.inf, np.float32), ValueError, "infinite"),
    (np.zeros((0, 8), np.float32), ValueError, "empty"),
    (np.full((4, 8), "a"), TypeError, "real numeric array"),
])
def test_encode_rejects_bad_vectors(bad, error, message):
    model = RQMoE(RQMoEConfig(8, 2, 2, n_experts=1, n_layers=1, hidden=4))
    with pytest.raises(error, match=message):
        model.encode(bad)


@pytest.mark.parametrize("bad, error, message", [
    (np.full((3, 2), 4), ValueError, r"\[0, K=4\)"),
    (np.full((3, 2), -1), ValueError, r"\[0, K=4\)"),
    (np.full((3, 2), 4, np.uint8), ValueError, r"\[0, K=4\)"),  # bytes skip the check only when K >= 256
    (torch.full((3, 2), 200, dtype=torch.uint8), ValueError, r"\[0, K=4\)"),
    (torch.full((3, 2), 4, dtype=torch.int32), ValueError, r"\[0, K=4\)"),  # checked before the int64 cast
    (np.full((3, 2), 2**63 + 5, np.uint64), ValueError, r"\[0, K=4\)"),  # wraps negative in int64: still caught
    (np.zeros((3, 3), np.int64), ValueError, "shape"),
    (np.zeros((3, 2), np.float32), TypeError, "integer"),
    (np.zeros((0, 2), np.int64), ValueError, "empty"),
])
def test_decode_rejects_bad_codes(bad, error, message):
    model = RQMoE(RQMoEConfig(8, 2, 2, n_experts=1, n_layers=1, hidden=4))
    with pytest.raises(error, match=message):
        model.decode(bad)
    with pytest.raises(error, match=message):
        model.decode_sequential(bad)


@pytest.mark.parametrize("config", [RQMoEConfig(8, 3, 4, n_experts=2, n_layers=1, hidden=8),
                                    RQMoEConfig(8, 3, 4, condition="reconstruction", ctx_dim=5, n_experts=2,
                                                n_layers=1, hidden=8)])
def test_weights_stamp_is_every_parameter_and_buffer_and_follows_changes(config):
    """The graphed decode's cheap stamp reads the model's own dicts: it must equal the stamp of
    parameters() + buffers() (same tensors, same order), and move when any of them changes in place."""
    from faiss_rqmoe.graphs import stamp
    model = RQMoE(config)
    engine = Engine(model)
    tensors = list(model.parameters()) + list(model.buffers())
    assert engine._weights_stamp() == stamp(tensors)
    with torch.no_grad():
        for tensor in tensors:
            before = engine._weights_stamp()
            tensor.add_(0) if tensor.dtype != torch.bool else tensor.logical_or_(tensor)
            assert engine._weights_stamp() != before
    model.extra = torch.nn.Linear(2, 2)  # a submodule: the stamp must cover its weights too
    assert engine._weights_stamp() == stamp(list(model.parameters()) + list(model.buffers()))


def test_decode_of_byte_codes_equals_int64():
    """Codes as bytes (uint8, as indexes store them) skip the range check at K = 256: every value is a code,
    and the decode is the int64 one."""
    model = perturb(RQMoE(RQMoEConfig(8, 3, 8, n_experts=2, n_layers=1, hidden=8)), scale=0.1)
    codes = np.random.default_rng(0).integers(0, 256, (50, 3))
    codes[0] = 255
    expected = model.decode(codes)
    for as_bytes in (codes.astype(np.uint8), torch.from_numpy(codes.astype(np.uint8))):
        torch.testing.assert_close(model.decode(as_bytes), expected, rtol=0, atol=0)
        torch.testing.assert_close(Engine(model).decode(as_bytes), Engine(model).decode(codes), rtol=0, atol=0)
        torch.testing.assert_close(model.decode_sequential(as_bytes), model.decode_sequential(codes), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"d": 0, "M": 2}, "d must be a positive integer"),
    ({"d": 8, "M": 2, "nbits": 17}, "nbits"),
    ({"d": 8, "M": 2, "condition": "magic"}, "condition"),
    ({"d": 8, "M": 2, "instr_dim": -1}, "instr_dim"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RQMoEConfig(**kwargs)


def test_init_from_rq_rejects_mismatched_quantizer():
    rq = faiss_rq(clustered(500, d=8), 2, 3)
    model = RQMoE(RQMoEConfig(8, 2, 2, n_experts=1, n_layers=1, hidden=4))
    with pytest.raises(ValueError, match="nbits"):
        model.init_from_rq(rq)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_encode_decode_match_cpu():
    cfg = RQMoEConfig(16, 4, 5, n_experts=2, n_layers=2, hidden=16)
    model = perturb(RQMoE(cfg))
    x = torch.randn(300, 16)
    codes = model.encode(x)
    on_gpu = RQMoE(cfg).cuda()
    on_gpu.load_state_dict(model.state_dict())
    gpu = Engine(on_gpu, Execution(dtype="float32"))
    assert (gpu.encode(x).cpu() == codes).float().mean() > 0.99
    torch.testing.assert_close(gpu.decode(codes).cpu(), model.decode(codes), rtol=1e-4, atol=1e-4)
    beam_cpu = model.encode(x, 8, beam_size=4)
    assert (gpu.encode(x, 8, beam_size=4).cpu() == beam_cpu).float().mean() > 0.98


def test_fused_kernel_chunks_are_larger_and_encode_the_same(monkeypatch):
    """Where the fused kernel runs, a morphed row needs no hidden units outside the kernel, so encoding takes
    larger chunks of the memory budget; the codes do not depend on the chunking (forced chunks of 7 give the
    same codes)."""
    model = Engine(RQMoE(RQMoEConfig(16, 3, 4, n_experts=2, n_layers=1, hidden=64)), mem_budget_bytes=1 << 20)
    torch_rows = model.rows_per_chunk(8, cpu_cap=False)
    monkeypatch.setattr(Engine, "fused", lambda self, device: True)
    assert model.rows_per_chunk(8, cpu_cap=False) >= 2 * torch_rows
    monkeypatch.setattr(Engine, "fused", lambda self, device: False)
    x = torch.randn(3 * torch_rows + 5, 16)
    whole = model.encode(x, n_candidates=8)
    monkeypatch.setattr(Engine, "chunk_items", lambda self, rows, beam_size=1: 7)
    torch.testing.assert_close(model.encode(x, n_candidates=8), whole, rtol=0, atol=0)


def test_a_codec_without_networks_ignores_the_kernel_choice(monkeypatch):
    """kernel='triton' on a shape the kernel cannot run raises only where a network would run it: plain RQ
    (no morphed steps) encodes and decodes whatever the kernel setting."""
    from faiss_rqmoe import kernels

    monkeypatch.setattr(kernels, "interpreting", lambda: True)  # as if the kernel could run here
    x = np.random.default_rng(0).random((40, 96), dtype=np.float32)
    plain = Engine(RQMoE(RQMoEConfig(96, 3, 4, condition="none")), Execution(kernel="triton"))
    assert plain.decode(plain.encode(x, n_candidates=8)).shape == (40, 96)
    networks = Engine(RQMoE(RQMoEConfig(96, 3, 4, n_experts=2, hidden=24)), Execution(kernel="triton"))
    with pytest.raises(ValueError, match="power of two"):
        networks.encode(x, n_candidates=8)


def test_byte_codes_skip_the_range_check(monkeypatch):
    """uint8 codes at K = 256 are valid by their type: no range check runs (on a GPU it would wait for the
    device); int64 codes and bytes at K < 256 are checked."""
    model = RQMoE(RQMoEConfig(8, 2, 8, n_experts=1, n_layers=1, hidden=4))
    small = RQMoE(RQMoEConfig(8, 2, 4, n_experts=1, n_layers=1, hidden=4))
    codes = np.full((3, 2), 255)

    def no_check(*args, **kwargs):
        raise AssertionError("range check ran")

    monkeypatch.setattr(torch, "aminmax", no_check)
    model.decode(codes.astype(np.uint8))
    model.decode(torch.from_numpy(codes.astype(np.uint8)))
    for checked in (lambda: model.decode(codes), lambda: small.decode(codes.astype(np.uint8) % 16)):
        with pytest.raises(AssertionError, match="range check ran"):
            checked()


def test_bfloat16_decodes_on_the_cpu_close_to_float32():
    """dtype='bfloat16' runs a CPU decode's products with bfloat16 inputs (torch's CPU autocast): the result
    stays float32, within bfloat16's rounding of the float32 decode, and differs from it (bfloat16 ran)."""
    torch.manual_seed(0)
    model = perturb(RQMoE(RQMoEConfig(32, 4, 5, n_experts=2, n_layers=2, hidden=32)), scale=0.05)
    codes = torch.randint(0, 32, (200, 4))
    reference = model.decode(codes)
    fast = Engine(model, Execution(dtype="bfloat16")).decode(codes)
    assert fast.dtype == torch.float32 and fast.shape == reference.shape
    error = float((fast - reference).norm() / reference.norm())
    assert 0 < error < 2e-2, error


def test_fused_chunks_stay_within_the_kernels_int32_offsets(monkeypatch):
    """A fused launch addresses its rows with int32 offsets: however large the memory budget, an encode's and
    a decode's chunks stay within kernels.max_rows, and a launch past it is refused with a clear error."""
    from faiss_rqmoe import kernels

    cfg = RQMoEConfig(128, 8, 8, n_experts=1, n_layers=2, hidden=256)
    model = Engine(RQMoE(cfg), mem_budget_bytes=1 << 40)
    monkeypatch.setattr(Engine, "fused", lambda self, device: True)
    for rows_per_item, scored in ((256, True), (64, True), (cfg.n_morph_steps, False)):
        assert model.rows_per_chunk(rows_per_item, scored, cpu_cap=False) * rows_per_item * cfg.d < 2 ** 31
    # a decode from tables with that many codes sums the steps inside its programs: it addresses (rows, d)
    rows = kernels.decode_sum_rows(cfg, 1 << 40)
    assert rows >= kernels.STEPS_IN_PROGRAM_MIN_ROWS and rows * cfg.d < 2 ** 31
    if kernels.triton is not None:
        with pytest.raises(ValueError, match="int32 offsets"):  # z read for every step: (S, R, d)
            kernels._dense_launch(cfg, None, "bfloat16", 0, cfg.n_morph_steps,
                                  kernels.max_rows(cfg, cfg.n_morph_steps) + 1, None, False)
