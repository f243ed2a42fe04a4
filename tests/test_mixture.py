"""Dataset mixtures with ratios, the loss per source dataset (exact across ranks and in packed rows that mix
sources), eval loss per dataset, and the mask audit with its warnings."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO, read_metrics, run_sft, write_chats
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmhalluc.config import DataConfig
from llmhalluc.data import IGNORE_INDEX, tokenize_chat
from llmhalluc.data.audit import audit, warnings
from llmhalluc.data.pipeline import mix_datasets, prepare_dataset
from llmhalluc.models.tiny import build_tokenizer


def sources(sizes: list[int]) -> list[datasets.Dataset]:
    return [datasets.Dataset.from_dict({"source": [i] * n, "row": list(range(n))}) for i, n in enumerate(sizes)]


def test_interleave_probs_give_the_asked_shares_deterministically():
    probs = [0.5, 0.3, 0.2]
    mixed = mix_datasets(sources([10_000] * 3), "interleave_under", probs, seed=7)
    first = Counter(mixed["source"][:10_000])
    for index, p in enumerate(probs):
        assert abs(first[index] / 10_000 - p) <= 0.01, (index, first[index])
    assert mixed["source"] == mix_datasets(sources([10_000] * 3), "interleave_under", probs, seed=7)["source"]
    assert mixed["source"] != mix_datasets(sources([10_000] * 3), "interleave_under", probs, seed=8)["source"]


def test_interleave_under_stops_at_the_first_exhausted_and_over_repeats_the_small_ones():
    under = mix_datasets(sources([100, 1000, 1000]), "interleave_under", [0.5, 0.25, 0.25], seed=1)
    counts = Counter(under["source"])
    assert counts[0] == 100 and under["source"][-1] == 0  # dataset 0 ran out first: the mix stops there
    assert counts[1] < 1000 and counts[2] < 1000
    over = mix_datasets(sources([100, 300, 50]), "interleave_over", [1 / 3, 1 / 3, 1 / 3], seed=1)
    seen = {s: set() for s in range(3)}
    for source, row in zip(over["source"], over["row"]):
        seen[source].add(row)
    assert [len(seen[s]) for s in range(3)] == [100, 300, 50]  # every dataset seen whole
    counts = Counter(over["source"])
    assert counts[0] > 100 and counts[2] > 50  # the smaller ones repeated
    concat = mix_datasets(sources([3, 2]), "concat", None, seed=1)
    assert concat["source"] == [0, 0, 0, 1, 1]


# --- the loss per source, launched ------------------------------------------------------------------------


def demo_chats(start: int, count: int) -> list[list[dict]]:
    lines = (REPO / "data" / "demo_train.jsonl").read_text().splitlines()[start : start + count]
    return [json.loads(line)["messages"] for line in lines]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, tiny_model_dir):
    """Datasets A (4 chats) and B (4 other chats); one step over all 8 in 1 process (padding-free), 2-process
    ZeRO-3, and packed rows that mix both; evaluated on both."""
    root = tmp_path_factory.mktemp("sources")
    write_chats(root / "data", "A", demo_chats(0, 4))
    write_chats(root / "data", "B", demo_chats(10, 4))
    base = [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        "dataset=[A,B]",
        "eval_dataset=[A,B]",
        f"dataset_dir={root / 'data'}",
        "eval_steps=",
        "save_steps=",
        "max_length=1024",
        "max_steps=1",
        "learning_rate=1e-3",
        "logging_steps=1",
    ]
    runs = {}
    for name, launch, extra in (
        ("one", None, ["per_device_train_batch_size=8"]),
        ("zero3", "cpu_zero3.yaml", ["per_device_train_batch_size=2", "gradient_accumulation_steps=2"]),
        ("packed", None, ["packing=true", "per_device_train_batch_size=1"]),
    ):
        run_sft([*base, *extra, f"output_dir={root / name}"], accelerate_config=launch)
        runs[name] = root / name
    return {"root": root, "runs": runs}


def reference_losses(model_dir, chats_by_source: dict[str, list]) -> dict[str, tuple[float, int]]:
    """(summed cross-entropy, trained tokens) per source: full logits, one chat at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    with torch.no_grad():
        for name, chats in chats_by_source.items():
            ce, count = 0.0, 0
            for chat in chats:
                example = tokenize_chat(tokenizer, chat)
                logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
                targets = torch.tensor(example["labels"][1:])
                ce += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                count += int((targets != IGNORE_INDEX).sum())
            out[name] = (ce, count)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one", "zero3", "packed"])
