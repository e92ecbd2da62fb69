"""The RQ-MoE network: two-part codebooks, the morphing mixture of experts, the differentiable forward
(docs/design.md, "The quantizer"). Fast inference lives in ``engine.py``; encoding's search in
``encode.py``.

All learned tensors live in a *scaled* space (raw vectors divided by the
scalar buffer ``scale``); the public methods take and return raw vectors.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from .arrays import as_codes, as_vectors_on, check_positive_int
from .config import Condition, RQMoEConfig
from .encode import encode_scaled, score_morphed
from .streams import advance_instruction, instruction_stream, recon_cond, step_rows

# morphed rows a reference encode or decode takes at once
REFERENCE_CHUNK_ROWS = 1 << 16
# starts of the instruction codewords (init_from_rq)
INSTR_INITS = ("codebooks", "random")


def _uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class RQMoE(nn.Module):
    """RQ-MoE quantizer: ``encode`` raw vectors to codes, ``decode`` codes back.

    The trainable network: its parameters, the differentiable forward that training runs, and a plain
    reference ``decode``/``encode`` (float32 torch, no caches). Parameters are stacked over the S morphed
    steps so that decoding runs a few batched matrix products for all steps at once. The fast paths
    (cached tables, fused kernels, CUDA graphs, kept temporaries) live in ``engine.Engine``, built from a
    model and held to it by the equivalence tests. ``dropout`` is applied to the experts' hidden units in
    training mode.
    """

    def __init__(self, config: RQMoEConfig):
        super().__init__()
        if not isinstance(config, RQMoEConfig):
            raise TypeError(f"config must be an RQMoEConfig, got {type(config).__name__}")
        self.config = config
        self.dropout = 0.0
        self.gate_usage: Optional[torch.Tensor] = None  # (S', N) mean gate weights of the last training pass
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

    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())

    # ------------------------------------------------------------------ inputs
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
    def init_from_rq(self, rq, scale: Optional[float] = None, instr_init: str = "random") -> "RQMoE":
        """Initialise from a trained ``faiss.ResidualQuantizer`` so the model *is* that RQ.

        rq: trained, with the same d, M and nbits. scale: the data scale
        (max |x| of the training set); None keeps the current ``scale``.
        Codebooks become rq's (divided by scale); the morphing networks are
        set to identity, so greedy encoding and decoding equal faiss RQ's.
        instr_init (RQ-MoE only): "codebooks" starts the instruction codewords
        as the base codewords (through a fixed orthonormal map when De != d),
        so that the instruction stream starts as the partial reconstruction
        QINCo-style conditions on; "random" keeps their small random start.
        """
        if instr_init not in INSTR_INITS:
            raise ValueError(f"instr_init must be one of {INSTR_INITS}, got {instr_init!r}")
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
        if self.instr_codebooks is not None and instr_init == "codebooks":
            self.instr_codebooks.copy_(self.codebooks[:-1] @ self.codeword_map())
        self.reset_morphing()
        self.initialized.fill_(True)
        return self

    def codeword_map(self) -> torch.Tensor:
        """(d, De) float32 on the model's device: the identity when De == d, else fixed orthonormal columns
        (De < d; seed 0) or the identity padded with zeros (De > d): how codewords become instruction words."""
        d, De = self.config.d, self.config.De
        if De >= d:
            return torch.eye(d, De, device=self.device)
        generator = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(d, De, generator=generator))
        return q.to(self.device)

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
    def project(self, s0: int, s1: int, base: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """z = P([c; cond]) for morphed steps s0..s1-1: base (S', B, d), cond (S', B, Dc) or None -> (S', B, d)."""
        z = torch.baddbmm(self.proj_bias[s0:s1, None, :], base, self.proj_code[s0:s1])
        if cond is not None and cond.shape[-1] > 0:
            z = torch.baddbmm(z, cond, self.proj_cond[s0:s1])
        return z

    def first_layer(self, s0: int, s1: int):
        """The first layer of every expert and of the gate, steps s0..s1-1, as one product:
        weight (S', d, (N+1)·H) and bias (S', 1, (N+1)·H)."""
        c = self.config
        S_, N, H = s1 - s0, c.n_experts, c.hidden
        experts_w = self.expert_w1[0, s0:s1].permute(0, 2, 1, 3).reshape(S_, c.d, N * H)
        experts_b = self.expert_b1[0, s0:s1].permute(0, 2, 1, 3).reshape(S_, 1, N * H)
        return (torch.cat([experts_w, self.gate_w1[s0:s1]], dim=2),
                torch.cat([experts_b, self.gate_b1[s0:s1, None, :]], dim=2))

    def morph(self, s0: int, s1: int, z: torch.Tensor) -> torch.Tensor:
        """Mixture of experts applied to z: (S', B, d) for morphed steps s0..s1-1 -> (S', B, d), in the
        caller's grad mode and precision (the reference the engine's paths are held to)."""
        return add_into(self.morph_delta(s0, s1, z), z)

    def morph_delta(self, s0: int, s1: int, z: torch.Tensor, pre: Optional[torch.Tensor] = None,
                    first: Optional[tuple] = None, spare: Optional[dict] = None) -> torch.Tensor:
        """The experts' gate-weighted residual updates, Σ_n a_n (y_n - z): (S', B, d) -> (S', B, d).

        Σ_n a_n = 1, so the morphed codeword is z plus this, and it sums the
        updates of every layer: Σ_l Σ_n a_n (h_ln W2_ln + b2_ln) with h_ln the
        expert's hidden units. The first layer of all experts and of the gate
        is one product (all read z). With one layer, the last product runs over
        the gate-weighted hidden units of all experts at once; with more, each
        expert's state feeds its next layer, so they run expert by expert,
        reading strided views of the shared first layer (no copies). pre: the
        first layer's activations (S', B, (N+1)H) when the caller has them;
        first: ``first_layer(s0, s1)`` when the caller keeps it; spare: a dict
        of temporaries that products without autograd or autocast may write
        into again (the engine's kept temporaries), else fresh tensors.
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
        spare = spare if spare is not None and products_in_place else {}

        def product(key, bias, x, w):  # torch.baddbmm(bias, x, w), into spare[key] where it fits, kept for later
            result = torch.baddbmm(bias, x, w, **kept_out(spare, key, (S_, R, w.shape[-1]), z))
            if products_in_place:
                spare[key] = result
            return result

        if pre is None and routed:  # the gate alone
            gate_hidden = self.gate_hidden(s0, s1, z)
        else:
            if pre is None:
                w_in, b_in = first if first is not None else self.first_layer(s0, s1)
                pre = relu(product("first", b_in, z, w_in))  # (S', R, (N+1)H)
            gate_hidden = pre[..., N * H:]
        gate = torch.softmax(self.gate_logits(s0, s1, gate_hidden), dim=-1)  # (S', R, N)
        if self.training and torch.is_grad_enabled():
            self.gate_usage = gate.mean(1)  # (S', N), for the load-balancing loss
        if routed:
            return self.routed_delta(s0, s1, z, gate, None if pre is None else pre[..., :N * H])
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

    def routed_delta(self, s0: int, s1: int, z: torch.Tensor, gate: torch.Tensor,
                      pre: Optional[torch.Tensor]) -> torch.Tensor:
        """``morph_delta`` under top-k routing, for inference: each row's k highest-gated experts,
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

    def step_codewords(self, step: int, base: torch.Tensor, cond: Optional[torch.Tensor], morph=None) -> torch.Tensor:
        """Morphed codewords of one morphed step: base (B, d), cond (B, Dc) -> (B, d). morph: as for
        ``decode_steps_sequential``."""
        s = step - self.config.first_morphed
        z = self.project(s, s + 1, base.unsqueeze(0), None if cond is None else cond.unsqueeze(0))
        return (morph or self.morph)(s, s + 1, z)[0]

    def cond_share(self, s: int, cond: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The conditioning rows' share of morphed step s's inputs z: cond (u, Dc) -> (u, d), or None."""
        return cond @ self.proj_cond[s] if cond is not None and cond.shape[-1] > 0 else None

    def morph_candidates(self, m: int, candidates: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                         n_rows: Optional[int] = None) -> torch.Tensor:
        """Morphed candidate codewords of step m for several conditioning rows (the reference).

        candidates: (u, A) int64 codeword indices a row, or None for all K codewords, shared by every row;
        cond: (u, Dc) or None; n_rows: u where neither tensor says it. Returns (u, A, d)."""
        c = self.config
        u = n_rows if n_rows is not None else (candidates.shape[0] if candidates is not None else cond.shape[0])
        book = self.codebooks[m]
        base = book.expand(u, *book.shape) if candidates is None else book[candidates]  # (u, A, d)
        A = base.shape[1]
        rows_cond = None if cond is None else cond.unsqueeze(1).expand(u, A, cond.shape[-1]).reshape(u * A, -1)
        return self.step_codewords(m, base.reshape(u * A, c.d), rows_cond).reshape(u, A, c.d)

    def score_candidates(self, m: int, candidates: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                         residual: torch.Tensor, owner: Optional[torch.Tensor] = None,
                         n_rows: Optional[int] = None):
        """A coder's ``score_candidates`` (encode.py) on the reference path: every candidate morphed, then
        scored (``encode.score_morphed``)."""
        morphed = self.morph_candidates(m, candidates, cond, n_rows)
        return score_morphed(morphed, residual, owner), lambda rows, which: morphed[rows, which]

    def chunk_items(self, rows_per_item: int, beam_size: int = 1) -> int:
        """Items a reference encode takes at once: REFERENCE_CHUNK_ROWS morphed rows."""
        return max(1, REFERENCE_CHUNK_ROWS // max(1, rows_per_item))

    def temporaries(self):
        """The context a reference encode runs in (it keeps no temporaries)."""
        return contextlib.nullcontext()

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
        if c.n_morph_steps == 0:
            base = step_rows(self.codebooks, codes)  # (n, M, d)
            return base.sum(1) if sum_steps else base
        ctx_cond = self.ctx_cond(ctx)
        if c.mode is Condition.RECONSTRUCTION:
            steps_out = self.decode_steps_sequential(codes, step_rows(self.codebooks, codes), ctx_cond)
            return steps_out.sum(1) if sum_steps else steps_out
        f = c.first_morphed
        morphed = self.morph(0, c.n_morph_steps, self.step_inputs(codes, ctx_cond))  # (S, n, d)
        if sum_steps:
            return self.plus_unmorphed(morphed.sum(0), codes)
        return torch.cat([step_rows(self.codebooks[:f], codes[:, :f]), morphed.transpose(0, 1)], dim=1)

    def step_inputs(self, codes: torch.Tensor, ctx_cond: Optional[torch.Tensor]) -> torch.Tensor:
        """The morphed steps' network inputs z of a parallel decode (condition 'instruction' or 'none'):
        codes (n, M) int64, ctx_cond (n, De) or None -> (S, n, d), the projected codewords and instruction
        stream."""
        c = self.config
        f = c.first_morphed
        cond = None
        if c.De > 0:
            cond = instruction_stream(self.instr_codebooks, codes, ctx_cond, include_first=f == 0)
            cond = cond.transpose(0, 1)  # (S, n, De)
        return self.project(0, c.n_morph_steps, step_rows(self.codebooks[f:], codes[:, f:]).transpose(0, 1), cond)

    def plus_unmorphed(self, morphed_sum: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """A decode's sum over the morphed steps (n, d) plus the codewords of the steps before them."""
        f = self.config.first_morphed
        return morphed_sum + step_rows(self.codebooks[:f], codes[:, :f]).sum(1) if f else morphed_sum

    def decode_steps_sequential(self, codes: torch.Tensor, base: torch.Tensor,
                                ctx_cond: Optional[torch.Tensor] = None, morph=None) -> torch.Tensor:
        """Step-by-step reference: codes (n, M), base (n, M, d), ctx_cond (n, Dc) or None -> (n, M, d).
        morph: who morphs a step's rows, morph(s0, s1, z) (default: this network's ``morph``)."""
        c = self.config
        outputs = []
        recon = torch.zeros_like(base[:, 0])
        instr = ctx_cond if c.mode is Condition.INSTRUCTION else None
        for m in range(c.M):
            if m < c.first_morphed:
                out = base[:, m]
            else:
                cond = instr if c.mode is Condition.INSTRUCTION else recon_cond(recon, ctx_cond)
                out = self.step_codewords(m, base[:, m], cond, morph)
            outputs.append(out)
            recon = recon + out
            if c.mode is Condition.INSTRUCTION and m < c.M - 1:
                instr = advance_instruction(instr, self.instr_codebooks[m, codes[:, m]])
        return torch.stack(outputs, dim=1)

    @torch.no_grad()
    def decode(self, codes, ctx=None) -> torch.Tensor:
        """Reconstruct raw vectors from codes on the reference path (float32 torch, all steps in parallel
        where the mode allows). For speed, decode through an ``Engine``.

        codes: (n, M) integer array/tensor with values in [0, K); ctx: (n, ctx_dim) float32 raw contexts
        (e.g. IVF centroids), required exactly when config.ctx_dim > 0. Returns (n, d) float32 on the
        model's device.
        """
        return self._decode(codes, ctx, self.decode_steps)

    @torch.no_grad()
    def decode_sequential(self, codes, ctx=None) -> torch.Tensor:
        """Reference decoder, one step after the other; same output as ``decode``.

        codes: (n, M) integers in [0, K); ctx as in ``decode``. Returns (n, d) float32.
        """
        def steps(chunk, ctx_s):
            if self.config.n_morph_steps == 0:  # plain RQ: nothing to run in sequence
                return self.decode_steps(chunk, ctx_s)
            return self.decode_steps_sequential(chunk, step_rows(self.codebooks, chunk), self.ctx_cond(ctx_s))
        return self._decode(codes, ctx, steps)

    def _decode(self, codes, ctx, steps) -> torch.Tensor:
        codes = self.check_codes(codes)
        ctx_s = self.check_ctx(ctx, codes.shape[0])
        out = torch.empty(codes.shape[0], self.config.d, device=self.device)
        bs = self.chunk_items(max(1, self.config.n_morph_steps))
        for i0 in range(0, codes.shape[0], bs):
            ctx_chunk = None if ctx_s is None else ctx_s[i0:i0 + bs]
            out[i0:i0 + bs] = steps(codes[i0:i0 + bs], ctx_chunk).sum(1)
        return out.mul_(self.scale)

    # ----------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(self, x, n_candidates: Optional[int] = None, beam_size: int = 1, ctx=None) -> torch.Tensor:
        """Encode raw vectors on the reference path: greedy (beam_size=1) or beam search. For speed, encode
        through an ``Engine``; its codes are these, up to near ties that float rounding decides otherwise.

        x: (n, d) float32 (other real dtypes are converted). n_candidates: None evaluates the morphing
        networks on all K codewords of every step (exact); an integer A < K first ranks the K base
        codewords by distance to the residual and runs the networks on the best A only. beam_size: B >= 1
        partial codes kept per vector after every step; the code with the smallest final residual wins.
        ctx: (n, ctx_dim) float32 raw contexts, required exactly when config.ctx_dim > 0. Returns (n, M)
        int64 codes on the model's device.
        """
        x = self.check_vectors(x)
        ctx_s = self.check_ctx(ctx, x.shape[0])
        if n_candidates is not None:
            n_candidates = check_positive_int(n_candidates, "n_candidates")
        beam_size = check_positive_int(beam_size, "beam_size")
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
