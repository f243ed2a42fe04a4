"""The researchers' own data, templates and tokens carry over: a Llama-3 reserved token reused as the backtrack token
through an alias (real Llama-3 tokenizer, full and LoRA fine-tuning), registry entries as they write them, and
backtrack data generated with exact error spans, masked exactly under the tiny, Qwen3 and Llama-3 tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_sft, write_chats
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from vendor import load_vendor_tokenizer

from llmhalluc.config import build_config
from llmhalluc.data.backtrack_augment import augment_rows
from llmhalluc.data.converters import ConvertOptions, to_chat
from llmhalluc.data.labels import IGNORE_INDEX
from llmhalluc.data.pipeline import prepare_dataset
from llmhalluc.data.registry import load_rows
from llmhalluc.data.templates import read_builtin_template
from llmhalluc.errors import DataError, UserError
from llmhalluc.models.tiny import build_tokenizer

pytestmark = pytest.mark.slow  # real 128k-151k-token tokenizers and training runs
RESERVED = "<|reserved_special_token_0|>"
BACKTRACK = "<|BACKTRACK|>"
# The researchers' token config, as they write it (llmhalluc/extras/constant.py of their code: description,
# semantic_words, description_weight).
TOKEN_CONFIG = {
    RESERVED: {
        "description": "This token is used to delete the previous token in the response.",
        "semantic_words": ["delete", "remove", "undo", "erase", "back", "cancel", "retry", "revert", "reset"],
        "description_weight": 0.5,
    }
}


def backtrack_chats(count: int) -> list[list[dict]]:
    lines = (REPO / "data" / "demo_backtrack.jsonl").read_text().splitlines()
    return [json.loads(line)["messages"] for line in lines if BACKTRACK in line][:count]


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> dict:
    """A tiny random Llama with Meta's Llama-3 tokenizer (128,256 tokens, the llama3 built-in template), whose
    reserved token's row is zero as in the released model; data written with the literal <|BACKTRACK|>."""
    root = tmp_path_factory.mktemp("llama3")
    tokenizer = load_vendor_tokenizer("llama3_1", "config")
    tokenizer.chat_template = read_builtin_template("llama3")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(RESERVED)] = 0
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_chats(root / "data", "bt", backtrack_chats(16))
    (root / "tokens.yaml").write_text(yaml.safe_dump(TOKEN_CONFIG))
    args = [
        "configs/demo.yaml",
        f"model_name_or_path={root / 'model'}",
        "dataset=bt",
        f"dataset_dir={root / 'data'}",
        "eval_dataset=[]",
        "eval_steps=",
        "save_steps=",
        "max_length=256",
        "max_steps=3",
        "per_device_train_batch_size=4",
        "learning_rate=1e-2",
        "logging_steps=1",
        f"backtrack_token={BACKTRACK}",
        f"token_aliases={{'{BACKTRACK}': '{RESERVED}'}}",
        "mask_backtracked=true",
        "init_special_tokens=combined",
        f"new_special_tokens_config={root / 'tokens.yaml'}",
    ]
    return {"root": root, "args": args, "reserved": tokenizer.convert_tokens_to_ids(RESERVED)}


def initial_row(model_dir: Path, reserved: int) -> torch.Tensor:
    """The reserved token's row as the run initialises it (combined, seed 42), computed here from the base rows."""
    base = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    entry = TOKEN_CONFIG[RESERVED]
    described = base[tokenizer(entry["description"], add_special_tokens=False)["input_ids"]].mean(dim=0)
    words = [i for w in entry["semantic_words"] for i in tokenizer(w, add_special_tokens=False)["input_ids"]]
    worded = base[list(dict.fromkeys(words))].mean(dim=0)
    noise = torch.randn(1, base.shape[1], generator=torch.Generator().manual_seed(42))[0] / base.shape[1] ** 0.5
    return 0.5 * described + 0.5 * worded + noise


