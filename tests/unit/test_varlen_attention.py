"""A packed row cut into causal sequences (`attention.varlen_sequences`) sees what the shared-prompt mask allows,
and `varlen_attention` run through a kernel of `varlen_attn`'s contract gives the grouped sdpa path's values and
gradients.

torch's varlen flash kernel runs only on CUDA GPUs in bf16/fp16, so on the CPU the sequences are checked two
ways: the positions each query sees (exactly the mask's), and the attention through `reference_varlen_attn`, a
plain per-sequence implementation of the kernel's documented semantics (causal: query i of a sequence with
Lq queries and Lk keys sees keys j <= i + Lk - Lq). The test at the end runs the real kernel where a GPU is
(`benchmarks/gpu_check.sh` runs this file there).
"""

import pytest
import torch
import torch.nn.functional as F
from test_shared_prompt import batch_of_prompts, statistics_and_gradients, tiny_llama

from mallows_ray.attention import (
    CAUSAL_WINDOW,
    GROUPED_SDPA,
    VARLEN,
    attention_inputs,
    packed_attention,
    packed_group_bounds,
    shared_prompt_mask,
    varlen_applies,
    varlen_attention,
    varlen_sequences,
)
from mallows_ray.data.collate import pack_responses

TOLERANCE = 1e-5  # float32: the same softmax terms summed per sequence instead of per group


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size, enable_gqa):
    """`torch.nn.attention.varlen.varlen_attn`'s result, sequence by sequence: q [Tq, H, D], k / v [Tk, H_kv, D]
    -> [Tq, H, D]; causal windows aligned to each sequence's last key."""
    assert window_size == CAUSAL_WINDOW and max_q == int(cu_seq_q.diff().max()) and max_k == int(cu_seq_k.diff().max())
    outputs = []
    for qs, qe, ks, ke in zip(cu_seq_q[:-1], cu_seq_q[1:], cu_seq_k[:-1], cu_seq_k[1:]):
        lq, lk = int(qe - qs), int(ke - ks)
        sees = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        outputs.append(F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1), attn_mask=sees,
            scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(outputs)


def packed_row(share: bool, seed: int = 0):
    prompts, responses = batch_of_prompts(seed)
    return pack_responses(prompts, responses, pad_id=0, share_prompt=share, pack=True)


def seen_by_sequences(sequences, t: int) -> torch.Tensor:
    """[T, T] bool: the keys each query of the row sees under `sequences`' causal windows."""
    sees = torch.zeros(t, t, dtype=torch.bool)
    cu_q, cu_k = sequences.cu_seq_q.tolist(), sequences.cu_seq_k.tolist()
    for qs, qe, ks, ke in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        keys = sequences.key_index[ks:ke]
        window = torch.ones(qe - qs, ke - ks, dtype=torch.bool).tril(diagonal=(ke - ks) - (qe - qs))
        for i, query in enumerate(range(qs, qe)):
            sees[query, keys[window[i]]] = True
    return sees


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("share", [True, False])
def test_the_sequences_see_exactly_what_the_mask_allows(share, seed):
    packed = packed_row(share, seed)
    t = packed.input_ids.shape[1]
    sequences = varlen_sequences(packed.segment_ids)
    # the queries are the row's positions in order, in runs of one segment (a prefix, a response, a row)
    assert sequences.cu_seq_q[0] == 0 and sequences.cu_seq_q[-1] == t
    runs = len(torch.unique_consecutive(packed.segment_ids[0]))
    assert len(sequences.cu_seq_q) == len(sequences.cu_seq_k) == runs + 1
    assert sequences.cu_seq_q.dtype == sequences.cu_seq_k.dtype == torch.int32
    assert sequences.max_q == int(sequences.cu_seq_q.diff().max())
    assert sequences.max_k == int(sequences.cu_seq_k.diff().max())
    mask = shared_prompt_mask(packed.segment_ids, packed.attention_mask, "sdpa", torch.float32)[0, 0]
    assert torch.equal(seen_by_sequences(sequences, t), mask)
    if share:  # every response segment reads its prompt's prefix again: more keys than positions
        assert len(sequences.key_index) > t
    else:  # one causal sequence per response row, its keys its own positions
        assert torch.equal(sequences.key_index, torch.arange(t))


