"""The shared-prompt and packed layouts give the per-response layout's log-probs, entropies and gradients.

Each prompt runs once with all its responses behind it, and packing lays every prompt's rows end to end in one
row (data/collate.py); the attention mask keeps every response blind to the others and every prompt blind to
the others, so a real (tiny) Llama must produce the same per-response statistics as one padded row per
response, under both attention implementations the mask is built for.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mallows_ray.attention import (
    GROUPED_SDPA,
    VARLEN,
    packed_group_bounds,
    register_packed_attention,
    shared_prompt_mask,
)
from mallows_ray.data.collate import pack_responses
from mallows_ray.models import response_stats

TOLERANCE = 1e-5  # float32 rounding: the two layouts sum the same terms in a different order


def tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    register_packed_attention()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval()


def batch_of_prompts(seed: int = 0):
    """Prompts of 1-9 tokens with 2-4 responses of 1-7 tokens: uneven counts and lengths, plenty of padding."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (), generator=g))  # noqa: E731
    tokens = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    prompts = [tokens(rand(1, 10)) for _ in range(4)]
    responses = [[tokens(rand(1, 8)) for _ in range(rand(2, 5))] for _ in prompts]
    return prompts, responses


def statistics_and_gradients(model, prompts, responses, device: str = "cpu", **layout):
    model.zero_grad(set_to_none=True)
    packed = pack_responses(prompts, responses, pad_id=0, **layout).to(torch.device(device))
    stats = response_stats(model, **packed.model_inputs(), with_entropy=True)
    weights = torch.linspace(-1.0, 2.0, packed.num_responses, device=device)  # any downstream use of the sums
    (stats.logp_sum * weights).sum().backward()
    return stats, {name: p.grad.clone() for name, p in model.named_parameters()}, packed


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", GROUPED_SDPA, VARLEN])  # VARLEN: grouped on CPU
@pytest.mark.parametrize("share, pack", [(True, False), (False, True), (True, True)])
def test_same_statistics_and_gradients_as_one_row_per_response(attn_implementation, share, pack):
    model = tiny_llama(attn_implementation)
    prompts, responses = batch_of_prompts()
    plain, plain_grads, plain_packed = statistics_and_gradients(model, prompts, responses)
    other, other_grads, other_packed = statistics_and_gradients(model, prompts, responses, share_prompt=share,
                                                                pack=pack)
    assert other_packed.input_ids.shape[0] == (1 if pack else len(prompts)) < plain_packed.input_ids.shape[0]
    assert other_packed.model_tokens < plain_packed.model_tokens if share else \
        other_packed.model_tokens == plain_packed.model_tokens
    if pack:  # no padding at all
        assert other_packed.input_ids.numel() == other_packed.model_tokens
    assert torch.equal(other.token_count, plain.token_count)
    assert torch.allclose(other.logp_sum, plain.logp_sum, atol=TOLERANCE)
    assert torch.allclose(other.mean_entropy, plain.mean_entropy, atol=TOLERANCE)
    assert plain.logp_sum.std() > 1.0  # the responses really differ: a mix-up between them would show
    for name, grad in plain_grads.items():
        assert torch.isfinite(other_grads[name]).all(), name
        assert torch.allclose(other_grads[name], grad, atol=TOLERANCE), name


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("attn_implementation", ["sdpa", GROUPED_SDPA])
def test_a_packed_prompt_cannot_see_the_others(share, attn_implementation):
    """Changing one prompt of a packed row changes no other prompt's log-probs."""
    model = tiny_llama(attn_implementation)
    prompts, responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[[20, 21], [22]], [[23], [24, 25]], [[26], [27]]]
    stats = lambda: response_stats(model, **pack_responses(prompts, responses, 0, share_prompt=share,  # noqa: E731
                                                           pack=True).model_inputs(), with_entropy=False).logp_sum
    before = stats()
    prompts[1] = [30, 31, 32]
    after = stats()
    assert torch.equal(before[[0, 1, 4, 5]], after[[0, 1, 4, 5]]) and (before[2:4] != after[2:4]).all()