@pytest.mark.parametrize("finetuning", ["full", "lora", "lora-frozen-rows"])
def test_a_reserved_token_reused_through_an_alias_is_initialised_trained_saved_and_reloaded(llama3, finetuning):
    from llmhalluc import load_pretrained

    out = llama3["root"] / finetuning
    extra = {
        "full": [],
        "lora": ["finetuning_type=lora"],
        "lora-frozen-rows": ["finetuning_type=lora", "freeze_new_token_rows=true"],
    }
    result = run_sft([*llama3["args"], *extra[finetuning], f"output_dir={out}"])
    summary = json.loads((out / "run_summary.json").read_text())
    reserved = llama3["reserved"]
    assert summary["new_tokens"]["reused"] == {RESERVED: reserved} and summary["new_tokens"]["added"] == []
    assert summary["train_data"]["backtrack"]["runs"] > 0  # the alias in the data became the token
    assert "masked" in result.stdout
    model, tokenizer = load_pretrained(out)
    assert len(tokenizer) == 128256  # nothing was added
    row = model.get_input_embeddings().weight[reserved].detach()
    start = initial_row(llama3["root"] / "model", reserved)
    if finetuning == "lora-frozen-rows":
        torch.testing.assert_close(row, start, atol=1e-6, rtol=0)  # kept as initialised, and saved so
    else:
        assert (row - start).abs().max() > 1e-3  # trained
        assert row.abs().max() > 0


def test_data_that_writes_the_token_another_way_is_refused_naming_the_dataset(llama3, tmp_path):
    args = [a for a in llama3["args"] if not a.startswith(("token_aliases", "backtrack_token"))]
    result = run_sft([*args, f"backtrack_token={RESERVED}", f"output_dir={tmp_path / 'out'}"], expect_code=2)
    assert "dataset 'bt': not one '<|reserved_special_token_0|>' in its assistant turns" in result.stderr
    assert "token_aliases" in result.stderr


