"""Deterministic global batches of an epoch, per-rank slices, and tensors from rows.

The sequence of global batches depends only on the data, `run.seed`, the epoch and the global batch size —
never on the number of workers — which gives
  * exact resume: a resumed or restarted run skips the global batches already consumed by index arithmetic
    (`epoch_order(...)[consumed:]`), without reading them;
  * invariance: 1 worker x accumulation 2 runs the same micro-batches as 2 workers x accumulation 1.
Each rank reads only its own contiguous slice of each global batch (`rank_slice`) from the scored parquet
(`data/scored_split.py`), so the rows read by all ranks together are the rows of the epoch, not rows x W.

Order within an epoch (`epoch_order`): a permutation of all N row indices seeded by (seed, epoch), different
each epoch (`shuffle=False`: the stored order). The permuted indices are cut into windows of
`WINDOW_BATCHES` global batches, each shuffled again by its own generator (an epoch of one window is
permuted by that shuffle alone); with `group_by_length` each window is sorted by padded length (so a
micro-batch holds prompts of similar length and little padding), cut into global batches, and the batches
are shuffled again so lengths do not rise through the window (`order_window`). The shuffle is global: the
rows of any window are a random sample of the whole split, whatever files or sources they came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from mallows_ray.data.collate import PackedResponses, pack_responses
from mallows_ray.train.metrics import rank_extremes

# Global batches per shuffle / length-grouping window (the "megabatch" of HF's LengthGroupedSampler).
WINDOW_BATCHES = 50
# The last seed word of an epoch's permutation: no window index reaches it, so the permutation and
# `order_window`'s [seed, epoch, window] generators are distinct streams.
_PERMUTATION_STREAM = 2**32 - 1

Row = dict[str, Any]
Item = TypeVar("Item")  # a row, or a row's index into the split


def padded_length(row: Row, share_prompt: bool = False) -> int:
    """Length of the row's packed sequence(s): what its micro-batch gets padded to (data/collate.py's layouts:
    prompt + longest response, or with a shared prompt the prompt once and every response, each opened by
    the last prompt token)."""
    responses = [len(r) for r in row["response_ids"]]
    if share_prompt:
        return len(row["prompt_ids"]) - 1 + sum(responses) + len(responses)
    return len(row["prompt_ids"]) + max(responses)


def order_window(rows: Sequence[Item], *, global_batch_size: int, seed: int, epoch: int, window: int,
                 shuffle: bool, group_by_length: bool, share_prompt: bool = False,
                 length: Callable[[Item], int] | None = None) -> list[list[Item]]:
    """The full global batches of one window, in training order; the incomplete remainder is dropped.

    `rows` are rows, or row indices with `length` giving each one's padded length (default: `padded_length`
    of the row)."""
    key = length or (lambda row: padded_length(row, share_prompt))
    rng = np.random.default_rng([seed, epoch, window])
    n_batches = len(rows) // global_batch_size
    order = rng.permutation(len(rows)) if shuffle else np.arange(len(rows))
    # choose the kept rows before sorting, so the dropped remainder is random rather than the longest rows
    order = order[: n_batches * global_batch_size]
    if group_by_length:
        # stable: ties keep the shuffled order
        order = sorted(order, key=lambda i: key(rows[i]))
    batches = [[rows[i] for i in order[b * global_batch_size:(b + 1) * global_batch_size]]
               for b in range(n_batches)]
    if shuffle and group_by_length:
        batches = [batches[i] for i in rng.permutation(n_batches)]
    return batches


def epoch_batches(windows: Iterable[Sequence[Item]], *, global_batch_size: int, seed: int, epoch: int,
                  shuffle: bool, group_by_length: bool, share_prompt: bool = False,
                  length: Callable[[Item], int] | None = None) -> Iterator[list[Item]]:
    """Global batches of one epoch from a sequence of windows of `WINDOW_BATCHES * global_batch_size` rows
    (or row indices, with `length`: see `order_window`)."""
    for window, rows in enumerate(windows):
        yield from order_window(rows, global_batch_size=global_batch_size, seed=seed, epoch=epoch, window=window,
                                shuffle=shuffle, group_by_length=group_by_length, share_prompt=share_prompt,
                                length=length)


def epoch_order(n_rows: int, *, global_batch_size: int, seed: int, epoch: int, shuffle: bool,
                lengths: np.ndarray | None = None) -> list[list[int]]:
    """The global batches of one epoch as row indices into the split (0..n_rows-1, in stored order): every
    full batch, the `n_rows % global_batch_size` rows left over dropped (at random when shuffled).

    `lengths` [n_rows]: each row's padded length, to group rows of similar length (None: no grouping).
    Costs 8 bytes a row and a sort per window, and reads no row: every rank computes it alone.
    """
    span = WINDOW_BATCHES * global_batch_size
    if shuffle and n_rows > span:
        # several windows: permute the whole split first, so that every window is a random sample of it
        perm = np.random.default_rng([seed, epoch, _PERMUTATION_STREAM]).permutation(n_rows)
    else:  # the stored order; an epoch of one window is permuted whole by that window's own shuffle
        perm = np.arange(n_rows)
    windows = (perm[start:start + span].tolist() for start in range(0, n_rows, span))
    length = None if lengths is None else lengths.__getitem__
    return list(epoch_batches(windows, global_batch_size=global_batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                              group_by_length=lengths is not None, length=length))


def rank_slice(global_rows: list[Row], rank: int, world: int) -> list[Row]:
    """Rank r's contiguous share of a global batch: rows [r * n / world, (r + 1) * n / world)."""
    share = len(global_rows) // world
    return global_rows[rank * share:(rank + 1) * share]


