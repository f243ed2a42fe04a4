"""Dataset preparation: drop reasons counted, stats, failures named, and a cache keyed by every setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_chats

from llmhalluc.config import DataConfig
from llmhalluc.data import IGNORE_INDEX, tokenize_chat
from llmhalluc.data.pairs import prepare_pairs
from llmhalluc.data.pipeline import prepare_dataset
from llmhalluc.errors import DataError
from llmhalluc.models.tiny import build_tokenizer


def turn(role: str, content) -> dict:
    return {"role": role, "content": content}


GOOD = [turn("user", "What is 2 + 2?"), turn("assistant", "2 + 2 = 4.\n#### 4")]
LONG_PROMPT = [turn("user", "Count these numbers. " + " ".join(str(i) for i in range(200))), turn("assistant", "ok")]
BAD = {
    "roles_out_of_order": [turn("assistant", "a"), turn("user", "q")],
    "empty_assistant_turn": [turn("user", "q"), turn("assistant", " ")],
    "no_assistant_turn": [turn("user", "q")],
    "non_text_content": [turn("user", "q"), turn("assistant", 42)],
    "no_trained_tokens_after_truncation": LONG_PROMPT,
}


def data_config(dataset_dir: Path, **overrides) -> DataConfig:
    return DataConfig(**{"dataset": ["chats"], "dataset_dir": str(dataset_dir), "max_length": 128, **overrides})


def test_every_drop_reason_is_counted_and_kept_rows_match_tokenize_chat(tmp_path, tokenizer):
    chats = [GOOD] * 5 + [chat for chat in BAD.values()] + [BAD["empty_assistant_turn"]]
    chats.append([turn("user", "Long answer?"), turn("assistant", " ".join(["word"] * 300))])  # truncated, kept
    write_chats(tmp_path, "chats", chats)
    dataset, stats = prepare_dataset(["chats"], data_config(tmp_path), tokenizer)
    assert stats.rows == len(chats)
    assert dict(stats.dropped) == {
        "roles_out_of_order": 1,
        "empty_assistant_turn": 2,
        "no_assistant_turn": 1,
        "non_text_content": 1,
        "no_trained_tokens_after_truncation": 1,
    }
    assert stats.examples == len(dataset) == 6
    assert stats.truncated == 2  # the long prompt (dropped) and the long answer (kept)
    reference = tokenize_chat(tokenizer, GOOD, max_length=128)
    assert dataset[0]["input_ids"] == reference["input_ids"]
    assert dataset[0]["labels"] == reference["labels"]
    assert max(dataset["length"]) == 128
    assert stats.tokens == sum(dataset["length"])
    assert stats.trained_tokens == sum(sum(x != IGNORE_INDEX for x in labels[1:]) for labels in dataset["labels"])
    assert set(stats.length_percentiles) == {"p50", "p90", "p99", "max"}


def test_max_length_shorter_than_every_prompt_is_an_error(tmp_path, tokenizer):
    write_chats(tmp_path, "chats", [LONG_PROMPT] * 3)
    with pytest.raises(DataError) as caught:
        prepare_dataset(["chats"], data_config(tmp_path, max_length=64), tokenizer)
    message = str(caught.value)
    assert "dataset 'chats': every row was dropped; first reason: no_trained_tokens_after_truncation" in message
    assert "raise max_length" in message


def test_dataset_where_every_row_is_dropped_names_the_first_reason(tmp_path, tokenizer):
    write_chats(tmp_path, "chats", [BAD["roles_out_of_order"], BAD["no_assistant_turn"]])
    with pytest.raises(DataError, match="dataset 'chats': every row was dropped; first reason: roles_out_of_order"):
        prepare_dataset(["chats"], data_config(tmp_path), tokenizer)


def test_template_that_forbids_a_chat_names_dataset_and_row(tmp_path):
    tokenizer = build_tokenizer("gemma")
    write_chats(tmp_path, "chats", [GOOD, [turn("user", "a"), turn("user", "b"), turn("assistant", "c")]])
    with pytest.raises(DataError) as caught:
        prepare_dataset(["chats"], data_config(tmp_path), tokenizer)
    assert "dataset 'chats': row 1: the chat template failed: gemma template: roles must alternate" in str(caught.value)


def test_several_datasets_are_concatenated(tmp_path, tokenizer):
    write_chats(tmp_path, "chats", [GOOD] * 3)
    write_chats(tmp_path, "more", [GOOD] * 2)
    dataset, stats = prepare_dataset(["chats", "more"], data_config(tmp_path), tokenizer)
    assert len(dataset) == stats.examples == 5


def test_cache_is_reused_only_while_every_setting_is_the_same(tmp_path):
    chats = [GOOD, [turn("user", "x " * 30), turn("assistant", "y " * 30)]]
    write_chats(tmp_path, "chats", chats)
    chatml = build_tokenizer("chatml")
    first, _ = prepare_dataset(["chats"], data_config(tmp_path), chatml)
    again, _ = prepare_dataset(["chats"], data_config(tmp_path), chatml)
    assert [f["filename"] for f in again.cache_files] == [f["filename"] for f in first.cache_files]

    qwen = build_tokenizer("chatml")
    qwen.chat_template = build_tokenizer("qwen").chat_template  # same tokens, another template
    changed, _ = prepare_dataset(["chats"], data_config(tmp_path), qwen)
    assert changed.cache_files != first.cache_files
    assert "You are Qwen" in qwen.decode(changed[0]["input_ids"])

    shorter, _ = prepare_dataset(["chats"], data_config(tmp_path, max_length=90), chatml)
    assert shorter.cache_files != first.cache_files
    assert len(shorter) == 2 and max(shorter["length"]) == 90 < max(first["length"])

    masked, _ = prepare_dataset(["chats"], data_config(tmp_path, train_on_prompt=True), chatml)
    assert masked[0]["labels"] == masked[0]["input_ids"] != first[0]["labels"]

    # A changed data file is new raw data: never the old cache.
    write_chats(tmp_path, "chats", [*chats, GOOD])
    grown, _ = prepare_dataset(["chats"], data_config(tmp_path), chatml)
    assert len(grown) == 3


def test_worker_processes_give_the_same_data(tmp_path, tokenizer):
    rows = [[turn("user", f"What is {i} + {i}?"), turn("assistant", f"{2 * i}")] for i in range(1200)]
    write_chats(tmp_path, "chats", rows)
    serial, _ = prepare_dataset(["chats"], data_config(tmp_path), tokenizer)
    write_chats(tmp_path / "copy", "chats", rows)
    parallel, _ = prepare_dataset(["chats"], data_config(tmp_path / "copy", preprocessing_num_workers=2), tokenizer)
    assert serial["input_ids"] == parallel["input_ids"]
    assert serial["labels"] == parallel["labels"]


def test_shipped_converters_prepare(tokenizer):
    shipped = Path(__file__).resolve().parent.parent / "data"
    entries = json.loads((shipped / "dataset_info.json").read_text())
    names = [n for n, e in entries.items() if "file_name" in e and not e.get("ranking")]
    config = DataConfig(dataset=names, dataset_dir=str(shipped), max_length=512)
    dataset, stats = prepare_dataset(names, config, tokenizer)
    assert not stats.dropped
    assert len(dataset) == stats.rows
    ranking = [n for n, e in entries.items() if e.get("ranking")]  # the preference pairs, as stage dpo reads them
    pairs, pair_stats = prepare_pairs(ranking, DataConfig(dataset=ranking, dataset_dir=str(shipped)), tokenizer)
    assert not pair_stats.dropped and len(pairs) == pair_stats.rows == 528
