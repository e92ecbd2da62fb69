"""The GPU paths against the CPU ones: search end to end on CUDA, the code mirror kept in step, and the
fused kernel against the torch path. Every test skips cleanly without CUDA (CI has none)."""
import faiss
import numpy as np
import pytest
import torch

import faiss_rqmoe
from faiss_rqmoe import Engine, Execution, RQMoE, RQMoEConfig, graphs, kernels
from faiss_rqmoe.engine import Backend

from conftest import clustered

from test_model import perturb

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TRAIN = dict(max_epochs=1, batch_size=256, progress=False, keep_rq_if_better=False)


@pytest.fixture(scope="module")
def pair(sift):
    """The same trained index on the CPU and on the GPU."""
    cpu = faiss_rqmoe.index_factory(128, "IVF16,RQMoE4x8_N2L2H32_centroid", device="cpu", **TRAIN)
    cpu.train(sift.xt[:3000], sift.xval[:300])
    cpu.add(sift.xb[:3000])
    gpu = faiss_rqmoe.clone_index(cpu).to("cuda")
    return cpu, gpu


@cuda_only
@pytest.mark.parametrize("nprobe, nshort", [(1, 10), (4, 50), (16, 3000)])
def test_gpu_search_equals_the_cpu_path(pair, sift, nprobe, nshort):
    cpu, gpu = pair
    xq = sift.xq[:100]
    params = {"nprobe": nprobe, "nshort": nshort}
    D, I = cpu.search(xq, 10, params)
    Dg, Ig = gpu.search(xq, 10, params)
    assert_same_up_to_ties(Dg, Ig, D, I, rtol=1e-4, atol=1e-2)


def assert_same_up_to_ties(D, I, D_ref, I_ref, rtol, atol):
    """The same k-th distances (within float32 rounding of the stored terms) and the same ids, but where
    distances tie: SIFT has duplicate descriptors, and their identical codes decode to one vector, which the
    two paths may order differently (a tie at the last place may bring in one from beyond the k)."""
    np.testing.assert_allclose(D, D_ref, rtol=rtol, atol=atol)
    for q, j in zip(*np.nonzero(I != I_ref)):
        ties = np.isclose(D_ref[q], D_ref[q, j], rtol=rtol, atol=atol)
        assert ties.sum() > 1 or j == I.shape[1] - 1, (q, j, D_ref[q])
        assert I[q, j] not in np.delete(I[q], j), (q, I[q])


@cuda_only
def test_query_tensor_on_the_gpu_stays_there(pair, sift):
    _, gpu = pair
    xq = torch.from_numpy(sift.xq[:20]).cuda()
    D, I = gpu.search(xq, 5, {"nprobe": 4, "nshort": 50})
    assert D.device.type == I.device.type == "cuda"
    Dn, In = gpu.search(sift.xq[:20], 5, {"nprobe": 4, "nshort": 50})
    np.testing.assert_array_equal(I.cpu().numpy(), In)


@cuda_only
def test_add_remove_reset_keep_the_gpu_mirror_in_step(sift):
    index = faiss_rqmoe.index_factory(128, "IVF8,RQMoE4x8_N2L1H32", device="cuda", **TRAIN)
    index.train(sift.xt[:2000])
    index.add(sift.xb[:500])
    index.search(sift.xq[:5], 5)  # builds the mirror
    index.add_with_ids(sift.xb[500:1000], np.arange(10_000, 10_500))
    index.remove_ids(np.arange(0, 500, 2))
    params = {"nprobe": 8, "nshort": 1000}
    D, I = index.search(sift.xq[:30], 10, params)
    stored = np.concatenate([np.arange(1, 500, 2), np.arange(10_000, 10_500)])
    assert set(I.ravel()) <= set(stored)
    reference = faiss.IndexIDMap(faiss.IndexFlatL2(128))
    reference.add_with_ids(index.reconstruct_batch(stored), stored)
    D_ref, I_ref = reference.search(sift.xq[:30], 10)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-2)
    index.reset()
    D, I = index.search(sift.xq[:3], 4)
    assert (I == -1).all() and np.isinf(D).all()


