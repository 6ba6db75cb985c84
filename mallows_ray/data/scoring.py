"""Reference scoring: one pass of the frozen reference model over every response (ALGORITHMS 2.3).

Per response y it emits the reference log-prob sum ref(y), the sum ref_l(y) over its first l tokens (l = the
token count of the prompt's shortest reply: LD-DPO's min(n(y_w), n(y_l)) for a pair), the token count n(y)
and the mean normalised entropy Hbar(y); per prompt the mean Hbar(x) over its responses. These become dataset columns, so the
reference model never sits in a training worker's memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mallows_ray.data.collate import pack_responses
from mallows_ray.data.stages import finalise_and_tokenize
from mallows_ray.losses import prompt_mean_entropy
from mallows_ray.models import load_model, response_stats

# The columns scoring adds, one value per response (lists of N) or per prompt.
SCORE_FIELDS = [
    pa.field("ref_logps", pa.list_(pa.float32())),      # ref(y): sum of reference log-probs
    pa.field("ref_shared_logps", pa.list_(pa.float32())),  # ref_l(y): sum over the first l tokens, l = n of the
                                                            # prompt's shortest reply (LD-DPO, `ld_alpha`)
    pa.field("ref_token_counts", pa.list_(pa.int32())),  # n(y)
    pa.field("ref_entropy", pa.list_(pa.float32())),     # Hbar(y): mean normalised entropy
    pa.field("hbar", pa.float64()),                      # Hbar(x): mean over the prompt's responses
]


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and lose precision)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@torch.no_grad()
def score_responses(
    model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[Sequence[int]]], *,
    pad_id: int, max_chunk_bytes: int, share_prompt: bool = False,
) -> dict[str, list[np.ndarray] | np.ndarray]:
    """Reference statistics for a batch of prompts; per-prompt lists have one entry per response."""
    device = next(model.parameters()).device
    packed = pack_responses(prompt_ids, response_ids, pad_id, share_prompt=share_prompt).to(device)
    stats = response_stats(model, **packed.model_inputs(with_prefix=True), with_entropy=True,
                           max_chunk_bytes=max_chunk_bytes)
    logps = [t.float().cpu().numpy() for t in packed.split(stats.logp_sum)]
    shared = [t.float().cpu().numpy() for t in packed.split(stats.prefix_logp_sum)]
    counts = [t.cpu().numpy().astype(np.int32) for t in packed.split(stats.token_count)]
    entropy = [t.float().cpu().numpy() for t in packed.split(stats.mean_entropy)]
    hbar = np.array([float(prompt_mean_entropy(torch.as_tensor(e)[None])[0]) for e in entropy], dtype=np.float64)
    return {"ref_logps": logps, "ref_shared_logps": shared, "ref_token_counts": counts, "ref_entropy": entropy, "hbar": hbar}


class ReferenceScorer:
    """Ray Data class UDF: loads the reference model once per actor, then scores batches of prompts.

    Used as `ds.map_batches(ReferenceScorer, batch_format="pyarrow", compute=ActorPoolStrategy(size=n), fn_constructor_kwargs=...)`.
    """

    def __init__(self, model_path: str, *, pad_id: int, dtype: str = "auto", max_chunk_mb: int = 64,
                 share_prompt: bool = True, trust_remote_code: bool = False):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(model_path, pick_dtype(dtype, self.device), trust_remote_code=trust_remote_code)
        self.model = model.to(self.device).eval()
        self.pad_id = pad_id
        self.max_chunk_bytes = max_chunk_mb * 2**20
        self.share_prompt = share_prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        # pyarrow batches keep the nested columns (messages, [N][len] token ids) exactly as they are
        scored = score_responses(
            self.model, batch.column("prompt_ids").to_pylist(), batch.column("response_ids").to_pylist(),
            pad_id=self.pad_id, max_chunk_bytes=self.max_chunk_bytes, share_prompt=self.share_prompt,
        )
        for field in SCORE_FIELDS:
            batch = batch.append_column(field, pa.array(scored[field.name], field.type))
        return batch


class TokenizeAndScore:
    """Ray Data class UDF of prepare's actor pool: the split-wide verdicts and tokenization
    (`stages.finalise_and_tokenize`), then the reference scores of the rows that survive them
    (`ReferenceScorer`), in one actor, so tokenized rows are never staged and the pool's processes, which
    load transformers anyway, do the tokenizing too.

    One output row per input row: the scored rows of the batch in their order, then its rejects in theirs,
    with null score columns (the driver writes the two apart, each in reading order)."""

    def __init__(self, *, verdicts: list, tokenizer_path: str, limits, **scorer_kwargs):
        """`verdicts`: [ObjectRef of stages.SplitVerdicts], in a list so that Ray starts the actor without
        waiting for it: the model loads while the split-wide checks finish, and only then is it fetched."""
        import ray

        self.scorer = ReferenceScorer(**scorer_kwargs)
        self.finalise = dict(verdicts=ray.get(verdicts[0]), tokenizer_path=tokenizer_path, limits=limits)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tokenized = finalise_and_tokenize(batch, **self.finalise)
        bad = pc.not_equal(tokenized.column("reject_reason"), "")
        kept, rejects = tokenized.filter(pc.invert(bad)), tokenized.filter(bad)
        scored = self.scorer(kept) if kept.num_rows else _with_null_scores(kept)
        return pa.concat_tables([scored, _with_null_scores(rejects)])


def _with_null_scores(table: pa.Table) -> pa.Table:
    for field in SCORE_FIELDS:
        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table
