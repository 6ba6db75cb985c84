"""The training stage's pure parts, without Ray: global-batch order, per-rank slices, tensors from rows, the
loss inputs (pairwise and listwise), the LR schedule and the DeepSpeed config."""

import math

import numpy as np
import pytest
import torch

from mallows_ray.config import load_config
from mallows_ray.data.collate import pack_responses
from mallows_ray.losses import build_loss
from mallows_ray.train.batches import (
    collate,
    epoch_batches,
    epoch_order,
    eval_slice,
    layout_tokens,
    micro_batches,
    order_window,
    padded_length,
    rank_slice,
    split_to_count,
    token_budget_batches,
)
from mallows_ray.train.objective import forward_loss, loss_inputs


def _row(i, prompt_len=3, response_lens=(2, 3), scores=()):
    return {"id": f"r{i}", "prompt_ids": list(range(10, 10 + prompt_len)),
            "response_ids": [[20 + i] * n for n in response_lens], "ref_logps": [-1.0 * n for n in response_lens],
            "dispersion": 1.0 + i / 10, "scores": [list(s) for s in scores]}


def _rows(n):
    return [_row(i, prompt_len=1 + (7 * i) % 11) for i in range(n)]


def _ids(batches):
    return [[row["id"] for row in batch] for batch in batches]


def test_window_order_is_seeded_complete_and_length_grouped():
    rows = _rows(42)
    kwargs = dict(global_batch_size=8, seed=3, window=0, shuffle=True, group_by_length=True)
    first = order_window(rows, epoch=0, **kwargs)
    assert _ids(first) == _ids(order_window(rows, epoch=0, **kwargs))  # same on every attempt
    assert _ids(first) != _ids(order_window(rows, epoch=1, **kwargs))  # reshuffled per epoch
    ids = [i for batch in _ids(first) for i in batch]
    assert len(first) == 5 and len(set(ids)) == 40  # 42 // 8 full batches, no row twice
    # length grouping: each global batch spans a narrow band of lengths
    spans = [max(map(padded_length, b)) - min(map(padded_length, b)) for b in first]
    shuffled = order_window(rows, epoch=0, **{**kwargs, "group_by_length": False})
    assert sum(spans) < sum(max(map(padded_length, b)) - min(map(padded_length, b)) for b in shuffled)
    plain = order_window(rows, epoch=0, **{**kwargs, "shuffle": False, "group_by_length": False})
    assert _ids(plain)[0] == [f"r{i}" for i in range(8)]


def test_padded_length_is_the_packed_width_of_either_layout():
    row = {"prompt_ids": [1, 2, 3], "response_ids": [[4, 5], [6], [7, 8, 9, 10]]}
    for share in (False, True):
        packed = pack_responses([row["prompt_ids"]], [row["response_ids"]], pad_id=0, share_prompt=share)
        assert padded_length(row, share) == packed.input_ids.shape[1]
    assert (padded_length(row), padded_length(row, True)) == (7, 12)


def test_epoch_batches_only_drop_the_tail_of_the_last_window():
    rows = _rows(50)
    windows = [rows[:24], rows[24:48], rows[48:]]  # windows of 3 global batches, then a 2-row tail
    batches = list(epoch_batches(windows, global_batch_size=8, seed=0, epoch=0, shuffle=True, group_by_length=False))
    assert len(batches) == 6 and len({r["id"] for b in batches for r in b}) == 48


def test_one_worker_accumulating_sees_the_micro_batches_of_two_workers():
    global_rows = _rows(8)
    single = micro_batches(rank_slice(global_rows, 0, 1), 4)  # 1 worker x accumulation 2
    pair = [micro_batches(rank_slice(global_rows, r, 2), 4)[0] for r in range(2)]  # 2 workers x 1
    assert _ids(single) == _ids(pair)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("pack", [False, True])
def test_layout_tokens_are_the_positions_of_the_collated_micro_batch(share, pack):
    rows = [_row(0, prompt_len=3, response_lens=(2, 5)), _row(1, prompt_len=7, response_lens=(1, 1, 4))]
    packed = pack_responses([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows], pad_id=0,
                            share_prompt=share, pack=pack)
    assert layout_tokens(rows, share, pack) == packed.input_ids.numel()


def test_token_budget_keeps_order_and_groups_and_runs_a_long_group_alone():
    rows = [_row(i, prompt_len=p) for i, p in enumerate([2, 2, 3, 3, 30, 30, 4, 4])]  # groups of 2 (copies)
    batches = token_budget_batches(rows, 40, group=2, share_prompt=True, pack=True)
    assert [r["id"] for b in batches for r in b] == [r["id"] for r in rows]
    assert [len(b) for b in batches] == [4, 2, 2]  # 36 positions, then the 30-token prompts over the budget alone
    assert layout_tokens(batches[0], True, True) <= 40 < layout_tokens(batches[1], True, True)
    assert [len(b) for b in token_budget_batches(rows, 10**6, group=2, share_prompt=True, pack=True)] == [8]