@cuda_only
def test_selector_on_the_gpu_path(pair, sift):
    _, gpu = pair
    sel = faiss.IDSelectorRange(0, 100)
    params = faiss.SearchParametersIVF(nprobe=16, sel=sel)
    D, I = gpu.search(sift.xq[:50], 10, params=params)
    found = I[I >= 0]
    assert len(found) > 0 and ((found >= 0) & (found < 100)).all()


def run(model, kernel="auto", dtype="auto", cuda_graphs=True, budget=None):
    """An engine over model, running it as asked."""
    options = {} if budget is None else {"mem_budget_bytes": budget}
    return Engine(model, Execution(kernel=kernel, dtype=dtype, cuda_graphs=cuda_graphs), **options)


@cuda_only
@pytest.mark.skipif(not kernels.available(), reason="needs Triton")
@pytest.mark.parametrize("condition, ctx", [("instruction", 0), ("instruction", 128), ("reconstruction", 0)])
def test_fused_kernel_equals_the_torch_path(condition, ctx):
    cfg = RQMoEConfig(128, 8, 8, n_experts=4, n_layers=2, hidden=256, condition=condition, ctx_dim=ctx)
    torch.manual_seed(0)
    model = perturb(RQMoE(cfg), scale=0.02).cuda()
    codes = torch.randint(0, 256, (3000, 8), device="cuda")
    ctx_vectors = torch.randn(3000, 128, device="cuda") if ctx else None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch_path = run(model, kernel="torch", dtype="float32")
    reference = torch_path.decode(codes, ctx=ctx_vectors)
    x = torch.from_numpy(clustered(2000, d=128)).cuda() * 0.05
    ctx_x = ctx_vectors[:2000] if ctx else None
    codes_ref = torch_path.encode(x, 16, ctx=ctx_x)
    ctx_some = None if ctx_x is None else ctx_x[:300]
    exact_ref, beam_ref = torch_path.encode(x[:300], ctx=ctx_some), torch_path.encode(x[:300], 16, 4, ctx=ctx_some)
    for dtype, tolerance in (("float32", 1e-4), ("tfloat32", 3e-3), ("bfloat16", 2e-2)):
        fused = run(model, kernel="triton", dtype=dtype).decode(codes, ctx=ctx_vectors)
        error = float((fused - reference).norm() / reference.norm())
        assert error < tolerance, (dtype, error)
    # the default is the fused kernel in bfloat16
    assert run(model).backend() == Backend(fused=True, precision="bfloat16")
    error = float((run(model).decode(codes.to(torch.uint8), ctx=ctx_vectors) - reference).norm() / reference.norm())
    assert error < 2e-2
    # the decode summing its steps inside the programs and computing its gates there, beside the default
    for min_rows, gate_rows in ((0, 1 << 62), (0, 0)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "STEPS_IN_PROGRAM_MIN_ROWS", min_rows)
            patch.setattr(kernels, "GATHERED_GATE_ONCE_MAX_ROWS", gate_rows)
            other = run(model, kernel="triton", dtype="bfloat16", cuda_graphs=False).decode(codes, ctx=ctx_vectors)
        assert float((other - reference).norm() / reference.norm()) < 2e-2, (min_rows, gate_rows)
    fused = run(model, kernel="triton", dtype="float32")
    # the kernel scores the candidates itself (kernels.candidate_scores): greedy, exact and beam codes as the
    # torch path's, up to near ties that float rounding decides otherwise
    assert (fused.encode(x, 16, ctx=ctx_x) == codes_ref).all(1).float().mean() > 0.99
    assert (fused.encode(x[:300], ctx=ctx_some) == exact_ref).all(1).float().mean() > 0.98
    assert (fused.encode(x[:300], 16, 4, ctx=ctx_some) == beam_ref).all(1).float().mean() > 0.98