def micro_batches(rows: list[Row], micro_batch_size: int) -> list[list[Row]]:
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def layout_tokens(rows: list[Row], share_prompt: bool, pack: bool) -> int:
    """Positions the forward of one micro-batch of `rows` runs, padding included (data/collate.py's layouts):
    rows x the longest row, or packed, every unpacked row end to end."""
    if share_prompt:  # a row per prompt: the prompt once, then each response opened by the last prompt token
        lengths = [padded_length(row, share_prompt=True) for row in rows]
    else:  # a row per response: prompt + response
        lengths = [len(row["prompt_ids"]) + len(response) for row in rows for response in row["response_ids"]]
    return sum(lengths) if pack else len(lengths) * max(lengths)


def token_budget_batches(rows: list[Row], max_tokens: int, *, group: int, share_prompt: bool,
                         pack: bool) -> list[list[Row]]:
    """`rows` cut, in order, into micro-batches whose forward runs at most `max_tokens` positions
    (`layout_tokens`); `group` consecutive rows (a prompt's lambda copies) stay in one micro-batch, and a group
    over the budget on its own runs alone. Rows in length order (`group_by_length`) waste little of it."""
    batches: list[list[Row]] = []
    for start in range(0, len(rows), group):
        rows_of_group = rows[start:start + group]
        if batches and layout_tokens(batches[-1] + rows_of_group, share_prompt, pack) <= max_tokens:
            batches[-1] = batches[-1] + rows_of_group
        else:
            batches.append(rows_of_group)
    return batches


def budget_micro_batches(rows: list[Row], max_tokens: int, *, group: int, share_prompt: bool,
                         pack: bool) -> list[list[Row]]:
    """A rank's `rows` as `token_budget_batches`, as many as on the rank that needs the most (collective: under
    ZeRO-3 every forward gathers parameters with all ranks, so every rank must run as many)."""
    parts = token_budget_batches(rows, max_tokens, group=group, share_prompt=share_prompt, pack=pack)
    _, most = rank_extremes(len(parts))
    return split_to_count(parts, int(most), group=group)


def split_to_count(batches: list[list[Row]], count: int, group: int) -> list[list[Row]]:
    """`batches` with the largest one halved (at a group boundary) until there are `count`: ranks whose token
    budget cut their share into fewer micro-batches than another rank's run as many forwards as it does
    (ZeRO-3 gathers parameters in every forward, collectively). Needs count <= groups in all the batches."""
    batches = list(batches)
    while len(batches) < count:
        largest = max(range(len(batches)), key=lambda b: len(batches[b]))
        rows = batches[largest]
        if len(rows) <= group:
            raise ValueError(f"cannot cut {sum(map(len, batches)) // group} groups into {count} micro-batches")
        half = len(rows) // group // 2 * group
        batches[largest:largest + 1] = [rows[:half], rows[half:]]
    return batches