def test_split_to_count_halves_the_largest_at_group_boundaries():
    rows = _rows(8)
    parts = split_to_count([rows[:6], rows[6:]], 4, group=2)
    assert [len(b) for b in parts] == [2, 2, 2, 2]  # 6 -> 2 + 4, then 4 -> 2 + 2
    assert [r["id"] for b in parts for r in b] == [r["id"] for r in rows]
    with pytest.raises(ValueError, match="cannot cut 4 groups into 5"):
        split_to_count(parts, 5, group=2)


def test_eval_slice_pads_short_shares_and_counts_real_rows():
    rows = _rows(3)
    (r0, n0), (r1, n1) = eval_slice(rows, 0, 2), eval_slice(rows, 1, 2)
    assert (len(r0), n0, len(r1), n1) == (2, 2, 2, 1) and r1[1] is rows[0]
    assert eval_slice(rows[:1], 1, 2) == ([rows[0]], 0)


def test_collate_grid_with_a_varying_number_of_responses():
    rows = [dict(_row(0, response_lens=(2, 3, 1), scores=[(1, 2, 3), (3, 2, 1)]), **{"lambda": [0.5, 0.5]}),
            dict(_row(1, response_lens=(4, 2), scores=[(5, 1), (2, 2)]), **{"lambda": [1.0, 0.0]})]
    batch = collate(rows, pad_id=0, with_scores=True)
    assert batch.lambdas.tolist() == [[0.5, 0.5], [1.0, 0.0]]
    assert batch.response_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.response_lengths().tolist() == [[2, 3, 1], [4, 2, 0]]
    assert batch.reference_logps.tolist() == [[-2.0, -3.0, -1.0], [-4.0, -2.0, 0.0]]
    assert batch.scores.shape == (2, 2, 3) and batch.scores[1, :, 2].tolist() == [0.0, 0.0]
    assert batch.grid(torch.arange(5.0)).tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 0.0]]
    inputs = loss_inputs(batch, batch.grid(torch.zeros(5)), listwise=True)
    # each row's lambda mixes the per-objective softmax targets; padding gets probability 0
    expected = 0.5 * (torch.softmax(torch.tensor([1.0, 2, 3]), 0) + torch.softmax(torch.tensor([3.0, 2, 1]), 0))
    assert torch.allclose(inputs.target[0], expected)
    assert torch.allclose(inputs.target[1, :2], torch.softmax(torch.tensor([5.0, 1.0]), 0))  # objective 0 only
    assert inputs.target[1, 2] == 0 and inputs.target.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    sharper = loss_inputs(batch, batch.grid(torch.zeros(5)), listwise=True, target_tau=0.5)
    assert torch.allclose(sharper.target[1, :2], torch.softmax(torch.tensor([10.0, 2.0]), 0))
    with pytest.raises(ValueError, match="objective scores"):
        collate([_row(0)], pad_id=0, with_scores=True)


def test_collate_groups_the_vertex_copies_of_a_prompt():
    row = lambda i, lam: dict(_row(i, scores=[(1, 2), (2, 1)]), **{"lambda": lam})  # noqa: E731
    rows = [row(0, [1.0, 0.0]), row(0, [0.0, 1.0]), row(5, [1.0, 0.0]), row(0, [0.5, 0.5]), row(5, [0.0, 1.0])]
    batch = collate(rows, pad_id=0, with_scores=True)
    assert batch.groups.tolist() == [0, 0, 2, 0, 2]  # the index of each id's first row
    assert loss_inputs(batch, batch.grid(torch.zeros(10)), listwise=True).group.tolist() == [0, 0, 2, 0, 2]
    assert collate(_rows(2), pad_id=0, with_scores=False).groups is None  # pairwise rows: no lambdas


def test_pairwise_forward_loss_is_dpo_of_the_model_outputs():
    rows = [_row(0), _row(1, response_lens=(3, 2))]
    batch = collate(rows, pad_id=0, with_scores=False)
    logps = torch.tensor([-1.0, -5.0, -2.0, -1.5], requires_grad=True)  # rows: p0 chosen, p0 rejected, p1 ...
    out = forward_loss(lambda **inputs: logps, batch, build_loss("dpo", beta=0.5))
    u = torch.tensor([(-1.0 + 2) - (-5.0 + 3), (-2.0 + 3) - (-1.5 + 2)])  # (lp - ref) chosen - rejected
    assert torch.allclose(out.losses, -torch.nn.functional.logsigmoid(0.5 * u))
    out.losses.sum().backward()
    assert logps.grad is not None and (logps.grad != 0).all()


def test_lr_schedule_and_deepspeed_config():
    from mallows_ray.train.engine import deepspeed_config, lr_factor

    factors = [lr_factor(s, schedule="linear", warmup=2, total=6) for s in range(6)]
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    assert lr_factor(4, schedule="cosine", warmup=0, total=8) == pytest.approx(0.5)
    assert lr_factor(5, schedule="constant", warmup=0, total=6) == 1.0
    config = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                "deepspeed.offload_params=true", "batch.micro_batch_size=3",
                                "batch.gradient_accumulation=4"])
    ds = deepspeed_config(config, torch.float32)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert not ds["bf16"]["enabled"] and deepspeed_config(config, torch.bfloat16)["bf16"]["enabled"]
    assert math.isclose(ds["gradient_clipping"], config.optim.max_grad_norm)


