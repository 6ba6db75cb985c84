"""The shared-prompt layout gives the per-response layout's log-probs, entropies and gradients.

Each prompt runs once with all its responses behind it (data/collate.py); the attention mask keeps every
response blind to the others, so a real (tiny) Llama must produce the same per-response statistics as one
row per response, under both attention implementations the mask is built for.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mallows_ray.data.collate import pack_responses
from mallows_ray.models import response_stats

TOLERANCE = 1e-5  # float32 rounding: the two layouts sum the same terms in a different order


def tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
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


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_same_statistics_and_gradients_as_one_row_per_response(attn_implementation):
    model = tiny_llama(attn_implementation)
    prompts, responses = batch_of_prompts()
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        packed = pack_responses(prompts, responses, pad_id=0, share_prompt=share)
        stats = response_stats(model, **packed.model_inputs(), with_entropy=True)
        weights = torch.linspace(-1.0, 2.0, packed.num_responses)  # any downstream use of the sums
        (stats.logp_sum * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results[share] = (stats, grads, packed)
    (plain, plain_grads, plain_packed), (shared, shared_grads, shared_packed) = results[False], results[True]
    assert shared_packed.input_ids.shape[0] == len(prompts) < plain_packed.input_ids.shape[0]
    assert shared_packed.model_tokens < plain_packed.model_tokens
    assert torch.equal(shared.token_count, plain.token_count)
    assert torch.allclose(shared.logp_sum, plain.logp_sum, atol=TOLERANCE)
    assert torch.allclose(shared.mean_entropy, plain.mean_entropy, atol=TOLERANCE)
    assert plain.logp_sum.std() > 1.0  # the responses really differ: a mix-up between them would show
    for name, grad in plain_grads.items():
        assert torch.isfinite(shared_grads[name]).all(), name
        assert torch.allclose(shared_grads[name], grad, atol=TOLERANCE), name


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
    with pytest.raises(ValueError, match="model.share_prompt=false"):
        response_stats(model, **packed.model_inputs(), with_entropy=False)
