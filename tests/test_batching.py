"""Batches: padding, best-fit-decreasing packing, packed attention isolation, and the global-batch sampler."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from llmhalluc.data import IGNORE_INDEX, tokenize_chat
from llmhalluc.data.batching import (
    GlobalBatchSampler,
    PackedCollator,
    PaddedCollator,
    eval_batches,
    pack_best_fit_decreasing,
    pack_shuffled_best_fit,
    packing_efficiency,
)
from llmhalluc.models.attention import PACKED_SDPA, use_packed_sdpa
from llmhalluc.train.loss import cross_entropy_sum as loss_parts
from llmhalluc.train.loss import model_inputs


def cross_entropy_sum(model, batch, **options):
    """The summed cross-entropy alone (the per-source split is tested elsewhere)."""
    return loss_parts(model, batch, **options)[0]


DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def examples(tokenizer):
    rows = [json.loads(line)["messages"] for line in (DATA / "demo_train.jsonl").read_text().splitlines()[:12]]
    return [tokenize_chat(tokenizer, messages) for messages in rows]


def test_padded_collator(examples):
    batch = PaddedCollator(pad_token_id=0, pad_to_multiple_of=8)(examples[:3])
    longest = max(len(e["input_ids"]) for e in examples[:3])
    assert batch["input_ids"].shape == (3, -(-longest // 8) * 8)
    for row, example in enumerate(examples[:3]):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}


def test_packed_collator_restarts_positions_and_unlabels_first_tokens(examples):
    rows = [examples[:2], examples[2:5]]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    sizes = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = -(-max(sizes) // 8) * 8
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["labels"].shape == (2, width)
    assert "attention_mask" not in batch
    assert batch["lengths"].tolist() == [len(e["input_ids"]) for e in examples[:5]]
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example["input_ids"])
            assert batch["input_ids"][r, start : start + n].tolist() == example["input_ids"]
            assert batch["position_ids"][r, start : start + n].tolist() == list(range(n))
            assert batch["labels"][r, start].item() == IGNORE_INDEX
            assert batch["labels"][r, start + 1 : start + n].tolist() == example["labels"][1:]
            start += n
        # The pad run at the end of a row: its own positions, never trained.
        assert batch["position_ids"][r, start:].tolist() == list(range(width - start))
        assert set(batch["labels"][r, start:].tolist()) <= {IGNORE_INDEX}
    # Segment boundaries over the flattened rows: every example, then each row's pad run.
    expected, segments = [0], []
    for r, row in enumerate(rows):
        for example in row:
            expected.append(expected[-1] + len(example["input_ids"]))
            segments.append(len(example["input_ids"]))
        if expected[-1] < (r + 1) * width:
            segments.append((r + 1) * width - expected[-1])
            expected.append((r + 1) * width)
    assert batch["cu_seq_lens"].tolist() == expected and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_seq_len"] == max(segments)


def test_best_fit_decreasing_is_a_valid_tight_packing():
    rng = random.Random(0)
    # GSM8K-shaped: about 200 tokens per chat (question + worked answer), a long tail, rows of 2048.
    lengths = [max(40, min(2048, int(rng.gauss(200, 70)))) for _ in range(10_000)]
    bins = pack_best_fit_decreasing(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    efficiency = packing_efficiency(lengths, bins, 2048)
    assert efficiency >= 0.97, efficiency
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_best_fit_decreasing([10, 3000], 2048)


def test_shuffled_best_fit_is_tight_deterministic_and_mixes_lengths():
    rng = random.Random(0)
    lengths = [max(40, min(2048, int(rng.gauss(200, 70)))) for _ in range(10_000)]
    bins = pack_shuffled_best_fit(lengths, 2048, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    assert packing_efficiency(lengths, bins, 2048) >= 0.97
    assert pack_shuffled_best_fit(lengths, 2048, seed=3) == bins
    assert pack_shuffled_best_fit(lengths, 2048, seed=4) != bins

    # Longest-first rows hold examples of similar length; shuffled rows hold a mix.
    def spread(rows):
        return sum(max(lengths[i] for i in r) - min(lengths[i] for i in r) for r in rows) / len(rows)

    assert spread(bins) > 2 * spread(pack_best_fit_decreasing(lengths, 2048))


def test_best_fit_picks_the_tightest_row():
    # 6 goes in first; 4 then fits the 6-row exactly (best fit), not a new row; 5 and 5 share the last row.
    assert pack_best_fit_decreasing([4, 6, 5, 5], 10) == [[1, 0], [2, 3]]


def load_with_attention(model_dir: Path, attention: str) -> Any:
    """The tiny model with sdpa, eager, or llmhalluc's per-segment sdpa for packed rows."""
    if attention != PACKED_SDPA:
        return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    use_packed_sdpa(model)
    return model


