"""The RQ-MoE quantizer: two-part codebooks, the morphing mixture of experts, and parallel decoding
(docs/design.md, "The quantizer"). Encoding lives in ``encode.py``.

All learned tensors live in a *scaled* space (raw vectors divided by the
scalar buffer ``scale``); the public methods take and return raw vectors.

Execution strategies (``Execution``) choose how the same network runs, never
what it computes: the morphing networks of all steps and experts run as a few
large matrix products (the first layer of every expert and of the gate as one
(d, (N+1)·H) product per step; the last layer as one product over the
gate-weighted hidden units of all experts), optionally with bfloat16 inputs
(float32 accumulation) or as one fused Triton kernel on CUDA. Under top-k
routing (``RQMoEConfig.routing``) each expert runs on its own rows only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from typing import Optional

import numpy as np
import torch
from torch import nn

from .arrays import as_codes, as_vectors_on, check_positive_int
from .config import Condition, RQMoEConfig
from .graphs import GraphCache, WeightsCache, bucket, stamp

DEFAULT_MEM_BUDGET_BYTES = 1 << 30
# CPU decodes and encodes take chunks whose temporaries stay within this: on 2 cores, 512 codes a chunk at the
# default shape (~70 MB of temporaries) decoded 1.1x faster than 1 024 at once, 128 codes 0.9x (docs/experiments.md,
# section 1g), and greedy, beam and exact encoding ran 1.0-1.5x faster than in 1 GiB chunks, whose fresh tensors
# page-fault after glibc returns the freed heap between steps (section 1j). A decode caps dense experts only: under
# top-1 routing smaller chunks split the experts' products further (0.7x). The GPU takes the whole memory budget.
CPU_CHUNK_BYTES = 64 << 20
# Within RQMoE.kept_temporaries(): per thread, {id(model): {key: tensor}}, the morphing's internal temporaries
# that later steps and chunks write again (out=) instead of allocating afresh.
_KEPT = threading.local()
KERNELS = ("auto", "torch", "triton")
DTYPES = ("float32", "tfloat32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Execution:
    """How the morphing networks run (the arithmetic they compute is the same).

    kernel: "torch" (batched matrix products, any device, differentiable),
    "triton" (one fused kernel a step for inference on CUDA, for dense experts
    or top-1 routing; data on the CPU takes the torch path) or "auto"
    (triton for inference on CUDA when Triton is installed, else torch).
    dtype: "float32"; "tfloat32" (the fused kernel's matmuls in TF32; the
    torch path follows torch.backends.cuda.matmul.allow_tf32); or
    "bfloat16" matmul inputs, with float32 sums and a float32 residual path
    (on the CPU a decode's products under torch's CPU autocast, whose speed
    depends on the processor's bfloat16 instructions: 1.1-1.3x for dense
    experts with AMX, docs/experiments.md section 1i; the CPU's encoding
    stays float32). Inference only: training's forward and backward run in
    float32; its no-grad encoding of each batch follows
    ``TrainConfig.encode_precision`` (bfloat16 on CUDA by default).
    cuda_graphs: on CUDA, decode batches of up to ``graphs.MAX_ROWS`` codes
    (and within the memory budget's chunk) by replaying a recorded CUDA
    graph (the same operations, padded to a power of two: float rounding may
    differ from the eager decode); False runs them eagerly.
    """

    kernel: str = "auto"
    dtype: str = "float32"
    cuda_graphs: bool = True

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"Execution.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Execution.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"Execution.cuda_graphs must be True or False, got {self.cuda_graphs!r}")


def _uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class RQMoE(nn.Module):
    """RQ-MoE quantizer: ``encode`` raw vectors to codes, ``decode`` codes back.

    Parameters are stacked over the S morphed steps so that decoding runs a
    few batched matrix products for all steps at once. ``mem_budget_bytes``
    bounds the temporaries of ``encode``/``decode`` (chunking over vectors).
    ``execution`` picks the execution strategy (see ``Execution``);
    ``dropout`` is applied to the experts' hidden units in training mode.
    """

    def __init__(self, config: RQMoEConfig, mem_budget_bytes: int = DEFAULT_MEM_BUDGET_BYTES,
                 execution: Optional[Execution] = None):
        super().__init__()
        if not isinstance(config, RQMoEConfig):
            raise TypeError(f"config must be an RQMoEConfig, got {type(config).__name__}")
        self.config = config
        self.mem_budget_bytes = check_positive_int(mem_budget_bytes, "mem_budget_bytes")
        self.execution = execution or Execution()
        self.dropout = 0.0
        self.gate_usage: Optional[torch.Tensor] = None  # (S', N) mean gate weights of the last training pass
        self._fused_cache = WeightsCache()
        self._cache_weights = True  # off while a CUDA graph that must derive them from the weights records
        self._graphs = GraphCache()
        c = config
        S, N, L, H, d, K = c.n_morph_steps, c.n_experts, c.n_layers, c.hidden, c.d, c.K
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.codebooks = nn.Parameter(torch.randn(c.M, K, d) * 0.1)
        if c.mode is Condition.INSTRUCTION:
            # E_m for m < M (the last step's instruction is never read). Small random values, not 0:
            # with the projection's instruction part at 0 the model is still exactly RQ, but E = P_I = 0
            # would be a saddle point where neither ever receives a gradient.
            self.instr_codebooks = nn.Parameter(torch.randn(c.M - 1, K, c.De) * 0.1)
        else:
            self.register_parameter("instr_codebooks", None)
        if S > 0:
            self.proj_code = nn.Parameter(torch.eye(d).repeat(S, 1, 1))  # (S, d, d), z = c @ W
            self.proj_cond = nn.Parameter(torch.zeros(S, c.cond_dim, d))
            self.proj_bias = nn.Parameter(torch.zeros(S, d))
            self.gate_w1 = nn.Parameter(_uniform_(torch.empty(S, d, H), d))
            self.gate_b1 = nn.Parameter(_uniform_(torch.empty(S, H), d))
            self.gate_w2 = nn.Parameter(_uniform_(torch.empty(S, H, N), H))
            self.gate_b2 = nn.Parameter(_uniform_(torch.empty(S, N), H))
            self.expert_w1 = nn.Parameter(_uniform_(torch.empty(L, S, N, d, H), d))
            self.expert_b1 = nn.Parameter(_uniform_(torch.empty(L, S, N, 1, H), d))
            self.expert_w2 = nn.Parameter(torch.zeros(L, S, N, H, d))
            self.expert_b2 = nn.Parameter(torch.zeros(L, S, N, 1, d))
        if c.ctx_dim > 0:
            # contexts enter normalised, (ctx - ctx_mean) / ctx_scale (set_context_stats), so that their
            # entries are of the instruction codewords' size whatever the data's offset and units
            self.register_buffer("ctx_mean", torch.zeros(c.ctx_dim))
            self.register_buffer("ctx_scale", torch.ones(()))
            # A: context -> conditioning. Identity where the widths agree, so that I_1 (or the QINCo-style
            # partial reconstruction) starts as the context itself; the zero proj_cond keeps it exactly RQ.
            self.ctx_proj = nn.Parameter(torch.eye(c.ctx_dim, c.cond_dim))
        else:
            self.register_parameter("ctx_proj", None)

    # ------------------------------------------------------------------ utils
    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())

    def set_execution(self, kernel: Optional[str] = None, dtype: Optional[str] = None,
                      cuda_graphs: Optional[bool] = None) -> "RQMoE":
        """Choose the execution strategy (see ``Execution``); None keeps a setting. Returns self."""
        changes = {k: v for k, v in (("kernel", kernel), ("dtype", dtype), ("cuda_graphs", cuda_graphs))
                   if v is not None}
        self.execution = dataclasses.replace(self.execution, **changes)
        self._fused_cache.clear()
        self._graphs.clear()
        return self

    @contextlib.contextmanager
    def uncached_weights(self):
        """Within: every weight derived from the parameters (the fused first layer, the codeword tables,
        the fused kernel's copies) is computed afresh and not kept. A CUDA graph recorded here computes
        them on every replay from the weights as they are then, which a graph of a training step needs:
        its replays change the weights without the host seeing it."""
        before, self._cache_weights = self._cache_weights, False
        try:
            yield self
        finally:
            self._cache_weights = before

    def _morph_bytes_per_row(self, fused: bool = False, scored: bool = False) -> int:
        """Float32 temporaries one morphed codeword needs (peak estimate): on the torch path every expert's
        hidden units; where the fused kernel runs, the rows around it (gathered and projected codewords, the
        instruction stream, the kernel's rows in and out, the scores), the split launch's per-expert
        outputs and, under top-1, the torch gate's hidden units and routing indices. scored: an encode's
        candidate that the fused kernel scores inside (dense experts, kernels.candidate_scores): only the
        launch's partial outputs (and gates) and its score."""
        c = self.config
        if fused:
            from .kernels import split_scratch_bytes_per_row
            if scored and c.top_k is None:
                return max(split_scratch_bytes_per_row(c), 4 * c.d) + 4
            return 4 * (6 * c.d + 4 * c.cond_dim + 32 + (c.hidden + c.n_experts if c.top_k == 1 else 0)) + \
                split_scratch_bytes_per_row(c)
        return 4 * (3 * c.d + c.cond_dim + (3 * c.n_experts + 1) * c.hidden + 2 * c.n_experts * c.d + 16)

    def rows_per_chunk(self, rows_per_item: int, scored: bool = False) -> int:
        """How many items fit the memory budget when each needs rows_per_item morphed rows (more where the
        fused kernel runs: it keeps the hidden units in registers; and more again for an encode's candidates,
        scored: the kernel scores them without writing them)."""
        fused = self.config.n_morph_steps > 0 and self._use_triton(self.device)
        per_item = max(1, rows_per_item) * self._morph_bytes_per_row(fused, scored)
        items = self.mem_budget_bytes // per_item
        if fused:  # and within one launch's int32 offsets (a launch runs a chunk's rows of one step, or a decode's
            # rows of every step)
            from .kernels import max_rows
            items = min(items, max_rows(self.config) // max(1, rows_per_item))
        return max(1, items)

    @contextlib.contextmanager
    def kept_temporaries(self):
        """Within, in this thread: the morphing's largest internal temporaries (a step's first-layer
        activations and inputs, the experts' updates and hidden units) are written again from step to step
        and chunk to chunk (out=) instead of allocated afresh, and released on exit. CPU encodes and decodes
        run in it: glibc returns freed multi-megabyte blocks to the system between steps, and every fresh
        one page-faults again (docs/experiments.md, section 1j). Nothing kept is ever returned to a caller."""
        models = _KEPT.__dict__.setdefault("models", {})
        outermost = id(self) not in models
        if outermost:
            models[id(self)] = {}
        try:
            yield self
        finally:
            if outermost:
                del models[id(self)]

    def _kept(self) -> dict:
        """This thread's kept temporaries of this model (kept_temporaries), or a new empty dict outside one
        (what is put in it then lives as long as the caller's reference)."""
        kept = getattr(_KEPT, "models", {}).get(id(self))
        return {} if kept is None else kept

    def cpu_chunk_items(self, rows_per_item: int) -> int:
        """How many items a CPU chunk takes when each needs rows_per_item morphed rows on the torch path:
        CPU_CHUNK_BYTES of temporaries (at least one item)."""
        return max(1, CPU_CHUNK_BYTES // (max(1, rows_per_item) * self._morph_bytes_per_row()))

    def check_vectors(self, x, name: str = "x", width: Optional[int] = None) -> torch.Tensor:
        """Raw vectors (n >= 1, width or d) as float32 on the model's device (arrays.as_vectors_on rules)."""
        return as_vectors_on(x, self.config.d if width is None else width, self.device, name, allow_empty=False)

    def check_ctx(self, ctx, n: int) -> Optional[torch.Tensor]:
        """Validate the contexts of n items and return them normalised, (n, ctx_dim) float32; None without."""
        c = self.config
        if c.ctx_dim == 0:
            if ctx is not None:
                raise ValueError("this model takes no context (config.ctx_dim == 0): pass ctx=None")
            return None
        if ctx is None:
            raise ValueError(f"this model is conditioned on a context of width {c.ctx_dim} (the IVF centroid "
                             f"of each vector): pass ctx of shape (n, {c.ctx_dim})")
        ctx = self.check_vectors(ctx, "ctx", c.ctx_dim)
        if ctx.shape[0] != n:
            raise ValueError(f"ctx has {ctx.shape[0]} rows, expected one per vector or code: {n}")
        return self.normalize_ctx(ctx)

    def normalize_ctx(self, ctx: torch.Tensor) -> torch.Tensor:
        """Raw contexts (n, ctx_dim) float32 on the model's device -> the normalised ones the networks see."""
        return (ctx - self.ctx_mean) / self.ctx_scale

    @torch.no_grad()
    def set_context_stats(self, ctx: np.ndarray, rms: float = 0.1) -> None:
        """Fix the context normalisation from the training contexts ctx (n, ctx_dim) float32.

        After it the normalised training contexts have mean 0 and entries of
        root mean square ``rms`` (that of the instruction codewords' start).
        """
        ctx = torch.as_tensor(np.asarray(ctx, dtype=np.float32))
        mean = ctx.mean(0)
        spread = float((ctx - mean).pow(2).mean().sqrt())
        self.ctx_mean.copy_(mean)
        self.ctx_scale.fill_(spread / rms if spread > 0 else 1.0)

    def has_context_stats(self) -> bool:
        """Whether the context normalisation was fixed (it starts as the identity: mean 0, scale 1)."""
        return bool(self.ctx_mean.any()) or float(self.ctx_scale) != 1.0

    def ctx_cond(self, ctx_s: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The context's share of the conditioning: normalised ctx (n, ctx_dim) -> (n, cond_dim), or None."""
        if (ctx_s is None) != (self.config.ctx_dim == 0):
            raise ValueError(f"the model has ctx_dim={self.config.ctx_dim}: a context must be given "
                             "exactly when ctx_dim > 0")
        return None if ctx_s is None else ctx_s @ self.ctx_proj

    def check_codes(self, codes) -> torch.Tensor:
        """Codes (n >= 1, M) in [0, K) as int64 on the model's device."""
        return as_codes(codes, self.config.M, self.config.K, self.device)

    # ---------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_from_rq(self, rq, scale: Optional[float] = None) -> "RQMoE":
        """Initialise from a trained ``faiss.ResidualQuantizer`` so the model *is* that RQ.

        rq: trained, with the same d, M and nbits. scale: the data scale
        (max |x| of the training set); None keeps the current ``scale``.
        Codebooks become rq's (divided by scale); the morphing networks are
        set to identity, so greedy encoding and decoding equal faiss RQ's.
        """
        import faiss  # the model's only contact with faiss

        c = self.config
        if not rq.is_trained:
            raise ValueError("the ResidualQuantizer is not trained")
        nbits = [int(b) for b in faiss.vector_to_array(rq.nbits)]
        if rq.d != c.d or rq.M != c.M or any(b != c.nbits for b in nbits):
            raise ValueError(f"ResidualQuantizer has d={rq.d}, M={rq.M}, nbits={nbits}; "
                             f"model expects d={c.d}, M={c.M}, nbits={c.nbits}")
        if scale is not None:
            if not (scale > 0 and math.isfinite(scale)):
                raise ValueError(f"scale must be a positive finite number, got {scale}")
            self.scale.fill_(float(scale))
        codebooks = faiss.vector_to_array(rq.codebooks).reshape(c.M, c.K, c.d)
        self.codebooks.copy_(torch.from_numpy(codebooks) / self.scale.cpu())
        self.reset_morphing()
        self.initialized.fill_(True)
        return self

    @torch.no_grad()
    def reset_morphing(self) -> None:
        """Set the morphing networks to the identity (the model becomes plain RQ on its codebooks)."""
        c = self.config
        if c.n_morph_steps > 0:
            self.proj_code.copy_(torch.eye(c.d).repeat(c.n_morph_steps, 1, 1))
            self.proj_cond.zero_()
            self.proj_bias.zero_()
            self.expert_w2.zero_()
            self.expert_b2.zero_()
        if c.ctx_dim > 0:
            self.ctx_proj.copy_(torch.eye(c.ctx_dim, c.cond_dim))

    def rq_codebooks(self) -> np.ndarray:
        """The base codebooks in raw units: (M, K, d) float32 numpy (what plain RQ decodes with)."""
        return (self.codebooks.detach() * self.scale).cpu().numpy()

    # ---------------------------------------------------------------- morphing
    def _project(self, s0: int, s1: int, base: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """z = P([c; cond]) for morphed steps s0..s1-1: base (S', B, d), cond (S', B, Dc) or None -> (S', B, d)."""
        z = torch.baddbmm(self.proj_bias[s0:s1, None, :], base, self.proj_code[s0:s1])
        if cond is not None and cond.shape[-1] > 0:
            z = torch.baddbmm(z, cond, self.proj_cond[s0:s1])
        return z

    def _first_layer(self, s0: int, s1: int):
        """The first layer of every expert and of the gate, steps s0..s1-1, as one product:
        weight (S', d, (N+1)·H) and bias (S', 1, (N+1)·H). Cached while the parameters do not change
        and no gradient is needed."""
        c = self.config
        S_, N, H = s1 - s0, c.n_experts, c.hidden
        grad = torch.is_grad_enabled()
        key = ("first", s0, s1)
        weights = stamp((self.expert_w1, self.expert_b1, self.gate_w1, self.gate_b1))
        cache = not grad and self._cache_weights
        if cache and key in self._fused_cache and self._fused_cache[key][0] == weights:
            return self._fused_cache[key][1]
        experts_w = self.expert_w1[0, s0:s1].permute(0, 2, 1, 3).reshape(S_, c.d, N * H)
        experts_b = self.expert_b1[0, s0:s1].permute(0, 2, 1, 3).reshape(S_, 1, N * H)
        fused = (torch.cat([experts_w, self.gate_w1[s0:s1]], dim=2),
                 torch.cat([experts_b, self.gate_b1[s0:s1, None, :]], dim=2))
        if cache:
            self._fused_cache[key] = (weights, fused)
        return fused

    def _use_triton(self, device: torch.device) -> bool:
        """Whether inference on tensors of ``device`` runs the fused kernel (Execution.kernel, grad mode,
        device, architecture)."""
        kernel = self.execution.kernel
        if kernel == "torch" or torch.is_grad_enabled():
            return False
        from . import kernels
        is_cuda = device.type == "cuda"
        if kernel == "triton" and not (is_cuda or kernels.interpreting()):
            return False  # the fused kernel runs on CUDA: a model moved to the CPU keeps working
        if self.config.top_k not in (None, 1):
            if kernel == "triton":
                raise ValueError(f"the fused kernel runs dense experts or top-1 routing; routing="
                                 f"{self.config.routing!r} runs on the torch path: use kernel='torch' or 'auto'")
            return False
        if kernel == "triton":
            if not kernels.supports(self.config):
                raise ValueError(f"the fused kernel needs d a power of two >= 16 and hidden a multiple of 16, "
                                 f"got d={self.config.d}, hidden={self.config.hidden}; use kernel='torch'")
            return True
        # exact float32 dots in Triton run without tensor cores, slower than cuBLAS: auto keeps them in torch
        return is_cuda and self.execution.dtype != "float32" and kernels.available() and kernels.supports(self.config)

    def _morph(self, s0: int, s1: int, z: torch.Tensor, sum_steps: bool = False) -> torch.Tensor:
        """Mixture of experts applied to z: (S', B, d) for morphed steps s0..s1-1 -> (S', B, d), or with
        sum_steps their sum over the steps, (B, d) (the fused kernel's launch then sums it in one pass)."""
        if self._use_triton(z.device):
            from . import kernels
            return kernels.morph(self, s0, s1, z, sum_steps=sum_steps)
        if sum_steps:
            return self._morph(s0, s1, z).sum(0)
        if self.execution.dtype == "bfloat16" and not torch.is_grad_enabled() and z.device.type in ("cuda", "cpu"):
            with torch.autocast(z.device.type, dtype=torch.bfloat16):
                return z + self._morph_delta(s0, s1, z).float()
        delta = self._morph_delta(s0, s1, z)
        return add_into(delta, z)

    def _morph_delta(self, s0: int, s1: int, z: torch.Tensor, pre: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The experts' gate-weighted residual updates, Σ_n a_n (y_n - z): (S', B, d) -> (S', B, d).

        Σ_n a_n = 1, so the morphed codeword is z plus this, and it sums the
        updates of every layer: Σ_l Σ_n a_n (h_ln W2_ln + b2_ln) with h_ln the
        expert's hidden units. The first layer of all experts and of the gate
        is one product (all read z). With one layer, the last product runs over
        the gate-weighted hidden units of all experts at once; with more, each
        expert's state feeds its next layer, so they run expert by expert,
        reading strided views of the shared first layer (no copies). pre: the
        first layer's activations (S', B, (N+1)H) when the caller has them.
        """
        c = self.config
        S_, R, d = z.shape
        N, H, L = c.n_experts, c.hidden, c.n_layers
        # without autograd, activation and scaling run in place: the same arithmetic, fewer temporaries
        inplace = not torch.is_grad_enabled()
        products_in_place = inplace and not autocast_enabled(z.device.type)  # autocast has no in-place products
        relu = torch.relu_ if inplace else torch.relu
        dropout = self.dropout if self.training and torch.is_grad_enabled() else 0.0
        drop = (lambda h: torch.nn.functional.dropout(h, dropout)) if dropout > 0 else (lambda h: h)  # noqa: E731
        # top-k routing without autograd runs each expert on its own rows; in training every expert runs
        # and the gate is masked to the chosen ones (the same values, and the products stay large)
        routed = c.top_k is not None and inplace
        # without autograd or autocast the products write into tensors of the same shape that are dead by then:
        # the previous expert's of the same layer, or the previous step's or chunk's within kept_temporaries()
        spare = self._kept() if products_in_place and z.device.type == "cpu" else {}

        def product(key, bias, x, w):  # torch.baddbmm(bias, x, w), into spare[key] where it fits, kept for later
            result = torch.baddbmm(bias, x, w, **kept_out(spare, key, (S_, R, w.shape[-1]), z))
            if products_in_place:
                spare[key] = result
            return result

        if pre is None and routed:  # the gate alone
            gate_hidden = self.gate_hidden(s0, s1, z)
        else:
            if pre is None:
                w_in, b_in = self._first_layer(s0, s1)
                pre = relu(product("first", b_in, z, w_in))  # (S', R, (N+1)H)
            gate_hidden = pre[..., N * H:]
        gate = torch.softmax(self.gate_logits(s0, s1, gate_hidden), dim=-1)  # (S', R, N)
        if self.training and torch.is_grad_enabled():
            self.gate_usage = gate.mean(1)  # (S', N), for the load-balancing loss
        if routed:
            return self._routed_delta(s0, s1, z, gate, None if pre is None else pre[..., :N * H])
        if c.top_k is not None:
            gate = routed_gate(gate, c.top_k)
        first = drop(pre[..., :N * H].reshape(S_, R, N, H))
        weights = gate.unsqueeze(-1)  # (S', R, N, 1)
        delta = torch.bmm(gate, self.expert_b2[L - 1, s0:s1, :, 0])  # Σ_n a_n b2 of the last layer
        if L == 1:
            weighted = first.mul_(weights) if inplace else first * weights
            return torch.baddbmm(delta, weighted.reshape(S_, R, N * H), self.expert_w2[0, s0:s1].reshape(S_, N * H, d))
        for n in range(N):
            share = weights[:, :, n]  # (S', R, 1)
            hidden = first[:, :, n]  # (S', R, H), a strided view of the first layer
            y = z
            for layer in range(L):
                w2, b2 = self.expert_w2[layer, s0:s1, n], self.expert_b2[layer, s0:s1, n]  # (S', H, d), (S', 1, d)
                if layer > 0:
                    hidden = drop(relu(product(("hidden", layer), self.expert_b1[layer, s0:s1, n], y,
                                               self.expert_w1[layer, s0:s1, n])))
                if layer < L - 1:
                    update = product(("update", layer), b2, hidden, w2)
                    delta = delta.addcmul_(share, update) if inplace else delta + share * update
                    y = add_into(update, y)  # y + update: update becomes y once delta has its share
                else:
                    weighted = hidden.mul_(share) if inplace else hidden * share
                    delta = delta.baddbmm_(weighted, w2) if products_in_place else torch.baddbmm(delta, weighted, w2)
        return delta

    def gate_hidden(self, s0: int, s1: int, z: torch.Tensor) -> torch.Tensor:
        """The gate's hidden units alone, relu(z G1 + g1): (S', R, d) -> (S', R, H), steps s0..s1-1."""
        return torch.baddbmm(self.gate_b1[s0:s1, None, :], z, self.gate_w1[s0:s1]).relu_()

    def gate_logits(self, s0: int, s1: int, gate_hidden: torch.Tensor) -> torch.Tensor:
        """The gate's logits from its hidden units: (S', R, H) -> (S', R, N), steps s0..s1-1."""
        return torch.baddbmm(self.gate_b2[s0:s1, None, :], gate_hidden, self.gate_w2[s0:s1])

    def _routed_delta(self, s0: int, s1: int, z: torch.Tensor, gate: torch.Tensor,
                      pre: Optional[torch.Tensor]) -> torch.Tensor:
        """``_morph_delta`` under top-k routing, for inference: each row's k highest-gated experts,
        weighted by their gate weights renormalised to sum to 1 (``routed_gate``).

        z (S', R, d); gate (S', R, N); pre: the experts' first-layer activations (S', R, N·H) when the
        caller has them, else None. The rows are sorted by (step, expert), so that each expert runs
        its residual blocks as plain matrix products on one contiguous slice of its own rows (no
        padding: an unbalanced gate costs no extra work); the updates are scattered back to their rows.
        Returns (S', R, d).
        """
        c = self.config
        S_, R, d = z.shape
        N, H, L, k = c.n_experts, c.hidden, c.n_layers, c.top_k
        top_w, top_n = torch.topk(gate, k, dim=-1)  # (S', R, k)
        weights = top_w / top_w.sum(-1, keepdim=True)
        steps = torch.arange(S_, device=z.device).view(S_, 1, 1)
        group = (steps * N + top_n).reshape(-1)  # (S'·R·k,) the (step, expert) pair of every assignment
        order = torch.argsort(group, stable=True)
        row = torch.div(order, k, rounding_mode="floor")  # the (step, row) each sorted assignment belongs to
        counts = torch.bincount(group, minlength=S_ * N).tolist()
        y_all = z.reshape(S_ * R, d).index_select(0, row)  # (S'·R·k, d), grouped by (step, expert)
        first = None if pre is None else pre.reshape(S_ * R * N, H).index_select(0, row * N + group[order] % N)
        # each assignment's Σ_l update, written slice by slice (autocast has no out= products: pieces there)
        in_place = not autocast_enabled(z.device.type)
        summed = y_all.new_empty(y_all.shape) if in_place else None
        pieces, begin = [], 0
        for g, count in enumerate(counts):
            if count == 0:
                continue
            s, n = divmod(g, N)
            rows = slice(begin, begin + count)
            begin += count
            y, hidden, earlier = y_all[rows], None if first is None else first[rows], None
            for layer in range(L):
                w2, b2 = self.expert_w2[layer, s0 + s, n], self.expert_b2[layer, s0 + s, n, 0]
                if layer > 0 or hidden is None:
                    hidden = torch.addmm(self.expert_b1[layer, s0 + s, n, 0], y, self.expert_w1[layer, s0 + s, n])
                    hidden = hidden.relu_()
                if in_place:  # the updates are summed in the group's slice of summed, y_l kept in its slice of y_all
                    out = summed[rows]
                    if layer == 0:
                        update = torch.addmm(b2, hidden, w2, out=out)  # the first update is the sum so far
                    elif layer == L - 1:
                        out.addmm_(hidden, w2).add_(b2)
                    else:
                        update = torch.addmm(b2, hidden, w2)
                        out.add_(update)
                    if layer < L - 1:
                        y = y.add_(update)
                    continue
                if layer < L - 1:
                    update = torch.addmm(b2, hidden, w2)
                    earlier = update if earlier is None else earlier.add_(update)
                    y = y + update
                else:
                    pieces.append(torch.addmm(b2 if earlier is None else earlier + b2, hidden, w2))
        if not in_place:
            summed = torch.cat(pieces) if pieces else y_all
        if k == 1:  # one expert a row, weight 1: a permutation back to the rows
            return summed.new_empty(S_ * R, d).index_copy_(0, row, summed).view(S_, R, d)
        chosen = summed * weights.reshape(-1)[order].unsqueeze(-1)
        return chosen.new_zeros(S_ * R, d).index_add_(0, row, chosen).view(S_, R, d)

    def _step_codewords(self, step: int, base: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """Morphed codewords of one morphed step: base (B, d), cond (B, Dc) -> (B, d)."""
        s = step - self.config.first_morphed
        z = self._project(s, s + 1, base.unsqueeze(0), None if cond is None else cond.unsqueeze(0))
        return self._morph(s, s + 1, z)[0]

    def _codeword_tables(self, s: int):
        """What the projection and the first layer make of step s's base codewords alone (inference):
        z_c = C P_c + bias (K, d) and its first-layer pre-activations z_c W_in + b_in (K, (N+1)H).
        Both are linear in the codeword, so a candidate's z and pre-activation are these rows plus its
        conditioning row's share: encoding gathers them instead of multiplying every candidate."""
        params = (self.codebooks, self.proj_code, self.proj_bias, self.expert_w1, self.expert_b1, self.gate_w1,
                  self.gate_b1)
        weights = stamp(params)
        key = ("codewords", s)
        if self._cache_weights and key in self._fused_cache and self._fused_cache[key][0] == weights:
            return self._fused_cache[key][1]
        m = s + self.config.first_morphed
        w_in, b_in = self._first_layer(s, s + 1)
        with torch.autocast(self.device.type, enabled=False):  # the cache outlives an enclosing autocast
            z_c = torch.addmm(self.proj_bias[s], self.codebooks[m], self.proj_code[s])  # (K, d)
            tables = (z_c, torch.addmm(b_in[0, 0], z_c, w_in[0]))
        if self._cache_weights:
            self._fused_cache[key] = (weights, tables)
        return tables

    def decode_tables(self):
        """What a decode's step inputs z are made of, for the fused kernel to sum per row (inference).

        z of morphed step s (code step m = s + first_morphed) is linear in the codes:
        C_m[i_m] P_s + b_s + (sum_{j<m} E_j[i_j] + ctx share) Q_s. Returns tab (T, K, d) float32, the
        tables C_m P_s + b_s and E_j Q_s, step after step; toff (S + 1,) int32, where each step's tables
        start in tab; tcol (T,) int32, the code column each table is indexed by; and Q (S, De, d) float32
        (proj_cond) for the context's share, or None without instructions. Cached while the parameters do
        not change.
        """
        c = self.config
        params = (self.codebooks, self.proj_code, self.proj_bias, self.instr_codebooks, self.proj_cond)
        weights = stamp([t for t in params if t is not None])
        key = ("decode_tables",)
        if self._cache_weights and key in self._fused_cache and self._fused_cache[key][0] == weights:
            return self._fused_cache[key][1]
        tabs, toff, tcol = [], [0], []
        # in float64, outside any autocast: the cache outlives both the autocast and the TF32 switch
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for s, columns in enumerate(decode_table_columns(c)):
                m = columns[0]
                tabs.append(torch.addmm(self.proj_bias[s].double(), self.codebooks[m].double(),
                                        self.proj_code[s].double()))
                tabs.extend(self.instr_codebooks[j].double() @ self.proj_cond[s].double() for j in columns[1:])
                tcol.extend(columns)
                toff.append(len(tcol))
            as_index = functools.partial(torch.tensor, dtype=torch.int32, device=self.device)
            tables = (torch.stack(tabs).float().contiguous(), as_index(toff), as_index(tcol),
                      self.proj_cond.detach().float().contiguous() if c.De > 0 else None)
        if self._cache_weights:
            self._fused_cache[key] = (weights, tables)
        return tables

    def _z_from_tables(self) -> bool:
        """Whether decode_steps sums the steps' inputs z from ``decode_tables`` (inference with cached weights,
        float32 weights, tables within the fused kernel's size cap) instead of projecting the gathered codewords and the
        instruction stream. At the default shape that is 35 table rows a vector instead of S·(d + De)·d
        multiply-adds: 5x faster on 2 CPU cores (docs/experiments.md, section 1j)."""
        from . import kernels

        return (not torch.is_grad_enabled() and self._cache_weights and self.codebooks.dtype == torch.float32
                and kernels.decode_tables_bytes(self.config) <= kernels.CONFIG["decode_tables_max_bytes"])

    def gathered_z(self, codes: torch.Tensor, ctx_cond: Optional[torch.Tensor]) -> torch.Tensor:
        """The morphed steps' inputs z summed from ``decode_tables`` (inference, condition 'instruction' or
        'none'): codes (n, M) int64, ctx_cond (n, De) float32 or None (the context's share of the
        instructions) -> (S, n, d) float32, what ``_project`` makes of the gathered codewords and the
        instruction stream. One embedding_bag: a bag a (step, row) holding a table row a code the step
        depends on."""
        tab, _, tcol, Q = self.decode_tables()
        T, K, d = tab.shape
        n = codes.shape[0]
        rows = codes.index_select(1, tcol.long()) + torch.arange(0, T * K, K, device=codes.device)  # (n, T)
        flat, offsets, first = [], [], 0  # step by step, each row's tables side by side: bags of the step's size
        for columns in decode_table_columns(self.config):  # the sizes from the config: no device sync
            flat.append(rows[:, first:first + len(columns)].reshape(-1))
            offsets.append(torch.arange(first * n, (first + len(columns)) * n, len(columns), device=codes.device))
            first += len(columns)
        z = nn.functional.embedding_bag(torch.cat(flat), tab.view(T * K, d), torch.cat(offsets), mode="sum")
        z = z.view(-1, n, d)
        if Q is not None and ctx_cond is not None:
            z = torch.baddbmm(z, ctx_cond.to(z.dtype).unsqueeze(0).expand(z.shape[0], n, ctx_cond.shape[1]), Q)
        return z

    def candidate_inputs(self, s: int, cond: Optional[torch.Tensor]):
        """The two linear shares of morphed step s's network inputs (inference): z_words (K, d), what the
        projection makes of the step's codewords (with its bias), and z_cond (u, d), the conditioning rows'
        share (None without conditioning). Candidate k of row j has z = z_words[k] + z_cond[j]."""
        return self._codeword_tables(s)[0], self._cond_share(s, cond)

    def _cond_share(self, s: int, cond: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The conditioning rows' share of morphed step s's inputs z: cond (u, Dc) -> (u, d), or None."""
        return cond @ self.proj_cond[s] if cond is not None and cond.shape[-1] > 0 else None

    def morph_candidates(self, m: int, candidates: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                         n_rows: Optional[int] = None) -> torch.Tensor:
        """Morphed candidate codewords of step m for several conditioning rows (inference only).

        candidates: (u, A) int64 codeword indices a row, or None for all K
        codewords, shared by every row; cond: (u, Dc) or None; n_rows: u where
        neither tensor says it. Returns (u, A, d). The codeword and the
        conditioning enter linearly, so their shares of z and of the first
        layer are computed apart (K rows and u rows) and only added per
        candidate: on the torch path no candidate pays the (d, (N+1)H)
        product. The fused kernel computes that product on tensor cores, which
        measured faster than adding table rows inside it (docs/experiments.md,
        section 1g). (For dense experts encoding scores the candidates inside
        the kernel instead: kernels.candidate_scores.)
        """
        c = self.config
        s = m - c.first_morphed
        z_c, pre_c = self._codeword_tables(s)
        z_r = self._cond_share(s, cond)
        u = n_rows if n_rows is not None else (candidates.shape[0] if candidates is not None else cond.shape[0])
        on_kernel = self._use_triton(z_c.device)
        kept = self._kept() if not on_kernel and z_c.device.type == "cpu" else {}
        z, _ = candidate_rows(z_c, candidates, z_r, u, kept, "candidate z")  # (u, A, d)
        A = z.shape[1]
        z = z.reshape(1, u * A, c.d)
        if on_kernel:  # the kernel computes the first layer itself: no (u, A, (N+1)H) table
            from . import kernels
            return kernels.morph(self, s, s + 1, z.contiguous())[0].reshape(u, A, c.d)
        share = None
        if z_r is not None:
            w_in, _ = self._first_layer(s, s + 1)
            share = z_r @ w_in[0]
        pre, own = candidate_rows(pre_c, candidates, share, u, kept, "candidate first layer")
        pre = pre.reshape(1, u * A, pre_c.shape[-1])
        pre = pre.relu_() if own else torch.relu(pre)  # not in place on the cached table itself
        return add_into(self._morph_delta(s, s + 1, z, pre=pre), z)[0].reshape(u, A, c.d)

    # ----------------------------------------------------------------- decode
    def decode_steps(self, codes: torch.Tensor, ctx: Optional[torch.Tensor] = None,
                     sum_steps: bool = False) -> torch.Tensor:
        """Per-step codewords in the scaled space, differentiable.

        codes: (n, M) int64, already validated; ctx: (n, ctx_dim) normalised
        contexts (None when config.ctx_dim == 0). Returns (n, M, d) float32
        whose sum over steps is the scaled reconstruction, or with sum_steps
        that sum, (n, d) (no per-step copy: what a decode needs). Parallel over
        steps for condition 'instruction'/'none', sequential for 'reconstruction'.
        """
        c = self.config
        if sum_steps and c.n_morph_steps > 0 and self._use_triton(codes.device):
            from . import kernels
            if kernels.gathers_z(c):  # the kernel sums each step's input from tables: no (S, n, d) tensors
                ctx_cond = self.ctx_cond(ctx)
                ctx_cond = ctx_cond.float() if ctx_cond is not None and c.De > 0 else None  # (autocast)
                return self._plus_unmorphed(kernels.decode_sum(self, codes, ctx_cond), codes)
        if c.n_morph_steps == 0:
            base = step_rows(self.codebooks, codes)  # (n, M, d)
            return base.sum(1) if sum_steps else base
        ctx_cond = self.ctx_cond(ctx)
        if c.mode is Condition.RECONSTRUCTION:
            steps_out = self._decode_steps_sequential(codes, step_rows(self.codebooks, codes), ctx_cond)
            return steps_out.sum(1) if sum_steps else steps_out
        S, f = c.n_morph_steps, c.first_morphed
        if self._z_from_tables():
            z = self.gathered_z(codes, ctx_cond)
        else:
            cond = None
            if c.De > 0:
                cond = instruction_stream(self.instr_codebooks, codes, ctx_cond, include_first=f == 0)
                cond = cond.transpose(0, 1)  # (S, n, De)
            z = self._project(0, S, step_rows(self.codebooks[f:], codes[:, f:]).transpose(0, 1), cond)
        if sum_steps:
            return self._plus_unmorphed(self._morph(0, S, z, sum_steps=True), codes)
        morphed = self._morph(0, S, z)  # (S, n, d)
        return torch.cat([step_rows(self.codebooks[:f], codes[:, :f]), morphed.transpose(0, 1)], dim=1)

    def _plus_unmorphed(self, morphed_sum: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """A decode's sum over the morphed steps (n, d) plus the codewords of the steps before them."""
        f = self.config.first_morphed
        return morphed_sum + step_rows(self.codebooks[:f], codes[:, :f]).sum(1) if f else morphed_sum

    def _decode_steps_sequential(self, codes: torch.Tensor, base: torch.Tensor,
                                 ctx_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step-by-step reference: codes (n, M), base (n, M, d), ctx_cond (n, Dc) or None -> (n, M, d)."""
        c = self.config
        outputs = []
        recon = torch.zeros_like(base[:, 0])
        instr = ctx_cond if c.mode is Condition.INSTRUCTION else None
        for m in range(c.M):
            if m < c.first_morphed:
                out = base[:, m]
            else:
                cond = instr if c.mode is Condition.INSTRUCTION else recon_cond(recon, ctx_cond)
                out = self._step_codewords(m, base[:, m], cond)
            outputs.append(out)
            recon = recon + out
            if c.mode is Condition.INSTRUCTION and m < c.M - 1:
                instr = advance_instruction(instr, self.instr_codebooks[m, codes[:, m]])
        return torch.stack(outputs, dim=1)

    def _decode_block(self, codes: torch.Tensor, ctx_s: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw reconstructions of a block of validated codes (n, M), normalised contexts or None -> (n, d)."""
        return self.decode_steps(codes, ctx_s, sum_steps=True).mul_(self.scale)

    def _graphed_decode(self, codes: torch.Tensor, ctx_s: Optional[torch.Tensor],
                        out: torch.Tensor) -> Optional[torch.Tensor]:
        """decode into out (n, d) through a recorded CUDA graph (graphs.py); None where that does not
        apply: not on CUDA, graphs off, a batch past graphs.MAX_ROWS or the memory budget's chunk, or a
        computation that synchronises with the host (top-k routing on the torch path)."""
        c = self.config
        rows = bucket(codes.shape[0])
        if not (codes.is_cuda and self.execution.cuda_graphs and rows) or c.n_morph_steps == 0 \
                or rows > self.rows_per_chunk(c.n_morph_steps):
            return None
        if c.top_k is not None and not (c.top_k == 1 and self._use_triton(codes.device)):
            return None
        from . import kernels

        inputs = (codes,) if ctx_s is None else (codes, ctx_s)
        weights = self._weights_stamp()
        # what else changes the recorded arithmetic: the device, the TF32 switch, an enclosing autocast,
        # the fused kernel's tile sizes (a recorded graph keeps the launches it was recorded with)
        key = ("decode", rows, ctx_s is not None, self.execution, codes.device,
               torch.backends.cuda.matmul.allow_tf32, autocast_enabled("cuda"), kernels.launch_key())
        return self._graphs.run(key, weights, self._decode_block, inputs, out, rows)

    def _weights_stamp(self) -> tuple:
        """stamp() of every parameter and buffer. The model keeps them in its own dicts (it has no
        submodules unless a subclass adds some), which reads 5x faster than parameters(): a graphed
        decode of 1 024 codes pays this on the host every call."""
        if self._modules:
            return stamp(list(self.parameters()) + list(self.buffers()))
        return stamp([t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None])

    def _decode_chunked(self, codes, ctx, sequential: bool) -> torch.Tensor:
        codes = self.check_codes(codes)
        ctx_s = self.check_ctx(ctx, codes.shape[0])
        c = self.config
        out = torch.empty(codes.shape[0], c.d, device=self.device)  # a normal tensor, made outside inference mode
        with torch.inference_mode():
            if not sequential and self._graphed_decode(codes, ctx_s, out) is not None:
                return out
            rows_per_code = max(1, c.n_morph_steps)
            bs = self.rows_per_chunk(rows_per_code)
            if not sequential and c.n_morph_steps > 0 and self._use_triton(codes.device):
                from . import kernels
                if kernels.gathers_z(c):  # decode_sum: no per-step rows outside the kernel
                    bs = kernels.decode_sum_rows(c, self.mem_budget_bytes)
            if codes.device.type == "cpu" and c.top_k is None:  # dense experts only: routing splits rows further
                bs = min(bs, self.cpu_chunk_items(rows_per_code))
            with self.kept_temporaries() if codes.device.type == "cpu" else contextlib.nullcontext():
                for i0 in range(0, codes.shape[0], bs):
                    chunk = codes[i0:i0 + bs]
                    ctx_chunk = None if ctx_s is None else ctx_s[i0:i0 + bs]
                    if sequential and c.n_morph_steps > 0:
                        steps_out = self._decode_steps_sequential(chunk, step_rows(self.codebooks, chunk),
                                                                  self.ctx_cond(ctx_chunk))
                        torch.sum(steps_out, dim=1, out=out[i0:i0 + bs])
                    else:
                        out[i0:i0 + bs] = self.decode_steps(chunk, ctx_chunk, sum_steps=True)
        return out.mul_(self.scale)

    def decode(self, codes, ctx=None) -> torch.Tensor:
        """Reconstruct raw vectors from codes, all steps in parallel.

        codes: (n, M) integer array/tensor with values in [0, K); ctx: (n,
        ctx_dim) float32 raw contexts (e.g. IVF centroids), required exactly
        when config.ctx_dim > 0. Returns (n, d) float32 on the model's device.
        (For condition 'reconstruction' the steps depend on each other and run
        in sequence.)
        """
        return self._decode_chunked(codes, ctx, sequential=False)

    def decode_sequential(self, codes, ctx=None) -> torch.Tensor:
        """Reference decoder, one step after the other; same output as ``decode``.

        codes: (n, M) integers in [0, K); ctx as in ``decode``. Returns (n, d) float32.
        """
        return self._decode_chunked(codes, ctx, sequential=True)

    # ----------------------------------------------------------------- encode
    def encode(self, x, n_candidates: Optional[int] = None, beam_size: int = 1, ctx=None) -> torch.Tensor:
        """Encode raw vectors: greedy (beam_size=1) or beam search.

        x: (n, d) float32 (other real dtypes are converted). n_candidates:
        None evaluates the morphing networks on all K codewords of every step
        (exact); an integer A < K first ranks the K base codewords by distance
        to the residual and runs the networks on the best A only (faster,
        approximate). beam_size: B >= 1 partial codes kept per vector after
        every step (the networks run on B x A candidates a step, so encoding
        costs about B times greedy); the code with the smallest final
        residual wins. B = 1 is greedy. ctx: (n, ctx_dim) float32 raw
        contexts, required exactly when config.ctx_dim > 0 (``decode`` needs
        the same ones). Returns (n, M) int64 codes on the model's device.
        Temporaries stay within ``mem_budget_bytes``.
        """
        from .encode import encode_scaled

        x = self.check_vectors(x)
        ctx_s = self.check_ctx(ctx, x.shape[0])
        if n_candidates is not None:
            n_candidates = check_positive_int(n_candidates, "n_candidates")
        beam_size = check_positive_int(beam_size, "beam_size")
        with torch.inference_mode():
            return encode_scaled(self, x / self.scale, n_candidates, beam_size, ctx_s)

    # --------------------------------------------------------------- training
    def forward(self, codes: torch.Tensor, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The training forward, ``decode_steps``: codes (n, M) int64, normalised ctx (n, ctx_dim) or None
        -> per-step scaled codewords (n, M, d), differentiable (their sum is the reconstruction)."""
        return self.decode_steps(codes, ctx)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type (torch < 2.4 has no device argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def routed_gate(gate: torch.Tensor, k: int) -> torch.Tensor:
    """The gate of top-k routing, for training: gate (..., N) softmax weights -> (..., N) with each row's
    k largest renormalised to sum to 1 and the rest 0. The sum is held constant (detached), so the kept
    weights still pass a gradient to the gate, also when k = 1 (their value is then exactly 1)."""
    top_w, top_n = torch.topk(gate, k, dim=-1)
    return torch.zeros_like(gate).scatter(-1, top_n, top_w / top_w.sum(-1, keepdim=True).detach())


def decode_table_columns(config: RQMoEConfig) -> list:
    """The code columns each morphed step's input z depends on, one list a step (``RQMoE.decode_tables`` keeps a
    table for each): the step's own code m first, then the earlier codes 0..m-1 whose instruction codewords
    condition it (none without instructions)."""
    return [[m] + list(range(m if config.De > 0 else 0)) for m in range(config.first_morphed, config.M)] \
        if config.n_morph_steps else []


def kept_out(kept: dict, key, shape: tuple, like: torch.Tensor) -> dict:
    """{"out": kept[key]} where that tensor can take a result of this shape and of ``like``'s dtype and device,
    made under the grad mode in force (an inference tensor is read-only outside inference mode); else {}."""
    t = kept.get(key)
    fits = (t is not None and t.shape == shape and t.dtype == like.dtype and t.device == like.device
            and t.is_inference() == torch.is_inference_mode_enabled())
    return {"out": t} if fits else {}


def add_into(delta: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """z + delta, in place in delta where nothing needs either (no autograd) and the result keeps delta's dtype."""
    if torch.is_grad_enabled() or delta.dtype != torch.promote_types(delta.dtype, z.dtype):
        return z + delta
    return delta.add_(z)


def candidate_rows(table: torch.Tensor, candidates: Optional[torch.Tensor], share: Optional[torch.Tensor], u: int,
                   kept: dict, key: str):
    """Each conditioning row's candidates' table rows plus the row's share: table (K, w); candidates (u, A)
    int64, or None for all K; share (u, w) or None -> ((u, A, w), own). own: the result is a tensor of this
    call (gathered into kept[key] where one of that size is there, and left there for the next call) rather
    than a broadcast view of the table, so it may be changed in place."""
    w = table.shape[1]
    if candidates is None:
        rows, own = table.unsqueeze(0), False
    else:
        index = candidates.reshape(-1)
        rows = torch.index_select(table, 0, index, **kept_out(kept, key, (index.numel(), w), table))
        kept[key] = rows
        rows, own = rows.view(u, candidates.shape[1], w), True
    if share is not None:
        in_place = own and rows.dtype == torch.promote_types(rows.dtype, share.dtype)
        rows, own = (rows.add_(share.unsqueeze(1)) if in_place else rows + share.unsqueeze(1)), True
    return rows.expand(u, rows.shape[1], w), own


def step_rows(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """codebooks[m, codes[:, m]] for every step m: codebooks (M, K, w), codes (n, M) int64 -> (n, M, w).
    One index_select over the flattened codebooks (faster than advanced indexing on the CPU)."""
    M, K, w = codebooks.shape
    flat = codes + torch.arange(M, device=codes.device) * K
    return codebooks.reshape(M * K, w).index_select(0, flat.reshape(-1)).view(codes.shape[0], M, w)


def advance_instruction(instr: Optional[torch.Tensor], word: torch.Tensor) -> torch.Tensor:
    """The instruction stream's update I_{m+1} = I_m + E_m[i_m] (I_m None: the stream has not started)."""
    return word if instr is None else instr + word


def instruction_stream(instr_codebooks: torch.Tensor, codes: torch.Tensor, ctx_cond: Optional[torch.Tensor],
                       include_first: bool) -> torch.Tensor:
    """All conditioning instructions at once (gather + cumulative sum).

    instr_codebooks: (M-1, K, De); codes: (n, M); ctx_cond: (n, De) or None.
    Returns (n, S, De): I_2 .. I_M, with I_1 first when ``include_first``
    (a context starts the stream, I_1 = A ctx, and conditions step 1 too).
    """
    cond = torch.cumsum(step_rows(instr_codebooks, codes[:, :-1]), dim=1)  # (n, M-1, De)
    if include_first:
        cond = torch.cat([cond.new_zeros(cond.shape[0], 1, cond.shape[2]), cond], dim=1)
    if ctx_cond is not None:
        cond = cond + ctx_cond.unsqueeze(1)
    return cond


def recon_cond(recon: torch.Tensor, ctx_cond: Optional[torch.Tensor]) -> torch.Tensor:
    """QINCo-style conditioning: the partial reconstruction, plus the context's share when there is one."""
    if ctx_cond is None:
        return recon
    return recon + (ctx_cond if ctx_cond.ndim == recon.ndim else ctx_cond.unsqueeze(1))
