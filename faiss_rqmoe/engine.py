"""The inference engine: one network's weights run fast on one device, in one precision.

An ``Engine`` is built once from an ``RQMoE`` and an ``Execution``. It owns
everything derived from the weights (the fused first layer, the codeword
and decode tables, the fused kernel's copies of the weights, recorded CUDA
graphs), the kept temporaries of CPU encodes and decodes, one memory plan
(how many rows a chunk takes, from one byte budget) and the choice of
backend, made once a device: the torch path, or the fused Triton kernels
(kernels.py) on CUDA. What it computes is what the network's reference
``decode``/``encode`` compute (the equivalence tests hold it to that);
caches are keyed by the weights' versions, so a network trained further
or loaded anew is read afresh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Optional

import torch
from torch import nn

from . import kernels
from .arrays import check_positive_int
from .config import Condition
from .encode import encode_scaled, score_morphed
from .graphs import GraphCache, WeightsCache, bucket, stamp
from .model import RQMoE, add_into, autocast_enabled, kept_out
from .streams import step_rows

DEFAULT_MEM_BUDGET_BYTES = 1 << 30
# CPU decodes and encodes take chunks whose temporaries stay within this: larger chunks page-fault after
# glibc returns the freed heap between steps, smaller ones split the products (docs/experiments.md,
# sections 1g and 1j). A decode caps dense experts only: under top-1 routing smaller chunks split the
# experts' products further. The GPU takes the whole memory budget.
CPU_CHUNK_BYTES = 64 << 20
KERNELS = ("auto", "torch", "triton")
DTYPES = ("auto", "float32", "tfloat32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Execution:
    """How an engine runs the network (the arithmetic is the same; the rounding follows the precision).

    kernel: "auto" (the fused Triton kernel for CUDA data where it runs this architecture: dense experts
    or top-1 routing, d a power of two, hidden a multiple of 16; else torch), "torch" (batched matrix
    products, any device) or "triton" (the fused kernel on CUDA; an error where it cannot run; data on the
    CPU takes the torch path). dtype: "auto" (bfloat16 matrix inputs with float32 sums where the fused
    kernel runs, float32 elsewhere: results on the CPU do not depend on the processor's bfloat16
    instructions), "float32", "tfloat32" (the fused kernel's products in TF32; the torch path follows
    torch.backends.cuda.matmul.allow_tf32) or "bfloat16" (on the CPU a decode's products under torch's
    CPU autocast). cuda_graphs: on CUDA, decode batches of up to ``graphs.MAX_ROWS`` codes by replaying
    a recorded CUDA graph (padded to a power of two: float rounding may differ from the eager decode).
    """

    kernel: str = "auto"
    dtype: str = "auto"
    cuda_graphs: bool = True

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"Execution.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Execution.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"Execution.cuda_graphs must be True or False, got {self.cuda_graphs!r}")


@dataclasses.dataclass(frozen=True)
class Backend:
    """What an engine runs on one device: ``fused`` (the Triton kernels) or not, and the precision of its
    matrix inputs ("float32", "tfloat32" or "bfloat16")."""

    fused: bool
    precision: str


def choose_backend(config, execution: Execution, device: torch.device) -> Backend:
    """The backend an engine runs ``config``'s network on for data on ``device``, chosen once."""
    kernel = execution.kernel
    is_cuda = device.type == "cuda"
    runs_here = is_cuda or kernels.interpreting()
    routed_ok = config.top_k in (None, 1)
    if kernel == "triton" and runs_here:
        if not routed_ok:
            raise ValueError(f"the fused kernel runs dense experts or top-1 routing; routing="
                             f"{config.routing!r} runs on the torch path: use kernel='torch' or 'auto'")
        if not kernels.supports(config):
            raise ValueError(f"the fused kernel needs d a power of two >= 16 and hidden a multiple of 16, "
                             f"got d={config.d}, hidden={config.hidden}; use kernel='torch'")
    fusable = (kernel != "torch" and runs_here and routed_ok and kernels.supports(config)
               and (kernel == "triton" or kernels.available()))
    precision = execution.dtype if execution.dtype != "auto" else "bfloat16" if fusable else "float32"
    # exact float32 products in Triton run without tensor cores, slower than cuBLAS: auto keeps them in torch
    fused = fusable and (kernel == "triton" or precision != "float32")
    return Backend(fused=fused and config.n_morph_steps > 0, precision=precision)