def assert_packed_logits_equal_unpacked(model: Any, rows: list[list[dict]]) -> None:
    """Each example's logits inside packed rows (pad runs included) equal its logits run alone."""
    packed = PackedCollator(pad_token_id=0, pad_to_multiple_of=64)(rows)  # pad runs are segments too
    with torch.no_grad():
        logits = model(**model_inputs(packed, model.config), use_cache=False).logits
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                n = len(example["input_ids"])
                alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
                torch.testing.assert_close(logits[r, start : start + n], alone, atol=1e-5, rtol=1e-5)
                start += n


@pytest.mark.parametrize("attention", ["sdpa", "eager", PACKED_SDPA])
def test_packed_logits_equal_unpacked_logits(tiny_model_dir, examples, attention):
    model = load_with_attention(tiny_model_dir, attention).eval()
    assert_packed_logits_equal_unpacked(model, [examples[:3], examples[3:7]])


def test_packed_loss_equals_padded_loss(tiny_model_dir, examples):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        padded = cross_entropy_sum(model, PaddedCollator(pad_token_id=0)(examples[:8]))
        packed = cross_entropy_sum(model, PackedCollator(pad_token_id=0)([examples[:3], examples[3:8]]))
        # Reference: the textbook full-logits computation, example by example.
        reference = 0.0
        for example in examples[:8]:
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            reference += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-6)
    assert padded.item() == pytest.approx(reference, rel=1e-5)


def test_packed_sdpa_gradients_equal_padded_gradients(tiny_model_dir, examples):
    # GQA (4 query heads on 2 key/value heads), pad runs, several rows: the training path on CPU.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    packed_model = load_with_attention(tiny_model_dir, PACKED_SDPA)
    assert packed_model.config.num_key_value_heads < packed_model.config.num_attention_heads
    padded = cross_entropy_sum(reference, PaddedCollator(pad_token_id=0)(examples[:8]))
    packed = cross_entropy_sum(
        packed_model, PackedCollator(pad_token_id=0, pad_to_multiple_of=64)([examples[:3], examples[3:8]])
    )
    padded.backward()
    packed.backward()
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-6)
    for (name, a), b in zip(reference.named_parameters(), packed_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    # Padded batches (eval) through the packed model are plain sdpa.
    with torch.no_grad():
        batch = PaddedCollator(pad_token_id=0)(examples[8:12])
        assert cross_entropy_sum(packed_model, batch).item() == cross_entropy_sum(reference, batch).item()


@pytest.mark.parametrize("attention", ["sdpa", "eager", PACKED_SDPA])
def test_packed_rows_keep_a_sliding_window(tokenizer, examples, attention):
    # Mistral-style layers attend to the last 8 tokens only: per-segment causal sdpa would see more, so those
    # layers fall back to transformers' sliding-window mask over the packed row; the explicit block-diagonal mask
    # of sdpa and eager carries the window too.
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    model.set_attn_implementation("sdpa" if attention == PACKED_SDPA else attention)
    if attention == PACKED_SDPA:
        use_packed_sdpa(model)
    assert_packed_logits_equal_unpacked(model, [examples[:3], examples[3:7]])


def global_batches(num_items, per_device, accumulation, processes, epoch=0):
    samplers = [GlobalBatchSampler(num_items, per_device, accumulation, processes, r, seed=7) for r in range(processes)]
    streams = []
    for sampler in samplers:
        sampler.set_epoch(epoch)
        streams.append(list(sampler))
    batches = []
    for step in range(samplers[0].steps_per_epoch):
        members = set()
        for stream in streams:
            for micro in stream[step * accumulation : (step + 1) * accumulation]:
                assert len(micro) == per_device
                members.update(micro)
        batches.append(members)
    return batches


def test_global_batches_do_not_depend_on_the_split():
    reference = global_batches(50, 8, 1, 1)
    assert len(reference) == 6  # 50 // 8; the last incomplete global batch is not used this epoch
    assert global_batches(50, 2, 4, 1) == reference
    assert global_batches(50, 4, 1, 2) == reference
    assert global_batches(50, 2, 2, 2) == reference
    assert global_batches(50, 1, 4, 2) == reference
    assert sum(len(b) for b in reference) == len(set().union(*reference)) == 48
    assert global_batches(50, 8, 1, 1, epoch=1) != reference


def test_eval_batches_cover_every_item_once_with_equal_counts_per_rank():
    for num_items, batch_size, processes in [(10, 3, 2), (7, 2, 3), (1, 4, 2), (48, 1, 2)]:
        per_rank = [eval_batches(num_items, batch_size, processes, r) for r in range(processes)]
        assert len({len(b) for b in per_rank}) == 1
        flat = [i for batches in per_rank for b in batches for i in b]
        assert sorted(flat) == list(range(num_items))


def test_lm_head_on_trained_positions_gives_the_full_logits_loss_and_gradients(tiny_model_dir, examples):
    batch = PaddedCollator(pad_token_id=0)(examples[:6])
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loss = cross_entropy_sum(ours, batch)
    loss.backward()
    logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum"
    )
    full.backward()
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-4)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
