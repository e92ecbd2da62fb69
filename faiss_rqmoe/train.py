"""Training RQ-MoE: the normalised residual loss, Adam(W), plateau or cosine schedule, best-validation
weights, resumable checkpoints, and data-parallel training under ``torch.distributed``
(docs/design.md, "Training").

``TrainConfig`` is the one home of every training option: ``train_rqmoe``,
the index, ``index_factory`` and the benchmark's flags all derive from its
fields.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch

from . import distributed
from .arrays import as_vectors
from .devices import resolve_device
from .engine import DTYPES, Engine, Execution
from .model import INSTR_INITS, RQMoE
from .progress import folded_faiss_warnings, matmul_rate, timed_stage
from .train_graph import GraphedTrainStep, graphable
from .storage import FileFormatError, arrays_to_state, load_arrays, save_arrays, state_to_arrays

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "faiss_rqmoe.checkpoint/1"
LR_SCHEDULES = ("plateau", "cosine")
OPTIMIZERS = ("adam", "adamw")
RQ_TRAIN_TYPES = ("progressive_dim", "kmeans")
RQ_AUTO_THRESHOLD = 50_000  # training vectors from which kmeans with beam 1 trains the RQ start better and faster
AUTO = "auto"

# What "auto" means where a default depends on the device: (cpu, cuda)
AUTO_TIME_BUDGET_S = (30.0, 300.0)
# On a CPU the budget buys two or three epochs of 100 000 vectors: too few validations for the plateau
# rule ever to lower the lr. Annealing over the budget after a warm-up from 0, the codebooks at 3x the
# networks' lr, and 2 candidates a step (more steps than 16 buy) turn them into a gain over the RQ start
# (docs/experiments.md, section 7). The GPU keeps its measured defaults, and a CPU without a time budget
# the earlier ones (plateau, 16 candidates): its length is then max_epochs, by default far too many epochs
# to warm up and anneal over.
AUTO_ENCODE_CANDIDATES = (2, 32)
UNBUDGETED_CPU_ENCODE_CANDIDATES = 16
AUTO_LR_SCHEDULE = ("cosine", "plateau")
AUTO_WARMUP_FRACTION = (0.1, 0.0)
AUTO_CODEBOOK_LR_SCALE = (3.0, 1.0)
ENCODE_PRECISIONS = (AUTO, "model") + tuple(d for d in DTYPES if d != AUTO)
# the TrainConfig fields that take one of a few words (checked in TrainConfig, and the choices of their flags)
TRAIN_OPTION_CHOICES = {"lr_schedule": LR_SCHEDULES + (AUTO,), "optimizer": OPTIMIZERS,
                        "rq_train_type": RQ_TRAIN_TYPES + (AUTO,), "encode_precision": ENCODE_PRECISIONS,
                        "instr_init": INSTR_INITS}


def _as_optional(value, kind, name: str, minimum=None, allow_auto: bool = False):
    """Normalise a numeric option (numpy scalars included) to a Python value; ValueError otherwise."""
    if value is None or (allow_auto and value == AUTO):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"TrainConfig.{name} must be a number or None"
                         f"{' or ' + repr(AUTO) if allow_auto else ''}, got {value!r}")
    if kind is int:
        if int(value) != value:
            raise ValueError(f"TrainConfig.{name} must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"TrainConfig.{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"TrainConfig.{name} must be >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every option of codec training (and of the index's training stage).

    Length: at most ``max_epochs`` epochs of ``epoch_size`` vectors (None:
    all) and ``time_budget_s`` seconds ("auto": 30 s on a CPU, 300 s on a
    GPU; None: no limit); stops after ``stop_patience`` validations without
    gain. Optimiser: ``optimizer`` adam | adamw, ``lr``, ``weight_decay``,
    ``lr_schedule`` plateau (lr / 10 after ``lr_patience`` validations
    without gain) | cosine (half cosine to 0 over the training length), both
    after a linear warm-up from 0 over ``warmup_fraction`` of the length;
    ``instr_lr_scale`` and ``codebook_lr_scale`` multiply the lr of the
    instruction codewords and of the base codebooks; "auto" for the
    schedule, the warm-up and the codebooks' scale: cosine, 0.1 and 3 on a
    CPU with a time budget, else plateau, 0 and 1 (``resolved_schedule``;
    docs/experiments.md, section 7). ``instr_init``: how RQ-MoE's
    instruction codewords start, "random" or "codebooks" (as the RQ start's
    codewords; equal within the runs' spread, section 9). Regularisation:
    ``dropout`` on the experts' hidden units, ``balance_loss`` weight of the
    gate load-balancing loss (Σ_n mean(a_n)² a step). Encoding while
    training: ``train_encode_candidates`` (None: exact; "auto": 2 on a CPU
    with a time budget, 16 without, 32 on a GPU) and ``encode_precision``, the matmul inputs of that encoding on
    CUDA ("auto": bfloat16 unless the codec's kernel is "torch": it learns
    as much a sample as float32 in a faster loop, docs/experiments.md,
    section 1e; "model": the codec's own ``Execution``; or a dtype);
    validation runs the codec's execution. Start: faiss RQ trained on at most ``rq_train_max`` vectors with
    beam ``rq_beam`` and ``rq_train_type`` progressive_dim (faiss's default)
    | kmeans; "auto" for both is faiss's default (progressive_dim, beam 5)
    below 50 000 training vectors and kmeans with beam 1 from there, which
    trains better and faster there (docs/experiments.md). The index also reads ``lut_train_max``: vectors its lookup
    tables are fitted on, and ``keep_rq_if_better``: keep the faiss RQ start
    when it encodes the validation vectors better than the learned codec.
    ``checkpoint_path``: written after every epoch and
    resumed from. ``device``: None picks cuda when available. ``cuda_graphs``:
    on one GPU, record a whole training step (encoding, forward, backward,
    Adam) as a CUDA graph and replay it for every full batch (train_graph.py):
    the eager step's operations, with Adam's lr and step count kept on the
    device in float32.
    """

    max_epochs: int = 1000
    time_budget_s: Union[float, str, None] = AUTO
    epoch_size: Optional[int] = None
    batch_size: int = 1024
    lr: float = 1e-3
    lr_schedule: str = AUTO
    lr_patience: int = 3
    stop_patience: int = 8
    warmup_fraction: Union[float, str] = AUTO
    optimizer: str = "adam"
    weight_decay: float = 0.0
    instr_lr_scale: float = 1.0
    instr_init: str = "random"
    codebook_lr_scale: Union[float, str] = AUTO
    dropout: float = 0.0
    balance_loss: float = 0.0
    train_encode_candidates: Union[int, str, None] = AUTO
    encode_precision: str = AUTO
    rq_train_max: int = 100_000
    rq_beam: Union[int, str] = AUTO
    rq_train_type: str = AUTO
    lut_train_max: int = 200_000
    keep_rq_if_better: bool = True
    seed: int = 0
    device: Optional[str] = None
    progress: bool = True
    checkpoint_path: Optional[str] = None
    cuda_graphs: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("max_epochs", "batch_size", "lr_patience", "stop_patience", "rq_train_max", "lut_train_max"):
            set_(name, _as_optional(getattr(self, name), int, name, minimum=1))
            if getattr(self, name) is None:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got None")
        set_("epoch_size", _as_optional(self.epoch_size, int, "epoch_size", minimum=1))
        set_("rq_beam", _as_optional(self.rq_beam, int, "rq_beam", minimum=1, allow_auto=True))
        if self.rq_beam is None:
            raise ValueError("TrainConfig.rq_beam must be an integer >= 1 or 'auto', got None")
        set_("seed", _as_optional(self.seed, int, "seed", minimum=0))
        set_("train_encode_candidates", _as_optional(self.train_encode_candidates, int, "train_encode_candidates",
                                                     minimum=1, allow_auto=True))
        set_("time_budget_s", _as_optional(self.time_budget_s, float, "time_budget_s", minimum=0,
                                           allow_auto=True))
        for name in ("lr", "weight_decay", "instr_lr_scale", "codebook_lr_scale", "dropout", "balance_loss",
                     "warmup_fraction"):
            set_(name, _as_optional(getattr(self, name), float, name, minimum=0,
                                    allow_auto=name in ("codebook_lr_scale", "warmup_fraction")))
            if getattr(self, name) is None:
                raise ValueError(f"TrainConfig.{name} must be a number, got None")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.dropout >= 1 or (self.warmup_fraction != AUTO and self.warmup_fraction >= 1):
            raise ValueError(f"TrainConfig.dropout and warmup_fraction must be < 1, got {self.dropout}, "
                             f"{self.warmup_fraction}")
        for name, allowed in TRAIN_OPTION_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.device is not None:
            set_("device", str(resolve_device(self.device)) if not isinstance(self.device, str)
                 else self.device)
        if self.checkpoint_path is not None:
            if not isinstance(self.checkpoint_path, (str, os.PathLike)):
                raise ValueError(f"TrainConfig.checkpoint_path must be a path, got {self.checkpoint_path!r}")
            set_("checkpoint_path", os.fspath(self.checkpoint_path))
        for name in ("progress", "keep_rq_if_better", "cuda_graphs"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
            set_(name, bool(getattr(self, name)))

    @classmethod
    def field_names(cls) -> List[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict, where: str = "training option") -> "TrainConfig":
        """A TrainConfig from keyword options; unknown names raise ValueError listing the known ones."""
        unknown = sorted(set(options) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown {where}{'s' if len(unknown) > 1 else ''} {unknown}; known: "
                             f"{cls.field_names()}")
        return cls(**options)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated like the constructor)."""
        return TrainConfig.from_options({**self.to_dict(), **changes})

    def to_dict(self, non_default_only: bool = False) -> dict:
        """The fields as JSON-ready values (optionally only those that differ from the defaults)."""
        values = dataclasses.asdict(self)
        if non_default_only:
            default = TrainConfig()
            values = {k: v for k, v in values.items() if v != getattr(default, k)}
        return values

    def resolved_time_budget_s(self, device: torch.device) -> Optional[float]:
        """The time budget in seconds on ``device`` ("auto" resolved)."""
        if self.time_budget_s == AUTO:
            return AUTO_TIME_BUDGET_S[device.type == "cuda"]
        return self.time_budget_s

    def resolved_schedule(self, device: torch.device) -> "TrainConfig":
        """A copy with the "auto" lr_schedule, warmup_fraction and codebook_lr_scale resolved for
        ``device``: on a CPU with a time budget a cosine over the training length after a 10 % warm-up,
        the codebooks at 3x the lr; on a GPU, or without a budget, plateau steps, no warm-up, one lr."""
        gpu = device.type == "cuda" or self.resolved_time_budget_s(device) is None
        auto = {"lr_schedule": AUTO_LR_SCHEDULE[gpu], "warmup_fraction": AUTO_WARMUP_FRACTION[gpu],
                "codebook_lr_scale": AUTO_CODEBOOK_LR_SCALE[gpu]}
        changes = {name: value for name, value in auto.items() if getattr(self, name) == AUTO}
        return self.replace(**changes) if changes else self

    def resolved_encode_execution(self, execution: Execution, device: torch.device) -> Execution:
        """The execution training encodes its batches with, for a codec that runs ``execution``: the
        model's on a CPU, with encode_precision "model", or with "auto" for a model set to the torch path
        (bfloat16 there was not measured); else its kernel choice with the requested matmul inputs ("auto":
        bfloat16)."""
        if device.type != "cuda" or self.encode_precision == "model" or \
                (self.encode_precision == AUTO and execution.kernel == "torch"):
            return execution
        dtype = "bfloat16" if self.encode_precision == AUTO else self.encode_precision
        return dataclasses.replace(execution, dtype=dtype)

    def resolved_encode_candidates(self, device: torch.device) -> Optional[int]:
        """Training's candidate count on ``device`` ("auto" resolved; None: exact): 2 on a CPU with a time
        budget, 16 on one without, 32 on a GPU."""
        if self.train_encode_candidates == AUTO:
            if device.type != "cuda" and self.resolved_time_budget_s(device) is None:
                return UNBUDGETED_CPU_ENCODE_CANDIDATES
            return AUTO_ENCODE_CANDIDATES[device.type == "cuda"]
        return self.train_encode_candidates


# One line of help a field, for every command-line front end (the benchmark's flags derive from these)
TRAIN_OPTION_HELP = {
    "max_epochs": "at most this many epochs",
    "time_budget_s": "training seconds ('auto': 30 on a CPU, 300 on a GPU; 'none': no limit)",
    "epoch_size": "vectors an epoch (default: all training vectors)",
    "batch_size": "vectors a training batch (the global batch under torchrun)",
    "lr": "learning rate",
    "lr_schedule": "plateau: lr / 10 on a validation plateau; cosine: warm-up, then half cosine to 0; 'auto': "
                   "cosine on a CPU with a time budget, else plateau",
    "lr_patience": "validations without gain before lr / 10 (plateau schedule)",
    "stop_patience": "validations without gain before training stops",
    "warmup_fraction": "share of the training length spent raising the lr from 0 ('auto': 0.1 on a CPU with a "
                       "time budget, else 0)",
    "optimizer": "adam or adamw",
    "weight_decay": "weight decay (decoupled with adamw)",
    "instr_lr_scale": "learning-rate multiplier of the instruction codewords",
    "instr_init": "start of RQ-MoE's instruction codewords: codebooks (the RQ start's codewords, so the "
                  "instruction stream starts as the partial reconstruction) or random (small noise)",
    "codebook_lr_scale": "learning-rate multiplier of the base codebooks, the RQ start's codewords ('auto': 3 on "
                         "a CPU with a time budget, else 1)",
    "dropout": "dropout on the experts' hidden units while training",
    "balance_loss": "weight of the gate load-balancing loss (sum over experts of the mean gate weight squared)",
    "train_encode_candidates": "candidates a step when training encodes its batches ('auto': 2 on a CPU with a "
                               "time budget, 16 without, 32 on a GPU; 'none': exact)",
    "encode_precision": "matmul inputs when training encodes its batches on CUDA ('auto': bfloat16 unless the "
                        "kernel is torch; 'model': the model's execution; or float32, tfloat32, bfloat16)",
    "rq_train_max": "training vectors for the faiss RQ start",
    "rq_beam": "beam of the faiss RQ start's training ('auto': 5 below 50 000 training vectors, faiss's "
               "default, else 1, which measured better there)",
    "rq_train_type": "faiss RQ training: progressive_dim (faiss's default), kmeans (faster) or 'auto' "
                     "(progressive_dim below 50 000 vectors, else kmeans)",
    "lut_train_max": "vectors the index's lookup tables are fitted on",
    "keep_rq_if_better": "keep the faiss RQ start when it encodes the validation vectors better",
    "seed": "random seed",
    "device": "cpu | cuda | cuda:N (default: cuda if available)",
    "progress": "show progress bars",
    "checkpoint_path": "write a checkpoint after every epoch, and resume from it",
    "cuda_graphs": "on one GPU, replay each full training step from a recorded CUDA graph",
}


@dataclasses.dataclass
class TrainHistory:
    """What happened during training, one entry an epoch (time_s is cumulative)."""

    epoch: List[int] = dataclasses.field(default_factory=list)
    train_loss: List[float] = dataclasses.field(default_factory=list)
    val_mse: List[float] = dataclasses.field(default_factory=list)
    lr: List[float] = dataclasses.field(default_factory=list)
    time_s: List[float] = dataclasses.field(default_factory=list)
    samples: List[int] = dataclasses.field(default_factory=list)
    init_val_mse: float = math.nan
    best_val_mse: float = math.inf
    best_epoch: int = 0
    stop_reason: str = ""
    rq_init_s: float = 0.0
    learned_val_mse: float = math.nan  # set by the index: the learned codec with its encoding settings
    rq_val_mse: float = math.nan  # ... and its faiss RQ start; the index keeps the lower

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainHistory":
        """Inverse of ``to_dict`` (fields added since a file was written take their defaults)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


