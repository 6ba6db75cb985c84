"""Per-response log-probs, token counts and mean normalised entropy from final hidden states, in chunks.

The naive path, `logits = lm_head(hidden)` then `log_softmax`, materialises a float32 [B, T, V] tensor:
4 x 512 x 128k x 4 bytes = 1 GiB, and autograd keeps more. Here only the labelled (response) positions are
gathered, and the output embedding is applied to bounded chunks of them, so one float32 [chunk, V] block is
alive at a time, in the forward and in the backward, which recomputes it from the saved hidden rows (the
"fused linear cross-entropy" trick, e.g. Liger-Kernel, arXiv:2410.10989). When all the labelled positions fit
in one chunk (a training micro-batch, usually) the forward keeps that block's probabilities for the backward
instead: one [chunk, V] block held a little longer, one [M, H] x [H, V] matmul fewer. One pass yields the log-probs of
the training step and the entropy of the dispersion estimator (ALGORITHMS.md section 2.3):

    lse         = logsumexp_v logit_v
    log p(y_t)  = logit[y_t] - lse
    H_t         = lse - sum_v softmax(logit)_v * logit_v      (nats, float32)
    Hbar(y)     = mean_t H_t / log(V)                         (in [0, 1])
    a(y)        = mean_t (log p(y_t) - log sum_v p_v^2)       (with_wpo: WPO's aligned log-prob, no gradient)
    lp_l(y)     = sum_{t < l(y)} log p(y_t)                   (prefix_lengths l: LD-DPO's shared-length sum)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20  # one float32 [chunk, V] block; measured ~2x faster than 16 MiB on CPU


@dataclass(frozen=True)
class ResponseStats:
    logp_sum: Tensor      # [B] sum of the labelled tokens' log-probs (differentiable w.r.t. hidden and weight)
    token_count: Tensor   # [B] long, number of labelled tokens n(y)
    mean_entropy: Tensor  # [B] float32, detached Hbar(y) in [0, 1]; 0 where a row has no labels or with_entropy=False
    aligned_logp_mean: Tensor | None = None  # [B] detached a(y) (WPO weights exp(a)); with_wpo only
    prefix_logp_sum: Tensor | None = None    # [B] lp_l(y), sum of the first l(y) labelled tokens' log-probs
                                             # (differentiable); with prefix_lengths only


def _chunk_logits(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """[c, H] -> [c, V]: the matmul runs in the input dtype (bf16 on GPU), the result is upcast to >= float32."""
    logits = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunked_forward(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                     with_entropy: bool, with_wpo: bool,
                     keep_probs: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(token log-prob [M], entropy [M] or [0], log sum_v p_v^2 [M] or [0], logsumexp [M], probabilities
    [M, V] or None) of M labelled rows, `chunk` rows at a time; the probabilities with `keep_probs` when the M
    rows are one chunk."""
    m = rows.shape[0]
    dtype = torch.promote_types(rows.dtype, torch.float32)
    token_logp = torch.empty(m, dtype=dtype, device=rows.device)
    entropy = torch.empty(m if with_entropy else 0, dtype=dtype, device=rows.device)
    log_sum_sq = torch.empty(m if with_wpo else 0, dtype=dtype, device=rows.device)
    lse = torch.empty(m, dtype=dtype, device=rows.device)
    probs = None
    for start in range(0, m, chunk):
        sl = slice(start, start + chunk)
        logits = _chunk_logits(rows[sl], weight, bias)              # [c, V]: the only vocab-wide tensor
        top = logits.amax(dim=-1)                                   # [c]
        shifted = torch.sub(logits, top[:, None]).exp_()            # [c, V] exp(logit - max), reused below
        total = shifted.sum(dim=-1)                                 # [c]
        lse[sl] = top + total.log()  # logsumexp by hand: one exp pass serves both lse and the entropy
        token_logp[sl] = logits.gather(1, targets[sl, None])[:, 0] - lse[sl]
        if with_entropy:
            entropy[sl] = lse[sl] - torch.linalg.vecdot(shifted, logits) / total  # sum_v p_v logit_v, no 3rd block
        if with_wpo:  # sum_v p_v^2 = sum_v shifted_v^2 / total^2; the max term of shifted is 1, so no underflow
            log_sum_sq[sl] = torch.linalg.vecdot(shifted, shifted).log() - 2 * total.log()
        if keep_probs and m <= chunk:
            probs = shifted.div_(total[:, None])                    # [M, V] softmax, for the backward
    return token_logp, entropy, log_sum_sq, lse, probs


