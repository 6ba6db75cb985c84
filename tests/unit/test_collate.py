"""Packing prompts and responses: labels are shifted so hidden[t] predicts labels[t]; padding ignored."""

import pytest
import torch

from mallows_ray.data.collate import pack_responses
from mallows_ray.losses import IGNORE_INDEX


def test_pack_two_prompts_variable_responses():
    packed = pack_responses([[1, 2, 3], [4]], [[[10, 11], [12]], [[13, 14, 15], [16], [17]]], pad_id=0)
    assert packed.input_ids.shape == (5, 5)
    assert packed.response_counts == [2, 3]
    assert packed.prompt_index.tolist() == [0, 0, 1, 1, 1]
    assert packed.input_ids[0].tolist() == [1, 2, 3, 10, 11]
    assert packed.attention_mask[1].tolist() == [1, 1, 1, 1, 0]
    # prompt [1,2,3] + response [10,11]: position 2 predicts 10, position 3 predicts 11
    assert packed.labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 10, 11, IGNORE_INDEX]
    # prompt [4] + response [13,14,15]
    assert packed.labels[2].tolist() == [13, 14, 15, IGNORE_INDEX, IGNORE_INDEX]
    assert (packed.labels != IGNORE_INDEX).sum(dim=1).tolist() == [2, 1, 3, 1, 1] == packed.token_counts.tolist()
    assert packed.owner[0].tolist() == [-1, -1, 0, 0, -1] and packed.owner[2].tolist() == [2, 2, 2, -1, -1]
    assert packed.position_ids is None and packed.segment_ids is None
    assert packed.sequence_tokens == packed.model_tokens == 5 + 4 + 4 + 2 + 2
    per_prompt = packed.split(torch.arange(5.0))
    assert [t.tolist() for t in per_prompt] == [[0.0, 1.0], [2.0, 3.0, 4.0]]


def test_shared_prompt_layout_holds_each_prompt_once():
    packed = pack_responses([[1, 2, 3], [4]], [[[10, 11], [12]], [[13, 14, 15], [16], [17]]], pad_id=0,
                            share_prompt=True)
    assert packed.input_ids.shape == (2, 8)  # one row per prompt; row 1: [4 13 14 15 | 4 16 | 4 17]
    # prefix [1, 2], then each segment opens with the last prompt token 3
    assert packed.input_ids[0].tolist() == [1, 2, 3, 10, 11, 3, 12, 0]
    assert packed.segment_ids[0].tolist() == [0, 0, 1, 1, 1, 2, 2, -1]
    assert packed.position_ids[0].tolist()[:7] == [0, 1, 2, 3, 4, 2, 3]  # positions as in per-response rows
    assert packed.labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 10, 11, IGNORE_INDEX, 12, IGNORE_INDEX,
                                         IGNORE_INDEX]
    assert packed.owner[0].tolist() == [-1, -1, 0, 0, -1, 1, -1, -1]
    assert packed.input_ids[1].tolist() == [4, 13, 14, 15, 4, 16, 4, 17]  # a 1-token prompt: empty prefix
    assert packed.owner[1].tolist() == [2, 2, 2, -1, 3, -1, 4, -1]
    assert packed.token_counts.tolist() == [2, 1, 3, 1, 1] and packed.num_responses == 5
    assert packed.sequence_tokens == 5 + 4 + 4 + 2 + 2  # the per-response layout's work unit
    assert packed.model_tokens == 7 + 8
    assert packed.prompt_index.tolist() == [0, 0, 1, 1, 1]


def test_empty_prompt_is_an_error():
    for share_prompt in (False, True):
        with pytest.raises(ValueError, match="empty prompt"):
            pack_responses([[]], [[[1], [2]]], pad_id=0, share_prompt=share_prompt)
