"""Evaluation passes under a token budget (`batch.max_tokens`): the same metrics as whole-share forwards, in
forwards of at most the budget, padding rows of a short share never counted."""

import dataclasses

import pytest
import torch
from test_shared_prompt import tiny_llama

from mallows_ray.losses import build_loss
from mallows_ray.train.batches import eval_slice, layout_tokens
from mallows_ray.train.engine import PolicyLogprobs
from mallows_ray.train.evaluation import EvalSettings, evaluate_rows, forward_parts


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs with prompts of 2-13 tokens and responses of 1-8: shares of very different widths."""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda lo, hi: torch.randint(3, 97, (int(torch.randint(lo, hi, (), generator=g)),),  # noqa: E731
                                          generator=g).tolist()
    return [{"id": f"p{i}", "prompt_ids": tokens(2, 14), "response_ids": [tokens(1, 9), tokens(1, 9)],
             "ref_logps": [-3.0 - i / 7, -2.5 + i / 11], "dispersion": 1.0 + i / 10} for i in range(n)]


@pytest.mark.parametrize("share, pack", [(False, False), (True, True)])
def test_a_token_budget_gives_the_same_metrics_in_smaller_forwards(share, pack):
    policy = PolicyLogprobs(tiny_llama("sdpa"), zero_stage=0, with_wpo=False)
    rows = _rows(13)
    batches = [rows[i:i + 6] for i in range(0, len(rows), 6)]  # 6, 6 and a short 1
    budget = 40
    widths = []

    def counted(**inputs):
        widths.append(inputs["input_ids"].numel())
        return policy(**inputs)

    settings = EvalSettings(build_loss("dpo", beta=0.3), pad_id=0, share_prompt=share, pack=pack)
    whole = evaluate_rows(counted, batches, settings)
    assert len(widths) == len(batches)
    widths.clear()
    cut = evaluate_rows(counted, batches, dataclasses.replace(settings, max_tokens=budget))
    assert len(widths) > len(batches)
    # a forward over the budget holds one prompt alone (a prompt is never split)
    singles = [layout_tokens([row], share, pack) for row in rows]
    assert all(width <= budget or width in singles for width in widths)
    assert cut["examples"] == whole["examples"] == len(rows)
    assert cut == pytest.approx(whole, rel=1e-6, abs=1e-6)


def test_a_short_share_counts_only_its_real_rows_in_each_forward():
    """Rank 1 of 2 on 7 rows holds rows 4-6 and a copy of row 0 (eval_slice); cut into one-row forwards, the
    copy's forward counts none."""
    rows = _rows(7)
    share, count = eval_slice(rows, rank=1, world=2)
    assert count == 3 and len(share) == 4
    settings = EvalSettings(build_loss("dpo"), pad_id=0, rank=1, world=2, max_tokens=1)  # every prompt alone
    parts = forward_parts(share, count, settings)
    assert [len(part) for part, _ in parts] == [1, 1, 1, 1]
    assert [n for _, n in parts] == [1, 1, 1, 0]
    assert forward_parts(share, count, EvalSettings(build_loss("dpo"), pad_id=0)) == [(share, count)]