def eval_slice(global_rows: list[Row], rank: int, world: int) -> tuple[list[Row], int]:
    """Rank r's rows of an evaluation batch and how many of them count.

    The last evaluation batch may hold fewer rows than ranks x micro batch. Under ZeRO-3 every rank must
    still run the same number of forwards (parameters are gathered collectively), so a rank whose share is
    short pads it with copies of the batch's first row and counts only the real ones.
    """
    share = -(-len(global_rows) // world)  # ceil
    rows = global_rows[rank * share:(rank + 1) * share]
    return rows + [global_rows[0]] * (share - len(rows)), len(rows)


@dataclass(frozen=True)
class Batch:
    """One micro-batch: B prompts, R = sum of their response counts, N = the largest count."""

    ids: list[str]
    packed: PackedResponses        # [R, T] rows, prompt-major (shared prompt: [B, T], one row per prompt)
    slots: torch.Tensor            # [R] long: flat index p * N + i of row r in the [B, N] grid
    response_mask: torch.Tensor    # [B, N] bool, False where a prompt has fewer than N responses
    reference_logps: torch.Tensor  # [B, N] ref(y) from the scored data, 0 at padding
    dispersion: torch.Tensor       # [B] s(x)
    scores: torch.Tensor | None    # [B, K, N] objective scores (listwise losses), 0 at padding
    lambdas: torch.Tensor | None   # [B, K] each prompt's preference weights (listwise losses)
    reference_shared_logps: torch.Tensor | None = None  # [B, N] ref_l(y) (LD-DPO), 0 at padding; None when the
                                                        # rows lack the ref_shared_logps column
    groups: torch.Tensor | None = None  # [B] long (listwise): rows with the same id (vertex copies of a prompt)
                                        # share a value, the index of the first of them

    @property
    def tokens(self) -> int:
        """Prompt + response tokens, a prompt counted once per response (whatever the packing layout)."""
        return self.packed.sequence_tokens

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """[R] per-response values -> [B, N], 0 at padding (differentiable: index_copy)."""
        flat = values.new_zeros(self.response_mask.numel()).index_copy(0, self.slots, values)
        return flat.view(self.response_mask.shape)

    def response_lengths(self) -> torch.Tensor:
        """[B, N] n(y): labelled tokens per response."""
        return self.grid(self.packed.token_counts)

    def to(self, device: torch.device) -> "Batch":
        scores = None if self.scores is None else self.scores.to(device)
        lambdas = None if self.lambdas is None else self.lambdas.to(device)
        shared = None if self.reference_shared_logps is None else self.reference_shared_logps.to(device)
        groups = None if self.groups is None else self.groups.to(device)
        return Batch(self.ids, self.packed.to(device), self.slots.to(device), self.response_mask.to(device),
                     self.reference_logps.to(device), self.dispersion.to(device), scores, lambdas, shared, groups)


def collate(rows: list[Row], pad_id: int, *, with_scores: bool, share_prompt: bool = False,
            pack: bool = False) -> Batch:
    """Tensors of one micro-batch from scored-data rows (columns id, prompt_ids, response_ids, ref_logps,
    dispersion; with `with_scores`, scores [K][N] the `lambda` [K] that `conditioning.Conditioner` gave, and the
    groups of rows with one id, a prompt's vertex copies).
    `share_prompt`: each prompt once with all its responses; `pack`: every prompt in one row (data/collate.py)."""
    counts = [len(row["response_ids"]) for row in rows]
    width = max(counts)
    mask = torch.tensor([[i < n for i in range(width)] for n in counts])                   # [B, N]
    reference = _response_grid(rows, "ref_logps", counts, width)
    shared = _response_grid(rows, "ref_shared_logps", counts, width) if "ref_shared_logps" in rows[0] else None
    scores = lambdas = groups = None
    if with_scores:
        if any(len(row["scores"]) == 0 for row in rows):
            raise ValueError("a listwise loss needs objective scores; rows "
                             f"{[row['id'] for row in rows if not row['scores']]} have none")
        scores = torch.zeros(len(rows), len(rows[0]["scores"]), width)                      # [B, K, N]
        for p, row in enumerate(rows):
            scores[p, :, : counts[p]] = torch.as_tensor(row["scores"], dtype=torch.float32)
        lambdas = torch.tensor([row["lambda"] for row in rows], dtype=torch.float32)        # [B, K]
        first = {}
        groups = torch.tensor([first.setdefault(row["id"], p) for p, row in enumerate(rows)])  # [B]
    return Batch(
        ids=[row["id"] for row in rows],
        packed=pack_responses([row["prompt_ids"] for row in rows], [row["response_ids"] for row in rows], pad_id,
                              share_prompt=share_prompt, pack=pack),
        slots=mask.flatten().nonzero()[:, 0],  # prompt-major packing = row-major order of the mask's True cells
        response_mask=mask,
        reference_logps=reference,
        dispersion=torch.tensor([float(row["dispersion"]) for row in rows]),
        scores=scores,
        lambdas=lambdas,
        reference_shared_logps=shared,
        groups=groups,
    )


def _response_grid(rows: list[Row], column: str, counts: list[int], width: int) -> torch.Tensor:
    """[B, N] float32 of a per-response column, 0 at padding."""
    grid = torch.zeros(len(rows), width)
    for p, row in enumerate(rows):
        grid[p, : counts[p]] = torch.as_tensor(row[column], dtype=torch.float32)
    return grid