def test_loss_per_source_equals_a_per_dataset_reference(two_sources, tiny_model_dir, name):
    chats = {"A": demo_chats(0, 4), "B": demo_chats(10, 4)}
    reference = reference_losses(tiny_model_dir, chats)
    (row,) = [r for r in read_metrics(two_sources["runs"][name]) if "loss" in r]
    for source, (ce, count) in reference.items():
        assert row[f"loss/{source}"] == pytest.approx(ce / count, rel=1e-5), source
        assert row[f"trained_tokens/{source}"] == count
    combined = sum(row[f"loss/{s}"] * row[f"trained_tokens/{s}"] for s in "AB") / row["trained_tokens"]
    assert combined == pytest.approx(row["loss"], rel=1e-6)
    # Evaluation after the step, per dataset, against the saved model's own reference.
    after = reference_losses(two_sources["runs"][name], chats)
    (evaluation,) = [r for r in read_metrics(two_sources["runs"][name]) if "eval_loss" in r]
    for source, (ce, count) in after.items():
        assert evaluation[f"eval/{source}/loss"] == pytest.approx(ce / count, rel=1e-4), source
    total = sum(ce for ce, _ in after.values()) / sum(count for _, count in after.values())
    assert evaluation["eval_loss"] == pytest.approx(total, rel=1e-4)


# --- the mask audit ---------------------------------------------------------------------------------------


def test_the_audit_counts_what_the_masks_train(tmp_path):
    tokenizer = build_tokenizer("chatml")
    chats_a, chats_b = demo_chats(0, 30), demo_chats(100, 20)
    long_answer = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": " ".join(["seven"] * 200)}]
    write_chats(tmp_path, "A", chats_a)
    write_chats(tmp_path, "B", [*chats_b, long_answer])
    config = DataConfig(dataset=["A", "B"], dataset_dir=str(tmp_path), max_length=128)
    dataset, stats = prepare_dataset(["A", "B"], config, tokenizer)
    report = audit(stats, config)
    for name, chats in (("A", chats_a), ("B", [*chats_b, long_answer])):
        examples = [tokenize_chat(tokenizer, chat, max_length=128) for chat in chats]
        trained = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples]
        tokens = sum(len(e["input_ids"]) for e in examples)
        row = report[name]
        assert row["examples"] == len(chats) and row["share_of_mix"] == round(len(chats) / 51, 4)
        assert row["trained_share_of_tokens"] == round(sum(trained) / tokens, 4)
        assert row["trained_per_example"] == {
            "mean": round(float(np.mean(trained)), 2),
            "p50": int(np.percentile(trained, 50, method="lower")),
            "p99": int(np.percentile(trained, 99, method="lower")),
        }
        assert row["truncated"] == (1 if name == "B" else 0)  # the long answer, cut at 128 tokens
    # The long answer lost its end-of-turn token to truncation: one of B's turns is not closed.
    turns_b = sum(sum(m["role"] == "assistant" for m in chat) for chat in [*chats_b, long_answer])
    assert report["B"]["turns_with_end_of_turn_trained"] == round((turns_b - 1) / turns_b, 4)
    assert report["A"]["turns_with_end_of_turn_trained"] == 1.0
    assert [w for w in warnings(stats, config) if "without a trained end-of-turn" in w] == [
        f"dataset 'B': 1 of {turns_b} assistant turns end without a trained end-of-turn token, so the model would "
        "not learn to stop: check the template's {% generation %} markers (they must include the end-of-turn token)"
    ]
    assert len(dataset) == 51


def test_a_template_that_leaves_the_end_of_turn_untrained_is_warned_about(tmp_path):
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    write_chats(tmp_path, "A", demo_chats(0, 10))
    config = DataConfig(dataset=["A"], dataset_dir=str(tmp_path), max_length=512)
    _, stats = prepare_dataset(["A"], config, tokenizer)
    assert audit(stats, config)["A"]["turns_with_end_of_turn_trained"] == 0.0
    (warning,) = warnings(stats, config)
    assert warning.startswith(f"dataset 'A': {stats.turns} of {stats.turns} assistant turns end without")


def test_a_starved_dataset_is_warned_about():
    from llmhalluc.data.pipeline import DatasetStats

    def part(examples):
        return DatasetStats(
            examples=examples,
            tokens=100 * examples,
            trained_tokens=30 * examples,
            turns=examples,
            turns_closed=examples,
        )

    stats = DatasetStats(examples=1000, sources={"big": part(995), "small": part(5)})
    asked = DataConfig(dataset=["big", "small"], mix_strategy="interleave_over", interleave_probs=[0.9, 0.1])
    assert warnings(stats, asked) == [
        "dataset 'small': 0.50% of the mix although interleave_probs asked for 10% (interleave_over stopped early?)"
    ]
    barely = DataConfig(dataset=["big", "small"], mix_strategy="interleave_over", interleave_probs=[0.995, 0.005])
    assert warnings(stats, barely) == []  # 0.5% asked, 0.5% given