def normalized_residual_loss(xs: torch.Tensor, step_codewords: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Σ_m Σ_batch log(1 + ||r_{m+1}||² / (stopgrad(||r_m||²) + eps)).

    xs: (b, d) scaled vectors; step_codewords: (b, M, d). Returns a scalar.
    """
    partial = torch.cumsum(step_codewords, dim=1)  # (b, M, d)
    residuals = xs.unsqueeze(1) - partial  # r_2 .. r_{M+1}
    sq_after = (residuals * residuals).sum(-1)  # (b, M)
    sq_before = torch.cat([(xs * xs).sum(-1, keepdim=True), sq_after[:, :-1]], dim=1).detach()
    return torch.log1p(sq_after / (sq_before + eps)).sum()


def balance_loss(gate_usage: Optional[torch.Tensor]) -> torch.Tensor:
    """Σ_steps Σ_n mean_batch(a_n)²: smallest when the experts are used evenly. gate_usage: (S, N)."""
    return (gate_usage * gate_usage).sum() if gate_usage is not None else torch.zeros(())


@torch.no_grad()
def reconstruction_mse(engine: Engine, xs: torch.Tensor, n_candidates: Optional[int] = None,
                       batch_size: int = 8192, ctx: Optional[torch.Tensor] = None, beam_size: int = 1) -> float:
    """Mean squared reconstruction error of scaled vectors xs (n, d) through ``engine``, in raw units.

    ctx: (n, ctx_dim) normalised contexts (``model.normalize_ctx``), for a model that takes them.
    """
    model = engine.model
    total = 0.0
    was_training = model.training
    model.eval()
    for i0 in range(0, xs.shape[0], batch_size):
        chunk = xs[i0:i0 + batch_size]
        ctx_chunk = None if ctx is None else ctx[i0:i0 + batch_size]
        codes = engine.encode_scaled(chunk, n_candidates, beam_size, ctx=ctx_chunk)
        err = chunk - engine.decode_steps(codes, ctx_chunk)
        total += float((err * err).sum(dtype=torch.float64))
    model.train(was_training)
    return total / xs.shape[0] * float(model.scale) ** 2


# ------------------------------------------------------------------ the RQ start
def expected_rq_train_s(n: int, d: int, M: int, K: int, beam: int, train_type: str) -> float:
    """A forecast of faiss RQ training time on this machine, for the progress bar: per step, k-means on
    at most 256 vectors a centroid and a beam encoding of the training set, with constants fitted at
    d=128, K=256 on a machine of a known float32 multiply-add rate and scaled by this machine's rate (a
    forecast for a progress bar, not a promise)."""
    work = d * K / (128 * 256)
    kmeans_s = 6.1e-6 * min(n, 256 * K) * (12.0 if train_type == "progressive_dim" else 1.0)
    beam_s = 1.9e-6 * n * beam
    return M * work * (kmeans_s + beam_s) * 70e9 / matmul_rate() + 0.2


def train_faiss_rq(xt: np.ndarray, M: int, nbits: int, beam: int = 5, train_type: str = "progressive_dim",
                   max_train: int = 100_000, seed: int = 0, progress: bool = False):
    """A trained ``faiss.ResidualQuantizer`` on (a sample of at most max_train rows of) xt (n, d) float32.

    beam: faiss's max_beam_size while training (faiss's default is 5);
    train_type: "progressive_dim" (faiss's default) or "kmeans" (plain
    k-means a step, Train_default: several times faster); "auto" for either
    resolves by the sample size (see TrainConfig). The returned rq encodes
    with beam 5 (faiss's default) at least. Returns the rq.
    """
    import faiss

    small = min(xt.shape[0], max_train) < RQ_AUTO_THRESHOLD
    beam = (5 if small else 1) if beam == AUTO else beam
    train_type = ("progressive_dim" if small else "kmeans") if train_type == AUTO else train_type
    if xt.shape[0] > max_train:
        rows = np.sort(np.random.default_rng(seed).choice(xt.shape[0], max_train, replace=False))
        xt = xt[rows]
    d = xt.shape[1]
    rq = faiss.ResidualQuantizer(d, M, nbits)
    rq.max_beam_size = beam
    rq.train_type = {"progressive_dim": faiss.ResidualQuantizer.Train_progressive_dim,
                     "kmeans": faiss.ResidualQuantizer.Train_default}[train_type]
    expected = expected_rq_train_s(len(xt), d, M, 1 << nbits, beam, train_type)
    desc = f"faiss RQ{M}x{nbits} start ({len(xt)} vectors, beam {beam})"
    with timed_stage(desc, expected, progress), folded_faiss_warnings("training the faiss RQ start"):
        rq.train(np.ascontiguousarray(xt, dtype=np.float32))
    rq.max_beam_size = max(beam, 5)  # the encoding beam of rq.compute_codes: at least faiss's default
    return rq


def init_from_data(model: RQMoE, xt: np.ndarray, config: Optional["TrainConfig"] = None) -> float:
    """Train a faiss ResidualQuantizer on (a sample of) xt (n, d) float32 and start the model from it.

    The scale is max |xt|. Returns the seconds it took.
    """
    config = config or TrainConfig()
    c = model.config
    start = time.perf_counter()
    logger.info("training faiss ResidualQuantizer d=%d M=%d nbits=%d on up to %d vectors", c.d, c.M, c.nbits,
                config.rq_train_max)
    rq = train_faiss_rq(xt, c.M, c.nbits, config.rq_beam, config.rq_train_type, config.rq_train_max,
                        config.seed, config.progress)
    model.init_from_rq(rq, scale=float(np.abs(xt).max()) or 1.0, instr_init=config.instr_init)
    return time.perf_counter() - start


# ------------------------------------------------------------------ checkpoints
def _save_checkpoint(path: Path, model: RQMoE, optimizer, best_state: dict, generator: torch.Generator,
                     history: TrainHistory, state: dict) -> None:
    arrays = state_to_arrays(model.state_dict(), "model.")
    arrays.update(state_to_arrays(best_state, "best."))
    opt_state = optimizer.state_dict()
    for index, param_state in opt_state["state"].items():
        for key, value in param_state.items():
            arrays[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().numpy()
    arrays["rng"] = generator.get_state().numpy()
    groups = [{**group, "lr": float(group["lr"])} for group in opt_state["param_groups"]]  # a tensor when capturable
    meta = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "history": history.to_dict(),
            "state": state, "param_groups": groups}
    save_arrays(path, arrays, meta)


def _load_optimizer_state(optimizer, opt_state: dict) -> None:
    """optimizer.load_state_dict, keeping this run's own choice of capturable (and its lr tensors, which a
    recorded step reads), whichever the checkpoint's run made."""
    own = [(group["lr"], group.get("capturable", False)) for group in optimizer.param_groups]
    optimizer.load_state_dict(opt_state)
    for group, (lr, capturable) in zip(optimizer.param_groups, own):
        group["capturable"] = capturable
        if isinstance(lr, torch.Tensor):
            group["lr"] = lr.fill_(float(group["lr"]))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:  # capturable Adam keeps its step count beside the parameter, else on the host
                state["step"] = state["step"].to(device=param.device if capturable else "cpu", dtype=torch.float32)


