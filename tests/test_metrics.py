"""Reported numbers: model FLOPs against a hand count (tied and untied embeddings, attention width that is not the
hidden size), GPU peaks by device name, and MFU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmhalluc.train.meter import flops_model_of, mfu, peak_flops_for, training_flops

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 64, 3, 4, 2, 24, 160, 300


def model(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,  # heads x head_dim = 96, not the hidden size 64 (as in Gemma or Qwen3)
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def hand_count_body() -> int:
    """Parameters outside the embedding and the LM head, counted from the architecture."""
    attention = HIDDEN * HEADS * HEAD_DIM + 2 * HIDDEN * KV_HEADS * HEAD_DIM + HEADS * HEAD_DIM * HIDDEN
    mlp = 3 * HIDDEN * INTERMEDIATE
    norms = 2 * HIDDEN
    return LAYERS * (attention + mlp + norms) + HIDDEN  # + the final norm


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_flops_equal_a_hand_count(tied):
    flops = flops_model_of(model(tied))
    assert flops.body_params == hand_count_body()  # the shared matrix is subtracted once when tied
    assert flops.head_params == VOCAB * HIDDEN
    assert flops.attention_width == HEADS * HEAD_DIM
    tokens, trained, squares = 1000, 300, 40 * 25**2
    expected = (
        6 * hand_count_body() * tokens
        + 6 * VOCAB * HIDDEN * trained
        + 6 * LAYERS * HEADS * HEAD_DIM * squares  # QK^T and AV over half the pairs, x3 for backward
    )
    assert training_flops(flops, tokens, trained, squares) == expected
    assert mfu(expected, 2.0, 4, peak=1e12) == pytest.approx(expected / 2.0 / 4 / 1e12)
    assert mfu(expected, 2.0, 4, peak=None) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_peaks_by_device_name(name, peak):
    assert peak_flops_for(name) == peak
