"""Fused Triton kernels for the morphing networks' inference on CUDA.

``morph`` computes exactly what the network's ``RQMoE.morph`` computes (gate,
every expert's residual blocks, the gate-weighted sum). The functions here
receive tensors (the weights in ``kernel_weights``' layout, tables, rows) and
an architecture; the engine (engine.py) decides when they run. A program takes a block of
rows of one step and one expert, computes the gate and its expert's share,
keeps every hidden activation in registers and stores the gate-weighted
expert output; one sum over the experts follows. The memory traffic is the
rows in, the experts' partial outputs and the (cached) weights. The torch
path materialises the (rows, N·H) activations of every layer instead.
Matmul inputs are bfloat16, TF32 or float32 (``Execution.dtype``); sums are
float32. Without CUDA the module imports, and ``available()`` says False.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .config import Condition

try:
    import triton
    import triton.language as tl
except ImportError:  # CI and CPU-only installs: the torch path is used
    triton = None

# Tile settings of the kernels (rows a program, hidden units a chunk, warps, pipeline stages), tuned by
# `bench speed --sweep` (docs/experiments.md, sections 1e and 1h).
TILES = {"BLOCK_R": 64, "HC": 64, "num_warps": 4, "num_stages": 3}
# A decode of at least this many codes sums the steps inside each program, writing (N, R, d) partial outputs
# instead of (N, S, R, d); fewer codes give too few programs (docs/experiments.md, section 1h).
STEPS_IN_PROGRAM_MIN_ROWS = 8192
# The split launch reads gates computed by a launch before it; a decode from tables of more codes than this
# computes them in every expert's program instead, since the gate buffer no longer fits the L2 (section 1h).
GATHERED_GATE_ONCE_MAX_ROWS = 32768
# A larger architecture's decode tables (about M²/2 of (K, d)) are not built: its decode reads z.
DECODE_TABLES_MAX_BYTES = 64 << 20
N_PAD = 16  # the gate's logits are padded to 16 columns: tl.dot needs 16 at least


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the fused kernel can run here: Triton importable and a CUDA device present."""
    return triton is not None and torch.cuda.is_available()


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, for tests without a GPU)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def supports(config) -> bool:
    """Whether the kernel handles this architecture: d a power of two >= 16, hidden a multiple of 16,
    at most 16 experts. Other shapes run on the torch path."""
    d, H = config.d, config.hidden
    return d >= 16 and d & (d - 1) == 0 and H % 16 == 0 and config.n_experts <= N_PAD