def test_an_engine_set_to_the_fused_kernel_still_runs_on_the_cpu():
    """kernel='triton' chooses the fused kernel for CUDA data; a model on the CPU (an index's ``to("cpu")``)
    decodes and encodes there through torch, exactly as kernel='torch' does."""
    if kernels.interpreting():
        pytest.skip("the Triton interpreter runs kernels on CPU data")
    torch.manual_seed(0)
    model = RQMoE(RQMoEConfig(32, 4, 4, n_experts=2, n_layers=1, hidden=16))
    codes = torch.randint(0, 16, (50, 4))
    x = torch.randn(40, 32)
    torch_path, fused = run(model, kernel="torch"), run(model, kernel="triton", dtype="bfloat16")
    assert not fused.backend().fused
    assert torch.equal(fused.encode(x, 4), torch_path.encode(x, 4))
    # on the CPU bfloat16 runs a decode's products under autocast: close to float32, not equal
    assert float((fused.decode(codes) - torch_path.decode(codes)).norm() / torch_path.decode(codes).norm()) < 2e-2
    assert torch.equal(run(model, kernel="triton", dtype="float32").decode(codes), torch_path.decode(codes))


KERNEL_CHECK = """
import torch
from faiss_rqmoe import Engine, Execution, RQMoE, RQMoEConfig, kernels
# the launch variants that ship: dense experts split over programs (N > 1) or not (N = 1), the split
# launch's gates from a launch before it or computed in every program (a decode of many codes), a decode
# summing its steps inside the programs or not, z read (QINCo-style, or instruction widths the kernel's
# product does not take) or summed from tables, with and without a context; top-1 routing
EVERY, NEVER = 0, 1 << 62
cases = ((1, 0, "dense", "instruction", 3, None, NEVER, NEVER),
         (2, 32, "dense", "instruction", 3, None, EVERY, EVERY),
         (2, 0, "dense", "instruction", 1, None, EVERY, NEVER),
         (2, 32, "dense", "reconstruction", 3, None, NEVER, NEVER),
         (2, 0, "dense", "instruction", 3, 24, NEVER, NEVER),
         (2, 32, "dense", "instruction", 3, 16, EVERY, NEVER),
         (1, 0, "dense", "instruction", 3, 0, NEVER, NEVER),
         (1, 0, "top1", "instruction", 3, None, NEVER, NEVER),
         (2, 32, "top1", "instruction", 3, None, NEVER, NEVER),
         (2, 0, "top1", "reconstruction", 3, None, NEVER, NEVER))
for layers, ctx, routing, condition, experts, instr, min_rows, gate_rows in cases:
    kernels.STEPS_IN_PROGRAM_MIN_ROWS, kernels.GATHERED_GATE_ONCE_MAX_ROWS = min_rows, gate_rows
    model = RQMoE(RQMoEConfig(32, 4, 5, n_experts=experts, n_layers=layers, hidden=48, ctx_dim=ctx,
                              routing=routing, condition=condition, instr_dim=instr))
    generator = torch.Generator().manual_seed(layers)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * (0.1 if routing == "dense" else 0.3))
    codes = torch.randint(0, 32, (96, 4), generator=generator)
    ctx_vectors = torch.randn(96, 32, generator=generator) if ctx else None
    x = torch.randn(96, 32, generator=generator)
    torch_path = Engine(model, Execution(kernel="torch", dtype="float32"))
    fused = Engine(model, Execution(kernel="triton", dtype="float32"))
    assert fused.backend().fused
    reference = torch_path.decode(codes, ctx=ctx_vectors)
    got = fused.decode(codes, ctx=ctx_vectors)
    assert float((got - reference).abs().max()) < 1e-4 * float(reference.abs().max()), (layers, routing, condition)
    assert bool((fused.encode(x, 8, ctx=ctx_vectors) == torch_path.encode(x, 8, ctx=ctx_vectors)).all())
    if (routing, condition, layers, ctx, instr) == ("dense", "instruction", 2, 32, None):
        # exact and beam encodes through the kernel (all codewords, and picked ones, with a context's share)
        some, some_ctx = x[:32], None if ctx_vectors is None else ctx_vectors[:32]
        for candidates, beam in ((None, 1), (8, 3)):
            want = torch_path.encode(some, candidates, beam, ctx=some_ctx)
            got = fused.encode(some, candidates, beam, ctx=some_ctx)
            assert float((got == want).all(1).float().mean()) >= 0.99, (layers, candidates, beam)
print("kernel ok")
"""


