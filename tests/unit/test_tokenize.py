"""Tokenization: chat template, EOS after each response, prompt keep-end / response keep-start truncation,
prompt_too_long rejects, and plain concatenation for tokenizers without a template."""

import pytest

from mallows_ray.data.tokenize import LengthLimits, render_prompt_ids, tokenize_record
from mallows_ray.models import load_tokenizer

RECORD = {
    "id": "r1", "kind": "pairwise", "source": "f.jsonl", "row": 1, "objectives": [], "scores": [],
    "prompt": [{"role": "user", "content": "Say hi"}],
    "responses": ["hello there", "go away"],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_chat_template_and_eos(tokenizer):
    out = tokenize_record(tokenizer, RECORD, LengthLimits(64, 64))
    assert out["reject_reason"] == ""
    assert tokenizer.decode(out["prompt_ids"]) == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert [tokenizer.decode(r) for r in out["response_ids"]] == ["hello there<|im_end|>", "go away<|im_end|>"]
    assert out["prompt_truncated"] is False and out["response_truncated"] == [False, False]
    assert out["responses"] == RECORD["responses"]  # the record's own fields pass through


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    full = tokenize_record(tokenizer, RECORD, LengthLimits(64, 64))
    out = tokenize_record(tokenizer, RECORD, LengthLimits(max_prompt_length=10, max_response_length=4))
    assert out["prompt_ids"] == full["prompt_ids"][-10:]
    assert out["response_ids"] == [r[:4] for r in full["response_ids"]]
    assert out["prompt_truncated"] is True and out["response_truncated"] == [True, True]


def test_prompt_leaving_no_room_is_rejected(tokenizer):
    out = tokenize_record(tokenizer, RECORD, LengthLimits(max_prompt_length=64, max_response_length=8, max_length=20))
    assert out["reject_reason"] == "prompt_too_long"
    assert "leaves no room" in out["reject_detail"] and out["response_ids"] == []


def test_plain_concatenation_without_template(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.decode(render_prompt_ids(tokenizer, messages)) == "System: Be kind.\n\nUser: Hi\n\nAssistant: "
