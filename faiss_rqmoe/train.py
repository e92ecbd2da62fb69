"""Training RQ-MoE: normalised residual loss, Adam, plateau schedule,
best-validation weights, resumable checkpoints (DESIGN.md §1)."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .io import load_arrays, save_arrays
from .model import RQMoE, RQMoEConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "faiss_rqmoe.checkpoint/1"
LR_SCHEDULES = ("plateau", "cosine")


@dataclasses.dataclass
class TrainHistory:
    """What happened during training, one entry an epoch (time_s is cumulative)."""

    epoch: List[int] = dataclasses.field(default_factory=list)
    train_loss: List[float] = dataclasses.field(default_factory=list)
    val_mse: List[float] = dataclasses.field(default_factory=list)
    lr: List[float] = dataclasses.field(default_factory=list)
    time_s: List[float] = dataclasses.field(default_factory=list)
    init_val_mse: float = math.nan
    best_val_mse: float = math.inf
    best_epoch: int = 0
    stop_reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(device=None) -> torch.device:
    """``None`` -> cuda when available, else cpu; strings and devices pass through."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    return device


def normalized_residual_loss(xs: torch.Tensor, step_codewords: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Σ_m Σ_batch log(1 + ||r_{m+1}||² / (stopgrad(||r_m||²) + eps)).

    xs: (b, d) scaled vectors; step_codewords: (b, M, d). Returns a scalar.
    """
    partial = torch.cumsum(step_codewords, dim=1)  # (b, M, d)
    residuals = xs.unsqueeze(1) - partial  # r_2 .. r_{M+1}
    sq_after = (residuals * residuals).sum(-1)  # (b, M)
    sq_before = torch.cat([(xs * xs).sum(-1, keepdim=True), sq_after[:, :-1]], dim=1).detach()
    return torch.log1p(sq_after / (sq_before + eps)).sum()


@torch.no_grad()
def reconstruction_mse(model: RQMoE, xs: torch.Tensor, n_candidates: Optional[int] = None,
                       batch_size: int = 8192, ctx: Optional[torch.Tensor] = None) -> float:
    """Mean squared reconstruction error of scaled vectors xs (n, d), in raw units.

    ctx: (n, ctx_dim) normalised contexts (``model.normalize_ctx``), for a model that takes them.
    """
    total = 0.0
    for i0 in range(0, xs.shape[0], batch_size):
        chunk = xs[i0:i0 + batch_size]
        ctx_chunk = None if ctx is None else ctx[i0:i0 + batch_size]
        codes = model.encode_scaled(chunk, n_candidates, ctx=ctx_chunk)
        err = chunk - model.decode_steps(codes, ctx_chunk).sum(1)
        total += float((err * err).sum(dtype=torch.float64))
    return total / xs.shape[0] * float(model.scale) ** 2


def init_from_data(model: RQMoE, xt: np.ndarray, max_train: int = 100_000, seed: int = 0) -> None:
    """Train a faiss ResidualQuantizer on (a sample of) xt and initialise the model from it.

    xt: (n, d) float32. The scale is max |xt|.
    """
    import faiss

    c = model.config
    if xt.shape[0] > max_train:
        rows = np.sort(np.random.default_rng(seed).choice(xt.shape[0], max_train, replace=False))
        xt = xt[rows]
    logger.info("training faiss ResidualQuantizer d=%d M=%d nbits=%d on %d vectors", c.d, c.M, c.nbits, len(xt))
    rq = faiss.ResidualQuantizer(c.d, c.M, c.nbits)
    rq.max_beam_size = 1
    rq.train(np.ascontiguousarray(xt, dtype=np.float32))
    model.init_from_rq(rq, scale=float(np.abs(xt).max()))


def _as_float32_numpy(x, name: str, d: int, n: Optional[int] = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be floating point (float32), got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must have shape (n, {d}), got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows (one a vector), got {x.shape[0]}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _save_checkpoint(path: Path, model: RQMoE, optimizer, best_state: dict, generator: torch.Generator,
                     history: TrainHistory, state: dict) -> None:
    arrays = {f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    arrays.update({f"best.{k}": v.numpy() for k, v in best_state.items()})
    opt_state = optimizer.state_dict()
    for index, param_state in opt_state["state"].items():
        for key, value in param_state.items():
            arrays[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().numpy()
    arrays["rng"] = generator.get_state().numpy()
    meta = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "history": history.to_dict(),
            "state": state, "param_groups": opt_state["param_groups"]}
    save_arrays(path, arrays, meta)


def _load_checkpoint(path: Path, model: RQMoE, optimizer, generator: torch.Generator):
    arrays, meta = load_arrays(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint (format {meta.get('format')!r})")
    if RQMoEConfig.from_dict(meta["config"]) != model.config:
        raise ValueError(f"checkpoint {path} was written for config {meta['config']}, "
                         f"model has {model.config.to_dict()}")
    device = model.device
    model.load_state_dict({k[6:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")})
    best_state = {k[5:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("best.")}
    opt_state = {"state": {}, "param_groups": meta["param_groups"]}
    for name, value in arrays.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            tensor = torch.from_numpy(value)
            opt_state["state"].setdefault(int(index), {})[key] = tensor if key == "step" else tensor.to(device)
    optimizer.load_state_dict(opt_state)
    generator.set_state(torch.from_numpy(arrays["rng"]))
    history = TrainHistory(**meta["history"])
    return best_state, history, meta["state"]


def train_rqmoe(model: RQMoE, xt, xval=None, *, max_epochs: int = 20, time_budget_s: Optional[float] = None,
                batch_size: int = 1024, lr: float = 1e-3, device=None, seed: int = 0, progress: bool = True,
                checkpoint_path=None, epoch_size: Optional[int] = None, lr_patience: int = 2,
                stop_patience: int = 5, encode_candidates: Optional[int] = None,
                rq_train_max: int = 100_000, ctx=None, ctx_val=None,
                lr_schedule: str = "plateau") -> TrainHistory:
    """Train an RQ-MoE model in place and return its history.

    xt: (n, d) float32 training vectors (raw); xval: (nv, d) float32 for the
    schedule and model selection, default: the last min(10 000, n // 10)
    rows of xt are held out. An uninitialised model is first initialised
    from a faiss ResidualQuantizer trained on xt (so it starts as RQ).
    Each epoch draws ``epoch_size`` vectors (default all) in a seeded order,
    encodes each batch with the current model (no grad) and takes an Adam
    step on the normalised residual loss. ``lr_schedule`` "plateau": lr ÷10
    after ``lr_patience`` epochs without validation gain over the best trained
    epoch (the RQ initialisation does not count); "cosine": lr follows a half
    cosine from ``lr`` to 0 over the training length (the time budget, or
    ``max_epochs`` if that comes first), batch by batch. Either stops after
    ``stop_patience`` epochs without gain, ``max_epochs`` or
    ``time_budget_s``. The best-validation weights are restored at the end;
    the model goes back to the device it came on.
    ``checkpoint_path``: written after every epoch; an existing checkpoint is
    resumed from. Deterministic on CPU for a fixed seed.
    ctx, ctx_val: (n, ctx_dim) / (nv, ctx_dim) float32 raw contexts of xt
    and xval (e.g. the IVF centroid of each vector), for a model with
    ``config.ctx_dim > 0`` and only for one.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, RQMoE):
        raise TypeError(f"model must be an RQMoE, got {type(model).__name__}")
    d, ctx_dim = model.config.d, model.config.ctx_dim
    xt = _as_float32_numpy(xt, "xt", d)
    if (ctx is None) != (ctx_dim == 0) or (ctx_val is not None and (xval is None or ctx_dim == 0)):
        raise ValueError(f"the model has ctx_dim={ctx_dim}: pass ctx (and ctx_val with xval) exactly when "
                         "ctx_dim > 0")
    if ctx is not None:
        ctx = _as_float32_numpy(ctx, "ctx", ctx_dim, xt.shape[0])
    if xval is None:
        n_val = min(10_000, xt.shape[0] // 10)
        if n_val == 0:
            raise ValueError(f"xt has {xt.shape[0]} vectors: too few to hold out validation; pass xval")
        xt, xval = xt[:-n_val], xt[-n_val:]
        if ctx is not None:
            ctx, ctx_val = ctx[:-n_val], ctx[-n_val:]
    xval = _as_float32_numpy(xval, "xval", d)
    if ctx is not None:
        if ctx_val is None:
            raise ValueError("xval was given without ctx_val: the model needs the contexts of xval too")
        ctx_val = _as_float32_numpy(ctx_val, "ctx_val", ctx_dim, xval.shape[0])
    for name, value in (("max_epochs", max_epochs), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    device = resolve_device(device)
    home_device = model.device

    torch.manual_seed(seed)
    if not bool(model.initialized):
        init_from_data(model, xt, max_train=rq_train_max, seed=seed)
    if ctx is not None and not model.has_context_stats():  # also for a model initialised by the caller
        model.set_context_stats(ctx)
    model.to(device)
    scale = float(model.scale)
    xt_scaled = torch.from_numpy(xt).to(device) / scale
    xval_scaled = torch.from_numpy(xval).to(device) / scale
    ctx_norm = None if ctx is None else model.normalize_ctx(torch.from_numpy(ctx).to(device))
    ctx_val_norm = None if ctx_val is None else model.normalize_ctx(torch.from_numpy(ctx_val).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None

    if checkpoint_path is not None and checkpoint_path.exists():
        best_state, history, state = _load_checkpoint(checkpoint_path, model, optimizer, generator)
        logger.info("resumed from %s at epoch %d", checkpoint_path, state["epoch"])
    else:
        model.eval()
        history = TrainHistory()
        history.init_val_mse = history.best_val_mse = reconstruction_mse(model, xval_scaled, encode_candidates,
                                                                         ctx=ctx_val_norm)
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state = {"epoch": 0, "bad_epochs": 0, "lr": lr, "elapsed_s": 0.0}

    n_train = xt_scaled.shape[0]
    per_epoch = min(int(epoch_size), n_train) if epoch_size else n_train
    n_batches = math.ceil(per_epoch / batch_size)
    start = time.perf_counter() - state["elapsed_s"]
    out_of_time = False

    def cosine_lr(epochs_done: float) -> float:
        """The cosine schedule's lr after epochs_done (fractional) epochs, at the current time."""
        progress = epochs_done / max_epochs
        if time_budget_s is not None:
            progress = max(progress, (time.perf_counter() - start) / time_budget_s)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    bar = tqdm(total=max_epochs * n_batches, initial=state["epoch"] * n_batches, disable=not progress,
               desc="train RQ-MoE", unit="batch")
    try:
        while state["epoch"] < max_epochs and not out_of_time and not history.stop_reason:
            for group in optimizer.param_groups:
                group["lr"] = state["lr"]
            order = torch.randperm(n_train, generator=generator)[:per_epoch].to(device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no host sync a batch
            for i0 in range(0, per_epoch, batch_size):
                if lr_schedule == "cosine":
                    for group in optimizer.param_groups:
                        group["lr"] = cosine_lr(state["epoch"] + i0 / per_epoch)
                rows = order[i0:i0 + batch_size]
                xs = xt_scaled[rows]
                ctx_batch = None if ctx_norm is None else ctx_norm[rows]
                with torch.no_grad():
                    codes = model.encode_scaled(xs, encode_candidates, ctx=ctx_batch)
                loss = normalized_residual_loss(xs, model.decode_steps(codes, ctx_batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                bar.update(1)
                if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                    out_of_time = True
                    break
            val_mse = reconstruction_mse(model, xval_scaled, encode_candidates, ctx=ctx_val_norm)
            state["epoch"] += 1
            elapsed = time.perf_counter() - start
            history.epoch.append(state["epoch"])
            history.train_loss.append(float(loss_sum) / per_epoch)
            history.val_mse.append(val_mse)
            history.lr.append(state["lr"] if lr_schedule == "plateau" else optimizer.param_groups[0]["lr"])
            history.time_s.append(elapsed)
            bar.set_postfix(val_mse=f"{val_mse:.4g}", lr=f"{history.lr[-1]:.0e}")
            if time_budget_s is not None and elapsed > 0:  # the budget, not max_epochs, sets the length
                expected = min(max_epochs, math.ceil(state["epoch"] * time_budget_s / elapsed))
                bar.total = max(expected, state["epoch"]) * n_batches
                bar.refresh()
            if val_mse < history.best_val_mse * (1 - 1e-4):
                history.best_val_mse, history.best_epoch = val_mse, state["epoch"]
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            # The plateau counts against the trained epochs only: the first epochs after the RQ
            # initialisation are often worse than it while still improving, and must not cut the lr.
            if val_mse < min(history.val_mse[:-1], default=math.inf) * (1 - 1e-4):
                state["bad_epochs"] = 0
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= stop_patience:
                    history.stop_reason = f"no validation gain for {stop_patience} epochs"
                elif lr_schedule == "plateau" and state["bad_epochs"] % lr_patience == 0:
                    state["lr"] /= 10
                    logger.info("epoch %d: validation plateau, lr -> %g", state["epoch"], state["lr"])
            state["elapsed_s"] = elapsed
            if checkpoint_path is not None:
                _save_checkpoint(checkpoint_path, model, optimizer, best_state, generator, history, state)
        bar.total = bar.n  # stopped early (budget, plateau): the bar ends full, not part-way
    finally:
        bar.close()
    if not history.stop_reason:
        history.stop_reason = "time budget" if out_of_time else "max_epochs"
    model.load_state_dict(best_state)
    model.to(home_device)
    model.eval()
    logger.info("training stopped (%s): best validation MSE %.6g at epoch %d (initial %.6g)",
                history.stop_reason, history.best_val_mse, history.best_epoch, history.init_val_mse)
    return history