def test_a_backtrack_token_the_tokenizer_does_not_read_as_one_token_is_refused_naming_the_row(tmp_path):
    from tokenizers import AddedToken

    tokenizer = build_tokenizer("chatml")
    # single_word: the token is read only between word boundaries, so "6<|BT|>" splits it into pieces.
    tokenizer.add_special_tokens({"extra_special_tokens": [AddedToken("<|BT|>", single_word=True, special=True)]})
    chats = [
        [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 6 <|BT|> 5"}],
        [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 5<|BT|> 4"}],
    ]
    write_chats(tmp_path, "odd", chats)
    data = build_config(
        {
            "model_name_or_path": "m",
            "dataset": "odd",
            "dataset_dir": str(tmp_path),
            "output_dir": "o",
            "backtrack_token": "<|BT|>",
            "mask_backtracked": True,
        }
    ).data
    with pytest.raises(DataError, match=r"dataset 'odd': row 1: the backtrack token '<\|BT\|>' is written 1 times"):
        prepare_dataset(["odd"], data, tokenizer)


# --- registry entries and templates as the researchers write them ----------------------------------------------


def test_an_entry_written_as_the_researchers_write_it(tmp_path):
    instruction = "Let's think step by step. Put your final answer at the end with 'The answer is: .'"
    (tmp_path / "instructions.json").write_text(json.dumps({"math": instruction}))
    entry = {
        "file_name": "gsm8k.jsonl",
        "formatting": "alpaca",
        "converter": "gsm8k",
        "columns": {"prompt": "math", "query": "query", "response": "response"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps({"gsm8k_train": entry}))
    rows = [
        {"query": "Tom has 3 apples and gets 15 more. How many?", "response": "3 + 15 = 18.\nThe answer is: 18"},
        {"query": "Ann has 4 pens and loses 1. How many?", "response": "4 - 1 = 3.\n#### 3"},
    ]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec, raw = load_rows("gsm8k_train", tmp_path)
    chats = [to_chat(row, spec, ConvertOptions()) for row in raw]
    # The instruction follows the question in the user turn (the researchers' order); the answer is kept as written.
    assert chats[0] == [
        {"role": "user", "content": rows[0]["query"] + "\n" + instruction},
        {"role": "assistant", "content": rows[0]["response"]},
    ]
    config = build_config(
        {"model_name_or_path": "m", "dataset": "gsm8k_train", "dataset_dir": str(tmp_path), "output_dir": "o"}
    )
    tokenizer = load_vendor_tokenizer("qwen3", "qwen3")
    tokenizer.chat_template = read_builtin_template("qwen3_nothink")  # template: qwen3_nothink, as they set it
    dataset, stats = prepare_dataset(["gsm8k_train"], config.data, tokenizer)
    assert stats.examples == 2 and not stats.dropped
    trained = tokenizer.decode([t for t in dataset[0]["labels"] if t != IGNORE_INDEX])
    assert trained == rows[0]["response"] + "<|im_end|>"  # not the given <think></think> block, not a header
    # A name that is neither a column nor an instruction is named; an unknown template lists the valid ones.
    entry["columns"]["prompt"] = "maths"
    (tmp_path / "dataset_info.json").write_text(json.dumps({"gsm8k_train": entry}))
    with pytest.raises(
        DataError, match=r"columns.prompt names column 'maths', which the data lacks.*instructions.json"
    ):
        load_rows("gsm8k_train", tmp_path)
    from llmhalluc.models.loading import resolve_template

    with pytest.raises(UserError, match=r"unknown template 'qwen4'; built-in: .*qwen3, qwen3_nothink"):
        resolve_template("qwen4")


# --- backtrack data generation -----------------------------------------------------------------------------


def tokenizer_named(name: str):
    """A tokenizer of the test matrix, with <|BACKTRACK|> added as a special token when it lacks it."""
    tokenizer = {
        "tiny": lambda: build_tokenizer("chatml"),
        "qwen3": lambda: load_vendor_tokenizer("qwen3", "qwen3"),
        "llama3": lambda: load_vendor_tokenizer("llama3_1", "llama3_1"),
    }[name]()
    if BACKTRACK not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [BACKTRACK]}, replace_extra_special_tokens=False)
    return tokenizer


@pytest.fixture(scope="module")
def generated() -> dict[str, list[dict]]:
    """Backtrack rows made from the same 24 demo chats with each tokenizer (2 error tokens at 10% of the positions)."""
    lines = (REPO / "data" / "demo_train.jsonl").read_text().splitlines()[:24]
    chats = [json.loads(line)["messages"] for line in lines]
    return {name: augment_rows(chats, tokenizer_named(name), 0.1, 2, seed=3)[0] for name in ("tiny", "qwen3", "llama3")}


def reference(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(labels, masked positions) computed here from character offsets: a token is trained when it starts inside an
    assistant answer or its end of turn and covers no recorded error character."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    qwen = "<|im_end|>" in text
    eot, header = (
        ("<|im_end|>", "<|im_start|>assistant\n") if qwen else ("<|eot_id|>", "assistant<|end_header_id|>\n\n")
    )
    spans, errors, cursor = [], [], 0
    for message in (m for m in messages if m["role"] == "assistant"):
        content = message["content"].strip()
        start = text.index(content, cursor)
        # What the assistant generates starts after its header (Qwen3 renders an empty <think> block there).
        generated = text.rindex(header, cursor, start) + len(header)
        cursor = text.index(eot, start + len(content)) + len(eot)
        spans.append((generated, cursor))
        offset = message["content"].index(content)
        for d in message.get("training_detail", []):
            errors.append((start + d["begin_offset"] - offset, start + d["end_offset"] - offset + 1))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels, masked = [], []
    for position, (token, (first, last)) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        inside = any(begin <= first < end for begin, end in spans)
        on_error = any(first < e and b < last for b, e in errors)
        labels.append(token if inside and not on_error else IGNORE_INDEX)
        if inside and on_error:
            masked.append(position)
    return labels, masked


@pytest.mark.parametrize(
    ("maker", "trainer"),
    [
        ("tiny", "tiny"),
        ("qwen3", "qwen3"),
        ("llama3", "llama3"),
        ("tiny", "qwen3"),
        ("qwen3", "llama3"),
        ("llama3", "tiny"),
    ],
)
def test_generated_errors_are_masked_exactly_under_any_tokenizer(tmp_path, generated, maker, trainer):
    rows = generated[maker]
    assert sum(bool(r["messages"][-1].get("training_detail")) for r in rows) >= 20
    for row in rows:  # the answer's own text is kept, character for character, around the errors
        answer = row["messages"][-1]
        kept, cursor = [], 0
        for span in answer.get("training_detail", []):
            kept.append(answer["content"][cursor : span["begin_offset"]])
            cursor = span["end_offset"] + 1
        original = json.loads((REPO / "data" / "demo_train.jsonl").read_text().splitlines()[row["source_row"]])
        rebuilt = "".join([*kept, answer["content"][cursor:]]).replace(BACKTRACK, "")
        assert rebuilt == original["messages"][-1]["content"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"made": {"file_name": "rows.jsonl", "formatting": "openai"}})
    )
    tokenizer = tokenizer_named(trainer)
    data = build_config(
        {
            "model_name_or_path": "m",
            "dataset": "made",
            "dataset_dir": str(tmp_path),
            "output_dir": "o",
            "backtrack_token": BACKTRACK,
            "mask_backtracked": True,
            "max_length": 1024,
        }
    ).data
    dataset, stats = prepare_dataset(["made"], data, tokenizer)
    masked_total = 0
    for example, row in zip(dataset, rows):
        labels, masked = reference(tokenizer, row["messages"])
        assert example["labels"] == labels, row["source_row"]
        masked_total += len(masked)
    # The audit's count: every masked token falls on a recorded error character, as counted here.
    assert stats.masked_tokens == stats.masked_on_errors == masked_total > 0


