"""The tied embedding's gradient summed in place (`response_stats(tie_grads=True)`, `TiedWeightGrad`) equals
autograd's dense sum of the lookup's and the head's gradients, for every parameter, and is only taken where
the input embedding is a plain, trainable `nn.Embedding` whose weight is the output embedding's."""

import pytest
import torch
from torch.profiler import profile
from transformers import LlamaConfig, LlamaForCausalLM

from mallows_ray.data.collate import pack_responses
from mallows_ray.losses.logprobs import IGNORE_INDEX
from mallows_ray.models import response_stats, tied_input_embedding

PAD = 0  # the embedding's padding_idx, and the pad id of the packed rows: its row gets no lookup gradient


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, pad_token_id=PAD)
    return LlamaForCausalLM(config)


def micro_batch(seed: int, **layout):
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    # the pad id inside a prompt too, as a token the model attends to (a tokenizer whose pad is a real token)
    prompts = [tokens(int(n)) + [PAD] + tokens(1) for n in torch.randint(1, 9, (3,), generator=g)]
    responses = [[tokens(int(n)) for n in torch.randint(1, 7, (2,), generator=g)] for _ in prompts]
    return pack_responses(prompts, responses, pad_id=PAD, **layout)


def accumulated_gradients(model, batches, tie_grads: bool):
    """Gradients of two micro-batches' weighted log-prob sums, accumulated as a training step does."""
    model.zero_grad(set_to_none=True)
    for packed in batches:
        stats = response_stats(model, **packed.model_inputs(), with_entropy=False, tie_grads=tie_grads)
        (stats.logp_sum * torch.linspace(-1.0, 2.0, packed.num_responses)).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("layout", [{"share_prompt": False}, {"share_prompt": True}, {"pack": True},
                                    {"share_prompt": True, "pack": True}])
def test_in_place_tied_gradients_equal_autograds(layout):
    model = tiny_llama()
    batches = [micro_batch(1, **layout), micro_batch(2, **layout)]
    expected = accumulated_gradients(model, batches, tie_grads=False)
    got = accumulated_gradients(model, batches, tie_grads=True)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert got["model.embed_tokens.weight"][PAD].abs().sum() > 0  # the head's share of the pad row is kept


def test_the_lookup_makes_no_dense_gradient_of_its_own():
    model = tiny_llama()
    packed = micro_batch(3, share_prompt=True, pack=True)
    for tie_grads, dense_backwards in ((False, 1), (True, 0)):
        stats = response_stats(model, **packed.model_inputs(), with_entropy=False, tie_grads=tie_grads)
        with profile() as prof:
            stats.logp_sum.sum().backward()
        ops = [event.key for event in prof.key_averages()]
        assert ops.count("aten::embedding_dense_backward") == dense_backwards, ops


def test_without_labelled_tokens_the_weight_gets_the_lookups_zero_gradient():
    model = tiny_llama()
    inputs = micro_batch(4, share_prompt=True).model_inputs()
    inputs["labels"] = torch.full_like(inputs["labels"], IGNORE_INDEX)  # the head takes no weight gradient
    for tie_grads in (False, True):
        model.zero_grad(set_to_none=True)
        response_stats(model, **inputs, with_entropy=False, tie_grads=tie_grads).logp_sum.sum().backward()
        assert torch.equal(model.get_input_embeddings().weight.grad, torch.zeros(97, 32))


def test_only_a_plain_trainable_tied_embedding_is_looked_up_in_place():
    tied = tiny_llama()
    assert tied_input_embedding(tied) is tied.get_input_embeddings()
    assert tied_input_embedding(tiny_llama(tied=False)) is None
    frozen = tiny_llama()
    frozen.get_input_embeddings().weight.requires_grad_(False)  # as under LoRA
    assert tied_input_embedding(frozen) is None
    scaled = tiny_llama()
    scaled.model.embed_tokens.max_norm = 1.0  # a lookup that renormalises rows is not F.embedding(ids, weight)
    assert tied_input_embedding(scaled) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
def test_a_bf16_lookup_rounds_each_tokens_summed_rows_once(device):
    """bf16 weights: a token repeated 401 times gets the fp32 sum of its rows' gradients rounded once to bf16
    (within bf16's unit roundoff of the exact sum). 401 bf16 additions, as CUDA's index_add_ makes with atomics,
    are off by up to ~14% here; CPU's index_add_ accumulates in fp32 itself, so only a GPU tells them apart."""
    from mallows_ray.losses.logprobs import TiedWeightGrad, embedding_lookup

    g = torch.Generator().manual_seed(5)
    weight = torch.randn(7, 16, generator=g).bfloat16().to(device).requires_grad_()
    ids = torch.tensor([3] * 400 + [1, 2, 3], device=device)
    grad_rows = torch.randn(len(ids), 16, generator=g).bfloat16().to(device)
    embedding_lookup(ids, weight, TiedWeightGrad()).backward(grad_rows)  # the head took no weight gradient
    exact = torch.zeros(7, 16, dtype=torch.float64, device=device).index_add_(0, ids, grad_rows.double())
    assert weight.grad.dtype == torch.bfloat16
    assert ((weight.grad.double() - exact).abs() <= exact.abs() * 2**-8).all()