def test_fused_kernel_in_the_triton_interpreter():
    """The fused kernels' arithmetic (dense experts, and top-1 routing with rows sorted by expert), on the CPU
    through Triton's interpreter (float32: the interpreter has no bfloat16); skipped where Triton is not
    installed (CI)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True, text=True, timeout=3600,
                         env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0 and "kernel ok" in run.stdout, run.stderr[-2000:]


HOPPER_SHARED_BYTES = 232_448  # shared memory a program may use on an H100 or H200 (227 KiB)


def test_fused_kernels_compile_for_hopper():
    """Every launch variant of the fused kernels compiles to Hopper machine code (sm_90, wgmma) without a GPU:
    Triton's front end, its passes and the ptxas it ships run on the CPU. The interpreter test checks their
    arithmetic; this one catches what only compilation sees (types, constexpr branches, layouts). Skipped
    where Triton is not installed (CI). Each must also fit a Hopper chip's shared memory, which only a launch
    would otherwise check."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as compile_kernel

    target, options = GPUTarget("cuda", 90, 32), dict(num_warps=4, num_stages=3)
    shape = dict(D=128, H=256, N=4, NP=kernels.N_PAD, BLOCK_R=64, HC=64, PRECISION="ieee")

    def build(fn, pointers, constexprs, stages=3):
        signature = dict(pointers, **{name: "constexpr" for name in constexprs})
        return compile_kernel(ASTSource(fn, signature, constexprs), target=target,
                              options=dict(options, num_stages=stages))

    tables = dict(codes_ptr="*i64", tab_ptr="*fp32", toff_ptr="*i32", tcol_ptr="*i32", ctx_ptr="*fp32",
                  pq_ptr="*fp32", M="i32", K="i32")
    pointers = dict(z_ptr="*fp32", out_ptr="*fp32", R="i32", s0="i32", S_span="i32", S_total="i32",
                    w1_ptr="*bf16", b1_ptr="*fp32", w2_ptr="*bf16", b2_ptr="*fp32", g1_ptr="*bf16", gb1_ptr="*fp32",
                    g2_ptr="*bf16", gb2_ptr="*fp32", gate_ptr="*fp32", **tables)
    flags = ("SPLIT", "GATE_IN", "SUM_STEPS", "Z_SOURCE", "HAS_CTX")

    def switches(values):  # Z_SOURCE is one of kernels.Z_READ .. Z_PICKED_CODEWORDS, the others are on or off
        return {flag: value if flag == "Z_SOURCE" else bool(value) for flag, value in zip(flags, values)}

    source = dict(DC=128, CTX_PRECISION="tf32")
    # a decode reads z or sums it from tables (Z_SOURCE 0, 1); an encode's candidates are all codewords or
    # picked ones (2, 3), with a conditioning share or without
    for values in ((1, 0, 0, 0, 0), (1, 1, 0, 0, 0), (0, 0, 0, 0, 0), (1, 1, 1, 0, 0), (0, 0, 1, 0, 0),
                   (1, 1, 1, 1, 1), (1, 0, 1, 1, 1), (1, 1, 0, 1, 0), (0, 0, 1, 1, 1), (1, 1, 0, 2, 1), (0, 0, 0, 3, 0)):
        constexprs = dict(shape, L=2, **source, **switches(values))
        compiled = build(kernels._morph_kernel, pointers, constexprs)
        assert "wgmma.mma_async" in compiled.asm["ptx"] and compiled.asm["cubin"], values
        assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, (values, compiled.metadata.shared)
    # float32 weights (a float32 or TF32 decode) take twice the shared memory a pipeline stage: a decode
    # from tables launches them with two stages, the other launches with three
    fp32_pointers = {name: "*fp32" if kind == "*bf16" else kind for name, kind in pointers.items()}
    for values, stages in (((1, 1, 1, 1, 1), 2), ((0, 0, 0, 1, 1), 2), ((1, 1, 0, 1, 1), 2),
                           ((1, 1, 1, 0, 0), 3), ((1, 1, 0, 0, 0), 3), ((1, 1, 0, 3, 1), 3)):
        constexprs = dict(shape, L=2, **dict(source, CTX_PRECISION="ieee"), **switches(values))
        compiled = build(kernels._morph_kernel, fp32_pointers, constexprs, stages)
        assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, ("float32", values, compiled.metadata.shared)
    gate_pointers = dict(z_ptr="*fp32", gate_ptr="*fp32", R="i32", s0="i32", g1_ptr="*bf16", gb1_ptr="*fp32",
                         g2_ptr="*bf16", gb2_ptr="*fp32", **tables)
    for z_source in (kernels.Z_READ, kernels.Z_TABLES, kernels.Z_PICKED_CODEWORDS):
        compiled = build(kernels._gate_kernel, gate_pointers, dict(shape, **source, Z_SOURCE=z_source,
                                                                   HAS_CTX=z_source > 0))
        assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, (z_source, compiled.metadata.shared)
    fp32_gate = {name: "*fp32" if kind == "*bf16" else kind for name, kind in gate_pointers.items()}
    compiled = build(kernels._gate_kernel, fp32_gate, dict(shape, **dict(source, CTX_PRECISION="ieee"),
                                                           Z_SOURCE=kernels.Z_TABLES, HAS_CTX=True), stages=2)
    assert compiled.metadata.shared <= HOPPER_SHARED_BYTES, ("float32 gate", compiled.metadata.shared)
    score = dict(parts_ptr="*fp32", res_ptr="*fp32", owner_ptr="*i64", scores_ptr="*fp32", B="i32", A="i32", R="i32")
    build(kernels._score_kernel, score, dict(P=4, D=128, BLOCK_R=64, HAS_OWNER=True))
    routed = dict(z_ptr="*fp32", out_ptr="*fp32", order_ptr="*i32", ends_ptr="*i32", counts_ptr="*i32",
                  starts_ptr="*i32", G="i32", s0="i32", S_total="i32", w1_ptr="*bf16", b1_ptr="*fp32", w2_ptr="*bf16",
                  b2_ptr="*fp32")
    routed_shape = {k: v for k, v in shape.items() if k != "NP"}
    build(kernels._routed_kernel, routed, dict(routed_shape, L=2, GP=32))


