"""Reference scoring: one pass of the frozen reference model over every response (ALGORITHMS 2.3).

Per response y it emits the reference log-prob sum ref(y), the sum ref_l(y) over its first l tokens (l = the
token count of the prompt's shortest reply: LD-DPO's min(n(y_w), n(y_l)) for a pair), the token count n(y)
and the mean normalised entropy Hbar(y); per prompt the mean Hbar(x) over its responses. These become dataset
columns, so the reference model never sits in a training worker's memory. `scoring_pool.py` runs it in
prepare's actors.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from mallows_ray.data.collate import pack_responses
from mallows_ray.losses import prompt_mean_entropy
from mallows_ray.models import load_model, response_stats
from mallows_ray.runtime import pick_dtype

# The columns scoring adds, one value per response (lists of N) or per prompt.
SCORE_FIELDS = [
    pa.field("ref_logps", pa.list_(pa.float32())),      # ref(y): sum of reference log-probs
    pa.field("ref_shared_logps", pa.list_(pa.float32())),  # ref_l(y): sum over the first l tokens, l = n of the
                                                            # prompt's shortest reply (LD-DPO, `ld_alpha`)
    pa.field("ref_token_counts", pa.list_(pa.int32())),  # n(y)
    pa.field("ref_entropy", pa.list_(pa.float32())),     # Hbar(y): mean normalised entropy
    pa.field("hbar", pa.float64()),                      # Hbar(x): mean over the prompt's responses
]


@torch.no_grad()
def score_responses(
    model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[Sequence[int]]], *,
    pad_id: int, max_chunk_bytes: int, share_prompt: bool = False, pack: bool = False,
) -> dict[str, list[np.ndarray] | np.ndarray]:
    """Reference statistics for a batch of prompts; per-prompt lists have one entry per response."""
    device = next(model.parameters()).device
    packed = pack_responses(prompt_ids, response_ids, pad_id, share_prompt=share_prompt, pack=pack).to(device)
    stats = response_stats(model, **packed.model_inputs(with_prefix=True), with_entropy=True,
                           max_chunk_bytes=max_chunk_bytes)
    logps = [t.float().cpu().numpy() for t in packed.split(stats.logp_sum)]
    shared = [t.float().cpu().numpy() for t in packed.split(stats.prefix_logp_sum)]
    counts = [t.cpu().numpy().astype(np.int32) for t in packed.split(stats.token_count)]
    entropy = [t.float().cpu().numpy() for t in packed.split(stats.mean_entropy)]
    hbar = np.array([float(prompt_mean_entropy(torch.as_tensor(e)[None])[0]) for e in entropy], dtype=np.float64)
    return {"ref_logps": logps, "ref_shared_logps": shared, "ref_token_counts": counts, "ref_entropy": entropy,
            "hbar": hbar}


class ReferenceScorer:
    """The frozen reference model of one process (a scoring actor, or a plain loop), scoring tokenized rows."""

    def __init__(self, model_path: str, *, pad_id: int, dtype: str = "auto", max_chunk_mb: int = 64,
                 share_prompt: bool = True, pack: bool = False, trust_remote_code: bool = False):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(model_path, pick_dtype(dtype, self.device), trust_remote_code=trust_remote_code)
        self.model = model.to(self.device).eval()
        self.pad_id = pad_id
        self.max_chunk_bytes = max_chunk_mb * 2**20
        self.share_prompt, self.pack = share_prompt, pack

    def score_columns(self, rows: Sequence[dict[str, Any]], batch_size: int) -> list[pa.Array]:
        """The SCORE_FIELDS columns of tokenized `rows` (dicts with prompt_ids, response_ids, reject_reason),
        in their order, scoring `batch_size` prompts per forward: null on the rows that are rejects. The token
        ids are read from the Python rows tokenization made, never converted back from Arrow."""
        kept = [i for i, row in enumerate(rows) if not row["reject_reason"]]
        values: dict[str, list] = {f.name: [None] * len(rows) for f in SCORE_FIELDS}
        for start in range(0, len(kept), batch_size):
            batch = kept[start:start + batch_size]
            scored = score_responses(
                self.model, [rows[i]["prompt_ids"] for i in batch], [rows[i]["response_ids"] for i in batch],
                pad_id=self.pad_id, max_chunk_bytes=self.max_chunk_bytes, share_prompt=self.share_prompt,
                pack=self.pack,
            )
            for name, column in scored.items():
                for i, value in zip(batch, column):
                    values[name][i] = value
        return [pa.array(values[f.name], f.type) for f in SCORE_FIELDS]
