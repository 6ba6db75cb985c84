"""Lambda conditioning of listwise rows (ALGORITHMS 3.1) and per-step lambda draws (3.2), without Ray."""

import pytest
import torch

from mallows_ray.config import load_config
from mallows_ray.data.tokenize import conditioned_prompt_ids, render_prompt_ids
from mallows_ray.lambdas.schedulers import DirichletScheduler, FixedScheduler, LearnedScheduler
from mallows_ray.lambdas.vectors import format_lambda
from mallows_ray.models import load_tokenizer
from mallows_ray.train.batches import micro_batches, rank_slice
from mallows_ray.train.conditioning import (
    Conditioner,
    build_lambda_scheduler,
    copies_per_prompt,
    evaluation_lambdas,
    step_lambdas,
    training_rows,
    vertex_copies,
)
from mallows_ray.typed_config import ConfigError

OBJECTIVES = ["loud", "calm"]
CHAT = [{"role": "user", "content": "Tell me about the apple, please, in a few words."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_conditioned_prompt_is_the_plain_prompt_with_the_weights_line(tokenizer):
    plain = render_prompt_ids(tokenizer, CHAT)
    ids = conditioned_prompt_ids(tokenizer, CHAT, plain, [0.25, 0.75], OBJECTIVES)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nPreference weights: loud=0.25, calm=0.75<|im_end|>\n")
    assert text.endswith(tokenizer.decode(plain))  # the whole conversation follows the weights line
    prefixed = tokenizer.decode(conditioned_prompt_ids(tokenizer, CHAT, plain, [1, 0], OBJECTIVES,
                                                       placement="user_prefix"))
    assert prefixed.startswith("<|im_start|>user\n" + format_lambda([1, 0], OBJECTIVES) + "\n\nTell me")
    suffixed = conditioned_prompt_ids(tokenizer, CHAT, plain, [1, 0], OBJECTIVES, placement="user_suffix")
    expected = render_prompt_ids(tokenizer, [{"role": "user", "content": CHAT[0]["content"] + "\n\n"
                                              + format_lambda([1, 0], OBJECTIVES)}])
    assert suffixed == expected  # no truncation: exactly the chat rendered with the line at the turn's end


def test_truncated_prompt_keeps_the_weights_line_and_the_same_tail(tokenizer):
    """The reference saw the last 12 tokens of the prompt; the policy sees the weights line plus those 12."""
    plain = render_prompt_ids(tokenizer, CHAT)
    kept = plain[-12:]
    ids = conditioned_prompt_ids(tokenizer, CHAT, kept, [0.5, 0.5], OBJECTIVES)
    head = render_prompt_ids(tokenizer, [{"role": "system", "content": format_lambda([0.5, 0.5], OBJECTIVES)}])
    assert ids[-12:] == kept and "Preference weights: loud=0.50, calm=0.50" in tokenizer.decode(ids)
    assert len(ids) < len(head) + 12 + 2  # no other part of the prompt came back


def test_truncated_prompt_with_the_line_at_the_end_keeps_what_the_reference_saw(tokenizer):
    """user_suffix: the policy sees the reference's 30 kept tokens with the weights line before the turn's end;
    a truncation that cut into the turn's end itself still leaves the line and the whole end."""
    plain = render_prompt_ids(tokenizer, CHAT)
    full = conditioned_prompt_ids(tokenizer, CHAT, plain, [1, 0], OBJECTIVES, placement="user_suffix")
    line = len(full) - len(plain)  # tokens the weights line adds
    end = format_lambda([1, 0], OBJECTIVES) + "<|im_end|>\n<|im_start|>assistant\n"
    ids = conditioned_prompt_ids(tokenizer, CHAT, plain[-30:], [1, 0], OBJECTIVES, placement="user_suffix")
    assert len(ids) == 30 + line and ids == full[-len(ids):] and tokenizer.decode(ids).endswith(end)
    short = conditioned_prompt_ids(tokenizer, CHAT, plain[-3:], [1, 0], OBJECTIVES, placement="user_suffix")
    assert tokenizer.decode(short).endswith(end) and "few words" not in tokenizer.decode(short)


def test_conditioner_sets_lambda_and_leaves_rows_alone(tokenizer):
    plain = render_prompt_ids(tokenizer, CHAT)
    rows = [{"id": "a", "prompt": CHAT, "prompt_ids": plain}, {"id": "b", "prompt": CHAT, "prompt_ids": plain}]
    out = Conditioner(tokenizer, OBJECTIVES).apply(rows, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert [row["lambda"] for row in out] == [[1.0, 0.0], [0.0, 1.0]]
    assert out[0]["prompt_ids"] != out[1]["prompt_ids"] and rows[0]["prompt_ids"] is plain and "lambda" not in rows[0]
    hidden = Conditioner(tokenizer, OBJECTIVES, condition=False).apply_one(rows, [0.5, 0.5])
    assert [row["prompt_ids"] for row in hidden] == [plain, plain] and hidden[1]["lambda"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="objective names"):
        Conditioner(tokenizer, [])


def test_step_lambdas_depend_only_on_seed_step_and_scheduler_state():
    scheduler = LearnedScheduler(torch.eye(2).tolist() + [[0.5, 0.5]], exploration=0.3)
    first = step_lambdas(scheduler, 8, seed=3, step=5)
    assert torch.equal(first, step_lambdas(scheduler, 8, seed=3, step=5))
    assert not torch.equal(first, step_lambdas(scheduler, 8, seed=3, step=6))
    assert torch.equal(step_lambdas(FixedScheduler([0.2, 0.8]), 3, seed=0, step=0),
                       torch.tensor([[0.2, 0.8]] * 3, dtype=first.dtype))


def test_evaluation_lambdas_are_the_vertices_and_uniform():
    assert evaluation_lambdas(["a", "b", "c"]) == {"a": (1.0, 0.0, 0.0), "b": (0.0, 1.0, 0.0), "c": (0.0, 0.0, 1.0),
                                                   "uniform": (1 / 3, 1 / 3, 1 / 3)}
    # lambdas.eval_vertices / lambdas.eval_uniform pick the passes (training's evaluation and `mallows-ray eval`)
    assert evaluation_lambdas(["a", "b"], uniform=False) == {"a": (1.0, 0.0), "b": (0.0, 1.0)}
    assert evaluation_lambdas(["a", "b"], vertices=False) == {"uniform": (0.5, 0.5)}


def test_lambda_config_validates_scheduler_and_parameters():
    config = load_config(None, ["lambdas.scheduler=learned", "lambdas.params={temperature: 0.5, exploration: 0.2}"])
    assert config.lambdas.scheduler == "learned" and config.lambdas.params["temperature"] == 0.5
    with pytest.raises(ConfigError, match="lambdas.scheduler"):
        load_config(None, ["lambdas.scheduler=bandit"])
    with pytest.raises(ConfigError, match=r"lambdas.params: the 'fixed' scheduler has no parameter 'alpha'"):
        load_config(None, ["lambdas.scheduler=fixed", "lambdas.params={alpha: 1}"])
    # values are checked against the data's objectives when training starts, with the objectives named
    fixed = load_config(None, ["lambdas.scheduler=fixed", "lambdas.params={lam: 'loud=2'}"]).lambdas
    with pytest.raises(ValueError, match=r"over objectives \['loud', 'calm'\]"):
        build_lambda_scheduler(fixed, OBJECTIVES)


def test_vertex_copies_put_each_prompt_under_every_vertex_and_its_draw():
    rows = [{"id": "a"}, {"id": "b"}]
    out, lambdas = vertex_copies(rows, [[0.3, 0.7], [0.6, 0.4]], 2)
    assert [row["id"] for row in out] == ["a", "a", "a", "b", "b", "b"]
    assert lambdas == [[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [1.0, 0.0], [0.0, 1.0], [0.6, 0.4]]
    with pytest.raises(ValueError):
        vertex_copies(rows, [[0.5, 0.5]], 2)  # one draw per row
    out, lambdas = vertex_copies(rows, [[0.3, 0.7], [0.6, 0.4]], 2, with_draw=False)
    assert [row["id"] for row in out] == ["a", "a", "b", "b"]
    assert lambdas == [[1.0, 0.0], [0.0, 1.0]] * 2
    copies = load_config(None, ["lambdas.vertex_copies=true"]).lambdas
    assert copies_per_prompt(copies, 2) == 3 and copies_per_prompt(load_config(None, []).lambdas, 2) == 1
    vertices_only = load_config(None, ["lambdas.vertex_copies=true", "lambdas.copy_draw=false"]).lambdas
    assert copies_per_prompt(vertices_only, 2) == 2


def _step_micro_batches(conditioner, global_rows, *, world, accumulation, step, seed=7):
    """The (id, lambda, prompt ids) of every micro-batch of one step, rank by rank, as the training loop cuts them."""
    scheduler = DirichletScheduler(1.0, 2)
    draws = step_lambdas(scheduler, len(global_rows), seed=seed, step=step).tolist()
    micro = len(global_rows) // (world * accumulation)
    out = []
    for rank in range(world):
        rows = training_rows(conditioner, rank_slice(global_rows, rank, world), rank_slice(draws, rank, world),
                             load_config(None, ["lambdas.vertex_copies=true"]).lambdas)
        out += [[(row["id"], row["lambda"], row["prompt_ids"]) for row in batch]
                for batch in micro_batches(rows, micro * 3)]
    return out


def test_vertex_copies_are_world_size_invariant_and_resume_exact(tokenizer):
    plain = render_prompt_ids(tokenizer, CHAT)
    global_rows = [{"id": f"p{i}", "prompt": CHAT, "prompt_ids": plain} for i in range(4)]
    conditioner = Conditioner(tokenizer, OBJECTIVES)
    two_workers = _step_micro_batches(conditioner, global_rows, world=2, accumulation=1, step=3)
    one_worker = _step_micro_batches(conditioner, global_rows, world=1, accumulation=2, step=3)
    assert two_workers == one_worker  # 2 workers x 1 == 1 worker x accumulation 2, row for row
    assert two_workers == _step_micro_batches(conditioner, global_rows, world=2, accumulation=1, step=3)  # resume
    assert two_workers != _step_micro_batches(conditioner, global_rows, world=2, accumulation=1, step=4)
    first = two_workers[0]
    assert len(two_workers) == 2 and len(first) == 6  # 2 prompts x (K + 1) per micro-batch
    assert [ident for ident, _, _ in first] == ["p0"] * 3 + ["p1"] * 3  # whole prompts, copies together
    assert [lam for _, lam, _ in first[:2]] == [[1.0, 0.0], [0.0, 1.0]]
    assert len({tuple(ids) for _, _, ids in first[:3]}) == 3  # each copy's prompt renders its own lambda


def test_vertex_copies_is_a_lambdas_option():
    assert load_config(None, []).lambdas.vertex_copies is False
    assert load_config(None, ["lambdas.vertex_copies=true"]).lambdas.vertex_copies is True


def test_conditioning_file_round_trip_and_an_older_export(tmp_path):
    """An export records its placement; one written before `placement` existed recorded `system_role`."""
    from mallows_ray.export_format import CONDITIONING_FILE, read_conditioning, write_conditioning

    assert read_conditioning(str(tmp_path)) is None  # no file: a model not trained with lambda
    settings = {"objectives": OBJECTIVES, "condition": True, "placement": "user_suffix"}
    write_conditioning(str(tmp_path), settings)
    assert read_conditioning(str(tmp_path)) == settings
    for system_role, placement in ((True, "system"), (False, "user_prefix")):
        (tmp_path / CONDITIONING_FILE).write_text(
            f'{{"objectives": ["loud", "calm"], "condition": true, "system_role": {str(system_role).lower()}}}')
        assert read_conditioning(str(tmp_path)) == {"objectives": OBJECTIVES, "condition": True, "placement": placement}
