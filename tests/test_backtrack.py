"""Loss masks the data controls (training: false, training_detail) and backtrack training: masked SFT labels,
backtrack position ids, exact attention with rewound positions, the loss of a step, and the shipped demo.

The references here work from character offsets: each error's characters are known where the chat is built, and
a token is an error when its characters overlap one — not the implementation's rule (the k tokens before a run of
k backtracks), which the data agree with only when every error is exactly the tokens it takes back.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, read_metrics, run_sft, write_chats
from transformers import AutoModelForCausalLM, AutoTokenizer
from vendor import load_vendor_tokenizer

from llmhalluc.data import IGNORE_INDEX, apply_backtracks, backtrack_positions, tokenize_chat
from llmhalluc.data.batching import PackedCollator, PaddedCollator, PaddingFreeCollator
from llmhalluc.data.chat import backtrack_id_of
from llmhalluc.data.labels import TokenizeOptions, label_tokens
from llmhalluc.data.spans import render_with_assistant_spans
from llmhalluc.data.template import stop_ids
from llmhalluc.models.attention import PACKED_SDPA, use_packed_sdpa
from llmhalluc.models.tiny import build_tokenizer
from llmhalluc.train.loss import model_inputs

BT = "<|BACKTRACK|>"


def test_apply_backtracks_on_hand_made_cases():
    b = 0
    assert apply_backtracks([], b) == []
    assert apply_backtracks([b], b) == []  # nothing to delete
    assert apply_backtracks([5, b, b, b], b) == []  # more backtracks than tokens
    assert apply_backtracks([5, 6, b, 7], b) == [5, 7]
    assert apply_backtracks([5, 6, b, 8, b, b, 9], b) == [9]  # a later run reaches past an earlier correction
    assert apply_backtracks([b, 5, 6, 7, b, b, 8], b) == [5, 8]


def reference_positions(ids: list[int], backtrack_id: int) -> list[int]:
    """The issue's definition, written out: depth counts surviving tokens; a backtrack sits one after the
    previous position and then removes one from the depth."""
    out, depth, previous = [], 0, -1
    for token in ids:
        if token == backtrack_id:
            out.append(previous + 1)
            depth = max(depth - 1, 0)
        else:
            out.append(depth)
            depth += 1
        previous = out[-1]
    return out


def test_backtrack_positions_follow_the_text_after_deletions():
    b = 9
    assert backtrack_positions([1, 1, 1, 1, 1, b, b, 1, 1], b) == [0, 1, 2, 3, 4, 5, 6, 3, 4]
    for ids in ([b, b, 1, 1], [1, b, b, b, 1], [1, 2, b, 3, b, b, 4, 5]):
        assert backtrack_positions(ids, b) == reference_positions(ids, b)


def with_backtrack(tokenizer):
    tokenizer.add_special_tokens({"extra_special_tokens": [BT]}, replace_extra_special_tokens=False)
    return tokenizer


class Content:
    """Assistant content built from pieces, remembering where the errors are (character offsets)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.errors: list[tuple[int, int]] = []

    def add(self, text: str) -> Content:
        self.text += text
        return self

    def error(self, text: str, tokens: int) -> Content:
        """An error and as many backtracks as it has tokens (checked: the data's contract)."""
        assert len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens, text
        self.errors.append((len(self.text), len(self.text) + len(text)))
        self.text += text + BT * tokens
        return self


def reference_labels(tokenizer, messages: list[dict], contents: dict[int, Content], **kwargs) -> list[int]:
    """Plain labels, then -100 on every token overlapping an error's characters."""
    plain = tokenize_chat(tokenizer, messages, **kwargs)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    errors, cursor = [], 0
    for _, content in sorted(contents.items()):
        start = text.index(content.text, cursor)
        errors += [(start + a, start + b) for a, b in content.errors]
        cursor = start + len(content.text)
    labels = list(plain["labels"])
    for index, (begin, end) in enumerate(encoded["offset_mapping"][: len(labels)]):
        if any(begin < b and a < end for a, b in errors):
            labels[index] = IGNORE_INDEX
    return labels


ERRORS = [" apples", " 12", " 9 9 9", " 1 2 3 4 5", " 91 82 73 64 55 46 37 28 19 10"]


def error_with(tokenizer, tokens: int) -> str:
    """An error text that is exactly `tokens` tokens of this tokenizer."""
    return next(e for e in ERRORS if len(tokenizer(e, add_special_tokens=False)["input_ids"]) == tokens)