def _load_checkpoint(path: Path, model: RQMoE, optimizer, generator: torch.Generator):
    from .config import RQMoEConfig

    arrays, meta = load_arrays(path, "a training checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path} is not a training checkpoint (format {meta.get('format')!r})")
    if RQMoEConfig.from_dict(meta["config"]) != model.config:
        raise ValueError(f"checkpoint {path} was written for config {meta['config']}, "
                         f"model has {model.config.to_dict()}")
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    model.load_state_dict(arrays_to_state(arrays, "model.", expected, str(path)))
    best_state = arrays_to_state(arrays, "best.", expected, str(path))
    opt_state = {"state": {}, "param_groups": meta["param_groups"]}
    for name, value in arrays.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            tensor = torch.from_numpy(value)
            opt_state["state"].setdefault(int(index), {})[key] = tensor if key == "step" else tensor.to(model.device)
    _load_optimizer_state(optimizer, opt_state)
    generator.set_state(torch.from_numpy(arrays["rng"]))
    return best_state, TrainHistory.from_dict(meta["history"]), meta["state"]


# ------------------------------------------------------------------ the loop
def train_step(engine: Engine, forward, optimizer, xs: torch.Tensor, ctx: Optional[torch.Tensor],
               candidates: Optional[int], balance_weight: float = 0.0, world: int = 1) -> torch.Tensor:
    """One optimiser step: encode the batch xs (b, d) scaled float32 with the current model through
    ``engine`` (no grad), then the normalised residual loss (+ the gate balance loss) through ``forward``
    (the model, or its DDP wrapper). Returns the detached loss."""
    model = engine.model
    with torch.no_grad():
        codes = engine.encode_scaled(xs, candidates, 1, ctx=ctx)
    loss = normalized_residual_loss(xs, forward(codes, ctx))
    if balance_weight > 0:
        loss = loss + balance_weight * xs.shape[0] * balance_loss(model.gate_usage)
    optimizer.zero_grad(set_to_none=True)
    (loss * world).backward()  # DDP averages over processes: * world keeps the sum over the batch
    optimizer.step()
    if model.gate_usage is not None:  # kept for reading, not for autograd: holding the graph would keep its
        model.gate_usage = model.gate_usage.detach()  # nodes alive into the next (perhaps recorded) step
    return loss.detach()


