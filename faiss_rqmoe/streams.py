"""The arithmetic of the two streams on codes, shared by the network, the engine and encoding: the
codewords codes pick, the instruction stream (RQ-MoE) and the partial reconstruction (QINCo-style)."""
from __future__ import annotations

from typing import Optional

import torch


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