@cuda_only
@pytest.mark.parametrize("routing, kernel, ctx_dim", [("dense", "torch", 0), ("dense", "triton", 32),
                                                      ("top1", "triton", 0)])
def test_graphed_decode_equals_eager_decode_and_follows_new_weights(routing, kernel, ctx_dim):
    """Small CUDA decodes replay a graph recorded for the batch padded to a power of two (one graph a
    padded size); they give what the eager decode of the padded batch gives (the same launches: the
    kernels pick their variants by rows, so an unpadded batch may round otherwise in bfloat16), and a change
    of the weights records the graph again."""
    torch.manual_seed(0)
    network = perturb(RQMoE(RQMoEConfig(32, 4, 5, n_experts=3, n_layers=2, hidden=32, routing=routing,
                                        ctx_dim=ctx_dim)), scale=0.2).cuda()
    model, eager_engine = run(network, kernel=kernel), run(network, kernel=kernel, cuda_graphs=False)

    def eager_padded(codes, ctx):
        def pad(t):  # t's rows, then zeros up to the graph's rows
            out = t.new_zeros((graphs.bucket(len(codes)),) + tuple(t.shape[1:]))
            out[:len(t)] = t
            return out
        return eager_engine.decode(pad(codes), None if ctx is None else pad(ctx))[:len(codes)]

    sizes = (5, 1000, 3000)
    for n in sizes:
        codes = torch.randint(0, 32, (n, 4), device="cuda")
        ctx = torch.randn(n, 32, device="cuda") if ctx_dim else None
        graphed = model.decode(codes, ctx)
        torch.testing.assert_close(model.decode(codes, ctx), graphed)  # the replay, not the recording
        torch.testing.assert_close(graphed, eager_padded(codes, ctx), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graphed, eager_engine.decode(codes, ctx), rtol=5e-2, atol=5e-2)
    assert len(model._graphs._graphs) == len({graphs.bucket(n) for n in sizes}) == 2
    assert not model._graphs._failed
    with torch.no_grad():
        network.codebooks.mul_(1.5)
        network.expert_w1.mul_(1.5)
    graphed = model.decode(codes, ctx)
    torch.testing.assert_close(graphed, eager_padded(codes, ctx), rtol=1e-5, atol=1e-5)
    graphed -= 1  # a normal tensor, as the eager decode returns