def test_a_run_of_padding_and_a_prompt_of_one_token_are_sequences_of_their_own():
    """A one-token prompt has no prefix (its token opens each segment); padding attends to padding only."""
    packed = pack_responses([[5], [6, 7, 8]], [[[9, 10], [11]], [[12], [13, 14]]], pad_id=0, share_prompt=True,
                            pack=True)
    segment_ids = torch.cat([packed.segment_ids, torch.full((1, 3), -1)], dim=1)  # 3 trailing pads
    attention_mask = torch.cat([packed.attention_mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    t = segment_ids.shape[1]
    sequences = varlen_sequences(segment_ids)
    seen = seen_by_sequences(sequences, t)
    mask = shared_prompt_mask(segment_ids, attention_mask, "sdpa", torch.float32)[0, 0]
    real = attention_mask[0].bool()
    assert torch.equal(seen[real], mask[real])  # every real query as the mask says
    assert seen[~real][:, real].sum() == 0 and seen[t - 1, t - 3:].all()  # padding sees padding only
    assert sequences.cu_seq_q.tolist()[:3] == [0, 3, 5]  # group 0: no prefix, segments of 3 and 2 tokens


@pytest.mark.parametrize("share", [True, False])
def test_varlen_attention_gives_the_grouped_paths_values_and_gradients(share):
    """query, key, value of a packed row (GQA: 4 heads over 2) through `varlen_attention` with the reference
    kernel, against `packed_attention` per group under the mask."""
    module = tiny_llama(GROUPED_SDPA).model.layers[0].self_attn
    packed = packed_row(share, seed=4)
    t = packed.input_ids.shape[1]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, heads, t, 8, generator=g) for heads in (4, 2, 2)]
    weights = torch.randn(1, t, 4, 8, generator=g)  # any downstream use of the output

    def attend(varlen: bool):
        query, key, value = (x.clone().requires_grad_() for x in inputs)
        if varlen:
            out = varlen_attention(query, key, value, varlen_sequences(packed.segment_ids), reference_varlen_attn,
                                   scale=module.scaling)
        else:
            bounds = packed_group_bounds(packed.segment_ids)
            mask = shared_prompt_mask(packed.segment_ids, packed.attention_mask, GROUPED_SDPA, torch.float32, bounds)
            out, _ = packed_attention(module, query, key, value, mask, bounds, scaling=module.scaling)
        (out * weights).sum().backward()
        return out, [x.grad for x in (query, key, value)]

    (want, want_grads), (got, got_grads) = attend(False), attend(True)
    assert got.shape == want.shape == (1, t, 4, 8)
    assert torch.allclose(got, want, atol=TOLERANCE)
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert torch.allclose(got_grad, want_grad, atol=TOLERANCE)
    assert want_grads[1].abs().sum() > 0  # the key gradients (summed over the prefix's copies) are compared


def test_load_model_gives_an_sdpa_model_the_varlen_implementation(tiny_model_dir):
    from mallows_ray.models import load_model

    assert load_model(tiny_model_dir).config._attn_implementation == VARLEN


def test_varlen_applies_only_to_varlen_models_on_a_gpu():
    """On the CPU (and for GROUPED_SDPA anywhere) a packed row gets its mask and group bounds."""
    packed = packed_row(share=True)
    for implementation in (VARLEN, GROUPED_SDPA):
        model = tiny_llama(implementation).bfloat16()
        assert not varlen_applies(model, torch.device("cpu"))
        mask, layout = attention_inputs(model, packed.segment_ids, packed.attention_mask)
        assert mask.shape == (1, 1, packed.input_ids.shape[1], packed.input_ids.shape[1])
        assert set(layout) == {"group_bounds"}


def cuda_with_flash() -> bool:
    return (torch.cuda.is_available() and torch.version.hip is None
            and torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability() >= (8, 0))


@pytest.mark.skipif(not cuda_with_flash(), reason="torch's varlen flash kernel needs an NVIDIA GPU (Ampere or later)")
@pytest.mark.parametrize("share", [True, False])
def test_on_a_gpu_the_varlen_kernel_gives_the_grouped_paths_statistics_and_gradients(share):
    """bf16 on the GPU: the real kernel through a whole model, against the grouped sdpa path on the same
    weights; bf16 rounding (8 bits of mantissa) sets the tolerance."""
    device = "cuda"
    varlen, grouped = (tiny_llama(name).to(device=device, dtype=torch.bfloat16) for name in (VARLEN, GROUPED_SDPA))
    grouped.load_state_dict(varlen.state_dict())
    prompts, responses = batch_of_prompts(seed=5)
    packed = pack_responses(prompts, responses, pad_id=0, share_prompt=share, pack=True).to(torch.device(device))
    _, layout = attention_inputs(varlen, packed.segment_ids, packed.attention_mask)
    assert set(layout) == {"causal_sequences"}  # the kernel path is the one taken
    layout_kwargs = {"share_prompt": share, "pack": True}
    want, want_grads, _ = statistics_and_gradients(grouped, prompts, responses, device=device, **layout_kwargs)
    got, got_grads, _ = statistics_and_gradients(varlen, prompts, responses, device=device, **layout_kwargs)
    scale = want.logp_sum.abs().max()
    assert torch.allclose(got.logp_sum.float(), want.logp_sum.float(), atol=0.02 * float(scale))
    for name, grad in want_grads.items():
        assert torch.isfinite(got_grads[name]).all(), name
        rel = (got_grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
        assert rel < 0.05, (name, float(rel))