@pytest.mark.parametrize("share", [False, True])
def test_grouped_attention_runs_each_prompt_of_a_packed_row_alone(share):
    """GROUPED_SDPA gets the spans of the packed row's groups (one per prompt, or per response row unshared),
    in order and covering the row; an unpacked batch gets none (plain sdpa)."""
    prompts, responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[[20, 21], [22]], [[23], [24, 25]], [[26], [27]]]
    packed = pack_responses(prompts, responses, 0, share_prompt=share, pack=True)
    if share:  # prompt once (its last token opens each segment), then every response
        lengths = [len(p) - 1 + sum(len(r) + 1 for r in rs) for p, rs in zip(prompts, responses)]
    else:
        lengths = [len(p) + len(r) for p, rs in zip(prompts, responses) for r in rs]
    ends = torch.tensor(lengths).cumsum(0).tolist()
    assert packed_group_bounds(packed.segment_ids) == list(zip([0, *ends[:-1]], ends))
    assert ends[-1] == packed.input_ids.shape[1]
    unpacked = pack_responses(prompts, responses, 0, share_prompt=True)
    assert packed_group_bounds(unpacked.segment_ids) is None


@pytest.mark.parametrize("group_bounds", [None, [(0, 5), (5, 9)]])
def test_a_bf16_model_attends_in_fp32_on_the_cpu(group_bounds):
    """bf16 query/key/value on the CPU: the fp32 attention of the same values, rounded to bf16 (torch's CPU
    bf16 flash-attention kernels are the slow ones), with bf16 gradients flowing back."""
    from mallows_ray.attention import packed_attention

    module = tiny_llama(GROUPED_SDPA).model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, heads, 9, 8, generator=g).bfloat16().requires_grad_()
                         for heads in (4, 2, 2))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    if group_bounds:
        mask[..., 5:, :5] = False
    out, _ = packed_attention(module, query, key, value, mask, group_bounds)
    upcast, _ = packed_attention(module, query.float(), key.float(), value.float(), mask, group_bounds)
    assert out.dtype == torch.bfloat16 and torch.equal(out, upcast.bfloat16())
    out.float().square().sum().backward()
    assert query.grad.dtype == torch.bfloat16 and query.grad.abs().sum() > 0


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_packed_rows_mask_built_per_group_equals_the_whole_rows(share, attn_implementation):
    """With the row's group bounds only the diagonal blocks are computed; the mask is the same."""
    prompts, responses = batch_of_prompts(seed=3)
    packed = pack_responses(prompts, responses, 0, share_prompt=share, pack=True)
    bounds = packed_group_bounds(packed.segment_ids)
    assert bounds is not None and len(bounds) >= len(prompts)
    blockwise, whole = (shared_prompt_mask(packed.segment_ids, packed.attention_mask, attn_implementation,
                                           torch.float32, group_bounds) for group_bounds in (bounds, None))
    assert blockwise.shape == whole.shape == (1, 1, packed.input_ids.shape[1], packed.input_ids.shape[1])
    assert torch.equal(blockwise, whole)


def test_a_response_cannot_see_its_siblings():
    """Changing one response changes no other response's log-prob in the shared row."""
    model = tiny_llama("sdpa")
    prompts, responses = [[5, 6, 7]], [[[10, 11, 12], [20, 21], [30, 31, 32, 33]]]
    before = response_stats(model, **pack_responses(prompts, responses, 0, share_prompt=True).model_inputs(),
                            with_entropy=False).logp_sum
    responses[0][1] = [40, 41]
    after = response_stats(model, **pack_responses(prompts, responses, 0, share_prompt=True).model_inputs(),
                           with_entropy=False).logp_sum
    assert torch.equal(before[[0, 2]], after[[0, 2]]) and before[1] != after[1]


def test_attention_without_a_custom_mask_is_refused_with_the_fix():
    model = tiny_llama("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    packed = pack_responses([[5, 6]], [[[7], [8]]], pad_id=0, share_prompt=True)
    with pytest.raises(ValueError, match="model.share_prompt and model.pack need"):
        response_stats(model, **packed.model_inputs(), with_entropy=False)