class TiedWeightGrad:
    """The weight gradient of a tied output embedding, handed from the head's backward to the input embedding
    lookup's (`embedding_lookup`), which adds its rows into it in place and returns the sum as the weight's one
    gradient.

    Autograd would give the lookup a dense gradient of its own (`embedding_dense_backward`: a zero-filled
    [V, H] tensor, for the few hundred rows a micro-batch touches) and add the head's to it: two passes over
    V x H floats a step, ~2-3% of a SmolLM2 CPU training step. The head's backward always runs first: the
    lookup's incoming gradient is computed from the head's gradient for the hidden states."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None  # set by the head's backward (one head per lookup: `response_stats`)

    def take(self) -> Tensor | None:
        """The head's gradient, released here so that the carrier does not keep a [V, H] tensor alive."""
        grad, self.grad = self.grad, None
        return grad


class _TiedEmbeddingLookup(torch.autograd.Function):
    """weight[ids] whose backward adds the rows' gradients into the tied head's (`TiedWeightGrad`). Rows of
    `padding_idx` get no gradient, as in `nn.Embedding`."""

    @staticmethod
    def forward(ctx, weight, ids, padding_idx, tied):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.tied, ctx.weight_shape = padding_idx, tied, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_embeds):
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad_embeds.reshape(-1, grad_embeds.shape[-1])   # [N], [N, H]
        if ctx.padding_idx is not None:
            kept = ids != ctx.padding_idx
            ids, rows = ids[kept], rows[kept]
        grad = ctx.tied.take()
        if grad is None:  # the head took no gradient for the weight in this backward
            grad = rows.new_zeros(ctx.weight_shape)
        if grad.dtype != torch.float32:
            # on CUDA a bf16 index_add_ adds with atomics in bf16, rounding at every repeat of a token (a chat
            # template's repeat hundreds of times; CPU's accumulates in fp32): each token's rows are summed in
            # fp32 first and rounded once, as autograd's embedding backward does on either device
            ids, inverse = torch.unique(ids, return_inverse=True)
            rows = rows.new_zeros((len(ids), rows.shape[-1]), dtype=torch.float32).index_add_(0, inverse, rows.float())
        return grad.index_add_(0, ids, rows.to(grad.dtype)), None, None, None


