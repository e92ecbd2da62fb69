"""Encoding: greedy (exact or with candidate pre-selection) and beam search.

Encoding is sequential over steps (each step's residual depends on the
codes before it) but batched over vectors and candidates, in chunks. The
search here reads the network's parameters and asks a *coder* for the rest:
``score_candidates`` (the morphed candidates' scores), ``chunk_items`` (how
many vectors a chunk takes) and ``temporaries()`` (the context a chunk runs
in). The network (``RQMoE``) is its own plain coder; the engine is the fast
one.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import Condition
from .streams import advance_instruction, recon_cond


def encode_scaled(model, xs: torch.Tensor, n_candidates: Optional[int] = None, beam_size: int = 1,
                  ctx: Optional[torch.Tensor] = None, coder=None) -> torch.Tensor:
    """Codes of validated, scaled vectors, in chunks the coder sizes.

    model: the network (``RQMoE``); coder: who scores the candidates and plans the chunks (default: the
    network itself). xs: (n, d) float32 on the model's device (raw / scale); n_candidates: None (exact) or
    A; beam_size: B >= 1; ctx: (n, ctx_dim) normalised contexts or None. Runs under the caller's grad mode
    (training calls it under ``no_grad``). Returns (n, M) int64.
    """
    coder = model if coder is None else coder
    c = model.config
    preselect = n_candidates is not None and n_candidates < c.K
    A = n_candidates if preselect else c.K
    bs = coder.chunk_items(A * beam_size, beam_size)
    codes = torch.empty(xs.shape[0], c.M, dtype=torch.int64, device=xs.device)
    with coder.temporaries():
        for i0 in range(0, xs.shape[0], bs):
            chunk = xs[i0:i0 + bs]
            ctx_chunk = None if ctx is None else ctx[i0:i0 + bs]
            if beam_size > 1:
                codes[i0:i0 + bs] = _beam_chunk(model, coder, chunk, A, beam_size, ctx_chunk)
            else:
                codes[i0:i0 + bs] = _greedy_chunk(model, coder, chunk, A if preselect else None, ctx_chunk)
    return codes


def _base_scores(book: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """||c_k||² - 2 <r, c_k> for base codewords book (K, d) and residuals (b, d): (b, K)."""
    return torch.addmm((book * book).sum(1)[None, :], residual, book.T, alpha=-2)


def _greedy_chunk(model, coder, xs: torch.Tensor, n_candidates: Optional[int],
                  ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy codes of scaled vectors xs (b, d), normalised contexts ctx (b, ctx_dim) or None -> (b, M) int64."""
    c = model.config
    b = xs.shape[0]
    codes = torch.empty(b, c.M, dtype=torch.int64, device=xs.device)
    residual = xs.clone()
    ctx_cond = model.ctx_cond(ctx)
    instr = ctx_cond if c.mode is Condition.INSTRUCTION else None
    # in the exact branch, rows with the same context share their morphed codebooks (see _select_all)
    groups, n_groups = None, 1
    if ctx is not None and n_candidates is None:
        distinct, groups = torch.unique(ctx, dim=0, return_inverse=True)
        n_groups = distinct.shape[0]
    for m in range(c.M):
        book = model.codebooks[m]  # (K, d)
        if m < c.first_morphed or c.n_morph_steps == 0:
            idx = _base_scores(book, residual).argmin(1)
            chosen = book[idx]
        else:
            cond = instr if c.mode is Condition.INSTRUCTION else recon_cond(xs - residual, ctx_cond)
            if n_candidates is None:
                idx, chosen = _select_all(model, coder, m, codes[:, :m], residual, cond, groups, n_groups)
            else:
                idx, chosen = _select_candidates(coder, m, book, residual, cond, n_candidates)
        codes[:, m] = idx
        residual = residual - chosen
        if c.mode is Condition.INSTRUCTION and m < c.M - 1:
            instr = advance_instruction(instr, model.instr_codebooks[m, idx])
    return codes


def _select_candidates(coder, m: int, book: torch.Tensor, residual: torch.Tensor,
                       cond: Optional[torch.Tensor], n_candidates: int):
    """Greedy choice at step m among the n_candidates base codewords of book (K, d) nearest each residual
    (b, d), by their morphed words' scores. Returns idx (b,) int64 and the chosen morphed codewords (b, d)
    (the step's partial outputs are freed on return, before the next step's)."""
    candidates = _base_scores(book, residual).topk(n_candidates, dim=1, largest=False).indices
    scores, words = coder.score_candidates(m, candidates, cond, residual)  # (b, A)
    best = scores.argmin(1)
    rows = torch.arange(residual.shape[0], device=residual.device)
    return candidates[rows, best], words(rows, best)


