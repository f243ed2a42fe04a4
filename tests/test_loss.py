"""The loss module: chunked LM head + cross-entropy equals the one-shot computation, the loss per source dataset
adds up, and the micro-step never reads a device value on the host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.gpu_check import HostReadRecorder
from llmhalluc.data import IGNORE_INDEX, tokenize_chat
from llmhalluc.data.batching import PackedCollator, PaddedCollator, PaddingFreeCollator
from llmhalluc.train.loss import cross_entropy_sum

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def examples(tokenizer):
    rows = [json.loads(line)["messages"] for line in (DATA / "demo_train.jsonl").read_text().splitlines()[:8]]
    return [{**tokenize_chat(tokenizer, messages), "source": i % 3} for i, messages in enumerate(rows)]


def test_chunked_cross_entropy_equals_the_unchunked_loss_and_gradients(tiny_model_dir, examples):
    batch = PaddingFreeCollator(pad_token_id=0, num_sources=3)(examples)
    assert len(batch["targets"]) > 100  # chunks of 7 positions: many chunks and a ragged last one
    whole = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chunked = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loss, by_source = cross_entropy_sum(whole, batch)
    loss_chunked, by_source_chunked = cross_entropy_sum(chunked, batch, chunk_tokens=7)
    loss.backward()
    loss_chunked.backward()
    torch.testing.assert_close(loss_chunked, loss, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(by_source_chunked, by_source, rtol=1e-6, atol=1e-4)
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters()):
        # float32 noise from the summation order: a millionth of the largest gradient entry
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6 * a.grad.abs().max().item(), msg=name)


def test_loss_per_source_adds_up_to_the_loss_and_matches_a_reference(tiny_model_dir, examples):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for collate in (PaddedCollator(0, num_sources=3), PaddingFreeCollator(0, num_sources=3)):
            batch = collate(examples)
            loss, by_source = cross_entropy_sum(model, batch)
            reference = torch.zeros(3)
            for example in examples:  # the textbook computation, example by example
                logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
                targets = torch.tensor(example["labels"][1:])
                reference[example["source"]] += torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            torch.testing.assert_close(by_source, reference, rtol=1e-5, atol=1e-4)
            assert loss.item() == pytest.approx(by_source.sum().item(), rel=1e-6)
            counts = [
                sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples if e["source"] == s)
                for s in range(3)
            ]
            assert batch["source_counts"] == counts


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["padded", "padding_free", "packed"])
def test_the_micro_step_never_reads_the_device_on_the_host(tiny_model_dir, examples, attention, layout):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
    collate = {
        "padded": lambda e: PaddedCollator(0, num_sources=3)(e),
        "padding_free": lambda e: PaddingFreeCollator(0, num_sources=3)(e),
        "packed": lambda e: PackedCollator(0, num_sources=3)([e[:3], e[3:]]),
    }[layout]
    batch = collate(examples)
    recorder = HostReadRecorder()
    with recorder:
        loss, _ = cross_entropy_sum(model, batch, chunk_tokens=64)
        loss.backward()
    assert recorder.calls == []
    if attention == "sdpa":  # the recorder does see transformers' own sdpa mask inspecting 2D padding on the host
        plain = PaddedCollator(0)(examples)
        with recorder:
            model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits.sum().backward()
        assert recorder.calls
