"""Per-response log-probs, token counts and mean normalised entropy from final hidden states, in chunks.

The naive path, `logits = lm_head(hidden)` then `log_softmax`, materialises a float32 [B, T, V] tensor:
4 x 512 x 128k x 4 bytes = 1 GiB before autograd keeps a copy. Here only the labelled (response) positions
are gathered, and the output embedding is applied to bounded chunks of them, so at most one float32
[chunk, V] block is alive at a time, in the forward and in the backward (which recomputes it; the
"fused linear cross-entropy" trick). One pass yields both the log-probs and the entropy of ALGORITHMS 2.3:

    log p(y_t)  = logit[y_t] - logsumexp(logit)
    H_t         = logsumexp(logit) - sum_v softmax(logit)_v * logit_v      (nats)
    Hbar(y)     = mean_t H_t / log(V)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ResponseStats:
    logp_sum: Tensor      # [B] sum of log-probs of the labelled tokens (differentiable)
    token_count: Tensor   # [B] long, number of labelled tokens
    mean_entropy: Tensor  # [B] detached Hbar(y) in [0, 1]; 0 where a row has no labels or entropy was skipped

    @property
    def logp_mean(self) -> Tensor:
        return self.logp_sum / self.token_count.clamp(min=1)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """[c, H] -> [c, V] logits: matmul in the input dtype (bf16 on GPU), then upcast to at least float32."""
    logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """token_logp [M] (and entropy [M], no grad) of M labelled rows; backward recomputes chunk softmaxes."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                with_entropy: bool):
        m = rows.shape[0]
        dtype = torch.promote_types(rows.dtype, torch.float32)
        token_logp = torch.empty(m, dtype=dtype, device=rows.device)
        entropy = torch.zeros(m if with_entropy else 0, dtype=dtype, device=rows.device)
        lse = torch.empty(m, dtype=dtype, device=rows.device)
        for start in range(0, m, chunk):
            sl = slice(start, start + chunk)
            logits = _chunk_logits(rows[sl], weight, bias)  # [c, V] float32: the only vocab-wide tensor
            lse[sl] = torch.logsumexp(logits, dim=-1)
            token_logp[sl] = logits.gather(1, targets[sl, None])[:, 0] - lse[sl]
            if with_entropy:
                probs = torch.sub(logits, lse[sl, None]).exp_()
                entropy[sl] = lse[sl] - torch.linalg.vecdot(probs, logits)  # row dots: no third [c, V] temp
        ctx.save_for_backward(rows, weight, bias, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return token_logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor):
        rows, weight, bias, targets, lse = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=lse.dtype) if need_bias else None
        for start in range(0, rows.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            # d(logit[y] - lse)/d logit = onehot(y) - softmax, scaled by the incoming gradient; built in place
            # in the recomputed logits buffer, so one [c, V] block is alive per chunk
            dlogits = _chunk_logits(rows[sl], weight, bias).sub_(lse[sl, None]).exp_().mul_(-grad_logp[sl, None])
            dlogits.scatter_add_(1, targets[sl, None], grad_logp[sl, None])
            if need_rows:
                grad_rows[sl] = (dlogits.to(weight.dtype) @ weight).to(rows.dtype)
            if need_weight:
                grad_weight.addmm_(dlogits.T, rows[sl].to(dlogits.dtype))
            if need_bias:
                grad_bias += dlogits.sum(0)
        return (grad_rows, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None, None)


def response_logprobs(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, chunk_tokens: int | None = None,
    max_chunk_bytes: int = 16 * 2**20, with_entropy: bool = True,
) -> ResponseStats:
    """Per-row statistics of the labelled tokens.

    hidden [B, T, H] final hidden states; weight [V, H] output embedding (bias [V] optional);
    labels [B, T] long, where labels[b, t] is the token predicted from hidden[b, t] (the caller shifts) and
    IGNORE_INDEX (-100) marks prompt and padding positions. Chunks hold `chunk_tokens` rows, or as many as
    keep one float32 [chunk, V] block under `max_chunk_bytes`.
    """
    batch, vocab = hidden.shape[0], weight.shape[0]
    mask = labels != IGNORE_INDEX                       # [B, T]
    owner = mask.nonzero()[:, 0]                         # [M] row index of each labelled position
    rows = hidden[mask]                                  # [M, H]: only response positions go to the vocab
    chunk = chunk_tokens or max(1, max_chunk_bytes // (4 * vocab))
    token_logp, entropy = _ChunkedTokenLogprobs.apply(rows, weight, bias, labels[mask], chunk, with_entropy)
    count = mask.sum(dim=1)                              # [B]
    logp_sum = torch.zeros(batch, dtype=token_logp.dtype, device=hidden.device).index_add(0, owner, token_logp)
    if with_entropy:
        entropy_sum = torch.zeros(batch, dtype=entropy.dtype, device=hidden.device).index_add(0, owner, entropy)
        mean_entropy = entropy_sum / count.clamp(min=1) / math.log(vocab)
    else:
        mean_entropy = torch.zeros(batch, dtype=token_logp.dtype, device=hidden.device)
    return ResponseStats(logp_sum, count, mean_entropy.detach())
