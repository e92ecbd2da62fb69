"""The codec's architecture (``RQMoEConfig``) and its vocabulary of conditioning modes (``Condition``).

One home for the names: the factory string, the benchmark's flags and the
model all parse modes through ``Condition.parse``.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import Optional

import numpy as np


class Condition(str, enum.Enum):
    """What the morphing networks of a step are conditioned on.

    INSTRUCTION: the instruction stream (RQ-MoE); RECONSTRUCTION: the
    partial reconstruction (QINCo-style); NONE: nothing, no morphing (plain RQ).
    """

    INSTRUCTION = "instruction"
    RECONSTRUCTION = "reconstruction"
    NONE = "none"

    @classmethod
    def parse(cls, value) -> "Condition":
        """A Condition from itself, its value or an alias (moe, rqmoe, qinco, rq); ValueError otherwise."""
        if isinstance(value, cls):
            return value
        key = str(value).strip().lower()
        for condition in cls:
            if key == condition.value or key in condition.aliases:
                return condition
        names = sorted({c.value for c in cls} | {a for c in cls for a in c.aliases})
        raise ValueError(f"unknown condition {value!r}; expected one of {names}")

    @property
    def aliases(self) -> tuple:
        """Other names of this mode: the factory's options and the benchmark's method keys."""
        return {"instruction": ("moe", "rqmoe", "rq-moe"), "reconstruction": ("qinco",),
                "none": ("rq", "rq-sgd")}[self.value]

    @property
    def display_name(self) -> str:
        """The name tables and plots print."""
        return {"instruction": "RQ-MoE", "reconstruction": "QINCo-style", "none": "RQ (ours, trained)"}[self.value]


_ROUTING = re.compile(r"dense|top(\d+)")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"RQMoEConfig.{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class RQMoEConfig:
    """Architecture of an RQ-MoE quantizer.

    d: vector dimension; M: quantization steps; nbits: bits a step
    (K = 2**nbits codewords); n_experts (N), n_layers (L residual blocks an
    expert), hidden (H): the morphing networks; instr_dim (De): width of the
    instruction codewords, None means d; condition: a ``Condition`` or its
    name ("instruction" for RQ-MoE, "reconstruction" for QINCo-style,
    "none" for plain RQ; aliases such as "qinco" are accepted and stored by
    their canonical value). ctx_dim: width of an external context vector
    given with every code (the IVF centroid of its inverted list), 0 for
    none. A context starts the instruction stream (I_1 = A · ctx) or, in the
    QINCo-style mode, is added to the partial reconstruction it conditions
    on; with one, the first step is morphed too. routing: "dense" (every
    expert runs on every row, gate-weighted: the paper's mixture) or "top<k>"
    (each row runs only its k highest-gated experts, their gate weights
    renormalised to sum to 1; "top1" costs one expert a step instead of N).
    """

    d: int
    M: int
    nbits: int = 8
    n_experts: int = 4
    n_layers: int = 2
    hidden: int = 256
    instr_dim: Optional[int] = None
    condition: str = Condition.INSTRUCTION.value
    ctx_dim: int = 0
    routing: str = "dense"

    def __post_init__(self):
        for name in ("d", "M", "nbits", "n_experts", "n_layers", "hidden"):
            object.__setattr__(self, name, _positive_int(getattr(self, name), name))
        if self.nbits > 16:
            raise ValueError(f"RQMoEConfig.nbits must be at most 16, got {self.nbits}")
        if self.instr_dim is not None:
            if isinstance(self.instr_dim, bool) or not isinstance(self.instr_dim, (int, np.integer)) \
                    or self.instr_dim < 0:
                raise ValueError(f"RQMoEConfig.instr_dim must be None or an integer >= 0, got {self.instr_dim!r}")
            object.__setattr__(self, "instr_dim", int(self.instr_dim))
        try:
            object.__setattr__(self, "condition", Condition.parse(self.condition).value)
        except ValueError as exc:
            raise ValueError(f"RQMoEConfig.condition: {exc}") from None
        if isinstance(self.ctx_dim, bool) or not isinstance(self.ctx_dim, (int, np.integer)) or self.ctx_dim < 0:
            raise ValueError(f"RQMoEConfig.ctx_dim must be an integer >= 0, got {self.ctx_dim!r}")
        object.__setattr__(self, "ctx_dim", int(self.ctx_dim))
        routing = str(self.routing).strip().lower()
        match = _ROUTING.fullmatch(routing)
        if not match or (match.group(1) and not 1 <= int(match.group(1)) <= self.n_experts):
            raise ValueError(f"RQMoEConfig.routing must be 'dense' or 'top<k>' with 1 <= k <= n_experts "
                             f"({self.n_experts}), got {self.routing!r}")
        object.__setattr__(self, "routing", "dense" if routing == "dense" or
                           int(match.group(1)) == self.n_experts else f"top{int(match.group(1))}")
        if self.ctx_dim > 0 and self.cond_dim == 0:
            raise ValueError("RQMoEConfig: a context (ctx_dim > 0) needs a conditioning vector to enter: "
                             f"condition {self.condition!r} with instr_dim={self.instr_dim} has none")

    @property
    def mode(self) -> Condition:
        """The conditioning mode as a ``Condition``."""
        return Condition(self.condition)

    @property
    def top_k(self) -> Optional[int]:
        """Experts a row runs under routing "top<k>"; None for dense routing (all of them)."""
        return None if self.routing == "dense" else int(self.routing[3:])

    @property
    def K(self) -> int:
        """Codewords a step."""
        return 1 << self.nbits

    @property
    def De(self) -> int:
        """Width of the instruction codewords (0 unless condition='instruction')."""
        if self.mode is not Condition.INSTRUCTION:
            return 0
        return self.d if self.instr_dim is None else self.instr_dim

    @property
    def cond_dim(self) -> int:
        """Width of the conditioning vector fed to the morphing projection."""
        return {Condition.INSTRUCTION: self.De, Condition.RECONSTRUCTION: self.d, Condition.NONE: 0}[self.mode]

    @property
    def first_morphed(self) -> int:
        """Index of the first morphed step: 0 with a context (it conditions step 1 too), else 1."""
        return 0 if self.ctx_dim > 0 else 1

    @property
    def n_morph_steps(self) -> int:
        """Steps whose codewords are morphed (from ``first_morphed`` on; none for 'none')."""
        return 0 if self.mode is Condition.NONE else self.M - self.first_morphed

    @property
    def code_size(self) -> int:
        """Bytes a vector when codes are packed (M * nbits bits, rounded up)."""
        return (self.M * self.nbits + 7) // 8

    def macs_per_vector(self) -> int:
        """Multiply-adds of the morphing networks to decode one vector: the projection, the gate and the
        experts a row runs (all N when dense, k under top-k routing)."""
        d, H, N, L = self.d, self.hidden, self.n_experts, self.n_layers
        per_step = d * d + self.cond_dim * d + d * H + H * N + (self.top_k or N) * L * 2 * d * H
        return self.n_morph_steps * per_step

    def to_dict(self) -> dict:
        """JSON-ready fields; ctx_dim is left out when 0 and routing when dense, so files of such
        codecs read as before."""
        values = dataclasses.asdict(self)
        if not self.ctx_dim:
            del values["ctx_dim"]
        if self.routing == "dense":
            del values["routing"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "RQMoEConfig":
        """Inverse of ``to_dict``; unknown fields raise ValueError naming the known ones."""
        if not isinstance(values, dict):
            raise ValueError(f"an RQMoEConfig is a JSON object, got {type(values).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown RQMoEConfig fields {sorted(unknown)}; expected {sorted(fields)}")
        return cls(**values)
