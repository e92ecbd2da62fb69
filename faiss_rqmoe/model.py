"""The RQ-MoE quantizer: two-part codebooks, morphing mixture of experts,
greedy encoding and parallel decoding (DESIGN.md §1).

All learned tensors live in a *scaled* space (raw vectors divided by the
scalar buffer ``scale``); the public methods take and return raw vectors.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch
from torch import nn

CONDITIONS = ("instruction", "reconstruction", "none")

DEFAULT_MEM_BUDGET_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class RQMoEConfig:
    """Architecture of an RQ-MoE quantizer.

    d: vector dimension; M: quantization steps; nbits: bits a step
    (K = 2**nbits codewords); n_experts (N), n_layers (L residual blocks an
    expert), hidden (H): the morphing networks; instr_dim (De): width of the
    instruction codewords, None means d; condition: "instruction" (RQ-MoE),
    "reconstruction" (QINCo-style: condition on the partial reconstruction)
    or "none" (plain RQ, no morphing). ctx_dim: width of an external
    context vector given with every code (the IVF centroid of its inverted
    list, DESIGN §3), 0 for none. A context starts the instruction stream
    (I_1 = A · ctx) or, in the QINCo-style mode, is added to the partial
    reconstruction it conditions on; with one, the first step is morphed too.
    """

    d: int
    M: int
    nbits: int = 8
    n_experts: int = 4
    n_layers: int = 2
    hidden: int = 256
    instr_dim: Optional[int] = None
    condition: str = "instruction"
    ctx_dim: int = 0

    def __post_init__(self):
        for name in ("d", "M", "nbits", "n_experts", "n_layers", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RQMoEConfig.{name} must be a positive integer, got {value!r}")
        if self.nbits > 16:
            raise ValueError(f"RQMoEConfig.nbits must be at most 16, got {self.nbits}")
        if self.instr_dim is not None and (not isinstance(self.instr_dim, (int, np.integer)) or self.instr_dim < 0):
            raise ValueError(f"RQMoEConfig.instr_dim must be None or an integer >= 0, got {self.instr_dim!r}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"RQMoEConfig.condition must be one of {CONDITIONS}, got {self.condition!r}")
        if isinstance(self.ctx_dim, bool) or not isinstance(self.ctx_dim, (int, np.integer)) or self.ctx_dim < 0:
            raise ValueError(f"RQMoEConfig.ctx_dim must be an integer >= 0, got {self.ctx_dim!r}")
        if self.ctx_dim > 0 and self.cond_dim == 0:
            raise ValueError("RQMoEConfig: a context (ctx_dim > 0) needs a conditioning vector to enter: "
                             f"condition {self.condition!r} with instr_dim={self.instr_dim} has none")

    @property
    def K(self) -> int:
        """Codewords a step."""
        return 1 << self.nbits

    @property
    def De(self) -> int:
        """Width of the instruction codewords (0 unless condition='instruction')."""
        if self.condition != "instruction":
            return 0
        return self.d if self.instr_dim is None else int(self.instr_dim)

    @property
    def cond_dim(self) -> int:
        """Width of the conditioning vector fed to the morphing projection."""
        return {"instruction": self.De, "reconstruction": self.d, "none": 0}[self.condition]

    @property
    def first_morphed(self) -> int:
        """Index of the first morphed step: 0 with a context (it conditions step 1 too), else 1."""
        return 0 if self.ctx_dim > 0 else 1

    @property
    def n_morph_steps(self) -> int:
        """Steps whose codewords are morphed (from ``first_morphed`` on; none for 'none')."""
        return 0 if self.condition == "none" else self.M - self.first_morphed

    @property
    def code_size(self) -> int:
        """Bytes a vector when codes are packed (M * nbits bits, rounded up)."""
        return (self.M * self.nbits + 7) // 8

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if not self.ctx_dim:  # files of context-free codecs stay readable by versions without the field
            del values["ctx_dim"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "RQMoEConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown RQMoEConfig fields {sorted(unknown)}; expected {sorted(fields)}")
        return cls(**values)


def check_beam_size(value, name: str = "beam_size") -> int:
    """A beam size as an int >= 1; ValueError naming ``name`` for anything else (bools, 0, 2.5)."""
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _uniform_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class RQMoE(nn.Module):
    """RQ-MoE quantizer: ``encode`` raw vectors to codes, ``decode`` codes back.

    Parameters are stacked over the M-1 morphed steps so that decoding runs
    one batched matmul a layer for all steps. ``mem_budget_bytes`` bounds the
    temporaries of ``encode``/``decode`` (chunking over vectors).
    """

    def __init__(self, config: RQMoEConfig, mem_budget_bytes: int = DEFAULT_MEM_BUDGET_BYTES):
        super().__init__()
        if not isinstance(config, RQMoEConfig):
            raise TypeError(f"config must be an RQMoEConfig, got {type(config).__name__}")
        self.config = config
        self.mem_budget_bytes = int(mem_budget_bytes)
        c = config
        S, N, L, H, d, K = c.n_morph_steps, c.n_experts, c.n_layers, c.hidden, c.d, c.K
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.codebooks = nn.Parameter(torch.randn(c.M, K, d) * 0.1)
        if c.condition == "instruction":
            # E_m for m < M (the last step's instruction is never read). Small
            # random values, not 0: with the projection's instruction part at 0
            # the model is still exactly RQ, but E = P_I = 0 would be a saddle
            # point where neither ever receives a gradient.
            self.instr_codebooks = nn.Parameter(torch.randn(c.M - 1, K, c.De) * 0.1)
        else:
            self.register_parameter("instr_codebooks", None)
        if S > 0:
            Dc = c.cond_dim
            self.proj_code = nn.Parameter(torch.eye(d).repeat(S, 1, 1))  # (S, d, d), z = c @ W
            self.proj_cond = nn.Parameter(torch.zeros(S, Dc, d))
            self.proj_bias = nn.Parameter(torch.zeros(S, d))
            self.gate_w1 = nn.Parameter(_uniform_(torch.empty(S, d, H), d))
            self.gate_b1 = nn.Parameter(_uniform_(torch.empty(S, H), d))
            self.gate_w2 = nn.Parameter(_uniform_(torch.empty(S, H, N), H))
            self.gate_b2 = nn.Parameter(_uniform_(torch.empty(S, N), H))
            # layer-major so that expert_w1[l] is one contiguous (S, N, d, H) block
            self.expert_w1 = nn.Parameter(_uniform_(torch.empty(L, S, N, d, H), d))
            self.expert_b1 = nn.Parameter(_uniform_(torch.empty(L, S, N, 1, H), d))
            self.expert_w2 = nn.Parameter(torch.zeros(L, S, N, H, d))
            self.expert_b2 = nn.Parameter(torch.zeros(L, S, N, 1, d))
        if c.ctx_dim > 0:
            # contexts enter normalised, (ctx - ctx_mean) / ctx_scale (set_context_stats), so that their
            # entries are of the instruction codewords' size whatever the data's offset and units
            self.register_buffer("ctx_mean", torch.zeros(c.ctx_dim))
            self.register_buffer("ctx_scale", torch.ones(()))
            # A: context -> conditioning. Identity where the widths agree, so that I_1 (or the
            # QINCo-style partial reconstruction) starts as the context itself; the zero
            # proj_cond still makes the untrained model exactly RQ.
            self.ctx_proj = nn.Parameter(torch.eye(c.ctx_dim, c.cond_dim))
        else:
            self.register_parameter("ctx_proj", None)

    # ------------------------------------------------------------------ utils
    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())

    def _morph_bytes_per_row(self) -> int:
        """Float32 temporaries a morphed codeword needs (peak estimate)."""
        c = self.config
        return 4 * (4 * c.d + c.cond_dim + c.hidden + 3 * c.n_experts * c.d + 2 * c.n_experts * c.hidden + 8)

    def _rows_per_chunk(self, rows_per_item: int) -> int:
        """How many items fit the memory budget when each needs rows_per_item morphed rows."""
        per_item = max(1, rows_per_item) * self._morph_bytes_per_row()
        return max(1, self.mem_budget_bytes // per_item)

    def _check_vectors(self, x, name: str = "x", width: Optional[int] = None) -> torch.Tensor:
        """Validate raw vectors (n, width or d) and return a float32 tensor on the model's device."""
        width = self.config.d if width is None else width
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"{name} must be a floating-point array (float32), got dtype {x.dtype}")
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        elif isinstance(x, torch.Tensor):
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor (float32), got dtype {x.dtype}")
        else:
            raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{name} must have shape (n, {width}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty: expected at least one vector of dimension {width}")
        x = x.to(device=self.device, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return x

    def _check_ctx(self, ctx, n: int) -> Optional[torch.Tensor]:
        """Validate the contexts of n items and return them normalised, (n, ctx_dim) float32; None without."""
        c = self.config
        if c.ctx_dim == 0:
            if ctx is not None:
                raise ValueError("this model takes no context (config.ctx_dim == 0): pass ctx=None")
            return None
        if ctx is None:
            raise ValueError(f"this model is conditioned on a context of width {c.ctx_dim} (the IVF centroid "
                             f"of each vector): pass ctx of shape (n, {c.ctx_dim})")
        ctx = self._check_vectors(ctx, "ctx", c.ctx_dim)
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

    def _ctx_cond(self, ctx_s: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The context's share of the conditioning: normalised ctx (n, ctx_dim) -> (n, cond_dim), or None."""
        if (ctx_s is None) != (self.config.ctx_dim == 0):
            raise ValueError(f"the model has ctx_dim={self.config.ctx_dim}: a context must be given "
                             "exactly when ctx_dim > 0")
        return None if ctx_s is None else ctx_s @ self.ctx_proj

    def _check_codes(self, codes) -> torch.Tensor:
        """Validate codes and return an int64 tensor on the model's device."""
        if isinstance(codes, np.ndarray):
            if not np.issubdtype(codes.dtype, np.integer):
                raise TypeError(f"codes must be an integer array, got dtype {codes.dtype}")
            codes = torch.from_numpy(codes.astype(np.int64))
        elif isinstance(codes, torch.Tensor):
            if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
                raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        else:
            raise TypeError(f"codes must be a numpy array or torch tensor, got {type(codes).__name__}")
        M, K = self.config.M, self.config.K
        if codes.ndim != 2 or codes.shape[1] != M:
            raise ValueError(f"codes must have shape (n, M={M}), got {tuple(codes.shape)}")
        if codes.shape[0] == 0:
            raise ValueError("codes is empty: expected at least one code")
        codes = codes.to(device=self.device, dtype=torch.int64)
        if (codes < 0).any() or (codes >= K).any():
            raise ValueError(f"codes must lie in [0, K={K}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes

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
        if c.n_morph_steps > 0:
            self.proj_code.copy_(torch.eye(c.d).repeat(c.n_morph_steps, 1, 1))
            self.proj_cond.zero_()
            self.proj_bias.zero_()
            self.expert_w2.zero_()
            self.expert_b2.zero_()
        if c.ctx_dim > 0:
            self.ctx_proj.copy_(torch.eye(c.ctx_dim, c.cond_dim))
        self.initialized.fill_(True)
        return self

    # ---------------------------------------------------------------- morphing
    def _project(self, s0: int, s1: int, base: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """z = P([c; cond]) for steps s0..s1-1 of the morphed steps.

        base: (S', B, d) codewords; cond: (S', B, Dc) or None. Returns (S', B, d).
        """
        z = torch.matmul(base, self.proj_code[s0:s1]) + self.proj_bias[s0:s1, None, :]
        if cond is not None and cond.shape[-1] > 0:
            z = z + torch.matmul(cond, self.proj_cond[s0:s1])
        return z

    def _morph(self, s0: int, s1: int, z: torch.Tensor) -> torch.Tensor:
        """Mixture of experts applied to z: (S', B, d) for morphed steps s0..s1-1 -> (S', B, d).

        One batched matmul a layer covers all S' steps and all N experts.
        """
        # Without autograd (decode, encode) the bias, activation and residual updates run in place: the
        # same operations in the same order, so the result is bit-identical, without the temporaries.
        inplace = not torch.is_grad_enabled()
        add = torch.Tensor.add_ if inplace else torch.add
        relu = torch.relu_ if inplace else torch.relu
        gate_hidden = relu(add(torch.matmul(z, self.gate_w1[s0:s1]), self.gate_b1[s0:s1, None, :]))
        gate = torch.softmax(add(torch.matmul(gate_hidden, self.gate_w2[s0:s1]), self.gate_b2[s0:s1, None, :]), dim=-1)
        y = z.unsqueeze(1)  # (S', 1, B, d), broadcast over experts until the first block
        for layer in range(self.config.n_layers):
            h = relu(add(torch.matmul(y, self.expert_w1[layer, s0:s1]), self.expert_b1[layer, s0:s1]))
            y = add(add(torch.matmul(h, self.expert_w2[layer, s0:s1]), y), self.expert_b2[layer, s0:s1])
        # gate: (S', B, N) -> (S', N, B, 1); y: (S', N, B, d)
        weights = gate.transpose(1, 2).unsqueeze(-1)
        return (y.mul_(weights) if inplace else y * weights).sum(dim=1)

    def _step_codewords(self, step: int, base: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """Morphed codewords of one morphed step: base (B, d), cond (B, Dc) -> (B, d)."""
        s = step - self.config.first_morphed
        z = self._project(s, s + 1, base.unsqueeze(0), None if cond is None else cond.unsqueeze(0))
        return self._morph(s, s + 1, z)[0]

    # ----------------------------------------------------------------- decode
    def decode_steps(self, codes: torch.Tensor, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-step codewords in the scaled space, differentiable.

        codes: (n, M) int64, already validated; ctx: (n, ctx_dim) normalised
        contexts (None when config.ctx_dim == 0). Returns (n, M, d) float32
        whose sum over steps is the scaled reconstruction. Parallel over steps
        for condition 'instruction'/'none', sequential for 'reconstruction'.
        """
        c = self.config
        steps = torch.arange(c.M, device=codes.device)
        base = self.codebooks[steps, codes]  # (n, M, d)
        if c.n_morph_steps == 0:
            return base
        ctx_cond = self._ctx_cond(ctx)
        if c.condition == "reconstruction":
            return self._decode_steps_sequential(codes, base, ctx_cond)
        S, f = c.n_morph_steps, c.first_morphed
        cond = None
        if c.De > 0:
            instr = self.instr_codebooks[steps[:-1], codes[:, :-1]]  # (n, M-1, De): E_m[i_m], m < M
            cond = torch.cumsum(instr, dim=1)  # (n, M-1, De): I_2 .. I_M without the context
            if ctx_cond is not None:  # I_1 = A ctx starts the stream and conditions step 1 too
                cond = torch.cat([cond.new_zeros(cond.shape[0], 1, cond.shape[2]), cond], dim=1)
                cond = cond + ctx_cond.unsqueeze(1)
            cond = cond.transpose(0, 1)  # (S, n, De)
        z = self._project(0, S, base[:, f:].transpose(0, 1), cond)
        morphed = self._morph(0, S, z)  # (S, n, d)
        return torch.cat([base[:, :f], morphed.transpose(0, 1)], dim=1)

    def _decode_steps_sequential(self, codes: torch.Tensor, base: torch.Tensor,
                                 ctx_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Step-by-step reference: codes (n, M), base (n, M, d), ctx_cond (n, Dc) or None -> (n, M, d)."""
        c = self.config
        outputs = []
        recon = torch.zeros_like(base[:, 0])
        instr = ctx_cond if c.condition == "instruction" else None
        for m in range(c.M):
            if m < c.first_morphed:
                out = base[:, m]
            else:
                cond = instr if c.condition == "instruction" else self._recon_cond(recon, ctx_cond)
                out = self._step_codewords(m, base[:, m], cond)
            outputs.append(out)
            recon = recon + out
            if c.condition == "instruction" and m < c.M - 1:
                e = self.instr_codebooks[m, codes[:, m]]
                instr = e if instr is None else instr + e
        return torch.stack(outputs, dim=1)

    def _decode_chunked(self, codes, ctx, sequential: bool) -> torch.Tensor:
        codes = self._check_codes(codes)
        ctx_s = self._check_ctx(ctx, codes.shape[0])
        c = self.config
        steps = torch.arange(c.M, device=codes.device)
        bs = self._rows_per_chunk(max(1, c.n_morph_steps))
        out = torch.empty(codes.shape[0], c.d, device=self.device)
        with torch.inference_mode():
            for i0 in range(0, codes.shape[0], bs):
                chunk = codes[i0:i0 + bs]
                ctx_chunk = None if ctx_s is None else ctx_s[i0:i0 + bs]
                if sequential and c.n_morph_steps > 0:
                    steps_out = self._decode_steps_sequential(chunk, self.codebooks[steps, chunk],
                                                              self._ctx_cond(ctx_chunk))
                else:
                    steps_out = self.decode_steps(chunk, ctx_chunk)
                out[i0:i0 + bs] = steps_out.sum(dim=1)
        return out * self.scale

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

        x: (n, d) float32 (float64 accepted). n_candidates: None evaluates the
        morphing networks on all K codewords of every step (exact);
        an integer A < K first ranks the K base codewords by distance to the
        residual and runs the networks on the best A only (faster, approximate).
        beam_size: B >= 1 partial codes kept per vector after every step (the
        networks run on B x A candidates a step, so encoding costs about B times
        greedy); the code with the smallest final residual wins. B = 1 is greedy.
        ctx: (n, ctx_dim) float32 raw contexts, required exactly when
        config.ctx_dim > 0 (``decode`` needs the same ones).
        Returns (n, M) int64 codes on the model's device. Temporaries stay
        within ``mem_budget_bytes``.
        """
        x = self._check_vectors(x)
        ctx_s = self._check_ctx(ctx, x.shape[0])
        if n_candidates is not None and not (int(n_candidates) >= 1):
            raise ValueError(f"n_candidates must be None or >= 1, got {n_candidates}")
        beam_size = check_beam_size(beam_size)
        with torch.inference_mode():
            return self.encode_scaled(x / self.scale, n_candidates, beam_size, ctx_s)

    def encode_scaled(self, xs: torch.Tensor, n_candidates: Optional[int] = None,
                      beam_size: int = 1, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Codes of already validated, scaled vectors, in memory-bounded chunks.

        xs: (n, d) float32 on the model's device (raw / scale); ctx: (n,
        ctx_dim) normalised contexts or None. Runs under the caller's grad mode
        (training calls it under ``no_grad``). Returns (n, M) int64.
        """
        c = self.config
        preselect = n_candidates is not None and int(n_candidates) < c.K
        A = int(n_candidates) if preselect else c.K
        bs = self._rows_per_chunk(A * beam_size)
        if beam_size > 1:  # plain codewords are scored K at a time per hypothesis: ~3 (K, d) float temporaries
            bs = min(bs, max(1, self.mem_budget_bytes // (beam_size * c.K * c.d * 4 * 3)))
        codes = torch.empty(xs.shape[0], c.M, dtype=torch.int64, device=xs.device)
        for i0 in range(0, xs.shape[0], bs):
            chunk = xs[i0:i0 + bs]
            ctx_chunk = None if ctx is None else ctx[i0:i0 + bs]
            if beam_size > 1:
                codes[i0:i0 + bs] = self._encode_chunk_beam(chunk, A, beam_size, ctx_chunk)
            else:
                codes[i0:i0 + bs] = self._encode_chunk(chunk, A if preselect else None, ctx_chunk)
        return codes

    def _encode_chunk(self, xs: torch.Tensor, n_candidates: Optional[int],
                      ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Greedy codes of scaled vectors xs: (b, d), normalised contexts ctx (b, ctx_dim) or None -> (b, M) int64."""
        c = self.config
        b = xs.shape[0]
        codes = torch.empty(b, c.M, dtype=torch.int64, device=xs.device)
        residual = xs.clone()
        ctx_cond = self._ctx_cond(ctx)
        instr = ctx_cond if c.condition == "instruction" else None
        # in the exact branch, rows with the same context share their morphed codebooks (see _select_all)
        groups = None
        if ctx is not None and n_candidates is None:
            groups = torch.unique(ctx, dim=0, return_inverse=True)[1]
        rows = torch.arange(b, device=xs.device)
        for m in range(c.M):
            book = self.codebooks[m]  # (K, d)
            base_scores = (book * book).sum(1)[None, :] - 2 * residual @ book.T  # (b, K)
            if m < c.first_morphed or c.n_morph_steps == 0:
                idx = base_scores.argmin(1)
                chosen = book[idx]
            else:
                cond = instr if c.condition == "instruction" else self._recon_cond(xs - residual, ctx_cond)
                if n_candidates is None:
                    idx, chosen = self._select_all(m, codes[:, :m], residual, cond, groups)
                else:
                    candidates = base_scores.topk(n_candidates, dim=1, largest=False).indices  # (b, A)
                    morphed = self._morph_candidates(m, book[candidates], cond)  # (b, A, d)
                    scores = (morphed * morphed).sum(-1) - 2 * torch.einsum("bad,bd->ba", morphed, residual)
                    best = scores.argmin(1)
                    idx = candidates[rows, best]
                    chosen = morphed[rows, best]
            codes[:, m] = idx
            residual = residual - chosen
            if c.condition == "instruction" and m < c.M - 1:
                e = self.instr_codebooks[m, idx]
                instr = e if instr is None else instr + e
        return codes

    @staticmethod
    def _recon_cond(recon: torch.Tensor, ctx_cond: Optional[torch.Tensor]) -> torch.Tensor:
        """QINCo-style conditioning: the partial reconstruction, plus the context's share when there is one."""
        if ctx_cond is None:
            return recon
        return recon + (ctx_cond if ctx_cond.ndim == recon.ndim else ctx_cond.unsqueeze(1))

    def _encode_chunk_beam(self, xs: torch.Tensor, n_candidates: int, beam_size: int,
                           ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Beam search codes of scaled vectors xs: (b, d), normalised contexts ctx (b, ctx_dim) or None -> (b, M) int64.

        Hypotheses are kept as (b, h, ...) tensors, h <= beam_size. Every step
        scores n_candidates (A) codewords per hypothesis by the squared norm of
        the residual they leave and keeps the best beam_size of the h * A.
        """
        c = self.config
        b, d = xs.shape
        K, A = c.K, n_candidates
        device = xs.device
        codes = torch.empty(b, 1, 0, dtype=torch.int64, device=device)  # (b, h, m)
        residual = xs.unsqueeze(1)  # (b, h, d)
        ctx_cond = self._ctx_cond(ctx)  # (b, Dc) or None
        instr = None  # (b, h, De) once the stream has started, condition 'instruction' only
        if c.condition == "instruction" and ctx_cond is not None:
            instr = ctx_cond.unsqueeze(1)
        vec_rows = torch.arange(b, device=device).unsqueeze(1)
        for m in range(c.M):
            h = residual.shape[1]
            flat = residual.reshape(b * h, d)
            book = self.codebooks[m]  # (K, d)
            res_norms = (flat * flat).sum(1, keepdim=True)  # (bh, 1)
            morphed_step = m >= c.first_morphed and c.n_morph_steps > 0
            if not morphed_step or A == K:
                candidates = torch.arange(K, device=device).expand(b * h, K)
                base = book.unsqueeze(0)  # shared by all hypotheses
            else:
                base_scores = (book * book).sum(1)[None, :] - 2 * flat @ book.T  # (bh, K)
                candidates = base_scores.topk(A, dim=1, largest=False).indices  # (bh, A)
                base = book[candidates]  # (bh, A, d)
            if not morphed_step:
                words = base.expand(b * h, K, d)
            else:
                if c.condition == "instruction":
                    cond = instr.expand(b, h, instr.shape[-1])
                else:
                    cond = self._recon_cond(xs.unsqueeze(1) - residual, ctx_cond)
                cond = cond.reshape(b * h, cond.shape[-1])
                words = self._morph_candidates(m, base, cond, n_rows=b * h)  # (bh, A, d)
            scores = res_norms + (words * words).sum(-1) - 2 * torch.einsum("bad,bd->ba", words, flat)
            n_cand = words.shape[1]
            keep = min(beam_size, h * n_cand)
            best = scores.reshape(b, h * n_cand).topk(keep, dim=1, largest=False).indices  # (b, keep)
            parent, which = best // n_cand, best % n_cand
            flat_rows = vec_rows * h + parent  # rows of the (bh, ...) tensors
            idx = candidates[flat_rows, which]  # (b, keep)
            chosen = words[flat_rows, which]  # (b, keep, d)
            codes = torch.cat([codes[vec_rows, parent], idx.unsqueeze(-1)], dim=2)
            residual = residual[vec_rows, parent] - chosen
            if c.condition == "instruction" and m < c.M - 1:
                e = self.instr_codebooks[m, idx]  # (b, keep, De)
                instr = e if instr is None else instr.expand(b, h, e.shape[-1])[vec_rows, parent] + e
        return codes[:, 0]  # topk sorts ascending: hypothesis 0 has the smallest final residual

    def _select_all(self, m: int, prefix: torch.Tensor, residual: torch.Tensor, cond: Optional[torch.Tensor],
                    groups: Optional[torch.Tensor] = None):
        """Exact greedy choice at step m over all K morphed codewords.

        The morphed codebook depends only on the code prefix (and the
        context), so it is computed once per distinct (context group, prefix)
        in the chunk: at step 2 without a context there are at most K of them,
        whatever the batch size.
        prefix: (b, m) int64, residual: (b, d), cond: (b, Dc) or None,
        groups: (b,) int64 context group of each row, or None.
        Returns idx (b,) int64 and the chosen morphed codewords (b, d).
        """
        b = prefix.shape[0]
        key = prefix if groups is None else torch.cat([groups.unsqueeze(1), prefix], dim=1)
        unique_keys, inverse = torch.unique(key, dim=0, return_inverse=True)
        u = unique_keys.shape[0]
        first = torch.full((u,), b, dtype=torch.int64, device=prefix.device)
        first.scatter_reduce_(0, inverse, torch.arange(b, device=prefix.device), reduce="amin")
        cond_unique = None if cond is None else cond[first]
        morphed = self._morph_candidates(m, self.codebooks[m].unsqueeze(0), cond_unique, n_rows=u)  # (u, K, d)
        norms = (morphed * morphed).sum(-1)  # (u, K)
        scores = norms[inverse] - 2 * torch.einsum("bkd,bd->bk", morphed[inverse], residual)
        idx = scores.argmin(1)
        return idx, morphed[inverse, idx]

    def _morph_candidates(self, m: int, base: torch.Tensor, cond: Optional[torch.Tensor],
                          n_rows: Optional[int] = None) -> torch.Tensor:
        """Morphed candidate codewords of step m for several conditioning rows.

        base: (u, A, d) candidates a row, or (1, A, d) shared by all rows;
        cond: (u, Dc) or None; n_rows: u where neither tensor says it.
        The projection is linear, so it runs on the A codewords and the u
        conditions apart and only the sum is broadcast to (u, A, d).
        """
        s = m - self.config.first_morphed
        d = self.config.d
        z = torch.matmul(base, self.proj_code[s]) + self.proj_bias[s]
        if cond is not None and cond.shape[-1] > 0:
            z = z + torch.matmul(cond, self.proj_cond[s]).unsqueeze(1)
        u = n_rows if n_rows is not None else z.shape[0]
        z = z.expand(u, z.shape[1], d)
        return self._morph(s, s + 1, z.reshape(1, -1, d))[0].reshape(u, -1, d)

    # --------------------------------------------------------------- training
    def forward(self, codes: torch.Tensor, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable scaled reconstruction: codes (n, M) int64, normalised ctx (n, ctx_dim) or None -> (n, d)."""
        return self.decode_steps(codes, ctx).sum(dim=1)
