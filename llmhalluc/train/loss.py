"""The loss: summed next-token cross-entropy over the trained positions of a batch, per source dataset too.

The model runs without its LM head (`logits_to_keep` empty, the final hidden states returned); the head and the
cross-entropy then run only on the positions that predict a trained token, which the collator listed on the CPU,
in chunks of positions, so a [trained tokens x vocabulary] fp32 logits tensor never exists at once: a chunk's logits
are recomputed in backward instead of kept. With `use_liger_kernel` on CUDA, Liger's fused linear cross-entropy
does the same in one kernel. Nothing here reads a device value on the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmhalluc.runtime.zero import full_shape

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # batch keys the model sees; the rest is metadata
CHUNK_LOGITS_BYTES = 2**30  # fp32 logits per chunk of trained positions: 1 GiB
NO_LOGITS = torch.zeros(0, dtype=torch.long)  # logits_to_keep: the model returns hidden states only


def causal_lm_of(model: Any) -> Any:
    """The transformers CausalLM inside DDP, a DeepSpeed engine, torch.compile or PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed
            model = model.module
        else:
            return model


def chunk_positions(vocab_size: int, chunk_tokens: int | None) -> int:
    """Trained positions per LM-head chunk: as configured, or as many as keep a chunk's fp32 logits at 1 GiB."""
    return chunk_tokens or max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))


def model_inputs(batch: dict[str, Any], config: Any = None) -> dict[str, Any]:
    """The model's arguments for a batch: ids, mask or positions; for packed rows the segment boundaries. For sdpa
    and eager attention (per the model `config`) the 4D causal mask comes from here, built from the segments (or
    the padding): transformers then neither infers examples from position ids (which may rewind at backtracks)
    nor inspects the padding on the host."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if "cu_seq_lens" in batch:  # flash-attention's varlen arguments; packed_sdpa_attention reads them too
        bounds, longest = batch["cu_seq_lens"], batch["max_seq_len"]
        inputs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
    if config is not None and config._attn_implementation in ("sdpa", "eager"):
        segments = batch["segment_ids"] if "segment_ids" in batch else 1 - batch["attention_mask"]  # pads: own segment
        inputs["attention_mask"] = causal_masks(segments, config)
    return inputs


def causal_masks(segment_ids: torch.Tensor, config: Any) -> Any:
    """4D masks that keep attention causal and inside each segment (and inside a sliding window where the model
    has one): bool for sdpa; for eager 0 where allowed and the most negative float elsewhere (it adds the mask to
    the scores). Models with several layer types get one mask per type, as transformers would build them."""
    length = segment_ids.shape[1]
    query = torch.arange(length, device=segment_ids.device)
    causal = query[None, :] <= query[:, None]
    full = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
    window = getattr(config, "sliding_window", None)  # model-specific attributes of the HF config
    windowed = full & ((query[:, None] - query[None, :]) < window) if window else full

    def for_kernel(mask: torch.Tensor) -> torch.Tensor:
        if config._attn_implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)

    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {kind: for_kernel(windowed if kind == "sliding_attention" else full) for kind in set(layer_types)}
    return for_kernel(windowed)


def cross_entropy_sum(
    model: Any, batch: dict[str, Any], chunk_tokens: int | None = None, liger: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the batch's trained positions, the same per source dataset)."""
    counts = batch["source_counts"]  # host ints: targets are ordered by source
    if liger:
        lm, selected = trained_hidden_states(model, batch)
        head = lm.get_output_embeddings()
        parts = zip(selected.split(counts), batch["targets"].split(counts))
        by_source = torch.stack([liger_cross_entropy_sum(h, head, t) if len(t) else h.sum() * 0 for h, t in parts])
        return by_source.sum(), by_source.detach()
    per_token = per_token_cross_entropy(model, batch, chunk_tokens)
    by_source = torch.stack([part.sum() for part in per_token.detach().split(counts)])
    return per_token.sum(), by_source


def trained_hidden_states(model: Any, batch: dict[str, Any]) -> tuple[Any, torch.Tensor]:
    """(the CausalLM, the final hidden states at the positions that predict a trained token, in target order)."""
    lm = causal_lm_of(model)
    inputs = model_inputs(batch, lm.config)
    output = model(
        **inputs,
        logits_to_keep=NO_LOGITS.to(batch["input_ids"].device),
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = output.hidden_states[-1]
    return lm, hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["predict_index"])


def per_token_cross_entropy(model: Any, batch: dict[str, Any], chunk_tokens: int | None = None) -> torch.Tensor:
    """The cross-entropy of every trained token of the batch (in target order), the LM head run in chunks."""
    lm, selected = trained_hidden_states(model, batch)
    head = lm.get_output_embeddings()
    vocab_size = full_shape(head.weight)[0]
    chunk = chunk_positions(vocab_size, chunk_tokens)
    return chunked_cross_entropy(selected, batch["targets"], head, logit_postprocess(lm.config), chunk)


def completion_logps(model: Any, batch: dict[str, Any], temperature: float, chunk_tokens: int | None) -> torch.Tensor:
    """The log-probability of every trained completion token (in target order) at the sampling temperature."""
    lm, selected = trained_hidden_states(model, batch)
    head = lm.get_output_embeddings()
    model_post = logit_postprocess(lm.config)

    def post(logits: torch.Tensor) -> torch.Tensor:
        return (model_post(logits) if model_post is not None else logits) / temperature

    chunk = chunk_positions(full_shape(head.weight)[0], chunk_tokens)
    return -chunked_cross_entropy(selected, batch["targets"], head, post, chunk)


def logit_postprocess(config: Any) -> Any:
    """What a model does to its LM head's output before the loss (Gemma's soft-capping, Cohere's scale), or None."""
    cap = getattr(config, "final_logit_softcapping", None)  # model-specific attributes of the HF config
    scale = getattr(config, "logit_scale", None)
    if cap:
        return lambda logits: torch.tanh(logits / cap) * cap
    if scale:
        return lambda logits: logits * scale
    return None


def chunked_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, postprocess: Any, chunk: int
) -> torch.Tensor:
    """Per-position cross-entropy of head(hidden) against targets, `chunk` positions at a time; beyond one chunk each
    chunk's logits are recomputed in backward rather than kept."""

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if postprocess is not None:
            logits = postprocess(logits)
        return F.cross_entropy(logits.float(), t, reduction="none")

    if hidden.shape[0] <= chunk:
        return piece(hidden, targets)
    return torch.cat(
        [checkpoint(piece, h, t, use_reentrant=False) for h, t in zip(hidden.split(chunk), targets.split(chunk))]
    )


def liger_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy (CUDA): the logits are never materialised."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, getattr(head, "bias", None))