class Engine:
    """Fast inference for one network: ``decode``, ``encode`` and the step-level operations encoding
    and search build on.

    model: the ``RQMoE`` whose weights it runs (read, never written); execution: how (``Execution``);
    mem_budget_bytes: the byte budget of one chunk's temporaries on a GPU (CPU chunks take
    CPU_CHUNK_BYTES at most).
    """

    def __init__(self, model: RQMoE, execution: Optional[Execution] = None,
                 mem_budget_bytes: int = DEFAULT_MEM_BUDGET_BYTES):
        if not isinstance(model, RQMoE):
            raise TypeError(f"model must be an RQMoE, got {type(model).__name__}")
        if execution is not None and not isinstance(execution, Execution):
            raise TypeError(f"execution must be an Execution, got {type(execution).__name__}")
        self.model = model
        self.config = model.config
        self.execution = execution or Execution()
        self.mem_budget_bytes = check_positive_int(mem_budget_bytes, "mem_budget_bytes")
        self._derived = WeightsCache()
        self._graphs = GraphCache()
        self._backends = {}
        self._cache_weights = True  # off while a CUDA graph that must derive them from the weights records
        self._kept = threading.local()

    def __repr__(self) -> str:
        return f"Engine({self.execution}, mem_budget_bytes={self.mem_budget_bytes}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def backend(self, device: Optional[torch.device] = None) -> Backend:
        """The backend for data on ``device`` (default: the model's), chosen once a device type."""
        device = self.device if device is None else device
        key = (device.type, kernels.interpreting())
        if key not in self._backends:
            self._backends[key] = choose_backend(self.config, self.execution, device)
        return self._backends[key]

    def fused(self, device: torch.device) -> bool:
        """Whether inference on tensors of ``device`` runs the fused kernels."""
        return self.backend(device).fused

    @contextlib.contextmanager
    def uncached_weights(self):
        """Within: every weight derived from the parameters is computed afresh and not kept. A CUDA graph
        recorded here computes them on every replay from the weights as they are then, which a graph of a
        training step needs: its replays change the weights without the host seeing it."""
        before, self._cache_weights = self._cache_weights, False
        try:
            yield self
        finally:
            self._cache_weights = before

    def _derive(self, key, params, build):
        """build(), cached under key while the tensors params keep their versions (and caching is on)."""
        weights = stamp([t for t in params if t is not None])
        if self._cache_weights and key in self._derived and self._derived[key][0] == weights:
            return self._derived[key][1]
        value = build()
        if self._cache_weights:
            self._derived[key] = (weights, value)
        return value

    # ------------------------------------------------------------------ memory plan
    def _morph_bytes_per_row(self, fused: bool = False, scored: bool = False) -> int:
        """Float32 temporaries one morphed codeword needs (peak estimate): on the torch path every expert's
        hidden units; where the fused kernel runs, the rows around it (gathered and projected codewords, the
        instruction stream, the kernel's rows in and out, the scores), the split launch's per-expert
        outputs and, under top-1, the torch gate's hidden units and routing indices. scored: an encode's
        candidate that the fused kernel scores inside (dense experts): only the launch's partial outputs
        (and gates) and its score."""
        c = self.config
        if fused:
            if scored and c.top_k is None:
                return max(kernels.split_scratch_bytes_per_row(c), 4 * c.d) + 4
            return 4 * (6 * c.d + 4 * c.cond_dim + 32 + (c.hidden + c.n_experts if c.top_k == 1 else 0)) + \
                kernels.split_scratch_bytes_per_row(c)
        return 4 * (3 * c.d + c.cond_dim + (3 * c.n_experts + 1) * c.hidden + 2 * c.n_experts * c.d + 16)

    def rows_per_chunk(self, rows_per_item: int, scored: bool = False, device: Optional[torch.device] = None,
                       cpu_cap: bool = True) -> int:
        """How many items fit the memory budget when each needs rows_per_item morphed rows (more where the
        fused kernel runs: it keeps the hidden units in registers; and more again for an encode's candidates,
        scored: the kernel scores them without writing them). On the CPU, with cpu_cap, at most
        CPU_CHUNK_BYTES of temporaries."""
        device = self.device if device is None else device
        fused = self.config.n_morph_steps > 0 and self.fused(device)
        per_item = max(1, rows_per_item) * self._morph_bytes_per_row(fused, scored)
        items = self.mem_budget_bytes // per_item
        if fused:  # and within one launch's int32 offsets (a launch runs a chunk's rows of one step, or a decode's
            # rows of every step)
            items = min(items, kernels.max_rows(self.config) // max(1, rows_per_item))
        if device.type == "cpu" and cpu_cap:
            items = min(items, CPU_CHUNK_BYTES // (max(1, rows_per_item) * self._morph_bytes_per_row()))
        return max(1, items)

    def chunk_items(self, rows_per_item: int, beam_size: int = 1) -> int:
        """Vectors an encode chunk takes (encode.py's coder protocol): rows_per_item candidates a vector
        scored, and under beam search ~3 (K,) float temporaries a hypothesis for the plain codewords."""
        bs = self.rows_per_chunk(rows_per_item, scored=True)
        if beam_size > 1:
            bs = min(bs, max(1, self.mem_budget_bytes // (beam_size * self.config.K * 4 * 3)))
        return bs

    @contextlib.contextmanager
    def temporaries(self):
        """Within, in this thread and on the CPU: the morphing's largest internal temporaries (a step's
        first-layer activations and inputs, the experts' updates and hidden units, an encode's gathered
        candidate rows) are written again from step to step and chunk to chunk (out=) instead of allocated
        afresh, and released on exit: glibc returns freed multi-megabyte blocks to the system between
        steps, and every fresh one page-faults again (docs/experiments.md, section 1j). Nothing kept is
        ever returned to a caller."""
        outermost = getattr(self._kept, "store", None) is None
        if outermost:
            self._kept.store = {}
        try:
            yield self
        finally:
            if outermost:
                self._kept.store = None

    def _spare(self, device: torch.device) -> Optional[dict]:
        """The kept temporaries on the CPU within ``temporaries()``, else None (fresh tensors)."""
        store = getattr(self._kept, "store", None)
        return store if device.type == "cpu" and store is not None else None

    # ------------------------------------------------------------------ derived weights
    def first_layer(self, s0: int, s1: int):
        """The network's ``first_layer(s0, s1)``, kept while the parameters do not change."""
        m = self.model
        return self._derive(("first", s0, s1), (m.expert_w1, m.expert_b1, m.gate_w1, m.gate_b1),
                            lambda: tuple(t.detach() for t in m.first_layer(s0, s1)))

    def kernel_weights(self, precision: str) -> tuple:
        """The fused kernel's copies of the weights (``kernels.kernel_weights``) for a precision."""
        m = self.model
        params = (m.expert_w1, m.expert_b1, m.expert_w2, m.expert_b2, m.gate_w1, m.gate_b1, m.gate_w2, m.gate_b2)
        dtype = kernels.PRECISIONS[precision][0]
        return self._derive(("kernel", precision), params,
                            lambda: kernels.kernel_weights(*(p.detach() for p in params), dtype=dtype))

    def codeword_tables(self, s: int):
        """What the projection and the first layer make of morphed step s's base codewords alone:
        z_c = C P_c + bias (K, d) and its first-layer pre-activations z_c W_in + b_in (K, (N+1)H).
        Both are linear in the codeword, so a candidate's z and pre-activation are these rows plus its
        conditioning row's share: encoding gathers them instead of multiplying every candidate."""
        m = self.model
        step = s + self.config.first_morphed

        def build():
            w_in, b_in = self.first_layer(s, s + 1)
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):  # outlives an autocast
                z_c = torch.addmm(m.proj_bias[s], m.codebooks[step], m.proj_code[s])  # (K, d)
                return z_c, torch.addmm(b_in[0, 0], z_c, w_in[0])

        params = (m.codebooks, m.proj_code, m.proj_bias, m.expert_w1, m.expert_b1, m.gate_w1, m.gate_b1)
        return self._derive(("codewords", s), params, build)

    def decode_tables(self):
        """What a decode's step inputs z are made of, summed per row (``gathered_z``, and the fused kernel).

        z of morphed step s (code step m = s + first_morphed) is linear in the codes:
        C_m[i_m] P_s + b_s + (sum_{j<m} E_j[i_j] + ctx share) Q_s. Returns tab (T, K, d) float32, the
        tables C_m P_s + b_s and E_j Q_s, step after step; toff (S + 1,) int32, where each step's tables
        start in tab; tcol (T,) int32, the code column each table is indexed by; and Q (S, De, d) float32
        (proj_cond) for the context's share, or None without instructions.
        """
        m, c = self.model, self.config

        def build():
            tabs, toff, tcol = [], [0], []
            # in float64, outside any autocast: the cache outlives both the autocast and the TF32 switch
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                for s, columns in enumerate(kernels.decode_table_columns(c)):
                    tabs.append(torch.addmm(m.proj_bias[s].double(), m.codebooks[columns[0]].double(),
                                            m.proj_code[s].double()))
                    tabs.extend(m.instr_codebooks[j].double() @ m.proj_cond[s].double() for j in columns[1:])
                    tcol.extend(columns)
                    toff.append(len(tcol))
                as_index = functools.partial(torch.tensor, dtype=torch.int32, device=self.device)
                return (torch.stack(tabs).float().contiguous(), as_index(toff), as_index(tcol),
                        m.proj_cond.detach().float().contiguous() if c.De > 0 else None)

        return self._derive(("decode_tables",), (m.codebooks, m.proj_code, m.proj_bias, m.instr_codebooks,
                                                 m.proj_cond), build)

    def _z_from_tables(self) -> bool:
        """Whether a decode sums the steps' inputs z from ``decode_tables`` (float32 weights, tables within
        the size cap) instead of projecting the gathered codewords and the instruction stream: at the
        default shape 35 table rows a vector instead of S·(d + De)·d multiply-adds (docs/experiments.md,
        section 1j)."""
        return (self._cache_weights and self.model.codebooks.dtype == torch.float32
                and kernels.decode_tables_bytes(self.config) <= kernels.DECODE_TABLES_MAX_BYTES)

    def gathered_z(self, codes: torch.Tensor, ctx_cond: Optional[torch.Tensor]) -> torch.Tensor:
        """The morphed steps' inputs z summed from ``decode_tables`` (condition 'instruction' or 'none'):
        codes (n, M) int64, ctx_cond (n, De) float32 or None (the context's share of the instructions) ->
        (S, n, d) float32, what the network's ``project`` makes of the gathered codewords and the
        instruction stream. One embedding_bag: a bag a (step, row) holding a table row a code the step
        depends on."""
        tab, _, tcol, Q = self.decode_tables()
        T, K, d = tab.shape
        n = codes.shape[0]
        rows = codes.index_select(1, tcol.long()) + torch.arange(0, T * K, K, device=codes.device)  # (n, T)
        flat, offsets, first = [], [], 0  # step by step, each row's tables side by side: bags of the step's size
        for columns in kernels.decode_table_columns(self.config):  # the sizes from the config: no device sync
            flat.append(rows[:, first:first + len(columns)].reshape(-1))
            offsets.append(torch.arange(first * n, (first + len(columns)) * n, len(columns), device=codes.device))
            first += len(columns)
        z = nn.functional.embedding_bag(torch.cat(flat), tab.view(T * K, d), torch.cat(offsets), mode="sum")
        z = z.view(-1, n, d)
        if Q is not None and ctx_cond is not None:
            z = torch.baddbmm(z, ctx_cond.to(z.dtype).unsqueeze(0).expand(z.shape[0], n, ctx_cond.shape[1]), Q)
        return z

    # ------------------------------------------------------------------ morphing
    def morph(self, s0: int, s1: int, z: torch.Tensor, sum_steps: bool = False) -> torch.Tensor:
        """The network's ``morph`` of z (S', B, d) for morphed steps s0..s1-1 -> (S', B, d), or with
        sum_steps their sum over the steps, (B, d), on this engine's backend."""
        backend = self.backend(z.device)
        m = self.model
        if backend.fused:
            choice = None
            if self.config.top_k == 1:  # the gate's choice in torch, float32
                choice = m.gate_logits(s0, s1, m.gate_hidden(s0, s1, z)).argmax(-1)
            return kernels.morph(self.config, self.kernel_weights(backend.precision), backend.precision, s0, z,
                                 sum_steps=sum_steps, choice=choice)
        if sum_steps:
            return self.morph(s0, s1, z).sum(0)
        if backend.precision == "bfloat16" and z.device.type in ("cuda", "cpu"):
            with torch.autocast(z.device.type, dtype=torch.bfloat16):
                return z + self._morph_delta(s0, s1, z).float()
        return add_into(self._morph_delta(s0, s1, z), z)

    def _morph_delta(self, s0: int, s1: int, z: torch.Tensor, pre: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model.morph_delta(s0, s1, z, pre=pre, first=self.first_layer(s0, s1),
                                      spare=self._spare(z.device))

    def candidate_inputs(self, s: int, cond: Optional[torch.Tensor]):
        """The two linear shares of morphed step s's network inputs: z_words (K, d), what the projection
        makes of the step's codewords (with its bias), and z_cond (u, d), the conditioning rows' share
        (None without conditioning). Candidate k of row j has z = z_words[k] + z_cond[j]."""
        return self.codeword_tables(s)[0], self.model.cond_share(s, cond)

    def morph_candidates(self, m: int, candidates: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                         n_rows: Optional[int] = None) -> torch.Tensor:
        """The network's ``morph_candidates`` (u, A, d) on this engine's backend. The codeword and the
        conditioning enter linearly, so their shares of z and of the first layer are computed apart (K rows
        and u rows) and only added per candidate: on the torch path no candidate pays the (d, (N+1)H)
        product. The fused kernel computes that product on tensor cores, which measured faster than
        adding table rows inside it (docs/experiments.md, section 1g)."""
        c = self.config
        s = m - c.first_morphed
        z_c, pre_c = self.codeword_tables(s)
        z_r = self.model.cond_share(s, cond)
        u = n_rows if n_rows is not None else (candidates.shape[0] if candidates is not None else cond.shape[0])
        fused = self.fused(z_c.device)
        kept = self._spare(z_c.device) if not fused else None
        kept = {} if kept is None else kept
        z, _ = candidate_rows(z_c, candidates, z_r, u, kept, "candidate z")  # (u, A, d)
        A = z.shape[1]
        z = z.reshape(1, u * A, c.d)
        if fused:  # the kernel computes the first layer itself: no (u, A, (N+1)H) table
            return self.morph(s, s + 1, z.contiguous())[0].reshape(u, A, c.d)
        share = None
        if z_r is not None:
            w_in, _ = self.first_layer(s, s + 1)
            share = z_r @ w_in[0]
        pre, own = candidate_rows(pre_c, candidates, share, u, kept, "candidate first layer")
        pre = pre.reshape(1, u * A, pre_c.shape[-1])
        pre = pre.relu_() if own else torch.relu(pre)  # not in place on the cached table itself
        return add_into(self._morph_delta(s, s + 1, z, pre=pre), z)[0].reshape(u, A, c.d)

    def score_candidates(self, m: int, candidates: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                         residual: torch.Tensor, owner: Optional[torch.Tensor] = None,
                         n_rows: Optional[int] = None):
        """Scores ||w||² - 2 <r, w> of step m's morphed candidate words against residual rows, and
        words(rows, which) (encode.score_morphed says what they are). Where the fused kernel runs dense
        experts it scores inside (kernels.candidate_scores) and words() sums the kept rows' partial
        outputs; elsewhere every candidate is morphed first."""
        backend = self.backend(residual.device)
        if self.config.top_k is None and backend.fused:
            s = m - self.config.first_morphed
            z_words, z_cond = self.candidate_inputs(s, cond)
            scores, parts = kernels.candidate_scores(self.config, self.kernel_weights(backend.precision),
                                                     backend.precision, s, z_words, z_cond, candidates, residual,
                                                     owner, n_rows)
            A = scores.shape[1]
            return scores, lambda rows, which: parts[:, rows * A + which].sum(0)
        morphed = self.morph_candidates(m, candidates, cond, n_rows)  # (u, A, d)
        return score_morphed(morphed, residual, owner), lambda rows, which: morphed[rows, which]

    # ----------------------------------------------------------------- decode
    def decode_steps(self, codes: torch.Tensor, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The scaled reconstructions of validated codes (n, M) int64 with normalised contexts ctx (n, ctx_dim)
        or None: (n, d) float32, the network's ``decode_steps(codes, ctx, sum_steps=True)`` on this engine's
        backend."""
        c, m = self.config, self.model
        if c.n_morph_steps == 0:
            return step_rows(m.codebooks, codes).sum(1)
        ctx_cond = m.ctx_cond(ctx)
        if c.mode is Condition.RECONSTRUCTION:
            return m.decode_steps_sequential(codes, step_rows(m.codebooks, codes), ctx_cond, morph=self.morph).sum(1)
        backend = self.backend(codes.device)
        if backend.fused and kernels.gathers_z(c):  # the kernel sums each step's input from tables
            ctx_cond = ctx_cond.float() if ctx_cond is not None and c.De > 0 else None  # (autocast)
            return m.plus_unmorphed(kernels.decode_sum(c, self.kernel_weights(backend.precision), backend.precision,
                                                       codes, ctx_cond, self.decode_tables()), codes)
        z = self.gathered_z(codes, ctx_cond) if self._z_from_tables() else m.step_inputs(codes, ctx_cond)
        return m.plus_unmorphed(self.morph(0, c.n_morph_steps, z, sum_steps=True), codes)

    def _decode_block(self, codes: torch.Tensor, ctx_s: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw reconstructions of a block of validated codes (n, M), normalised contexts or None -> (n, d)."""
        return self.decode_steps(codes, ctx_s).mul_(self.model.scale)

    def _graphed_decode(self, codes: torch.Tensor, ctx_s: Optional[torch.Tensor],
                        out: torch.Tensor) -> Optional[torch.Tensor]:
        """decode into out (n, d) through a recorded CUDA graph (graphs.py); None where that does not
        apply: not on CUDA, graphs off, a batch past graphs.MAX_ROWS or the memory budget's chunk, a
        computation that synchronises with the host (top-k routing on the torch path), or a decode that a
        caller's graph is recording (it becomes part of that graph)."""
        c = self.config
        rows = bucket(codes.shape[0])
        if not (codes.is_cuda and self.execution.cuda_graphs and rows) or c.n_morph_steps == 0 \
                or rows > self.rows_per_chunk(c.n_morph_steps, device=codes.device):
            return None
        if torch.cuda.is_current_stream_capturing():  # inside a caller's graph (a search): record into that one
            return None
        if c.top_k is not None and not (c.top_k == 1 and self.fused(codes.device)):
            return None
        inputs = (codes,) if ctx_s is None else (codes, ctx_s)
        # what else changes the recorded arithmetic: the device, the TF32 switch, an enclosing autocast,
        # the fused kernel's tile sizes (a recorded graph keeps the launches it was recorded with)
        key = ("decode", rows, ctx_s is not None, self.execution, codes.device,
               torch.backends.cuda.matmul.allow_tf32, autocast_enabled("cuda"), kernels.launch_key())
        return self._graphs.run(key, self._weights_stamp(), self._decode_block, inputs, out, rows)

    def _weights_stamp(self) -> tuple:
        """stamp() of every parameter and buffer of the network, read from its own dicts (it has no
        submodules unless a subclass adds some), much faster than parameters(): a graphed decode of
        1 024 codes pays this on the host every call."""
        m = self.model
        if m._modules:
            return stamp(list(m.parameters()) + list(m.buffers()))
        return stamp([t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None])

    def decode(self, codes, ctx=None) -> torch.Tensor:
        """Reconstruct raw vectors from codes.

        codes: (n, M) integer array/tensor with values in [0, K) (uint8 codes are taken as they are on a
        GPU); ctx: (n, ctx_dim) float32 raw contexts (e.g. IVF centroids), required exactly when
        config.ctx_dim > 0. Returns (n, d) float32 on the model's device.
        """
        m = self.model
        codes = m.check_codes(codes)
        return self.decode_checked(codes, m.check_ctx(ctx, codes.shape[0]))

    def decode_checked(self, codes: torch.Tensor, ctx_s: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``decode`` of inputs already checked: codes (n >= 1, M) int64 in [0, K) and normalised contexts
        (``RQMoE.normalize_ctx``) or None, on the model's device. Nothing here waits for the device, so a
        CUDA graph can record it (an index's search decodes its own stored codes this way)."""
        m, c = self.model, self.config
        out = torch.empty(codes.shape[0], c.d, device=m.device)  # a normal tensor, made outside inference mode
        with torch.inference_mode():
            if self._graphed_decode(codes, ctx_s, out) is not None:
                return out
            rows_per_code = max(1, c.n_morph_steps)
            # CPU chunks cap dense experts only: top-k routing splits its rows by expert further itself
            bs = self.rows_per_chunk(rows_per_code, cpu_cap=c.top_k is None)
            if c.n_morph_steps > 0 and self.fused(codes.device) and kernels.gathers_z(c):
                bs = kernels.decode_sum_rows(c, self.mem_budget_bytes)  # no per-step rows outside the kernel
            with self.temporaries():
                for i0 in range(0, codes.shape[0], bs):
                    ctx_chunk = None if ctx_s is None else ctx_s[i0:i0 + bs]
                    out[i0:i0 + bs] = self.decode_steps(codes[i0:i0 + bs], ctx_chunk)
        return out.mul_(m.scale)

    # ----------------------------------------------------------------- encode
    def encode(self, x, n_candidates: Optional[int] = None, beam_size: int = 1, ctx=None) -> torch.Tensor:
        """Encode raw vectors: greedy (beam_size=1) or beam search, as the network's ``encode`` (up to near
        ties that float rounding decides otherwise).

        x: (n, d) float32; n_candidates: None (exact) or A < K base codewords nearest the residual run
        through the networks; beam_size: B >= 1 partial codes kept a vector; ctx: (n, ctx_dim) float32 raw
        contexts, required exactly when config.ctx_dim > 0. Returns (n, M) int64 codes on the model's
        device. Temporaries stay within the memory plan.
        """
        m = self.model
        x = m.check_vectors(x)
        ctx_s = m.check_ctx(ctx, x.shape[0])
        if n_candidates is not None:
            n_candidates = check_positive_int(n_candidates, "n_candidates")
        beam_size = check_positive_int(beam_size, "beam_size")
        with torch.inference_mode():
            return self.encode_scaled(x / m.scale, n_candidates, beam_size, ctx_s)

    def encode_scaled(self, xs: torch.Tensor, n_candidates: Optional[int] = None, beam_size: int = 1,
                      ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``encode`` of validated scaled vectors xs (n, d) float32 with normalised contexts or None, in the
        caller's grad mode: (n, M) int64."""
        return encode_scaled(self.model, xs, n_candidates, beam_size, ctx, coder=self)


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
