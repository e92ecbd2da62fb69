import numpy as np
import pytest
import torch

from faiss_rqmoe import RQMoE, RQMoEConfig, train_rqmoe
from faiss_rqmoe.engine import Engine, Execution
from faiss_rqmoe.train import TrainConfig, normalized_residual_loss

from conftest import clustered

TINY = dict(n_experts=2, n_layers=1, hidden=32)


@pytest.mark.parametrize("condition", ["instruction", "reconstruction", "none"])
def test_each_mode_lowers_validation_mse_on_real_sift(sift, condition):
    model = RQMoE(RQMoEConfig(128, 4, 6, condition=condition, **TINY))
    # validation encodes with training's candidates: 16, as the index encodes on a CPU, so that the
    # restored weights' exact encoding below lands near the validation's figure
    history = train_rqmoe(model, sift.xt[:4000], sift.xval[:500], max_epochs=5, batch_size=256,
                          train_encode_candidates=16, device="cpu", progress=False)
    # seconds of CPU training on 4 000 vectors: a small but real gain over the faiss RQ start
    assert history.best_val_mse < history.init_val_mse * 0.998
    # the restored weights are the best ones
    codes = model.encode(sift.xval[:500])
    mse = ((model.decode(codes).numpy() - sift.xval[:500]) ** 2).sum(1).mean()
    assert mse == pytest.approx(history.best_val_mse, rel=1e-3)


def test_training_is_deterministic_for_a_seed():
    x = clustered(3000, d=16)
    states = []
    for _ in range(2):
        torch.manual_seed(123)  # model init is the caller's; training's own randomness is seeded
        model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
        history = train_rqmoe(model, x, max_epochs=2, batch_size=128, device="cpu", seed=7, progress=False)
        states.append((model.state_dict(), history.val_mse))
    assert states[0][1] == states[1][1]
    for key, value in states[0][0].items():
        assert torch.equal(value, states[1][0][key]), key


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, device):
    """On CUDA the steps replay a CUDA graph, with Adam's state and lr on the device: the resumed run
    loads them into its own capturable optimiser (and records its graph again)."""
    x = clustered(3000, d=16)
    rel, atol = (1e-6, 1e-6) if device == "cpu" else (1e-3, 1e-4)
    # the plateau schedule: this test interrupts a run by a shorter max_epochs, over which a cosine would anneal
    options = dict(batch_size=128, device=device, progress=False, lr_patience=1, stop_patience=10,
                   lr=1e-3, lr_schedule="plateau", warmup_fraction=0,
                   train_encode_candidates=8)  # fewer than K = 16: exact encoding never records

    def fresh():
        torch.manual_seed(5)
        return RQMoE(RQMoEConfig(16, 3, 4, **TINY))

    full = fresh()
    full_history = train_rqmoe(full, x, max_epochs=4, **options)
    resumed = fresh()
    ckpt = tmp_path / "train.ckpt"
    train_rqmoe(resumed, x, max_epochs=2, checkpoint_path=ckpt, **options)
    again = fresh()
    history = train_rqmoe(again, x, max_epochs=4, checkpoint_path=ckpt, **options)
    assert history.epoch == [1, 2, 3, 4]
    assert history.val_mse == pytest.approx(full_history.val_mse, rel=rel)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=10 * rel, atol=atol)


def test_time_budget_stops_training():
    x = clustered(3000, d=16)
    model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
    history = train_rqmoe(model, x, max_epochs=1000, time_budget_s=0.5, batch_size=64, device="cpu",
                          progress=False)
    assert history.stop_reason == "time budget"
    assert len(history.epoch) < 1000