def test_plan_step_counts_and_checks(tiny_model_dir, tmp_path):
    from mallows_ray.data import manifest as mf
    from mallows_ray.data.cache import PreparedData
    from mallows_ray.drivers.train import make_plan

    manifest = {"kind": "pairwise", "splits": {"train": {"rows_out": 30}}, "tokenizer_path": str(tiny_model_dir),
                "tokenizer": mf.tokenizer_fingerprint(tiny_model_dir), "dispersion_scale": 0.9}
    data = PreparedData(tmp_path, manifest)

    def config(*overrides):
        return load_config(None, [f"model.name_or_path={tiny_model_dir}", f"run.storage_path={tmp_path}", *overrides])

    plan = make_plan(config("batch.micro_batch_size=2", "scaling.num_workers=2", "optim.epochs=3"), data)
    assert (plan.global_batch_size, plan.steps_per_epoch, plan.total_steps, plan.has_validation) == (4, 7, 21, False)
    assert plan.run_dir == f"{tmp_path}/mallows-ray" and plan.export_dir == f"{tmp_path}/mallows-ray/export"
    assert plan.position(9) == (1, 2)  # epoch 1, 2 global batches of it consumed
    assert make_plan(config("optim.max_steps=5"), data).total_steps == 5
    with pytest.raises(ValueError, match="is pairwise but the data"):
        make_plan(config(), PreparedData(tmp_path, {**manifest, "kind": "listwise"}))
    with pytest.raises(ValueError, match="do not fill one global batch"):
        make_plan(config("batch.micro_batch_size=31"), data)
    with pytest.raises(ValueError, match="offload_params needs"):
        make_plan(config("deepspeed.offload_params=true"), data)
    with pytest.raises(ValueError, match="tokenizer differs"):
        make_plan(config(), PreparedData(tmp_path, {**manifest, "tokenizer": "another"}))
    with pytest.raises(ValueError, match="run.eval_at_start evaluates on the validation split"):
        make_plan(config("run.eval_at_start=true"), data)
    with_validation = {**manifest, "splits": {**manifest["splits"], "validation": {"rows_out": 4}}}
    assert make_plan(config("run.eval_at_start=true"), PreparedData(tmp_path, with_validation)).has_validation


def _two_sources(n):
    """n rows stored source by source, as a scored split sorted by id holds two files: a-* then b-*."""
    return [f"a-{i:05d}" for i in range(n // 2)] + [f"b-{i:05d}" for i in range(n - n // 2)]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_epoch_order_is_a_seeded_global_permutation(group_by_length):
    n, gbs = 2003, 8
    ids = _two_sources(n)
    lengths = np.array([5 + (13 * i) % 40 for i in range(n)]) if group_by_length else None
    order = {epoch: epoch_order(n, global_batch_size=gbs, seed=7, epoch=epoch, shuffle=True, lengths=lengths)
             for epoch in range(3)}
    for epoch, batches in order.items():
        assert len(batches) == n // gbs and all(len(b) == gbs for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat) == n // gbs * gbs  # every kept row once; 3 rows dropped
        # the first tenth of the epoch's steps mixes both sources (an id-sorted window would be all a-*)
        head = [ids[i] for b in batches[: len(batches) // 10] for i in b]
        share_a = sum(i.startswith("a-") for i in head) / len(head)
        assert 0.3 <= share_a <= 0.7, share_a
    assert len({tuple(order[e][0]) for e in order}) == 3  # the first step differs between epochs
    again = epoch_order(n, global_batch_size=gbs, seed=7, epoch=1, shuffle=True, lengths=lengths)
    assert again == order[1]  # the same on every attempt and every rank
    assert epoch_order(n, global_batch_size=gbs, seed=8, epoch=1, shuffle=True, lengths=lengths) != order[1]
    if group_by_length:  # each global batch spans a narrow band of lengths
        plain = epoch_order(n, global_batch_size=gbs, seed=7, epoch=0, shuffle=True)
        span = lambda batches: sum(int(lengths[b].max() - lengths[b].min()) for b in batches)  # noqa: E731
        assert span(order[0]) < span(plain) / 4


def test_epoch_order_without_shuffle_is_the_stored_order():
    batches = epoch_order(21, global_batch_size=4, seed=0, epoch=3, shuffle=False)
    assert batches == [list(range(b * 4, b * 4 + 4)) for b in range(5)]


def test_rank_slices_of_the_epoch_read_each_row_once():
    """Ranks read disjoint slices of every global batch: together the epoch's rows, each rank rows / W."""
    batches = epoch_order(100, global_batch_size=8, seed=1, epoch=0, shuffle=True)
    for world in (1, 2, 4):
        per_rank = [[i for b in batches for i in rank_slice(b, rank, world)] for rank in range(world)]
        assert all(len(rows) == 96 // world for rows in per_rank)
        assert sorted(i for rows in per_rank for i in rows) == sorted(i for b in batches for i in b)
