"""Pack prompts and their responses into padded [rows, T] tensors for one forward pass.

Two layouts, the same log-probs (within float rounding; tests/unit/test_collate.py, test_shared_prompt.py):

* per response (`share_prompt=False`): R = B x N rows, row r = prompt + response r, T = longest prompt +
  response. Plain causal attention with right padding.
* shared prompt (`share_prompt=True`): B rows, one per prompt, holding the prompt once and then every
  response after it:

      [ x_0 .. x_{P-2} | x_{P-1} y^1 | x_{P-1} y^2 | ... | x_{P-1} y^N | pad ]
        shared prefix    segment 1     segment 2           segment N

  A token of segment i attends to the shared prefix and to the earlier tokens of its own segment only,
  and its position id is the one it has in the per-response row, so every hidden state equals the
  per-response layout's. The last prompt token opens each segment (its hidden state predicts y_0, one
  copy per response keeps one label per position) at the cost of N - 1 extra tokens. The prompt runs once
  instead of N times: for pairs with a prompt as long as a response, 1/4 fewer tokens; listwise N = 4,
  more. The model side turns `segment_ids` into the 4D attention mask (`attention.shared_prompt_mask`), or
  on a GPU in bf16 into causal sequences for the varlen flash kernel (`attention.varlen_sequences`).

Either layout can also be **packed** (`pack=True`): the rows of the micro-batch's prompts laid end to end in
one row, without padding between them. A token attends only within its own row of the unpacked layout (a
group): `segment_ids` carry the group in their high bits (`SEGMENT_BITS`) and the segment in the low ones, and
positions restart in every group, so every hidden state is again the unpacked one's. Padding between rows
is gone (a micro-batch's prompts differ in length); the price is a [T, T] attention mask over the whole row.

In all, `labels[row, t]` is the token that `hidden[row, t]` predicts (already shifted), IGNORE_INDEX
(`losses.logprobs`) on prompt and padding positions, so the first response token and the EOS are both scored
(ALGORITHMS 2.3), and `owner[row, t]` says which response r in [0, R) a labelled position belongs to
(prompt-major order).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from mallows_ray.losses import IGNORE_INDEX

SEGMENT_BITS = 16  # segment_ids = group << SEGMENT_BITS | segment (group: a row of the unpacked layout)


@dataclass(frozen=True)
class PackedResponses:
    input_ids: torch.Tensor             # [rows, T] long
    attention_mask: torch.Tensor        # [rows, T] long: 1 on real tokens, 0 on padding
    labels: torch.Tensor                # [rows, T] long, IGNORE_INDEX outside responses
    owner: torch.Tensor                 # [rows, T] long: response index r of each labelled position, -1 elsewhere
    position_ids: torch.Tensor | None   # [rows, T] long (shared prompt, packed); None: 0..T-1 per row
    segment_ids: torch.Tensor | None    # [rows, T] long (shared prompt, packed): group << SEGMENT_BITS | segment,
                                        # segment 0 prefix (all of a per-response row), i + 1 response i; -1 padding
    prompt_index: torch.Tensor          # [R] long: which prompt of the batch each response belongs to
    response_counts: list[int]          # N_p per prompt; with a common N, response p * N + i is response i of p
    token_counts: torch.Tensor          # [R] long: n(y), labelled tokens per response
    prompt_lengths: list[int]           # P per prompt

    @property
    def num_responses(self) -> int:
        return len(self.prompt_index)

    @property
    def sequence_tokens(self) -> int:
        """Tokens of the prompt + response sequences, a prompt counted once per response: the work unit
        that does not depend on the layout (what a per-response trainer such as TRL runs)."""
        return int(self.token_counts.sum()) + sum(n * p for n, p in zip(self.response_counts, self.prompt_lengths))

    @property
    def model_tokens(self) -> int:
        """Non-padding tokens the model actually runs (the shared layout runs each prompt about once)."""
        return int(self.attention_mask.sum())

    @property
    def shared_lengths(self) -> torch.Tensor:
        """[R] long: n of the shortest response of each response's prompt, LD-DPO's l = min(n(y_w), n(y_l))
        for a pair (Liu et al. 2024, https://arxiv.org/abs/2409.06411)."""
        shortest = torch.stack([counts.min() for counts in self.split(self.token_counts)])  # [B]
        return shortest[self.prompt_index]

    def model_inputs(self, with_prefix: bool = False) -> dict:
        """Keyword arguments of `models.response_stats` and of the policy's forward; `with_prefix` adds
        prefix_lengths = `shared_lengths` (the log-prob sums of LD-DPO's shared part)."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                  "owner": self.owner, "position_ids": self.position_ids, "segment_ids": self.segment_ids,
                  "num_responses": self.num_responses}
        return {**inputs, "prefix_lengths": self.shared_lengths} if with_prefix else inputs

    def to(self, device: torch.device) -> "PackedResponses":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedResponses(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """[R] per-response values -> one [N_p] tensor per prompt."""
        return list(torch.split(values, self.response_counts))


def pack_responses(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[Sequence[int]]], pad_id: int, *,
    share_prompt: bool = False, pack: bool = False,
) -> PackedResponses:
    """Rows of B prompts and their responses in the per-response or the shared-prompt layout, packed into one
    row with `pack` (module doc)."""
    if any(len(prompt) == 0 for prompt in prompt_ids):
        raise ValueError("an empty prompt cannot predict the first response token")
    # one entry per row: its tokens, labels, owners, and (shared layout) positions and segments
    rows: list[tuple[list[int], list[int], list[int], list[int], list[int]]] = []
    r = 0
    for prompt, responses in zip(prompt_ids, response_ids):
        prompt = list(prompt)
        if share_prompt:
            tokens, positions = prompt[:-1], list(range(len(prompt) - 1))
            labels, owners, segments = [IGNORE_INDEX] * len(tokens), [-1] * len(tokens), [0] * len(tokens)
            for i, response in enumerate(responses):
                segment = [prompt[-1], *response]
                tokens += segment
                positions += range(len(prompt) - 1, len(prompt) + len(response))
                labels += [*response, IGNORE_INDEX]  # x_{P-1} predicts y_0, ..., y_{L-2} predicts y_{L-1}
                owners += [r] * len(response) + [-1]
                segments += [i + 1] * len(segment)
                r += 1
            rows.append((tokens, labels, owners, positions, segments))
        else:
            for response in responses:
                tokens = prompt + list(response)
                labels = [IGNORE_INDEX] * (len(prompt) - 1) + list(response) + [IGNORE_INDEX]
                owners = [-1] * (len(prompt) - 1) + [r] * len(response) + [-1]
                # positions and segments only where they are used: a packed row (one group per row here)
                layout = (list(range(len(tokens))), [0] * len(tokens)) if pack else ([], [])
                rows.append((tokens, labels, owners, *layout))
                r += 1
    if pack:  # every row end to end, its segments tagged with its group
        rows = [tuple([value for row in rows for value in row[column]] for column in range(4))
                + ([g << SEGMENT_BITS | segment for g, row in enumerate(rows) for segment in row[4]],)]
    width = max(len(tokens) for tokens, *_ in rows)

    def padded(column: int, fill: int) -> torch.Tensor:
        return torch.tensor([row[column] + [fill] * (width - len(row[column])) for row in rows], dtype=torch.long)

    attention_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t, *_ in rows], dtype=torch.long)
    return PackedResponses(
        input_ids=padded(0, pad_id), attention_mask=attention_mask, labels=padded(1, IGNORE_INDEX), owner=padded(2, -1),
        position_ids=padded(3, 0) if share_prompt or pack else None,
        segment_ids=padded(4, -1) if share_prompt or pack else None,
        prompt_index=torch.tensor([p for p, resps in enumerate(response_ids) for _ in resps], dtype=torch.long),
        response_counts=[len(resps) for resps in response_ids],
        token_counts=torch.tensor([len(resp) for resps in response_ids for resp in resps], dtype=torch.long),
        prompt_lengths=[len(prompt) for prompt in prompt_ids],
    )