def embedding_lookup(ids: Tensor, weight: Tensor, tied: TiedWeightGrad, padding_idx: int | None = None) -> Tensor:
    """[..., ] token ids -> [..., H] rows of `weight`, the input embedding that `tied` also hands to
    `response_logprobs` as its head."""
    return _TiedEmbeddingLookup.apply(weight, ids, padding_idx, tied)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Autograd for `_chunked_forward`: saves rows, weight, bias, targets and lse, and a [c, V] block only when
    the rows are one chunk (their probabilities: the backward then skips recomputing the logits).

    d log p(y) / d logit = onehot(y) - softmax(logit), so with g the incoming gradient per row and
    D = g * (onehot - p) ([c, V], rebuilt chunk by chunk): grad_rows = D @ W, grad_W = sum_chunks D^T @ rows,
    grad_bias = sum_chunks D.sum(0). The entropy and log sum p^2 outputs carry no gradient. With `tied` the
    weight's gradient goes to the input embedding lookup instead (`TiedWeightGrad`).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk, with_entropy, with_wpo, tied):
        token_logp, entropy, log_sum_sq, lse, probs = _chunked_forward(rows, weight, bias, targets, chunk,
                                                                       with_entropy, with_wpo, keep_probs=True)
        ctx.save_for_backward(rows, weight, bias, targets, lse, probs)
        ctx.chunk, ctx.tied = chunk, tied
        ctx.mark_non_differentiable(entropy, log_sum_sq)
        return token_logp, entropy, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy, _grad_log_sum_sq):
        rows, weight, bias, targets, lse, probs = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.empty_like(rows) if need_rows else None
        # W and bias gradients accumulate over chunks in float32 (as wide as lse), cast once at the end; the
        # first chunk's product creates them (no zero-filled [V, H] to add it to: one chunk is the usual case)
        grad_weight = grad_bias = None
        for start in range(0, rows.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            # D = g * (onehot - p): from the kept probabilities (one chunk), else built in place in the
            # recomputed logits, one [c, V] block per chunk
            dlogits = (probs * -grad_logp[:, None] if probs is not None else
                       _chunk_logits(rows[sl], weight, bias).sub_(lse[sl, None]).exp_().mul_(-grad_logp[sl, None]))
            dlogits.scatter_add_(1, targets[sl, None], grad_logp[sl, None])
            if need_rows:
                grad_rows[sl] = dlogits.to(weight.dtype) @ weight
            if need_weight:
                chunk_rows = rows[sl].to(dlogits.dtype)
                grad_weight = (dlogits.T @ chunk_rows if grad_weight is None
                               else grad_weight.addmm_(dlogits.T, chunk_rows))
            if need_bias:
                grad_bias = dlogits.sum(dim=0) if grad_bias is None else grad_bias.add_(dlogits.sum(dim=0))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
            if ctx.tied is not None:
                ctx.tied.grad = grad_weight
                grad_weight = None
        return (grad_rows, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None, None)


def response_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, owner: Tensor | None = None,
    num_responses: int | None = None, chunk_tokens: int | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, with_entropy: bool = True, with_wpo: bool = False,
    prefix_lengths: Tensor | None = None, tied: TiedWeightGrad | None = None,
) -> ResponseStats:
    """Per-response log-prob sum, token count and mean normalised entropy of the labelled tokens.

    Args:
        hidden: [B, T, H] final hidden states.
        weight: [V, H] output embedding (lm_head); `bias` [V] optional.
        labels: [B, T] long; labels[b, t] is the token predicted from hidden[b, t] (the caller shifts),
            IGNORE_INDEX (-100) marks prompt and padding positions.
        owner: [B, T] long, the response (in [0, num_responses)) each labelled position belongs to, for rows
            that hold several responses (data/collate.py's shared-prompt layout); default: row b is response b.
        chunk_tokens: rows per chunk; by default as many as keep one float32 [chunk, V] block within
            `max_chunk_bytes`. The forward holds two such blocks at its peak (the logits and their
            exponentials), the backward one (built in place).
        with_entropy: also compute mean_entropy (the reference-scoring pass); the training step skips it.
        with_wpo: also compute aligned_logp_mean, the per-token mean of log p(y_t) - log sum_v p_v^2 whose exp
            is the WPO weight of a reply (Zhou et al. 2024, https://arxiv.org/abs/2406.11827, Eq. 2 with TRL's
            alignment); detached.
        prefix_lengths: [B] long l(y); also compute prefix_logp_sum, the log-prob sum of each response's first
            l(y) labelled tokens (LD-DPO's shared part, Liu et al. 2024, https://arxiv.org/abs/2409.06411;
            l(y) >= n(y) gives lp(y)). Token order within a response is position order.
        tied: `weight` is also the input embedding, looked up with `embedding_lookup(..., tied)` for this
            forward: the weight's gradient is handed to that lookup's backward, which returns the sum.

    Matches `log_softmax(hidden @ weight.T + bias)` gathered at the labels, values and gradients. When no
    gradient is needed (under no_grad, or no input requires grad) the same chunk loop runs without autograd.
    """
    vocab = weight.shape[0]
    mask = labels != IGNORE_INDEX                                   # [B, T]
    if owner is None:
        batch, owner = hidden.shape[0], mask.nonzero()[:, 0]        # [M] row of each labelled position
    else:
        batch, owner = num_responses, owner[mask]                   # [M] response of each labelled position
    rows, targets = hidden[mask], labels[mask]                      # [M, H], [M]: only these reach the vocab
    chunk = chunk_tokens or max(1, max_chunk_bytes // (4 * vocab))
    args = (rows, weight, bias, targets, chunk, with_entropy, with_wpo)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    token_logp, entropy, log_sum_sq = (_ChunkedTokenLogprobs.apply(*args, tied) if needs_grad
                                       else _chunked_forward(*args)[:3])
    count = torch.bincount(owner, minlength=batch)                  # [B] long
    logp_sum = token_logp.new_zeros(batch).index_add(0, owner, token_logp)
    mean_entropy = torch.zeros(batch, dtype=torch.float32, device=hidden.device)
    if with_entropy:
        entropy_sum = entropy.new_zeros(batch).index_add(0, owner, entropy)
        mean_entropy = (entropy_sum / count.clamp(min=1) / math.log(vocab)).float()
    aligned = None
    if with_wpo:
        aligned_sum = log_sum_sq.new_zeros(batch).index_add(0, owner, token_logp.detach() - log_sum_sq)
        aligned = aligned_sum / count.clamp(min=1)
    prefix = None
    if prefix_lengths is not None:
        in_prefix = _rank_in_response(owner, count) < prefix_lengths[owner]   # [M] bool
        prefix = token_logp.new_zeros(batch).index_add(0, owner[in_prefix], token_logp[in_prefix])
    return ResponseStats(logp_sum, count, mean_entropy.detach(), aligned, prefix)


def _rank_in_response(owner: Tensor, count: Tensor) -> Tensor:
    """[M] long: the index of each labelled position among its response's (0 = first token). `owner` lists the
    positions in row-major order, so a stable sort by owner keeps each response's tokens in position order."""
    order = torch.argsort(owner, stable=True)
    starts = count.cumsum(0) - count                                    # [B] first sorted index per response
    rank = torch.empty_like(owner)
    rank[order] = torch.arange(owner.numel(), device=owner.device) - starts[owner[order]]
    return rank