def chats(tokenizer) -> dict[str, tuple[list[dict], dict[int, Content]]]:
    """Chats with runs of 1, 3 and 10 backtracks, several runs in a turn, a run at the very start of the content
    (nothing of the turn before it: clamped), and two turns."""
    one, three, ten = (error_with(tokenizer, k) for k in (1, 3, 10))
    single = Content(tokenizer).add("So 3 + 4 =").error(one, 1).add(" 7.\n#### 7")
    triple = Content(tokenizer).add("The sum is").error(three, 3).add(" 7.")
    several = Content(tokenizer).add("First =").error(one, 1).add(" 6, then =").error(ten, 10)
    several = several.add(" 12.\n####").error(three, 3).add(" 12")
    start = Content(tokenizer).add(BT + BT + "Answer: 4.")  # backtracks with nothing of the turn before them
    user = {"role": "user", "content": "Solve it."}
    return {
        "single": ([user, {"role": "assistant", "content": single.text}], {1: single}),
        "three": ([user, {"role": "assistant", "content": triple.text}], {1: triple}),
        "several": ([user, {"role": "assistant", "content": several.text}], {1: several}),
        "start": ([user, {"role": "assistant", "content": start.text}], {1: start}),
        "two_turns": (
            [user, {"role": "assistant", "content": triple.text}, user, {"role": "assistant", "content": several.text}],
            {1: triple, 3: several},
        ),
    }


TOKENIZERS = {
    "tiny": lambda: with_backtrack(build_tokenizer("chatml")),
    "qwen3": lambda: with_backtrack(load_vendor_tokenizer("qwen3", "qwen2_5")),
}


@pytest.mark.parametrize("which", sorted(TOKENIZERS))
def test_masked_labels_equal_the_character_offset_reference(which):
    tokenizer = TOKENIZERS[which]()
    for name, (messages, contents) in chats(tokenizer).items():
        masked = tokenize_chat(tokenizer, messages, backtrack_token=BT, mask_backtracked=True)
        assert masked["labels"] == reference_labels(tokenizer, messages, contents), name
        plain = tokenize_chat(tokenizer, messages, backtrack_token=BT)  # plain SFT: the other arm
        assert plain["labels"] == tokenize_chat(tokenizer, messages)["labels"], name
    messages, contents = chats(tokenizer)["two_turns"]
    last = tokenize_chat(tokenizer, messages, mask_history=True, backtrack_token=BT, mask_backtracked=True)
    assert last["labels"] == reference_labels(tokenizer, messages, {3: contents[3]}, mask_history=True)
    full = tokenize_chat(tokenizer, messages, backtrack_token=BT, mask_backtracked=True)
    bt = tokenizer.convert_tokens_to_ids(BT)
    inside_run = [i for i, t in enumerate(full["input_ids"]) if t == bt][-5]  # truncation through a 10-token run
    cut = tokenize_chat(tokenizer, messages, max_length=inside_run, backtrack_token=BT, mask_backtracked=True)
    assert cut["labels"] == full["labels"][:inside_run]


def test_backtrack_statistics_count_runs_masked_and_clamped_tokens():
    tokenizer = TOKENIZERS["tiny"]()
    options = TokenizeOptions(backtrack_id=backtrack_id_of(tokenizer, BT), mask_backtracked=True)
    counts = {}
    for name, (messages, contents) in chats(tokenizer).items():
        text, spans = render_with_assistant_spans(tokenizer, messages)
        encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
        stats = label_tokens(text, encoding, spans, messages, options, stop_ids(tokenizer)).backtrack
        counts[name] = (stats.runs, stats.tokens, stats.masked, stats.clamped)
        errors = sum(len(c.errors) for c in contents.values())
        assert stats.runs == errors + (1 if name == "start" else 0), name
    assert counts["start"] == (1, 2, 0, 1)  # two backtracks, nothing of the turn before them: clamped, counted
    assert counts["single"][1] == counts["single"][2] == 1
    assert counts["several"][2] == counts["several"][1] == 14  # 1 + 10 + 3 tokens taken back