@cuda_only
def test_graphed_decodes_from_several_threads_get_their_own_results():
    """Threads share one model's graphs and buffers: every decode must still return its own codes' vectors."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    network = perturb(RQMoE(RQMoEConfig(32, 4, 5, n_experts=3, n_layers=2, hidden=32)), scale=0.2).cuda()
    batches = [torch.randint(0, 32, (700 + 37 * i, 4), device="cuda") for i in range(8)]
    expected = [run(network, cuda_graphs=False).decode(codes) for codes in batches]
    model = run(network)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            results = list(pool.map(model.decode, batches))
            for got, want in zip(results, expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@cuda_only
def test_graphed_decode_of_byte_codes_equals_int64():
    """Byte codes (uint8 at K = 256) skip the range check and so the host wait; the graphed decode of them is
    the eager decode of the same codes as int64."""
    torch.manual_seed(0)
    network = perturb(RQMoE(RQMoEConfig(32, 4, 8, n_experts=2, n_layers=2, hidden=32)), scale=0.2).cuda()
    codes = torch.randint(0, 256, (1500, 4), device="cuda")
    expected = run(network, cuda_graphs=False).decode(codes)
    got = run(network).decode(codes.to(torch.uint8))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@cuda_only
@pytest.mark.skipif(not kernels.available(), reason="needs Triton")
def test_fused_encode_stays_within_the_memory_budget():
    """Where the fused kernel runs, encoding and decoding take larger chunks (no hidden units outside the
    kernel; an encode's candidates scored inside it; a decode's steps summed inside it): their temporaries
    must still stay within the memory budget (twice it, for the allocator's rounding and the per-chunk
    tensors the estimate leaves out)."""
    budget = 64 << 20
    torch.manual_seed(0)
    model = run(perturb(RQMoE(RQMoEConfig(128, 8, 8, n_experts=4, n_layers=2, hidden=256)), scale=0.02).cuda(),
                kernel="triton", dtype="bfloat16", budget=budget)
    x = torch.randn(20000, 128, device="cuda") * 0.1
    expected = model.encode(x, n_candidates=32)  # warm-up: the kernel compiles, the caches fill
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    codes = model.encode(x, n_candidates=32)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - held <= 2 * budget + codes.numel() * 8
    assert torch.equal(codes, expected)
    many = torch.randint(0, 256, (100000, 8), device="cuda", dtype=torch.uint8)
    model.decode(many)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    decoded = model.decode(many)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - held <= 2 * budget + decoded.numel() * 4


@cuda_only
@pytest.mark.parametrize("description", ["IVF16,RQMoE4x8_N2L2H32", "IVF16,RQMoE4x8_N2L2H32_centroid"])
def test_small_gpu_searches_replay_a_recorded_graph_with_the_eager_results(sift, description):
    """Up to 64 queries on a GPU replay one recorded CUDA graph a shape (index.SEARCH_GRAPH_MAX_QUERIES):
    the results are the eager search's; an add records the graph again, and the new vectors are found."""
    cpu = faiss_rqmoe.index_factory(128, description, device="cpu", **TRAIN)
    cpu.train(sift.xt[:3000], sift.xval[:300])
    cpu.add(sift.xb[:3000])
    graphed = faiss_rqmoe.clone_index(cpu).to("cuda")
    eager = faiss_rqmoe.clone_index(cpu).to("cuda").set_execution(cuda_graphs=False)
    params = {"nprobe": 4, "nshort": 50}
    for round_ in range(2):
        for n in (1, 3, 64):
            D, I = graphed.search(sift.xq[:n], 10, params)
            D_eager, I_eager = eager.search(sift.xq[:n], 10, params)
            assert_same_up_to_ties(D, I, D_eager, I_eager, rtol=1e-5, atol=1e-2)
        assert len(graphed._search_graphs._graphs) == 3 and not graphed._search_graphs._failed
        if round_ == 0:
            for index in (graphed, eager):
                index.add(sift.xb[3000:3500])
    # the added vectors as queries: a graph still reading the store before the add could not return them
    D, I = graphed.search(sift.xb[3000:3064], 10, {"nprobe": 16, "nshort": 50})
    D_eager, I_eager = eager.search(sift.xb[3000:3064], 10, {"nprobe": 16, "nshort": 50})
    assert_same_up_to_ties(D, I, D_eager, I_eager, rtol=1e-5, atol=1e-2)
    assert (I >= 3000).any()