if triton is not None:
    @triton.jit
    def _expert_out(y, s, n, S_total, w1_ptr, b1_ptr, w2_ptr, b2_ptr, D: tl.constexpr, H: tl.constexpr,
                    N: tl.constexpr, L: tl.constexpr, HC: tl.constexpr, PRECISION: tl.constexpr):
        # expert n of step s on a tile of rows y = z (BLOCK_R, D) float32: y_L with y_0 = z and
        # y_{l+1} = y_l + relu(y_l W1 + b1) W2 + b2. Each layer's products read a copy of y_l in the
        # weights' dtype, so the second products add straight into y: the live tiles are y (float32),
        # that copy and one chunk of hidden units. Matmul inputs in the weights' dtype, float32 sums.
        dcols = tl.arange(0, D)
        hcols = tl.arange(0, HC)
        wtype = w1_ptr.dtype.element_ty
        for layer in tl.static_range(L):
            block = (layer * S_total + s) * N + n
            yw = y.to(wtype)
            for h0 in range(0, H, HC):
                w1 = tl.load(w1_ptr + block * D * H + dcols[:, None] * H + (h0 + hcols)[None, :])
                hidden = tl.dot(yw, w1, input_precision=PRECISION) + \
                    tl.load(b1_ptr + block * H + h0 + hcols)[None, :]
                hidden = tl.maximum(hidden, 0.0).to(wtype)
                w2 = tl.load(w2_ptr + block * H * D + (h0 + hcols)[:, None] * D + dcols[None, :])
                y = tl.dot(hidden, w2, acc=y, input_precision=PRECISION)
            y += tl.load(b2_ptr + block * D + dcols)[None, :]
        return y

    @triton.jit
    def _gate_shares(z, s, g1_ptr, gb1_ptr, g2_ptr, gb2_ptr, D: tl.constexpr, H: tl.constexpr, NP: tl.constexpr,
                     BLOCK_R: tl.constexpr, HC: tl.constexpr, PRECISION: tl.constexpr):
        # the gate of step s on a tile of rows z (BLOCK_R, D) float32: softmax(relu(z G1 + g1) G2 + g2)
        # (BLOCK_R, NP) float32, the padded experts at 0 (their bias is -1e30)
        dcols = tl.arange(0, D)
        hcols = tl.arange(0, HC)
        ncols = tl.arange(0, NP)
        wtype = g1_ptr.dtype.element_ty
        zw = z.to(wtype)
        logits = tl.zeros((BLOCK_R, NP), dtype=tl.float32)
        for h0 in range(0, H, HC):
            g1 = tl.load(g1_ptr + s * D * H + dcols[:, None] * H + (h0 + hcols)[None, :])
            gh = tl.dot(zw, g1, input_precision=PRECISION) + tl.load(gb1_ptr + s * H + h0 + hcols)[None, :]
            gh = tl.maximum(gh, 0.0).to(wtype)
            g2 = tl.load(g2_ptr + s * H * NP + (h0 + hcols)[:, None] * NP + ncols[None, :])
            logits += tl.dot(gh, g2, input_precision=PRECISION)
        logits += tl.load(gb2_ptr + s * NP + ncols)[None, :]
        logits = logits - tl.max(logits, axis=1)[:, None]
        weights = tl.exp(logits)
        return weights / tl.sum(weights, axis=1)[:, None]

    @triton.jit
    def _z_tile(z_ptr, codes_ptr, tab_ptr, toff_ptr, tcol_ptr, ctx_ptr, pq_ptr, R, M, K, rows, row_ok, s_local, s,
                D: tl.constexpr, DC: tl.constexpr, BLOCK_R: tl.constexpr, Z_SOURCE: tl.constexpr,
                HAS_CTX: tl.constexpr, CTX_PRECISION: tl.constexpr):
        # the networks' input z of step s on a tile of rows, (BLOCK_R, D) float32, by Z_SOURCE:
        # Z_READ: read from z (S', R, D).
        # Z_TABLES (a decode): summed from table rows, one a code it depends on (decode_tables: the projection of
        # the step's codeword and of the instruction codewords before it), plus the context's share
        # ctx (R, DC) @ pq[s] (DC, D) where HAS_CTX (float32 inputs: CTX_PRECISION "ieee" or "tf32").
        # Z_ALL_CODEWORDS, Z_PICKED_CODEWORDS (an encode's candidates): row r is candidate r % K of conditioning
        # row r // K (K: candidates a conditioning row); z = tab[w] + ctx[r // K] with tab the projected codewords
        # (K', D), ctx the conditioning rows' share (u, D) where HAS_CTX, and w = r % K (all codewords) or
        # codes[r] (picked ones: codes holds each candidate's codeword)
        dcols = tl.arange(0, D)
        if Z_SOURCE == 1:
            z = tl.zeros((BLOCK_R, D), dtype=tl.float32)
            for t in range(tl.load(toff_ptr + s), tl.load(toff_ptr + s + 1)):
                code = tl.load(codes_ptr + rows.to(tl.int64) * M + tl.load(tcol_ptr + t), mask=row_ok, other=0)
                z += tl.load(tab_ptr + (t * K + code.to(tl.int64))[:, None] * D + dcols[None, :])
            if HAS_CTX:  # in slices of 16 context columns: a whole (DC, D) float32 slice a pipeline stage
                # would outgrow the shared memory
                ccols = tl.arange(0, 16)
                for c0 in tl.static_range(0, DC, 16):
                    ctx = tl.load(ctx_ptr + rows.to(tl.int64)[:, None] * DC + c0 + ccols[None, :],
                                  mask=row_ok[:, None], other=0.0)
                    pq = tl.load(pq_ptr + s * DC * D + (c0 + ccols)[:, None] * D + dcols[None, :])
                    z = tl.dot(ctx, pq, acc=z, input_precision=CTX_PRECISION)
        elif Z_SOURCE >= 2:
            if Z_SOURCE == 3:
                word = tl.load(codes_ptr + rows.to(tl.int64), mask=row_ok, other=0).to(tl.int64)
            else:
                word = (rows % K).to(tl.int64)
            z = tl.load(tab_ptr + word[:, None] * D + dcols[None, :])
            if HAS_CTX:
                owner = (rows // K).to(tl.int64)
                z += tl.load(ctx_ptr + owner[:, None] * D + dcols[None, :], mask=row_ok[:, None], other=0.0)
        else:
            z = tl.load(z_ptr + (s_local * R + rows)[:, None] * D + dcols[None, :], mask=row_ok[:, None], other=0.0)
        return z

    @triton.jit
    def _score_kernel(parts_ptr, res_ptr, owner_ptr, scores_ptr, B, A, R, P: tl.constexpr, D: tl.constexpr,
                      BLOCK_R: tl.constexpr, HAS_OWNER: tl.constexpr):
        # scores (B, A) of candidate words against residuals res (B, D): ||w||^2 - 2 <r, w>, where the word of
        # (b, k) is the sum over p of parts (P, R, D) at row owner[b] * A + k (b * A + k without owners)
        q = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = q < B * A
        b = (q // A).to(tl.int64)
        k = (q % A).to(tl.int64)
        owner = tl.load(owner_ptr + b, mask=ok, other=0) if HAS_OWNER else b
        src = owner * A + k
        dcols = tl.arange(0, D)
        word = tl.zeros((BLOCK_R, D), dtype=tl.float32)
        for p in tl.static_range(P):
            word += tl.load(parts_ptr + (p * R + src)[:, None] * D + dcols[None, :], mask=ok[:, None], other=0.0)
        res = tl.load(res_ptr + b[:, None] * D + dcols[None, :], mask=ok[:, None], other=0.0)
        tl.store(scores_ptr + q, tl.sum(word * word, axis=1) - 2.0 * tl.sum(word * res, axis=1), mask=ok)

    @triton.jit
    def _gate_kernel(z_ptr, gate_ptr, R, s0, g1_ptr, gb1_ptr, g2_ptr, gb2_ptr,
                     codes_ptr, tab_ptr, toff_ptr, tcol_ptr, ctx_ptr, pq_ptr, M, K,
                     D: tl.constexpr, H: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, DC: tl.constexpr,
                     BLOCK_R: tl.constexpr, HC: tl.constexpr, PRECISION: tl.constexpr, Z_SOURCE: tl.constexpr,
                     HAS_CTX: tl.constexpr, CTX_PRECISION: tl.constexpr):
        # the gates of a (row block, step) into gate (S', R, NP), for the split launch to read (GATE_IN)
        pid = tl.program_id(0)
        s_local = tl.program_id(1)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        z = _z_tile(z_ptr, codes_ptr, tab_ptr, toff_ptr, tcol_ptr, ctx_ptr, pq_ptr, R, M, K, rows, row_ok, s_local,
                    s0 + s_local, D=D, DC=DC, BLOCK_R=BLOCK_R, Z_SOURCE=Z_SOURCE, HAS_CTX=HAS_CTX,
                    CTX_PRECISION=CTX_PRECISION)
        gate = _gate_shares(z, s0 + s_local, g1_ptr, gb1_ptr, g2_ptr, gb2_ptr, D=D, H=H, NP=NP, BLOCK_R=BLOCK_R,
                            HC=HC, PRECISION=PRECISION)
        ncols = tl.arange(0, NP)
        tl.store(gate_ptr + (s_local * R + rows)[:, None] * NP + ncols[None, :], gate, mask=row_ok[:, None])

    @triton.jit
    def _step_part(z_ptr, gate_ptr, R, rows, row_ok, s_local, s, S_total, n,
                   w1_ptr, b1_ptr, w2_ptr, b2_ptr, g1_ptr, gb1_ptr, g2_ptr, gb2_ptr,
                   codes_ptr, tab_ptr, toff_ptr, tcol_ptr, ctx_ptr, pq_ptr, M, K,
                   D: tl.constexpr, H: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, L: tl.constexpr,
                   DC: tl.constexpr, BLOCK_R: tl.constexpr, HC: tl.constexpr, PRECISION: tl.constexpr,
                   SPLIT: tl.constexpr, GATE_IN: tl.constexpr, Z_SOURCE: tl.constexpr, HAS_CTX: tl.constexpr,
                   CTX_PRECISION: tl.constexpr):
        # step s on a tile of rows (its z from _z_tile): expert n's gate-weighted output (SPLIT) or the
        # gate-weighted sum of every expert's, (BLOCK_R, D) float32. GATE_IN: the gates come from
        # _gate_kernel's (S', R, NP)
        z = _z_tile(z_ptr, codes_ptr, tab_ptr, toff_ptr, tcol_ptr, ctx_ptr, pq_ptr, R, M, K, rows, row_ok, s_local, s,
                    D=D, DC=DC, BLOCK_R=BLOCK_R, Z_SOURCE=Z_SOURCE, HAS_CTX=HAS_CTX, CTX_PRECISION=CTX_PRECISION)
        ncols = tl.arange(0, NP)
        if GATE_IN:
            gate = tl.load(gate_ptr + (s_local * R + rows)[:, None] * NP + ncols[None, :], mask=row_ok[:, None],
                           other=0.0)
        else:
            gate = _gate_shares(z, s, g1_ptr, gb1_ptr, g2_ptr, gb2_ptr, D=D, H=H, NP=NP, BLOCK_R=BLOCK_R, HC=HC,
                                PRECISION=PRECISION)
        # the experts: z + Σ_n a_n (y_L^n - z) = Σ_n a_n y_L^n, the gate's shares summing to 1
        if SPLIT:
            share = tl.sum(tl.where(ncols[None, :] == n, gate, 0.0), axis=1)
            morphed = share[:, None] * _expert_out(z, s, n, S_total, w1_ptr, b1_ptr, w2_ptr, b2_ptr, D=D, H=H, N=N,
                                                   L=L, HC=HC, PRECISION=PRECISION)
        else:
            morphed = tl.zeros((BLOCK_R, D), dtype=tl.float32)
            for e in tl.static_range(N):
                share = tl.sum(tl.where(ncols[None, :] == e, gate, 0.0), axis=1)
                morphed += share[:, None] * _expert_out(z, s, e, S_total, w1_ptr, b1_ptr, w2_ptr, b2_ptr, D=D, H=H,
                                                        N=N, L=L, HC=HC, PRECISION=PRECISION)
        return morphed

    @triton.jit
    def _morph_kernel(z_ptr, out_ptr, R, s0, S_span, S_total,
                      w1_ptr, b1_ptr, w2_ptr, b2_ptr, g1_ptr, gb1_ptr, g2_ptr, gb2_ptr, gate_ptr,
                      codes_ptr, tab_ptr, toff_ptr, tcol_ptr, ctx_ptr, pq_ptr, M, K,
                      D: tl.constexpr, H: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, L: tl.constexpr,
                      DC: tl.constexpr, BLOCK_R: tl.constexpr, HC: tl.constexpr, PRECISION: tl.constexpr,
                      SPLIT: tl.constexpr, GATE_IN: tl.constexpr,
                      SUM_STEPS: tl.constexpr, Z_SOURCE: tl.constexpr, HAS_CTX: tl.constexpr,
                      CTX_PRECISION: tl.constexpr):
        # z (S_span, R, D) holds steps s0..s0+S_span-1, or the programs build each z (_z_tile's Z_SOURCE).
        # SPLIT: one program a (row block, step, expert), each storing its gate-weighted expert output into
        # out[n] for a sum over n outside; else one program a (row block, step). SUM_STEPS: a
        # program loops over the S_span steps and stores their sum instead, so out is (N, R, D) (SPLIT) or
        # (R, D), and the grid's steps axis is 1.
        # the grid: (row blocks x experts, steps) where SPLIT, the expert varying fastest, so the N programs of
        # a row block run side by side and read its rows from L2 once; else (row blocks, steps)
        if SPLIT:
            pid = tl.program_id(0) // N
            n = tl.program_id(0) % N
        else:
            pid = tl.program_id(0)
            n = 0
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        dcols = tl.arange(0, D)
        if SUM_STEPS:
            part = tl.zeros((BLOCK_R, D), dtype=tl.float32)
            for s_local in range(0, S_span):
                part += _step_part(z_ptr, gate_ptr, R, rows, row_ok, s_local, s0 + s_local, S_total, n, w1_ptr,
                                   b1_ptr, w2_ptr, b2_ptr, g1_ptr, gb1_ptr, g2_ptr, gb2_ptr, codes_ptr, tab_ptr,
                                   toff_ptr, tcol_ptr, ctx_ptr, pq_ptr, M, K, D=D, H=H, N=N, NP=NP, L=L, DC=DC,
                                   BLOCK_R=BLOCK_R, HC=HC, PRECISION=PRECISION, SPLIT=SPLIT, GATE_IN=GATE_IN,
                                   Z_SOURCE=Z_SOURCE, HAS_CTX=HAS_CTX, CTX_PRECISION=CTX_PRECISION)
            target = rows  # out (N, R, D) or (R, D)
            expert_stride = R
        else:
            s_local = tl.program_id(1)
            part = _step_part(z_ptr, gate_ptr, R, rows, row_ok, s_local, s0 + s_local, S_total, n, w1_ptr, b1_ptr,
                              w2_ptr, b2_ptr, g1_ptr, gb1_ptr, g2_ptr, gb2_ptr, codes_ptr, tab_ptr, toff_ptr,
                              tcol_ptr, ctx_ptr, pq_ptr, M, K, D=D, H=H, N=N, NP=NP, L=L, DC=DC, BLOCK_R=BLOCK_R,
                              HC=HC, PRECISION=PRECISION, SPLIT=SPLIT, GATE_IN=GATE_IN, Z_SOURCE=Z_SOURCE,
                              HAS_CTX=HAS_CTX, CTX_PRECISION=CTX_PRECISION)
            target = s_local * R + rows  # out (N, S_span, R, D) or (S_span, R, D)
            expert_stride = S_span * R
        if SPLIT:
            target += n * expert_stride
        tl.store(out_ptr + target[:, None] * D + dcols[None, :], part, mask=row_ok[:, None])

    @triton.jit
    def _routed_kernel(z_ptr, out_ptr, order_ptr, ends_ptr, counts_ptr, starts_ptr, G, s0, S_total,
                       w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                       D: tl.constexpr, H: tl.constexpr, N: tl.constexpr, L: tl.constexpr, GP: tl.constexpr,
                       BLOCK_R: tl.constexpr, HC: tl.constexpr, PRECISION: tl.constexpr):
        # top-1 routing: the rows are sorted by (step, expert) group, and every program takes BLOCK_R rows
        # of one group, so it runs that group's expert only
        pid = tl.program_id(0)
        gcols = tl.arange(0, GP)
        ends = tl.load(ends_ptr + gcols, mask=gcols < G, other=2147483647)  # cumulative blocks a group
        g = tl.sum((ends <= pid).to(tl.int32), axis=0)
        if g < G:
            first_block = tl.sum(tl.where(gcols == g - 1, ends, 0), axis=0)  # 0 for the first group
            local = (pid - first_block) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = local < tl.load(counts_ptr + g)
            rows = tl.load(order_ptr + tl.load(starts_ptr + g) + local, mask=row_ok, other=0)
            s_local = g // N
            n = g % N
            s = s0 + s_local
            dcols = tl.arange(0, D)
            offsets = rows[:, None] * D + dcols[None, :]
            z = tl.load(z_ptr + offsets, mask=row_ok[:, None], other=0.0)
            out = _expert_out(z, s, n, S_total, w1_ptr, b1_ptr, w2_ptr, b2_ptr, D=D, H=H, N=N, L=L, HC=HC,
                              PRECISION=PRECISION)
            tl.store(out_ptr + offsets, out, mask=row_ok[:, None])


def kernel_weights(expert_w1, expert_b1, expert_w2, expert_b2, gate_w1, gate_b1, gate_w2, gate_b2,
                   dtype: torch.dtype) -> tuple:
    """The morphing networks' weights in the kernels' layout: matrices in ``dtype``, biases float32, the
    gate's last layer padded to N_PAD columns (logits of -1e30 in the padding). Takes the network's stacked
    parameters (S morphed steps, N experts, L layers) and returns the eight tensors every launch reads."""
    S, H, N = gate_w2.shape
    with torch.no_grad():
        g2 = gate_w2.new_zeros(S, H, N_PAD)
        g2[:, :, :N] = gate_w2
        gb2 = gate_b2.new_full((S, N_PAD), -1e30)
        gb2[:, :N] = gate_b2
        return (expert_w1.to(dtype).contiguous(), expert_b1.float().reshape(-1).contiguous(),
                expert_w2.to(dtype).contiguous(), expert_b2.float().reshape(-1).contiguous(),
                gate_w1.to(dtype).contiguous(), gate_b1.float().contiguous(),
                g2.to(dtype).contiguous(), gb2.float().contiguous())


# Execution.dtype -> (the weights' dtype, tl.dot's input precision)
PRECISIONS = {"float32": (torch.float32, "ieee"), "tfloat32": (torch.float32, "tf32"),
              "bfloat16": (torch.bfloat16, "ieee")}


def morph(config, weights: tuple, precision: str, s0: int, z: torch.Tensor, sum_steps: bool = False,
          choice: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The morphed codewords of steps s0..s0+S'-1: z (S', R, d) float32 -> (S', R, d) float32, as the
    network's ``morph`` computes them. weights: ``kernel_weights`` in PRECISIONS[precision]'s dtype. Dense
    experts: one fused launch (then a sum over the experts' partial outputs, where it splits them over
    programs). Top-1 routing: choice (S', R) int64, each row's expert, and one launch whose programs each
    run one expert on sorted rows. sum_steps: their sum over the steps instead, (R, d) float32."""
    if triton is None:
        raise RuntimeError("the fused kernel needs Triton (pip install triton) and a CUDA device")
    z = z.contiguous()
    S_, R, _ = z.shape
    if R == 0:
        out = torch.empty_like(z)
        return out.sum(0) if sum_steps else out
    if config.top_k == 1:
        out = _routed_morph(config, weights, precision, s0, z, choice, torch.empty_like(z))
        return out.sum(0) if sum_steps else out
    return _dense_launch(config, weights, precision, s0, S_, R, z, sum_steps)


def gathers_z(config) -> bool:
    """Whether a decode of this architecture can build the networks' inputs inside the kernel from tables
    (dense experts, condition 'instruction', an instruction width the kernel's product takes, tables within
    DECODE_TABLES_MAX_BYTES)."""
    De = config.cond_dim
    return (config.top_k is None and config.mode is Condition.INSTRUCTION
            and (De == 0 or (De >= 16 and De & (De - 1) == 0))
            and decode_tables_bytes(config) <= DECODE_TABLES_MAX_BYTES)


def decode_table_columns(config) -> list:
    """The code columns each morphed step's input z depends on, one list a step (a decode keeps a table for
    each): the step's own code m first, then the earlier codes 0..m-1 whose instruction codewords condition
    it (none without instructions)."""
    return [[m] + list(range(m if config.De > 0 else 0)) for m in range(config.first_morphed, config.M)] \
        if config.n_morph_steps else []


def decode_tables_bytes(config) -> int:
    """Bytes of a decode's tables for this architecture: one (K, d) float32 table a morphed step and one a
    (step, earlier instruction), about M²/2 of them (4.6 MB at d=128, 8 bytes of 8 bits)."""
    return sum(map(len, decode_table_columns(config))) * config.K * config.d * 4


def decode_sum(config, weights: tuple, precision: str, codes: torch.Tensor, ctx_cond, tables: tuple) -> torch.Tensor:
    """The morphed steps' share of a decode, summed over the steps: codes (R, M) int64, ctx_cond (R, De) float32
    or None (the context's share of the instructions) -> (R, d) float32. tables: (tab (T, K, d) float32, toff
    (S + 1,) int32, tcol (T,) int32, Q (S, De, d) float32 or None), the tables z is summed from (see
    ``decode_table_columns``). The programs sum each row's network input from them instead of reading a
    projected (S, R, d) tensor."""
    if not gathers_z(config):
        raise ValueError("decode_sum: this architecture's decode reads z (kernels.gathers_z is False)")
    R = codes.shape[0]
    if R == 0:
        return codes.new_zeros(0, config.d, dtype=torch.float32)
    return _dense_launch(config, weights, precision, 0, config.n_morph_steps, R, None, True,
                         decode=(codes.contiguous(), ctx_cond, tables))


def candidate_scores(config, weights: tuple, precision: str, s: int, z_words: torch.Tensor,
                     z_cond: Optional[torch.Tensor], picked: Optional[torch.Tensor], residual: torch.Tensor,
                     owner: Optional[torch.Tensor] = None, n_rows: Optional[int] = None):
    """Scores of morphed step s's candidate codewords against residuals, the words never written whole.

    Candidate k of conditioning row j has the network input z = z_words[w] + z_cond[j] (w = k, or
    picked[j, k]): z_words (K, d) float32, what the projection makes of the step's codewords; z_cond (u, d)
    float32, the conditioning rows' share, or None; picked (u, A) int64 codeword indices, or None for all K
    (A = K). residual (b, d) float32; owner (b,) int64, the conditioning row each residual row reads (None:
    row i reads row i, b = u); n_rows: u where neither z_cond nor picked says it (else b). The programs build
    z from those rows (no (u·A, d) input is written), the experts' outputs go to the launch's partial
    outputs, and one reduction (_score_kernel) sums them into each word w and stores ||w||² - 2 <r, w>: the
    words and their norms make no pass through memory. Returns scores (b, A) float32 and parts (P, u·A, d)
    float32, whose sum over P is the morphed words (row j·A + k): the caller sums the rows it keeps.
    """
    u = z_cond.shape[0] if z_cond is not None else picked.shape[0] if picked is not None else \
        n_rows if n_rows is not None else residual.shape[0]
    A = picked.shape[1] if picked is not None else z_words.shape[0]
    b = residual.shape[0]
    scores = torch.empty(b, A, device=residual.device, dtype=torch.float32)
    if u * A == 0:
        return scores, scores.new_empty(1, 0, config.d)
    parts = _dense_launch(config, weights, precision, s, 1, u * A, None, False, words=(z_words, z_cond, picked, A),
                          parts=True)
    if b * A:
        block = 64
        _score_kernel[(triton.cdiv(b * A, block),)](
            parts, residual.contiguous(), residual if owner is None else owner.contiguous(), scores, b, A, u * A,
            P=parts.shape[0], D=config.d, BLOCK_R=block, HAS_OWNER=owner is not None, num_warps=4)
    return scores, parts


Z_READ, Z_TABLES, Z_ALL_CODEWORDS, Z_PICKED_CODEWORDS = 0, 1, 2, 3  # _z_tile's sources of z


def _z_arguments(config, z, decode, words):
    """The kernel arguments that say where z comes from: (z, the six source tensors of _z_tile, its
    constexprs and sizes). Pointers a source does not read get some tensor of the right dtype."""
    c = config
    if decode is not None:  # a decode: z summed from the decode tables and the context's product
        codes, ctx, (tab, toff, tcol, pq) = decode
        has_ctx = ctx is not None
        tensors = (codes, tab, toff, tcol, ctx.contiguous() if has_ctx else tab, pq if has_ctx else tab)
        return tab, tensors, dict(M=c.M, K=c.K, DC=max(16, c.cond_dim), Z_SOURCE=Z_TABLES, HAS_CTX=has_ctx)
    if words is not None:  # an encode's candidates: z = projected codeword + conditioning row's share
        z_words, z_cond, picked, A = words
        has_ctx = z_cond is not None
        index = picked.reshape(-1).contiguous() if picked is not None else z_words
        tensors = (index, z_words.contiguous(), z_words, z_words, z_cond.contiguous() if has_ctx else z_words,
                   z_words)
        kind = Z_PICKED_CODEWORDS if picked is not None else Z_ALL_CODEWORDS
        return z_words, tensors, dict(M=0, K=A, DC=16, Z_SOURCE=kind, HAS_CTX=has_ctx)
    return z, (z,) * 6, dict(M=0, K=0, DC=16, Z_SOURCE=Z_READ, HAS_CTX=False)


def _dense_launch(config, weights: tuple, precision: str, s0: int, S_: int, R: int, z, sum_steps: bool,
                  decode=None, words=None, parts: bool = False) -> torch.Tensor:
    """morph(), decode_sum() and candidate_scores() for dense experts: z (S_, R, d) float32, or the programs
    build it, from decode = (codes, ctx_cond, tables) or from words = (z_words, z_cond, picked, A) (see
    candidate_scores). Returns (S_, R, d), or (R, d) with sum_steps, or with parts the launch's partial
    outputs for one step, (P, R, d) whose sum over P is the result (P: the experts where the launch splits
    them, else 1)."""
    c = config
    dtype, dot_precision = PRECISIONS[precision]
    blocks = triton.cdiv(R, TILES["BLOCK_R"])
    # a decode of many rows sums the steps inside the programs: no (S', R, d) partial outputs to write and read
    steps_in_program = sum_steps and R >= STEPS_IN_PROGRAM_MIN_ROWS
    spans = 1 if steps_in_program else S_
    # the rows in and out are addressed with int32 offsets: a launch that would pass 2**31 of them is refused
    # (callers chunk by max_rows), and one whose split partial outputs would pass it runs unsplit
    steps_addressed = max(spans, S_ if decode is None and words is None else 1)  # z read: (S', R, d)
    if steps_addressed * R * c.d >= INT32_OFFSETS:
        raise ValueError(f"a fused launch of {steps_addressed} step(s) x {R} rows x d={c.d} passes the kernel's "
                         f"int32 offsets; take at most kernels.max_rows(config, steps)="
                         f"{max_rows(c, steps_addressed)} rows a launch")
    split = splits_experts(c) and c.n_experts * spans * R * c.d < INT32_OFFSETS
    empty = functools.partial(torch.empty, device=weights[0].device, dtype=torch.float32)
    # the (S', R, d) output exists only where it is returned or the unsplit launch writes it
    out = empty(S_, R, c.d) if not sum_steps else None
    target = empty(c.n_experts, spans, R, c.d) if split else out if out is not None else empty(spans, R, c.d)
    grid = (blocks * c.n_experts, spans) if split else (blocks, spans)
    z, tensors, source = _z_arguments(c, z, decode, words)
    # the context's product takes float32 inputs: exact for float32 decodes, TF32 for the others
    source["CTX_PRECISION"] = "ieee" if precision == "float32" else "tf32"
    # the table rows' loads are pipelined too: with float32 weights three stages of them, the weights' tiles
    # included, outgrow a Hopper chip's shared memory (288 KiB asked, 227 KiB there), so those take two
    stages = TILES["num_stages"] if decode is None or dtype != torch.float32 else min(2, TILES["num_stages"])
    launch = dict(D=c.d, H=c.hidden, N=c.n_experts, NP=N_PAD, BLOCK_R=TILES["BLOCK_R"],
                  HC=_hidden_chunk(c.hidden), PRECISION=dot_precision, num_warps=TILES["num_warps"],
                  num_stages=stages)
    gate_in = split and (decode is None or R <= GATHERED_GATE_ONCE_MAX_ROWS)
    gate = empty(S_, R, N_PAD) if gate_in else target
    if gate_in:
        _gate_kernel[(blocks, S_)](z, gate, R, s0, *weights[4:], *tensors, **source, **launch)
    _morph_kernel[grid](z, target, R, s0, S_, c.n_morph_steps, *weights, gate, *tensors, L=c.n_layers, SPLIT=split,
                        GATE_IN=gate_in, SUM_STEPS=steps_in_program, **source, **launch)
    if parts:
        return target.reshape(-1, R, c.d)
    if sum_steps:
        if split:
            return target.sum(dim=(0, 1))
        return target[0] if steps_in_program else target.sum(0)
    return torch.sum(target, dim=0, out=out) if split else out


def _hidden_chunk(hidden: int) -> int:
    """Hidden units a tile: TILES' chunk, or the largest of 64, 32, 16 that divides hidden."""
    return next(size for size in (TILES["HC"], 64, 32, 16) if hidden % size == 0)


def launch_key() -> tuple:
    """The launch settings, for the key of a recorded CUDA graph (which keeps the launches it was recorded with)."""
    return tuple(sorted(TILES.items())) + (STEPS_IN_PROGRAM_MIN_ROWS, GATHERED_GATE_ONCE_MAX_ROWS)


def splits_experts(config) -> bool:
    """Whether the dense kernel gives every expert its own programs for this architecture (dense experts,
    more than one)."""
    return config.n_experts > 1 and config.top_k is None


INT32_OFFSETS = 2 ** 31  # the kernels address rows with int32 offsets: (steps, rows, d) must stay below this


def max_rows(config, steps: int = 1) -> int:
    """The most rows one fused launch takes where it addresses (steps, rows, d) with int32 offsets: the z it
    reads and the outputs it writes a step (a decode from tables that sums the steps inside its programs
    addresses (rows, d) only: steps 1)."""
    return (INT32_OFFSETS - 1) // (max(1, steps) * config.d)


def decode_sum_rows(config, budget: int) -> int:
    """Codes a decode_sum launch may take for its temporaries to stay within budget bytes. From
    STEPS_IN_PROGRAM_MIN_ROWS codes the programs sum the steps, so a code needs its experts' partial
    outputs and its sum once, not once a step: (P + 1)·d floats, its gates (S·N_PAD, where computed once), its
    context share and its codes."""
    S, d = config.n_morph_steps, config.d
    P = config.n_experts if splits_experts(config) else 1
    around = 4 * (3 * d + config.cond_dim + S * N_PAD) + 8 * config.M  # sums, context share, gates, codes
    rows = min(budget // (4 * P * d + around), max_rows(config))
    if rows >= STEPS_IN_PROGRAM_MIN_ROWS:
        return rows
    return max(1, budget // (4 * S * P * d + around))  # fewer codes: partial outputs a step


def split_scratch_bytes_per_row(config) -> int:
    """Bytes of the split launch's per-expert outputs and gates for one morphed row (0 where it never
    splits)."""
    if not splits_experts(config):
        return 0
    return 4 * config.n_experts * config.d + 4 * N_PAD


def _routed_morph(config, weights: tuple, precision: str, s0: int, z: torch.Tensor, choice: torch.Tensor,
                  out: torch.Tensor):
    """morph() under top-1 routing: choice (S', R) int64, the gate's expert for every row; the rows sorted
    by (step, expert), then one launch whose programs each run one expert on BLOCK_R rows of its group."""
    c = config
    S_, R, _ = z.shape
    N, G, block_r = c.n_experts, S_ * c.n_experts, TILES["BLOCK_R"]
    group = (choice + torch.arange(S_, device=z.device).view(S_, 1) * N).reshape(-1)  # (S'·R,)
    order = torch.argsort(group).to(torch.int32)
    counts = torch.zeros(G, dtype=torch.int64, device=z.device).index_add_(0, group, torch.ones_like(group))
    ends = torch.cumsum((counts + block_r - 1) // block_r, 0)  # cumulative blocks a group
    starts = torch.cumsum(counts, 0) - counts
    grid = (triton.cdiv(S_ * R, block_r) + G,)  # an upper bound on the blocks: no host sync (CUDA graphs)
    _routed_kernel[grid](z, out, order, ends.to(torch.int32), counts.to(torch.int32), starts.to(torch.int32), G, s0,
                         c.n_morph_steps, *weights[:4], D=c.d, H=c.hidden, N=N, L=c.n_layers,
                         GP=triton.next_power_of_2(G), BLOCK_R=block_r, HC=_hidden_chunk(c.hidden),
                         PRECISION=PRECISIONS[precision][1], num_warps=TILES["num_warps"],
                         num_stages=TILES["num_stages"])
    return out