def make_optimizer(model: RQMoE, config: TrainConfig, capturable: bool = False):
    """Adam or AdamW over the model's parameters (the instruction codewords and the base codebooks each in
    their own group when their lr is scaled; "auto" resolved for the model's device). capturable:
    state and learning rate on the model's (CUDA) device, as a training step recorded into a CUDA graph
    needs; set_lr then fills the lr tensors in place."""
    config = config.resolved_schedule(model.device)
    instr = [model.instr_codebooks] if model.instr_codebooks is not None and config.instr_lr_scale != 1 else []
    base = [model.codebooks] if config.codebook_lr_scale != 1 else []
    rest = [p for p in model.parameters() if all(p is not q for q in instr + base)]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if instr:
        groups.append({"params": instr, "lr_scale": config.instr_lr_scale})
    if base:
        groups.append({"params": base, "lr_scale": config.codebook_lr_scale})
    if capturable:
        for group in groups:
            group["lr"] = torch.tensor(config.lr * group["lr_scale"], device=model.device)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, weight_decay=config.weight_decay, capturable=capturable)




def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):  # capturable: a recorded step reads this tensor
            group["lr"].fill_(value)
        else:
            group["lr"] = value


class _Schedule:
    """The learning rate as training goes: a linear warm-up from 0 over ``warmup_fraction`` of the length,
    then plateau steps or a half cosine to 0 over the rest."""

    def __init__(self, config: TrainConfig, budget_s: Optional[float]):
        self.config, self.budget_s = config, budget_s

    def progress(self, epochs_done: float, spent_s: float) -> float:
        """The share of the training length done: of max_epochs, or of the budget where that binds first.
        spent_s: seconds of the steps taken so far, so the first step's lr never depends on the clock (a
        run that max_epochs ends well within its budget stays deterministic for a seed)."""
        fraction = epochs_done / self.config.max_epochs
        if self.budget_s:
            fraction = max(fraction, spent_s / self.budget_s)
        return min(1.0, fraction)

    def lr(self, base_lr: float, epochs_done: float, spent_s: float) -> float:
        progress, warmup = self.progress(epochs_done, spent_s), self.config.warmup_fraction
        plateau = self.config.lr_schedule == "plateau"
        if progress < warmup:
            return (base_lr if plateau else self.config.lr) * progress / warmup
        if plateau:
            return base_lr
        progress = (progress - warmup) / (1 - warmup)
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _check_inputs(model: RQMoE, xt, xval, ctx, ctx_val):
    d, ctx_dim = model.config.d, model.config.ctx_dim
    xt = as_vectors(xt, d, "xt", allow_empty=False)
    if (ctx is None) != (ctx_dim == 0) or (ctx_val is not None and (xval is None or ctx_dim == 0)):
        raise ValueError(f"the model has ctx_dim={ctx_dim}: pass ctx (and ctx_val with xval) exactly when "
                         "ctx_dim > 0")
    if ctx is not None:
        ctx = as_vectors(ctx, ctx_dim, "ctx")
        if len(ctx) != len(xt):
            raise ValueError(f"ctx must have {len(xt)} rows (one a vector), got {len(ctx)}")
    if xval is None:
        n_val = min(10_000, xt.shape[0] // 10)
        if n_val == 0:
            raise ValueError(f"xt has {xt.shape[0]} vectors: too few to hold out validation; pass xval")
        xt, xval = xt[:-n_val], xt[-n_val:]
        if ctx is not None:
            ctx, ctx_val = ctx[:-n_val], ctx[-n_val:]
    xval = as_vectors(xval, d, "xval", allow_empty=False)
    if ctx is not None:
        if ctx_val is None:
            raise ValueError("xval was given without ctx_val: the model needs the contexts of xval too")
        ctx_val = as_vectors(ctx_val, ctx_dim, "ctx_val")
        if len(ctx_val) != len(xval):
            raise ValueError(f"ctx_val must have {len(xval)} rows (one a vector), got {len(ctx_val)}")
    return xt, xval, ctx, ctx_val


def train_rqmoe(model: RQMoE, xt, xval=None, config: Optional[TrainConfig] = None, *, ctx=None, ctx_val=None,
                execution: Optional[Execution] = None, **options) -> TrainHistory:
    """Train an RQ-MoE model in place and return its history.

    xt: (n, d) float32 training vectors (raw; other real dtypes are
    converted); xval: (nv, d) for the schedule and model selection, default:
    the last min(10 000, n // 10) rows of xt are held out. config: a
    ``TrainConfig``; keyword ``options`` override its fields (e.g.
    ``max_epochs=5``). An uninitialised model first starts from a faiss
    ResidualQuantizer trained on xt (so it starts as RQ). Each epoch draws
    ``epoch_size`` vectors in a seeded order, encodes each batch with the
    current model (no grad) and takes an optimiser step on the normalised
    residual loss. The plateau rule counts trained epochs only (the RQ start
    does not count). The best-validation weights are restored at the end;
    the model goes back to the device it came on. Deterministic on CPU for a
    fixed seed. ctx, ctx_val: (n, ctx_dim) / (nv, ctx_dim) float32 raw
    contexts of xt and xval (e.g. each vector's IVF centroid), exactly for a
    model with ``config.ctx_dim > 0``. execution: how validation runs the
    model (an ``Engine``'s ``Execution``, default: the defaults; the batches'
    encoding follows ``encode_precision``). Under ``torch.distributed`` (e.g.
    started by torchrun), every process holds the same data; each takes its
    share of every batch and gradients are averaged by DistributedDataParallel,
    so N processes see the same samples as one.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, RQMoE):
        raise TypeError(f"model must be an RQMoE, got {type(model).__name__}")
    config = (config or TrainConfig()).replace(**options) if options else (config or TrainConfig())
    xt, xval, ctx, ctx_val = _check_inputs(model, xt, xval, ctx, ctx_val)
    device = distributed.device_for_rank(resolve_device(config.device))
    config = config.resolved_schedule(device)
    budget_s = config.resolved_time_budget_s(device)
    candidates = config.resolved_encode_candidates(device)
    home_device = model.device
    rank, world = distributed.rank_and_world()
    show = config.progress and rank == 0

    torch.manual_seed(config.seed)
    rq_init_s = 0.0
    if not bool(model.initialized):
        if rank == 0:
            rq_init_s = init_from_data(model, xt, config.replace(progress=show))
        distributed.broadcast_module(model)
    if ctx is not None and not model.has_context_stats():  # also for a model initialised by the caller
        model.set_context_stats(ctx)
    model.to(device)
    model.dropout = config.dropout
    scale = float(model.scale)
    xt_scaled = torch.from_numpy(xt).to(device) / scale
    xval_scaled = torch.from_numpy(xval).to(device) / scale
    ctx_norm = None if ctx is None else model.normalize_ctx(torch.from_numpy(ctx).to(device))
    ctx_val_norm = None if ctx_val is None else model.normalize_ctx(torch.from_numpy(ctx_val).to(device))
    execution = execution or Execution()
    val_engine = Engine(model, execution)  # validation runs what the trained codec will run
    batch_execution = config.resolved_encode_execution(execution, device)
    # one engine where the batches are encoded as validation runs (a CPU): one set of derived tables
    batch_engine = val_engine if batch_execution == execution else Engine(model, batch_execution)
    graph_steps = config.cuda_graphs and graphable(batch_engine, device, candidates, world)
    optimizer = make_optimizer(model, config, capturable=graph_steps)
    forward = distributed.wrap(model, device)
    generator = torch.Generator().manual_seed(config.seed)
    checkpoint_path = Path(config.checkpoint_path) if config.checkpoint_path is not None else None

    if checkpoint_path is not None and checkpoint_path.exists():
        best_state, history, state = _load_checkpoint(checkpoint_path, model, optimizer, generator)
        logger.info("resumed from %s at epoch %d", checkpoint_path, state["epoch"])
    else:
        history = TrainHistory(rq_init_s=rq_init_s)
        history.init_val_mse = history.best_val_mse = reconstruction_mse(val_engine, xval_scaled, candidates,
                                                                         ctx=ctx_val_norm)
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state = {"epoch": 0, "bad_epochs": 0, "lr": config.lr, "elapsed_s": 0.0, "samples": 0}

    n_train = xt_scaled.shape[0]
    per_epoch = min(config.epoch_size, n_train) if config.epoch_size else n_train
    batch = config.batch_size
    start = time.perf_counter() - state["elapsed_s"]
    schedule = _Schedule(config, budget_s)
    spent = state["elapsed_s"]
    out_of_time = False
    logger.info("training %s on %d vectors (%s): up to %s, %d epochs of %d, batch %d, %s candidates",
                model.config.mode.display_name, n_train, device,
                f"{budget_s:.0f} s" if budget_s else "no time limit", config.max_epochs, per_epoch, batch,
                candidates or "all")
    n_batches = math.ceil(per_epoch / batch)
    if budget_s:  # the budget sets the length: a bar in seconds has a total that never moves
        bar = tqdm(total=round(budget_s, 1), initial=min(state["elapsed_s"], budget_s), disable=not show,
                   desc=f"train {model.config.mode.display_name}", unit="s",
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{postfix}]")
    else:
        bar = tqdm(total=config.max_epochs * n_batches, initial=state["epoch"] * n_batches, disable=not show,
                   desc=f"train {model.config.mode.display_name}", unit="batch")
    eager_step = lambda xs, ctx_rows: train_step(batch_engine, forward, optimizer, xs, ctx_rows, candidates,  # noqa: E731
                                                 config.balance_loss, world)
    graphed = GraphedTrainStep(model, batch_engine, optimizer, eager_step, batch) if graph_steps else None
    model.train()
    try:
        while state["epoch"] < config.max_epochs and not out_of_time and not history.stop_reason:
            _set_lr(optimizer, state["lr"])
            order = torch.randperm(n_train, generator=generator)[:per_epoch].to(device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no host sync a batch
            for i0 in range(0, per_epoch, batch):
                if config.lr_schedule == "cosine" or config.warmup_fraction > 0:
                    _set_lr(optimizer, schedule.lr(state["lr"], state["epoch"] + i0 / per_epoch, spent))
                rows = distributed.my_share(order[i0:i0 + batch])
                xs, ctx_batch = xt_scaled[rows], None if ctx_norm is None else ctx_norm[rows]
                loss = None if graphed is None else graphed(xs, ctx_batch)
                loss_sum += eager_step(xs, ctx_batch) if loss is None else loss
                state["samples"] += min(batch, per_epoch - i0)
                spent = time.perf_counter() - start  # one reading for the bar and the stop: a stop shows a full bar
                if budget_s:
                    bar.n = min(spent, budget_s)
                    bar.refresh()
                else:
                    bar.update(1)
                if budget_s is not None and distributed.any_rank(spent > budget_s):
                    out_of_time = True
                    break
            model.eval()
            val_mse = distributed.from_rank0(reconstruction_mse(val_engine, xval_scaled, candidates,
                                                                ctx=ctx_val_norm))
            model.train()
            state["epoch"] += 1
            elapsed = time.perf_counter() - start
            history.epoch.append(state["epoch"])
            history.train_loss.append(distributed.mean_over_ranks(float(loss_sum)) * world / per_epoch)
            history.val_mse.append(val_mse)
            history.lr.append(float(optimizer.param_groups[0]["lr"]))
            history.time_s.append(elapsed)
            history.samples.append(state["samples"])
            bar.set_postfix_str(f"epoch {state['epoch']}, val MSE {val_mse:.4g}, lr {history.lr[-1]:.0e}")
            if val_mse < history.best_val_mse * (1 - 1e-4):
                history.best_val_mse, history.best_epoch = val_mse, state["epoch"]
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            # The plateau counts against the trained epochs only: the first epochs after the RQ
            # initialisation are often worse than it while still improving, and must not cut the lr.
            if val_mse < min(history.val_mse[:-1], default=math.inf) * (1 - 1e-4):
                state["bad_epochs"] = 0
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] >= config.stop_patience:
                    history.stop_reason = f"no validation gain for {config.stop_patience} epochs"
                elif config.lr_schedule == "plateau" and state["bad_epochs"] % config.lr_patience == 0:
                    state["lr"] /= 10
                    logger.info("epoch %d: validation plateau, lr -> %g", state["epoch"], state["lr"])
            state["elapsed_s"] = elapsed
            if checkpoint_path is not None and rank == 0:
                _save_checkpoint(checkpoint_path, model, optimizer, best_state, generator, history, state)
        bar.total = bar.n  # stopped by the budget or early: the bar ends full
    finally:
        bar.close()
    if not history.stop_reason:
        history.stop_reason = "time budget" if out_of_time else "max_epochs"
    if graphed is not None:
        logger.info("%d training steps replayed from a CUDA graph%s", graphed.replays,
                    " (it could not be recorded: eager steps)" if graphed.failed else "")
    model.load_state_dict(best_state)
    model.to(home_device)
    model.eval()
    logger.info("training stopped (%s): best validation MSE %.6g at epoch %d (initial %.6g)",
                history.stop_reason, history.best_val_mse, history.best_epoch, history.init_val_mse)
    return history