def test_generation_is_deterministic_per_seed_and_the_command_writes_a_registry_entry(tmp_path, tiny_model_dir):
    from llmhalluc.data.backtrack_augment import main

    command = [
        "demo",
        "--dataset-dir",
        str(REPO / "data"),
        "--tokenizer",
        str(tiny_model_dir),
        "--ratio",
        "0.1",
        "--errors",
        "2",
        "--max-samples",
        "32",
    ]
    assert main([*command, "--seed", "7", "--output", str(tmp_path / "a" / "made.jsonl")]) == 0
    assert main([*command, "--seed", "7", "--output", str(tmp_path / "b" / "made.jsonl")]) == 0
    assert main([*command, "--seed", "8", "--output", str(tmp_path / "c" / "made.jsonl")]) == 0
    first = (tmp_path / "a" / "made.jsonl").read_bytes()
    assert first == (tmp_path / "b" / "made.jsonl").read_bytes() != (tmp_path / "c" / "made.jsonl").read_bytes()
    assert json.loads((tmp_path / "a" / "dataset_info.json").read_text())["made"]["formatting"] == "openai"
    # It trains with masked SFT; the mask audit in the run summary says every masked token is an error's.
    out = tmp_path / "run"
    run_sft(
        [
            "configs/demo.yaml",
            f"model_name_or_path={tiny_model_dir}",
            "dataset=made",
            f"dataset_dir={tmp_path / 'a'}",
            "eval_dataset=[]",
            "eval_steps=",
            "save_steps=",
            "max_steps=2",
            f"backtrack_token={BACKTRACK}",
            "mask_backtracked=true",
            f"output_dir={out}",
        ]
    )
    audit = json.loads((out / "run_summary.json").read_text())["mask_audit"]["datasets"]["made"]
    assert audit["masked_tokens"] == audit["masked_on_recorded_errors"] > 0