def test_training_false_turns_and_training_detail_spans_are_untrained_exactly():
    tokenizer = build_tokenizer("chatml")
    answer = "The total is 12 apples, I think."
    messages = [
        {"role": "user", "content": "Count them."},
        {"role": "assistant", "content": "Context only.", "training": False},
        {"role": "user", "content": "Again?"},
        {
            "role": "assistant",
            "content": answer,
            "training_detail": [
                {"begin_offset": 13, "end_offset": 14, "train": False},  # "12", end inclusive
                {"begin_offset": 22, "end_offset": 31, "train": False},  # " I think."
                {"begin_offset": 0, "end_offset": 3, "train": True},
            ],
        },
    ]
    out = tokenize_chat(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    plain = tokenize_chat(tokenizer, [{k: v for k, v in m.items() if k == "role" or k == "content"} for m in messages])
    first = text.index("Context only.")
    first_end = text.index("<|im_end|>", first) + len("<|im_end|>")  # the turn's end-of-turn follows its flag
    start = text.index(answer)
    untrained = [(first, first_end), (start + 13, start + 15), (start + 22, start + 32)]
    expected = [
        IGNORE_INDEX if any(b < e2 and b2 < e for b2, e2 in untrained) else label
        for label, (b, e) in zip(plain["labels"], encoded["offset_mapping"])
    ]
    assert out["labels"] == expected
    trained = tokenizer.decode([t for t in out["labels"] if t != IGNORE_INDEX])
    assert "Context only" not in trained and "12" not in trained and "think" not in trained
    assert trained.startswith("The total is") and trained.endswith("<|im_end|>")


# --- rewound positions: attention stays inside each example whatever the layout ---------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager", PACKED_SDPA])
def test_logits_with_rewound_positions_are_the_same_padded_padding_free_and_packed(tiny_model_dir, attention):
    tokenizer = with_backtrack(AutoTokenizer.from_pretrained(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="sdpa" if attention == PACKED_SDPA else attention
    )
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if attention == PACKED_SDPA:
        use_packed_sdpa(model)
    model.eval()
    examples = []
    for messages, _ in chats(tokenizer).values():
        example = tokenize_chat(tokenizer, messages, backtrack_token=BT, backtrack_position_ids=True)
        assert example["position_ids"] == reference_positions(example["input_ids"], tokenizer.convert_tokens_to_ids(BT))
        examples.append(example)
    with torch.no_grad():
        # Alone, with an explicit mask: without one (and without a cache) transformers would take every rewind of
        # the positions for the start of another sequence.
        alone = [
            model(
                input_ids=torch.tensor([e["input_ids"]]),
                position_ids=torch.tensor([e["position_ids"]]),
                attention_mask=torch.ones(1, len(e["input_ids"]), dtype=torch.long),
                use_cache=False,
            ).logits[0]
            for e in examples
        ]
        layouts = {
            "padded": (PaddedCollator(0)(examples), [[e] for e in examples]),
            "padded, one": (PaddedCollator(0)(examples[:1]), [examples[:1]]),
            "padding-free": (PaddingFreeCollator(0)(examples), [examples]),
            "padding-free, one": (PaddingFreeCollator(0)(examples[:1]), [examples[:1]]),
            "packed": (
                PackedCollator(0, pad_to_multiple_of=32)([examples[:2], examples[2:]]),
                [examples[:2], examples[2:]],
            ),
        }
        for name, (batch, rows) in layouts.items():
            logits = model(**model_inputs(batch, model.config), use_cache=False).logits
            index = 0
            for r, row in enumerate(rows):
                start = 0
                for example in row:
                    n = len(example["input_ids"])
                    torch.testing.assert_close(
                        logits[r, start : start + n], alone[index], atol=1e-5, rtol=1e-5, msg=name
                    )
                    start += n
                    index += 1


# --- launched runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_masked_step_has_the_loss_of_the_reference_labels(tmp_path, tiny_model_dir):
    tokenizer = with_backtrack(AutoTokenizer.from_pretrained(tiny_model_dir))
    built = chats(tokenizer)
    write_chats(tmp_path / "data", "bt", [messages for messages, _ in built.values()])
    out = tmp_path / "out"
    run_sft(
        [
            "configs/demo_backtrack.yaml",
            f"model_name_or_path={tiny_model_dir}",
            "dataset=bt",
            f"dataset_dir={tmp_path / 'data'}",
            "eval_dataset=[]",
            "eval_steps=",
            "save_steps=",
            f"per_device_train_batch_size={len(built)}",
            "max_steps=1",
            "logging_steps=1",
            f"output_dir={out}",
        ]
    )
    (row,) = [r for r in read_metrics(out) if "loss" in r]
    # Reference: the model as the run initialised it (the new row from the saved tokenizer's id: noise_init, seed
    # 42), full logits, the character-offset labels.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from llmhalluc.config import load_config
    from llmhalluc.models.tokens import add_tokens, embed_new_tokens

    config = load_config(REPO / "configs" / "demo_backtrack.yaml", [f"model_name_or_path={tiny_model_dir}"])
    reference_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    embed_new_tokens(model, reference_tokenizer, add_tokens(reference_tokenizer, config), seed=config.training.seed)
    ce, count = 0.0, 0
    with torch.no_grad():
        for messages, contents in built.values():
            labels = torch.tensor(reference_labels(reference_tokenizer, messages, contents))
            ids = torch.tensor([tokenize_chat(reference_tokenizer, messages)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            ce += torch.nn.functional.cross_entropy(logits, labels[1:], reduction="sum").item()
            count += int((labels[1:] != IGNORE_INDEX).sum())
    assert row["loss"] == pytest.approx(ce / count, rel=1e-5)
    assert row["trained_tokens"] == count
    summary = json.loads((out / "run_summary.json").read_text())["train_data"]["backtrack"]
    assert summary["clamped"] == 1 and summary["masked"] == summary["tokens"] - 2  # all but the clamped run's two
    assert math.isfinite(row["grad_norm"])


@pytest.mark.slow
def test_the_backtrack_demo_trains_under_zero3_and_keeps_its_token(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = run_sft(
        [
            "configs/demo_backtrack.yaml",
            f"model_name_or_path={tiny_model_dir}",
            "max_steps=8",
            "eval_steps=8",
            "save_steps=",
            "per_device_train_batch_size=4",
            "per_device_eval_batch_size=8",
            f"output_dir={out}",
        ],
        accelerate_config="cpu_zero3.yaml",
    )
    assert (
        "train: backtracks examples_with_backtracks=359, runs=481, tokens=822, masked=822, clamped=0" in result.stdout
    )
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["status"] == "finished"
    assert summary["new_tokens"]["added"] == [{"token": BT, "id": 761, "special": True}]
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(BT) == 761 and BT in tokenizer.all_special_tokens
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == 762
