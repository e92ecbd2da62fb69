"""Top-k routing (RQMoEConfig.routing="top<k>"): each row runs only its k highest-gated experts.

The truth is a per-row reference written out from the formula: the gate,
then each chosen expert's residual blocks run on that row alone, weighted by
its renormalised gate weight.
"""
import numpy as np
import pytest
import torch

from faiss_rqmoe import Engine, Execution, RQMoE, RQMoEConfig

from conftest import clustered

from test_model import perturb


def reference_morph(model, s, z):
    """The morphed codewords of morphed step s for rows z (R, d), one row and one expert at a time."""
    c = model.config
    out = []
    for row in z:
        gate_hidden = torch.relu(row @ model.gate_w1[s] + model.gate_b1[s])
        gate = torch.softmax(gate_hidden @ model.gate_w2[s] + model.gate_b2[s], dim=-1)
        weights, experts = torch.topk(gate, c.top_k or c.n_experts)
        weights = weights / weights.sum()
        delta = torch.zeros_like(row)
        for weight, n in zip(weights, experts):
            y = row
            for layer in range(c.n_layers):
                hidden = torch.relu(y @ model.expert_w1[layer, s, n] + model.expert_b1[layer, s, n, 0])
                update = hidden @ model.expert_w2[layer, s, n] + model.expert_b2[layer, s, n, 0]
                delta = delta + weight * update
                y = y + update
        out.append(row + delta)
    return torch.stack(out)


def routed_model(routing, condition="instruction", seed=1, **kwargs):
    config = RQMoEConfig(16, 4, 5, n_experts=4, n_layers=2, hidden=12, condition=condition, routing=routing,
                         **kwargs)
    return perturb(RQMoE(config), scale=0.3, seed=seed)