def _residual_scores(words: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """||w||² - 2 <r, w> for candidate words (b, A, d) and residuals (b, d): (b, A)."""
    return (words * words).sum(-1) - 2 * torch.bmm(words, residual.unsqueeze(-1)).squeeze(-1)


def score_morphed(morphed: torch.Tensor, residual: torch.Tensor, owner: Optional[torch.Tensor] = None):
    """Scores ||w||² - 2 <r, w> of morphed candidate words (u, A, d) against residual rows (b, d): (b, A).

    owner: (b,) int64, the conditioning row each residual row is scored with, from torch.unique's inverse
    (a permutation where u == b), or None: row i with row i (b = u). A coder's ``score_candidates``
    returns these scores and words(rows, which), the morphed words of conditioning rows ``rows`` and
    candidate columns ``which`` (int64, one shape) -> (*shape, d)."""
    if owner is None:
        return _residual_scores(morphed, residual)
    if morphed.shape[0] == residual.shape[0]:  # every row its own words: score in their order, no (b, A, d) copy
        first = torch.empty_like(owner).scatter_(0, owner, torch.arange(len(owner), device=owner.device))
        return _residual_scores(morphed, residual[first])[owner]
    return (morphed * morphed).sum(-1)[owner] - 2 * torch.bmm(morphed[owner], residual.unsqueeze(-1)).squeeze(-1)


DEDUP_KEYS_PER_ROW = 8  # _select_all looks for rows sharing a codebook only where a step has at most this many
# possible (context, prefix) keys a row: with more, few rows share one, and the search's sort and wait on the
# device cost more than the words it saves


def _select_all(model, coder, m: int, prefix: torch.Tensor, residual: torch.Tensor,
                cond: Optional[torch.Tensor], groups: Optional[torch.Tensor] = None, n_groups: int = 1):
    """Exact greedy choice at step m over all K morphed codewords.

    The morphed codebook depends only on the code prefix (and the context),
    so where a step has few possible keys (n_groups · K^m at most
    DEDUP_KEYS_PER_ROW a row) it is computed once per distinct (context
    group, prefix) in the chunk: at step 1 without a context there are at
    most K of them, whatever the batch size; later steps compute each row's
    own. prefix: (b, m) int64, residual: (b, d), cond: (b, Dc) or None,
    groups: (b,) int64 context group of each row, or None; n_groups: how
    many groups. Returns idx (b,) int64 and the chosen morphed codewords (b, d).
    """
    b = prefix.shape[0]
    rows = torch.arange(b, device=prefix.device)
    owner, u = None, b  # every row its own codebook
    if n_groups * model.config.K ** m <= DEDUP_KEYS_PER_ROW * b:
        key = prefix if groups is None else torch.cat([groups.unsqueeze(1), prefix], dim=1)
        unique_keys, owner = torch.unique(key, dim=0, return_inverse=True)
        u = unique_keys.shape[0]
        first = torch.full((u,), b, dtype=torch.int64, device=prefix.device)
        first.scatter_reduce_(0, owner, rows, reduce="amin")
        cond = None if cond is None else cond[first]
    scores, words = coder.score_candidates(m, None, cond, residual, owner=owner, n_rows=u)  # (b, K)
    idx = scores.argmin(1)
    return idx, words(rows if owner is None else owner, idx)


def _beam_chunk(model, coder, xs: torch.Tensor, n_candidates: int, beam_size: int,
                ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Beam search codes of scaled vectors xs (b, d), normalised contexts ctx (b, ctx_dim) or None -> (b, M) int64.

    Hypotheses are kept as (b, h, ...) tensors, h <= beam_size. Every step
    scores n_candidates (A) codewords per hypothesis by the squared norm of
    the residual they leave and keeps the best beam_size of the h * A.
    """
    c = model.config
    b, d = xs.shape
    K, A = c.K, n_candidates
    device = xs.device
    codes = torch.empty(b, 1, 0, dtype=torch.int64, device=device)  # (b, h, m)
    residual = xs.unsqueeze(1)  # (b, h, d)
    ctx_cond = model.ctx_cond(ctx)  # (b, Dc) or None
    instr = None  # (b, h, De) once the stream has started, condition 'instruction' only
    if c.mode is Condition.INSTRUCTION and ctx_cond is not None:
        instr = ctx_cond.unsqueeze(1)
    vec_rows = torch.arange(b, device=device).unsqueeze(1)
    for m in range(c.M):
        h = residual.shape[1]
        flat = residual.reshape(b * h, d)
        book = model.codebooks[m]  # (K, d)
        res_norms = (flat * flat).sum(1, keepdim=True)  # (bh, 1)
        morphed_step = m >= c.first_morphed and c.n_morph_steps > 0
        if not morphed_step or A == K:
            candidates = torch.arange(K, device=device).expand(b * h, K)
            shared = None  # all K codewords, shared by all hypotheses
        else:
            candidates = _base_scores(book, flat).topk(A, dim=1, largest=False).indices  # (bh, A)
            shared = candidates
        if not morphed_step:
            scores = res_norms + _base_scores(book, flat)
            n_cand = K
            words = None
        else:
            if c.mode is Condition.INSTRUCTION:
                cond = instr.expand(b, h, instr.shape[-1])
            else:
                cond = recon_cond(xs.unsqueeze(1) - residual, ctx_cond)
            cond = cond.reshape(b * h, cond.shape[-1])
            scores, words = coder.score_candidates(m, shared, cond, flat, n_rows=b * h)  # (bh, A)
            scores = res_norms + scores
            n_cand = scores.shape[1]
        keep = min(beam_size, h * n_cand)
        best = scores.reshape(b, h * n_cand).topk(keep, dim=1, largest=False).indices  # (b, keep)
        parent, which = best // n_cand, best % n_cand
        flat_rows = vec_rows * h + parent  # rows of the (bh, ...) tensors
        idx = candidates[flat_rows, which]  # (b, keep)
        chosen = book[idx] if words is None else words(flat_rows, which)  # (b, keep, d)
        words = None  # the step's partial outputs go before the next step's are made
        codes = torch.cat([codes[vec_rows, parent], idx.unsqueeze(-1)], dim=2)
        residual = residual[vec_rows, parent] - chosen
        if c.mode is Condition.INSTRUCTION and m < c.M - 1:
            e = model.instr_codebooks[m, idx]  # (b, keep, De)
            instr = advance_instruction(None if instr is None else
                                        instr.expand(b, h, e.shape[-1])[vec_rows, parent], e)
    return codes[:, 0]  # topk sorts ascending: hypothesis 0 has the smallest final residual
