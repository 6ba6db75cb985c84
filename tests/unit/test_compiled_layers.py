"""model.compile: the torch.compile'd decoder layers give the eager model's log-probs, entropies and gradients
within float rounding, in the packed layout (its grouped attention traced per count of prompts) and per row,
and the layers share their compiled graphs."""

import pytest
import torch
from test_shared_prompt import batch_of_prompts, statistics_and_gradients, tiny_llama

from mallows_ray.attention import GROUPED_SDPA
from mallows_ray.config import ConfigError, load_config
from mallows_ray.models import compile_layers

TOLERANCE = 1e-5  # float32: the compiled kernels fuse and reorder the same arithmetic


@pytest.mark.slow  # compiling on 2 cores: ~1 minute
def test_the_compiled_layers_give_the_eager_statistics_and_gradients():
    eager, compiled = tiny_llama(GROUPED_SDPA), tiny_llama(GROUPED_SDPA)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()  # graphs and counts of an earlier test in this process
    torch._dynamo.utils.counters.clear()
    compile_layers(compiled)
    assert [m._compiled_call_impl is not None for m in compiled.model.layers] == [True, True]
    assert compiled.model._compiled_call_impl is None  # the layers, not the whole body
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]  # in place
    # packed rows of 4 and of 3 prompts (two graphs, bounds symbolic), then the unpacked layout
    for seed, prompts_kept, layout in [(0, 4, {"pack": True}), (1, 3, {"pack": True}), (2, 4, {"pack": False})]:
        prompts, responses = batch_of_prompts(seed)
        prompts, responses = prompts[:prompts_kept], responses[:prompts_kept]
        want, want_grads, _ = statistics_and_gradients(eager, prompts, responses, share_prompt=True, **layout)
        got, got_grads, _ = statistics_and_gradients(compiled, prompts, responses, share_prompt=True, **layout)
        assert torch.allclose(got.logp_sum, want.logp_sum, atol=TOLERANCE)
        assert torch.allclose(got.mean_entropy, want.mean_entropy, atol=TOLERANCE)
        assert want.logp_sum.std() > 1.0  # the responses differ: a mix-up would show
        for name, grad in want_grads.items():
            assert torch.allclose(got_grads[name], grad, atol=TOLERANCE), name
    # one graph per layout (4 groups, 3 groups, unpacked), shared by the two layers: 6 if each compiled its own
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3


def test_compile_is_refused_with_zero_3():
    with pytest.raises(ConfigError, match="model.compile=true with deepspeed.zero_stage=3"):
        load_config(None, ["model.compile=true", "deepspeed.zero_stage=3"])
    assert load_config(None, ["model.compile=true", "deepspeed.zero_stage=2"]).model.compile


def test_compile_is_refused_with_gradient_checkpointing():
    # a checkpointed layer breaks dynamo's graph and runs eagerly: the switch would compile nothing
    with pytest.raises(ConfigError, match="model.compile=true with model.gradient_checkpointing=true"):
        load_config(None, ["model.compile=true", "model.gradient_checkpointing=true"])
    assert load_config(None, ["model.gradient_checkpointing=true"]).model.gradient_checkpointing