@pytest.mark.parametrize("routing", ["top1", "top2", "dense"])
def test_routed_morph_matches_the_per_row_reference(routing):
    model = routed_model(routing)
    z = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, fast = model.morph(0, 3, z), Engine(model).morph(0, 3, z)
        expected = torch.stack([reference_morph(model, s, z[s]) for s in range(3)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


def test_routing_picks_different_experts_for_different_rows():
    """The reference test above only means something if the rows do not all go to one expert."""
    model = routed_model("top1")
    z = torch.randn(1, 200, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate_hidden = torch.relu(z[0] @ model.gate_w1[0] + model.gate_b1[0])
        choice = (gate_hidden @ model.gate_w2[0] + model.gate_b2[0]).argmax(-1)
    assert len(torch.unique(choice)) >= 2


@pytest.mark.parametrize("condition", ["instruction", "reconstruction"])
def test_routed_parallel_decode_equals_sequential_and_the_training_forward(condition):
    model = routed_model("top1", condition)
    codes = torch.randint(0, 32, (300, 4), generator=torch.Generator().manual_seed(3))
    parallel = model.decode(codes)
    torch.testing.assert_close(parallel, model.decode_sequential(codes), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Engine(model).decode(codes), parallel, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        differentiable = model(codes).sum(1)
    torch.testing.assert_close(parallel, differentiable.detach() * model.scale, rtol=1e-5, atol=1e-5)


def test_routed_encode_is_the_greedy_argmin_of_routed_decoding():
    """Encoding (morphing candidate tables) and decoding route the same way: every code is the nearest
    routed codeword to the residual, found by brute force through decode_steps."""
    model = routed_model("top1")
    c = model.config
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(4)) * 0.5
    codes = Engine(model).encode(x)
    assert torch.equal(codes, model.encode(x))
    with torch.no_grad():
        for i in range(len(x)):
            residual = x[i].clone()
            for m in range(c.M):
                candidates = codes[i:i + 1].repeat(c.K, 1)
                candidates[:, m] = torch.arange(c.K)
                steps = model.decode_steps(candidates)[:, m]
                best = ((residual - steps) ** 2).sum(1).argmin()
                assert int(best) == int(codes[i, m])
                residual = residual - steps[best]


def test_top1_training_gives_the_gate_a_gradient():
    """With one expert a row the renormalised weight is 1, yet the gate must still learn."""
    model = routed_model("top1").train()
    codes = torch.randint(0, 32, (64, 4), generator=torch.Generator().manual_seed(5))
    loss = model(codes).sum(1).pow(2).sum()
    loss.backward()
    assert model.gate_w2.grad.abs().sum() > 0
    assert model.expert_w1.grad.abs().sum() > 0


def test_top1_costs_one_expert_a_step():
    dense = RQMoEConfig(128, 8, n_experts=4, n_layers=2, hidden=256)
    top1 = RQMoEConfig(128, 8, n_experts=4, n_layers=2, hidden=256, routing="top1")
    expert = 2 * 2 * 128 * 256  # L=2 residual blocks of d->H->d
    assert dense.macs_per_vector() - top1.macs_per_vector() == 7 * 3 * expert


def test_routed_index_from_the_factory_round_trips_through_a_file(tmp_path):
    """The factory's top<k> option reaches the codec, the file keeps it, and the read index searches alike;
    a dense codec's config is written as before (no routing field)."""
    import faiss_rqmoe

    x = clustered(2000, d=16)
    index = faiss_rqmoe.index_factory(16, "IVF4,RQMoE4x5_N4L1H8_top2", max_epochs=1, batch_size=256,
                                      keep_rq_if_better=False, progress=False, device="cpu")
    assert index.config.routing == "top2"
    index.train(x[:1500], x[1500:1700])
    assert index.config.routing == "top2" and index.config.condition == "instruction"
    index.add(x)
    faiss_rqmoe.write_index(index, tmp_path / "routed.rqmoe")
    loaded = faiss_rqmoe.read_index(tmp_path / "routed.rqmoe", device="cpu")  # the file's round trip, not a device's
    assert loaded.config.routing == "top2"
    D, I = index.search(x[:50], 5)
    D2, I2 = loaded.search(x[:50], 5)
    np.testing.assert_array_equal(I, I2)
    np.testing.assert_allclose(D, D2, rtol=1e-5)
    assert "routing" not in RQMoEConfig(16, 4).to_dict()


@pytest.mark.parametrize("routing, message", [("top5", "1 <= k <= n_experts"), ("sparse", "routing"),
                                              ("top0", "1 <= k")])
def test_config_rejects_bad_routing(routing, message):
    with pytest.raises(ValueError, match=message):
        RQMoEConfig(16, 4, n_experts=4, routing=routing)


def test_top_n_is_dense():
    assert RQMoEConfig(16, 4, n_experts=4, routing="top4").routing == "dense"
    assert RQMoEConfig(16, 4, n_experts=4, routing="TOP1").top_k == 1


def test_fused_kernel_refuses_top2_routing():
    """The fused kernels run dense experts and top-1 routing (tests/test_gpu.py checks them); top-2 says so."""
    from faiss_rqmoe import kernels
    if not (kernels.available() or kernels.interpreting()):
        pytest.skip("needs CUDA or the Triton interpreter")
    # on a GPU machine the data must be on the GPU: CPU data takes the torch path whatever the kernel setting
    model = routed_model("top2").to("cuda" if kernels.available() else "cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="top-1 routing"):
        Engine(model, Execution(kernel="triton")).morph(0, 1, torch.randn(1, 8, 16).to(model.device))


def test_graph_buckets_and_model_copies():
    """CUDA graphs serve batches padded to powers of two up to MAX_ROWS; a copied graph cache starts without
    any (tests/test_gpu.py checks the replays themselves)."""
    import copy

    from faiss_rqmoe import graphs

    assert [graphs.bucket(n) for n in (1, 1024, 1025, graphs.MAX_ROWS)] == [1024, 1024, 2048, graphs.MAX_ROWS]
    assert graphs.bucket(graphs.MAX_ROWS + 1) is None
    engine = Engine(routed_model("top1"))
    engine._graphs._failed.add("something")
    assert not copy.deepcopy(engine._graphs)._failed
    with pytest.raises(ValueError, match="cuda_graphs"):
        Execution(cuda_graphs="yes")


def test_top2_set_to_the_fused_kernel_still_decodes_on_the_cpu():
    """kernel='triton' is for CUDA data; on the CPU a top-2 codec takes the torch path, as dense ones do."""
    from faiss_rqmoe import kernels

    if kernels.interpreting():
        pytest.skip("the Triton interpreter runs kernels on CPU data")
    model = routed_model("top2")
    codes = torch.randint(0, 32, (40, 4), generator=torch.Generator().manual_seed(7))
    expected = model.decode(codes)
    torch.testing.assert_close(Engine(model, Execution(kernel="triton")).decode(codes), expected)


def test_routed_morph_under_autocast_stays_close_to_float32():
    """Under autocast (bfloat16 products, as the CUDA bfloat16 path runs them) the routed experts give
    the float32 result to bfloat16 precision; k = 1 and k = 2 take different scatter steps. The gate's
    biases make its choices clear, so that bfloat16 rounding cannot flip a row to another expert."""
    for routing in ("top1", "top2"):
        model = routed_model(routing)
        with torch.no_grad():
            model.gate_b2.copy_(torch.tensor([0.0, 4.0, 8.0, 12.0]))
        z = torch.randn(3, 60, 16, generator=torch.Generator().manual_seed(8))
        with torch.inference_mode():
            reference = model.morph(0, 3, z)
            approx = Engine(model, Execution(dtype="bfloat16")).morph(0, 3, z)
        assert float((approx - reference).norm() / reference.norm()) < 0.02, routing


def test_routing_is_stored_canonically():
    assert RQMoEConfig(16, 4, n_experts=4, routing="top01").routing == "top1"
