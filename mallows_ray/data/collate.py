"""Pack prompts and their responses into padded [R, T] tensors for one forward pass.

R = total responses in the batch (every response of every prompt, so all N responses of a prompt go through
the model together), T = longest prompt + response. Right padding; `labels[r, t]` is the token that
`hidden[r, t]` predicts (already shifted), -100 on prompt and padding positions, so the first response token
and the EOS are both scored (ALGORITHMS 2.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100


@dataclass(frozen=True)
class PackedResponses:
    input_ids: torch.Tensor       # [R, T] long
    attention_mask: torch.Tensor  # [R, T] long
    labels: torch.Tensor          # [R, T] long, IGNORE outside responses
    prompt_index: torch.Tensor    # [R] long: which prompt of the batch each row belongs to (prompt-major order)
    response_counts: list[int]    # N_p per prompt; with a common N, row p * N + i is response i of prompt p

    def to(self, device: torch.device) -> "PackedResponses":
        return PackedResponses(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                               self.prompt_index.to(device), self.response_counts)

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """[R] per-response values -> one [N_p] tensor per prompt."""
        return list(torch.split(values, self.response_counts))


def pack_responses(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[Sequence[int]]], pad_id: int
) -> PackedResponses:
    """One row per (prompt, response), prompt-major: the rows of prompt p are followed by those of p + 1."""
    if any(len(prompt) == 0 for prompt in prompt_ids):
        raise ValueError("an empty prompt cannot predict the first response token")
    rows = [(p, list(prompt) + list(resp), len(prompt)) for p, (prompt, resps) in
            enumerate(zip(prompt_ids, response_ids)) for resp in resps]
    width = max(len(seq) for _, seq, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (_, seq, prompt_len) in enumerate(rows):
        input_ids[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[r, : len(seq)] = 1
        # position t predicts token t+1: response tokens sit at [prompt_len, len(seq)), predicted from t-1
        labels[r, prompt_len - 1 : len(seq) - 1] = input_ids[r, prompt_len : len(seq)]
    prompt_index = torch.tensor([p for p, _, _ in rows], dtype=torch.long)
    return PackedResponses(input_ids, attention_mask, labels, prompt_index, [len(r) for r in response_ids])
