"""Attention over the shared-prompt and packed layouts (data/collate.py): what a token may see, and the kernels.

A token of response i sees the earlier tokens of its group's shared prefix and of its own segment, nothing of
its siblings nor of the other groups of a packed row. Three ways to run that, one per device and dtype:

* a [rows, 1, T, T] mask (`shared_prompt_mask`) for transformers' sdpa and eager attention;
* per group (`GROUPED_SDPA`): a packed row's mask is block-diagonal over its groups, and sdpa over the whole row
  computes every off-diagonal block only to mask it out; sdpa on each group's diagonal block instead computes
  sum_g L_g^2 scores instead of T^2 (two equal groups: half; 17 -> 10 ms forward + backward per layer at
  T = 600 on a 2-core CPU). The CPU path, and the GPU's in fp32;
* as causal sequences (`VARLEN`, the implementation `models.load_model` gives an sdpa model): on a CUDA device
  in bf16 / fp16 a packed row runs torch's varlen flash-attention kernel on the row cut into sequences
  (`varlen_sequences`), each causal with its keys aligned to its end: the prefix alone, then every response
  segment whose keys are the prefix followed by the segment itself. No mask is built (the [T, T] one grows as
  the square of a token-budgeted micro-batch) and the kernel skips what a causal mask would hide. Elsewhere,
  and for a batch of several rows, `VARLEN` runs as `GROUPED_SDPA`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mallows_ray.data.collate import SEGMENT_BITS

GROUPED_SDPA = "mallows_ray_grouped_sdpa"
VARLEN = "mallows_ray_varlen"
HALF_DTYPES = (torch.bfloat16, torch.float16)
SEGMENT_MASK = (1 << SEGMENT_BITS) - 1
CAUSAL_WINDOW = (-1, 0)  # varlen_attn's window for causal attention, aligned to each sequence's last key


@dataclass(frozen=True)
class VarlenSequences:
    """A single packed row's positions cut into S causal sequences, in row order, as varlen_attn takes them."""
    cu_seq_q: torch.Tensor   # [S + 1] int32: the queries of sequence s are row positions cu_seq_q[s]:cu_seq_q[s+1]
    cu_seq_k: torch.Tensor   # [S + 1] int32: its keys are key_index[cu_seq_k[s]:cu_seq_k[s+1]]
    key_index: torch.Tensor  # [K] long: row positions of every sequence's keys, sequence after sequence
    max_q: int
    max_k: int


def varlen_sequences(segment_ids: torch.Tensor) -> VarlenSequences:
    """[1, T] segment ids of one row (group << SEGMENT_BITS | segment; -1 padding) -> its causal sequences.

    Every run of one segment id is the queries of one sequence: the prefix (segment 0) and a per-response row
    (unshared, all segment 0) attend to themselves; response segment i >= 1 to its group's prefix, then itself;
    trailing padding to itself (no softmax row is empty). With each sequence's causal window aligned to its
    last key, query j of a response segment sees the whole prefix and the segment's first j + 1 tokens: the
    rule of `shared_prompt_mask`."""
    values, lengths = (t.tolist() for t in torch.unique_consecutive(segment_ids[0], return_counts=True))
    spans = []  # (start, end) row spans of the keys, sequence after sequence: its prefix's, then its own
    cu_q, cu_k, start = [0], [0], 0
    prefix, prefix_group = (0, 0), None
    for value, length in zip(values, lengths):
        run = (start, start + length)
        group, segment = value >> SEGMENT_BITS, value & SEGMENT_MASK
        if value >= 0 and segment == 0:
            prefix, prefix_group = run, group
        shared = prefix if value >= 0 and segment > 0 and prefix_group == group else (start, start)
        spans += [shared, run]
        cu_q.append(run[1])
        cu_k.append(cu_k[-1] + (shared[1] - shared[0]) + length)
        start += length
    device = segment_ids.device
    return VarlenSequences(
        cu_seq_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seq_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        key_index=torch.cat([torch.arange(s, e) for s, e in spans]).to(device),  # per span, not per token
        max_q=max(lengths), max_k=max(b - a for a, b in zip(cu_k, cu_k[1:])))