def test_loss_matches_hand_computation():
    xs = torch.tensor([[2.0, 0.0]])
    steps = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    # r1 = (2,0): |r1|²=4; r2 = (1,0): 1; r3 = (0.5,0): 0.25
    expected = np.log(1 + 1 / 4) + np.log(1 + 0.25 / 1)
    assert float(normalized_residual_loss(xs, steps, eps=0.0)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("xt, error, message", [
    (np.zeros((100, 15), np.float32), ValueError, "15 columns, expected d=16"),
    (np.zeros((100, 16), bool), TypeError, "real numeric"),
    (np.full((100, 16), np.nan, np.float32), ValueError, "NaN"),
    (np.zeros((0, 16), np.float32), ValueError, "empty"),
])
def test_train_rejects_bad_input(xt, error, message):
    model = RQMoE(RQMoEConfig(16, 2, 2, **TINY))
    with pytest.raises(error, match=message):
        train_rqmoe(model, xt, np.zeros((10, 16), np.float32), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_gpu_returns_model_to_its_device():
    x = clustered(2000, d=16)
    model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
    history = train_rqmoe(model, x, max_epochs=2, device="cuda", progress=False)
    assert model.device.type == "cpu"
    assert history.best_val_mse <= history.init_val_mse


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel, dtype", [("torch", "float32"), ("triton", "bfloat16")])
def test_graphed_training_steps_equal_the_eager_steps(kernel, dtype):
    """Steps replayed from a CUDA graph compute what the eager steps compute (the same losses and weights,
    across an lr change), decline a batch of another size, and leave no stale derived weights behind:
    after replays, the model encodes and decodes as a fresh copy of it does (no caches)."""
    import copy

    from faiss_rqmoe.train import _set_lr, make_optimizer, train_step
    from faiss_rqmoe.train_graph import WARMUP_STEPS, GraphedTrainStep

    torch.manual_seed(0)
    base = RQMoE(RQMoEConfig(16, 4, 4, n_experts=2, n_layers=2, hidden=32)).cuda()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    xs = torch.randn(8 * 64, 16, device="cuda")
    probe = xs[:200]

    execution = Execution(kernel=kernel, dtype=dtype)

    def check_no_stale_caches(engine):
        with torch.no_grad():
            fresh = Engine(copy.deepcopy(engine.model), execution)
            assert torch.equal(engine.encode_scaled(probe, 4), fresh.encode_scaled(probe, 4))
            codes = fresh.encode_scaled(probe, 4)
        torch.testing.assert_close(engine.decode(codes), fresh.decode(codes), rtol=0, atol=0)

    runs = []
    for graphed in (False, True):
        model = copy.deepcopy(base).train()
        engine = Engine(model, execution)
        optimizer = make_optimizer(model, TrainConfig(lr=1e-2), capturable=True)

        def eager(x, ctx, engine=engine, optimizer=optimizer):
            return train_step(engine, engine.model, optimizer, x, ctx, 4)

        runner = GraphedTrainStep(model, engine, optimizer, eager, 64) if graphed else None
        losses = []
        for i in range(8):
            if i == 5:
                _set_lr(optimizer, 1e-3)
                check_no_stale_caches(engine)  # fills the eager caches between replays
            x = xs[i * 64:(i + 1) * 64]
            losses.append(float(runner(x, None) if runner is not None else eager(x, None)))
        if graphed:
            assert runner(xs[:32], None) is None
            assert runner.replays == 8 - WARMUP_STEPS and not runner.failed
        check_no_stale_caches(engine)
        runs.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (eager_losses, eager_state), (graph_losses, graph_state) = runs
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for key, value in eager_state.items():
        torch.testing.assert_close(graph_state[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_loop_replays_its_steps_and_learns_as_the_eager_loop(caplog):
    """The loop replays its full batches from a CUDA graph (the last, shorter batch of an epoch runs
    eagerly) and learns what the eager loop learns, within float tolerance."""
    import logging
    import re

    x = clustered(3000, d=16)
    histories = []
    for graphs in (False, True):
        torch.manual_seed(5)
        model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="faiss_rqmoe.train"):
            histories.append(train_rqmoe(model, x, max_epochs=3, batch_size=128, device="cuda", progress=False,
                                         cuda_graphs=graphs, stop_patience=10, train_encode_candidates=8))
        replayed = re.search(r"(\d+) training steps replayed from a CUDA graph", caplog.text)
        assert (replayed is not None) == graphs
    assert int(replayed.group(1)) > 0 and "could not be recorded" not in caplog.text
    assert histories[1].val_mse == pytest.approx(histories[0].val_mse, rel=1e-2)
    assert histories[1].best_val_mse < histories[1].init_val_mse


def test_graphable_follows_the_execution_the_batches_are_encoded_with():
    """Steps are recorded only where nothing in them waits on the device. For top-1 routing that depends on
    the execution of the batch encoding (the fused kernel routes on the device, the torch path counts rows
    on the host), not on the grad mode training runs in."""
    from faiss_rqmoe.train_graph import graphable

    cuda = torch.device("cuda")  # only the device type is read: this runs without a GPU
    top1 = RQMoE(RQMoEConfig(16, 3, 8, n_experts=2, n_layers=1, hidden=32, routing="top1"))
    kernel, torch_path = Execution(kernel="triton", dtype="bfloat16"), Execution(kernel="torch")
    assert graphable(Engine(top1, kernel), cuda, 16, 1)
    assert not graphable(Engine(top1, torch_path), cuda, 16, 1)
    dense = Engine(RQMoE(RQMoEConfig(16, 3, 8, n_experts=2, n_layers=1, hidden=32)), torch_path)
    assert graphable(dense, cuda, 16, 1)
    assert not graphable(dense, cuda, None, 1)  # exact encoding: torch.unique waits on the device
    assert not graphable(dense, cuda, 256, 1)  # as many candidates as codewords is exact encoding too
    assert not graphable(dense, cuda, 16, 2)  # data parallel
    assert not graphable(dense, torch.device("cpu"), 16, 1)
    top2 = RQMoE(RQMoEConfig(16, 3, 8, n_experts=4, n_layers=1, hidden=32, routing="top2"))
    assert not graphable(Engine(top2, torch_path), cuda, 16, 1)


def test_training_encodes_its_batches_in_bfloat16_on_cuda_only():
    own, cuda = Execution(kernel="triton", dtype="float32"), torch.device("cuda")
    assert TrainConfig().resolved_encode_execution(own, cuda) == Execution(kernel="triton", dtype="bfloat16")
    assert TrainConfig().resolved_encode_execution(own, torch.device("cpu")) == own
    assert TrainConfig(encode_precision="model").resolved_encode_execution(own, cuda) == own
    assert TrainConfig(encode_precision="tfloat32").resolved_encode_execution(own, cuda).dtype == "tfloat32"
    torch_path = Execution(kernel="torch")
    assert TrainConfig().resolved_encode_execution(torch_path, cuda) == torch_path  # unmeasured: left alone
    with pytest.raises(ValueError, match="encode_precision must be one of"):
        TrainConfig(encode_precision="float16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_gpu_encodes_batches_in_bfloat16_and_validates_as_the_codec_runs(monkeypatch):
    seen, encode = [], Engine.encode_scaled
    monkeypatch.setattr(Engine, "encode_scaled",
                        lambda engine, *args, **kw: seen.append((engine.model.training,
                                                                 engine.backend(torch.device("cuda")).precision))
                        or encode(engine, *args, **kw))
    model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
    exact = Execution(kernel="torch", dtype="float32")
    train_rqmoe(model, clustered(2000, d=16), max_epochs=2, device="cuda", progress=False, execution=exact)
    assert {dtype for training, dtype in seen if training} == {"float32"}  # the torch path: left as it is
    seen.clear()
    train_rqmoe(model, clustered(2000, d=16), max_epochs=2, device="cuda", progress=False)
    assert {dtype for training, dtype in seen if training} == {"bfloat16"}
    assert {dtype for training, dtype in seen if not training} == {Engine(model).backend(torch.device("cuda")).precision}


def test_plateau_counts_trained_epochs_only():
    """An lr so large that every epoch is worse than the RQ start: the first trained epoch sets the
    plateau reference, so the lr is cut only after later epochs fail to beat it, never after epoch 1."""
    x = clustered(2000, d=16)
    model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
    history = train_rqmoe(model, x, max_epochs=4, batch_size=128, lr=0.5, lr_schedule="plateau",
                          warmup_fraction=0, device="cpu", progress=False, lr_patience=1, stop_patience=10)
    assert history.val_mse[0] > history.init_val_mse  # the premise: epoch 1 is worse than the start
    assert history.lr[1] == 0.5  # not cut for being worse than the initialisation
    for epoch in range(1, 3):  # from then on: cut exactly when an epoch beats no earlier trained epoch
        beaten = history.val_mse[epoch] < min(history.val_mse[:epoch]) * (1 - 1e-4)
        assert history.lr[epoch + 1] == (history.lr[epoch] if beaten else history.lr[epoch] / 10)
    assert history.best_epoch == 0  # the initial weights, still the best, are the ones restored


def test_progress_bar_follows_the_time_budget_and_ends_full(monkeypatch):
    import tqdm.auto

    bars = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    x = clustered(3000, d=16)
    model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
    history = train_rqmoe(model, x, max_epochs=1000, time_budget_s=0.5, batch_size=64, device="cpu",
                          progress=True)
    assert history.stop_reason == "time budget"
    training = [bar for bar in bars if bar.desc.startswith("train")]
    assert len(training) == 1
    bar = training[0]
    # the bar counts seconds of the budget (a total that does not move with the epochs it fits), and it
    # ends full: a handful of epochs of the 1000 allowed ran, and it says 100 %, not 0.5 %
    assert bar.unit == "s" and 0.5 <= bar.n < 0.5 + 5 and bar.total == bar.n
    assert 1 <= len(history.epoch) < 1000


def test_cosine_schedule_anneals_the_lr_to_zero_over_max_epochs():
    x = clustered(3000, d=16)
    model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
    history = train_rqmoe(model, x, max_epochs=4, batch_size=270, lr=2e-3, lr_schedule="cosine",
                          warmup_fraction=0, stop_patience=10, device="cpu", progress=False)
    # the lr of each epoch's last batch: 2700 vectors = 10 batches, so progress (e - 1 + 0.9) / 4
    expected = [1e-3 * (1 + np.cos(np.pi * (e - 0.1) / 4)) for e in (1, 2, 3, 4)]
    np.testing.assert_allclose(history.lr, expected, rtol=1e-9)
    assert history.best_val_mse < history.init_val_mse
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        train_rqmoe(model, x, max_epochs=1, lr_schedule="linear", progress=False)


def test_plateau_schedule_warms_up_from_zero():
    x = clustered(3000, d=16)
    model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
    history = train_rqmoe(model, x, max_epochs=4, batch_size=270, lr=2e-3, lr_schedule="plateau",
                          warmup_fraction=0.5, stop_patience=10, lr_patience=10, device="cpu", progress=False)
    # the lr of each epoch's last batch: progress (e - 1 + 0.9) / 4, linear up to half the length, then flat
    expected = [2e-3 * min(1.0, (e - 0.1) / 4 / 0.5) for e in (1, 2, 3, 4)]
    np.testing.assert_allclose(history.lr, expected, rtol=1e-9)


def test_codebook_lr_scale_zero_freezes_the_codebooks():
    x = clustered(2000, d=16)
    model = RQMoE(RQMoEConfig(16, 3, 4, **TINY))
    train_rqmoe(model, x, max_epochs=1, device="cpu", progress=False)  # the RQ start, then some training
    codebooks = model.codebooks.detach().clone()
    w2 = model.expert_w2.detach().clone()
    train_rqmoe(model, x, max_epochs=1, batch_size=128, codebook_lr_scale=0, device="cpu", progress=False)
    assert torch.equal(model.codebooks, codebooks)
    assert not torch.equal(model.expert_w2, w2)


def test_auto_schedule_follows_the_device():
    """CPU: annealed over the budget after a warm-up, codebooks at 3x the lr, 2 candidates; GPU: unchanged."""
    config = TrainConfig()
    cpu, gpu = config.resolved_schedule(torch.device("cpu")), config.resolved_schedule(torch.device("cuda"))
    fields = lambda c: (c.lr, c.lr_schedule, c.warmup_fraction, c.codebook_lr_scale)  # noqa: E731
    assert fields(cpu) == (1e-3, "cosine", 0.1, 3.0)
    assert fields(gpu) == (1e-3, "plateau", 0.0, 1.0)
    assert (config.resolved_encode_candidates(torch.device("cpu")),
            config.resolved_encode_candidates(torch.device("cuda"))) == (2, 32)
    # without a budget the length is max_epochs (1000 by default): too long to anneal over
    unbudgeted = TrainConfig(time_budget_s=None)
    assert fields(unbudgeted.resolved_schedule(torch.device("cpu"))) == fields(gpu)
    assert unbudgeted.resolved_encode_candidates(torch.device("cpu")) == 16
    explicit = TrainConfig(lr_schedule="plateau", warmup_fraction=0.2, codebook_lr_scale=1)
    assert fields(explicit.resolved_schedule(torch.device("cpu"))) == (1e-3, "plateau", 0.2, 1.0)
    for bad in ({"lr": None}, {"lr": 0}, {"warmup_fraction": 1}, {"lr_schedule": "linear"},
                {"codebook_lr_scale": None}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