def varlen_applies(model, device: torch.device) -> bool:
    """Whether `model`'s packed rows on `device` run the varlen flash kernel: `VARLEN` is its implementation,
    the device an NVIDIA GPU with flash attention (Ampere or later; ROCm's kernel aligns a causal window to a
    sequence's first key, not its last), the weights bf16 / fp16, and every layer full causal attention
    without a sliding window, soft-capping, or dropout while training (the kernel is given none of them)."""
    config = model.config
    if config._attn_implementation != VARLEN or device.type != "cuda" or torch.version.hip is not None:
        return False
    layers = getattr(config, "layer_types", None) or ["full_attention"]
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return (model.get_input_embeddings().weight.dtype in HALF_DTYPES
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0)
            and all(kind == "full_attention" for kind in layers) and not sliding
            and not getattr(config, "attn_logit_softcapping", None)
            and not (model.training and getattr(config, "attention_dropout", 0.0)))


def attention_inputs(model, segment_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The attention mask and the extra attention arguments of a forward over `segment_ids`' layout [rows, T]:
    the 2D [1, T] mask as it is and the row's `varlen_sequences` where `varlen_applies` (a single row of real
    tokens: transformers then builds no mask either), else `shared_prompt_mask`, with a packed row's
    `group_bounds` for `GROUPED_SDPA` and `VARLEN`."""
    implementation = model.config._attn_implementation
    if segment_ids.shape[0] == 1 and varlen_applies(model, segment_ids.device):
        return attention_mask, {"causal_sequences": varlen_sequences(segment_ids)}
    bounds = packed_group_bounds(segment_ids)
    mask = shared_prompt_mask(segment_ids, attention_mask, implementation,
                              model.get_input_embeddings().weight.dtype, bounds)
    return mask, ({"group_bounds": bounds} if bounds is not None and implementation in (GROUPED_SDPA, VARLEN)
                  else {})


def packed_attention(module, query, key, value, attention_mask, group_bounds=None, causal_sequences=None,
                     **kwargs):
    """The attention of `GROUPED_SDPA` and `VARLEN`: transformers' sdpa attention, run per group of a packed
    row (`group_bounds` [(start, end)] covering its T positions in order), or as `causal_sequences`
    (`varlen_sequences`) by `varlen_attention`. query [1, H, T, D], key / value [1, H_kv, T, D], attention_mask
    [1, 1, T, T] (True = attend, block-diagonal over the groups; None or ignored with `causal_sequences`) ->
    ([1, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if causal_sequences is not None:
        from torch.nn.attention.varlen import varlen_attn

        if kwargs.get("dropout") or not query.is_cuda or query.dtype not in HALF_DTYPES:
            raise ValueError(f"the varlen flash kernel takes bf16/fp16 CUDA tensors without dropout, not "
                             f"{query.dtype} on {query.device} (dropout {kwargs.get('dropout')}): `varlen_applies` "
                             f"judged this model by its embedding weights")
        return varlen_attention(query, key, value, causal_sequences, varlen_attn, scale=kwargs.get("scaling")), None
    if query.device.type == "cpu" and query.dtype in HALF_DTYPES:
        # torch's CPU flash-attention kernels run bf16 far slower than fp32 (the backward ~6x on SmolLM2's
        # packed rows: ~10 ms against ~1.75 ms a layer, while bf16 matmuls run 2-5x faster on AMX): attend in
        # fp32 and round the output back, which is more precise too. GPUs keep their native kernels.
        additive = attention_mask is not None and attention_mask.is_floating_point()
        mask = attention_mask.float() if additive else attention_mask  # bool (True = attend) or None as it is
        out, _ = packed_attention(module, query.float(), key.float(), value.float(), mask, group_bounds, **kwargs)
        return out.to(query.dtype), None
    if group_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # split, not slices: the backward of a split concatenates the groups' gradients, while each slice's
    # backward would zero-fill a whole [1, H, T, D] gradient (that cost as much as the blocks saved)
    sizes = [e - s for s, e in group_bounds]
    outputs = [sdpa_attention_forward(module, q, k, v, attention_mask[..., s:e, s:e], **kwargs)[0]
               for q, k, v, (s, e) in zip(query.split(sizes, dim=2), key.split(sizes, dim=2),
                                          value.split(sizes, dim=2), group_bounds)]
    return torch.cat(outputs, dim=1), None


def varlen_attention(query, key, value, sequences: VarlenSequences, kernel, scale: float | None) -> torch.Tensor:
    """One row's attention as causal `sequences` through `kernel` (torch's `varlen_attn` or a function of its
    signature): query [1, H, T, D], key / value [1, H_kv, T, D] -> [1, T, H, D]. The keys are gathered into
    sequence order (a prefix once per response segment of its group); the gather's backward adds each copy's
    gradient back into the prefix's (on a GPU with atomic adds: in bf16 not bitwise reproducible)."""
    q = query[0].transpose(0, 1).contiguous()                                       # [T, H, D]
    k, v = (x[0].transpose(0, 1).index_select(0, sequences.key_index) for x in (key, value))  # [K, H_kv, D]
    out = kernel(q, k, v, sequences.cu_seq_q, sequences.cu_seq_k, sequences.max_q, sequences.max_k, scale=scale,
                 window_size=CAUSAL_WINDOW, enable_gqa=q.shape[1] != k.shape[1])   # [T, H, D]
    return out[None]


def register_packed_attention() -> None:
    """Make `GROUPED_SDPA` and `VARLEN` transformers attention implementations (masks built as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name in (GROUPED_SDPA, VARLEN):
        AttentionInterface.register(name, packed_attention)
        AttentionMaskInterface.register(name, sdpa_mask)


def packed_group_bounds(segment_ids: torch.Tensor) -> list[tuple[int, int]] | None:
    """[(start, end)] of the runs of one group in a single packed row's [1, T] segment ids (trailing padding,
    segment -1, a run of its own); None when the row holds one run or there are several rows."""
    if segment_ids.shape[0] != 1:
        return None
    _, lengths = torch.unique_consecutive(segment_ids[0] >> SEGMENT_BITS, return_counts=True)
    if len(lengths) == 1:
        return None
    ends = lengths.cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def shared_prompt_mask(segment_ids: torch.Tensor, attention_mask: torch.Tensor, attn_implementation: str,
                       dtype: torch.dtype, group_bounds: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """[rows, T] segment ids (data/collate.py: group << SEGMENT_BITS | segment, segment 0 the shared prefix,
    i + 1 response i) -> the [rows, 1, T, T] mask in the form the model's attention takes (sdpa: bool,
    True = attend; eager: additive float).

    Query q sees key k <= q when k is real, in q's group, and in the prefix or in q's own segment. Padding
    queries see themselves, so no softmax row is empty: an all-masked row gives NaN, and NaN * 0 still
    poisons the weight gradients through the padding positions. `group_bounds` (`packed_group_bounds` of a
    single packed row): every key outside q's group is masked, so only the diagonal blocks are computed.
    """
    t = segment_ids.shape[1]
    if group_bounds is None:
        allowed = _segment_mask(segment_ids, attention_mask)
    else:  # sum_g L_g^2 positions instead of T^2 (8 prompts a scoring row: an eighth)
        allowed = torch.zeros(1, t, t, dtype=torch.bool, device=segment_ids.device)
        for s, e in group_bounds:
            allowed[:, s:e, s:e] = _segment_mask(segment_ids[:, s:e], attention_mask[:, s:e])
    if attn_implementation in ("sdpa", GROUPED_SDPA, VARLEN):
        return allowed[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)[:, None]
    raise ValueError(f"model.share_prompt and model.pack need the 'sdpa' or 'eager' attention implementation (a "
                     f"custom 4D mask); this model uses {attn_implementation!r}: set both to false")


def _segment_mask(segment_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`shared_prompt_mask`'s rule on [rows, L] positions -> [rows, L, L] bool."""
    t = segment_ids.shape[1]
    group, segment = segment_ids >> SEGMENT_BITS, segment_ids & SEGMENT_MASK                  # [rows, L]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()            # [L, L]
    same = (group[:, None, :] == group[:, :, None]) & (
        (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))           # [rows, Lq, Lk]
    allowed = causal & same & attention_mask.bool()[:, None, :]
    return allowed | torch.eye(t, dtype=torch.bool, device=segment_ids.device)
