"""tokenize_chat: exact assistant-only masks for built-in and real vendor templates, checked against an
independent reference: the trained text must be each assistant turn's content plus its end-of-turn token, in order,
and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trl

from llmhalluc.data import IGNORE_INDEX, tokenize_chat
from llmhalluc.data.template import has_generation_markers
from llmhalluc.data.templates import BUILTIN_TEMPLATES, read_builtin_template
from llmhalluc.errors import TemplateError
from llmhalluc.models.tiny import TEMPLATE_TOKENS, build_tokenizer

VENDOR_DIR = Path(trl.__file__).parent / "chat_templates"

SYSTEM = {"role": "system", "content": "You are a careful tutor."}
SINGLE = [
    {"role": "user", "content": "Tom has 3 apples and gets 4 more. How many?"},
    {"role": "assistant", "content": "3 + 4 = 7.\n#### 7"},
]
MULTI = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4.\n#### 4"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8.\n#### 8"},
    {"role": "user", "content": "Sara has some cards. How many?"},
    {"role": "assistant", "content": "  The problem does not say. I don't know.  "},
]
CHATS = {
    "single": SINGLE,
    "single+system": [SYSTEM, *SINGLE],
    "multi": MULTI,
    "multi+system": [SYSTEM, *MULTI],
}

# The reference: what each template family makes the assistant generate for a turn with content c, written by
# hand from the vendors' formats (not derived from any template): (prefix, strip content?, end-of-turn).
GENERATED = {
    "chatml": ("", False, "<|im_end|>"),
    "qwen": ("", False, "<|im_end|>"),
    "qwen3": ("", False, "<|im_end|>"),
    "qwen3_nothink": ("", False, "<|im_end|>"),
    "llama3": ("", True, "<|eot_id|>"),
    "mistral": (" ", False, "</s>"),
    "gemma": ("", True, "<end_of_turn>"),
    "phi3": ("", False, "<|end|>"),
}
# Vendor templates as shipped (no generation markers), paired with the tiny tokenizer of their family.
VENDOR = {
    "llama3_1": "llama3",
    "llama3_2": "llama3",
    "qwen2_5": "qwen",
    "qwen3": "qwen",
    "qwen3_instruct_2507": "qwen",
    "gemma": "gemma",
    "gemma3": "gemma",
    "phi3": "phi3",
    "phi3_5": "phi3",
}


def trained_segments(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded maximal runs of trained tokens."""
    segments, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            segments.append(run)
            run = []
    if run:
        segments.append(run)
    return [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in segments]


def expected_segments(family: str, messages: list[dict], vendor: str | None = None) -> list[str]:
    prefix, strip, end = GENERATED[family]
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    segments = [prefix + (c.strip() if strip else c) + end for c in contents]
    if vendor == "qwen3":  # Qwen3 renders an empty reasoning block in the final turn, which the model generates
        segments[-1] = "<think>\n\n</think>\n\n" + segments[-1]
    return segments


def tokenizer_with(family: str, template: str):
    tokenizer = build_tokenizer(family)
    tokenizer.chat_template = template
    return tokenizer


def without_markers(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def assert_inference_ids(tokenizer, messages, ids):
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chat_name", sorted(CHATS))
@pytest.mark.parametrize("family", BUILTIN_TEMPLATES)
@pytest.mark.parametrize("markers", [True, False], ids=["markers", "inferred"])
def test_builtin_templates_train_exactly_the_assistant(family, chat_name, markers):
    template = read_builtin_template(family)
    tokenizer = tokenizer_with(family, template if markers else without_markers(template))
    messages = CHATS[chat_name]
    out = tokenize_chat(tokenizer, messages)
    assert_inference_ids(tokenizer, messages, out["input_ids"])
    assert trained_segments(tokenizer, out["input_ids"], out["labels"]) == expected_segments(family, messages)
    untrained = [i for i, label in zip(out["input_ids"], out["labels"]) if label == IGNORE_INDEX]
    assert len(untrained) + sum(label != IGNORE_INDEX for label in out["labels"]) == len(out["input_ids"])


@pytest.mark.parametrize("family", BUILTIN_TEMPLATES)
@pytest.mark.parametrize("markers", [True, False], ids=["markers", "inferred"])
def test_builtin_templates_refuse_tool_calls_they_would_drop(family, markers):
    # The built-in templates render content only: a tool-call turn would train as an empty turn.
    template = read_builtin_template(family)
    tokenizer = tokenizer_with(family, template if markers else without_markers(template))
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    with pytest.raises(TemplateError, match=r"assistant turn 1: the chat template does not render its tool call"):
        tokenize_chat(tokenizer, messages)


@pytest.mark.parametrize("chat_name", sorted(CHATS))
@pytest.mark.parametrize("vendor", sorted(VENDOR))
def test_vendor_templates_without_markers(vendor, chat_name):
    family = VENDOR[vendor]
    messages = CHATS[chat_name]
    if vendor == "gemma" and messages[0]["role"] == "system":
        tokenizer = tokenizer_with(family, (VENDOR_DIR / f"{vendor}.jinja").read_text())
        with pytest.raises(Exception, match="System role not supported"):
            tokenize_chat(tokenizer, messages)
        return
    tokenizer = tokenizer_with(family, (VENDOR_DIR / f"{vendor}.jinja").read_text())
    assert not has_generation_markers(tokenizer.chat_template)
    out = tokenize_chat(tokenizer, messages)
    assert_inference_ids(tokenizer, messages, out["input_ids"])
    assert trained_segments(tokenizer, out["input_ids"], out["labels"]) == expected_segments(family, messages, vendor)


def test_phi3_end_of_chat_eos_is_not_trained():
    tokenizer = tokenizer_with("phi3", (VENDOR_DIR / "phi3.jinja").read_text())
    out = tokenize_chat(tokenizer, SINGLE)
    assert out["input_ids"][-1] == tokenizer.eos_token_id  # the template appends eos after the last turn
    assert out["labels"][-1] == IGNORE_INDEX
    assert trained_segments(tokenizer, out["input_ids"], out["labels"]) == ["3 + 4 = 7.\n#### 7<|end|>"]


def test_qwen3_drops_earlier_reasoning_so_only_mask_history_trains_it():
    tokenizer = tokenizer_with("qwen", (VENDOR_DIR / "qwen3.jinja").read_text())
    messages = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>two twos</think>\n\n2 + 2 = 4."},
        {"role": "user", "content": "3 + 3?"},
        {"role": "assistant", "content": "3 + 3 = 6."},
    ]
    with pytest.raises(TemplateError, match="assistant turn 1: the chat template drops part of it"):
        tokenize_chat(tokenizer, messages)
    out = tokenize_chat(tokenizer, messages, mask_history=True)
    assert "two twos" not in tokenizer.decode(out["input_ids"])
    assert trained_segments(tokenizer, out["input_ids"], out["labels"]) == [
        "<think>\n\n</think>\n\n3 + 3 = 6.<|im_end|>"
    ]


def test_qwen3_reasoning_in_the_final_turn_is_trained_as_rendered_with_or_without_markers():
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>twos</think>4"}]
    for template in ("qwen3", "qwen3_training"):
        tokenizer = tokenizer_with("qwen", (VENDOR_DIR / f"{template}.jinja").read_text())
        out = tokenize_chat(tokenizer, messages)
        (segment,) = trained_segments(tokenizer, out["input_ids"], out["labels"])
        # trl's training template also marks the newline after <|im_end|>: markers are the template's word.
        assert segment.startswith("<think>\ntwos\n</think>\n\n4<|im_end|>"), template


def test_templates_with_several_marked_blocks_per_turn():
    # TRL's Phi-3 training template marks the end-of-chat eos as a block of its own.
    tokenizer = tokenizer_with("phi3", (VENDOR_DIR / "phi3_training.jinja").read_text())
    out = tokenize_chat(tokenizer, MULTI)
    segments = trained_segments(tokenizer, out["input_ids"], out["labels"])
    assert segments[-1].endswith("<|end|>\n<|endoftext|>")
    history = tokenize_chat(tokenizer, MULTI, mask_history=True)
    assert trained_segments(tokenizer, history["input_ids"], history["labels"]) == [segments[-1]]


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma"])
@pytest.mark.parametrize("markers", [True, False], ids=["markers", "inferred"])
def test_mask_history_trains_only_the_last_turn(family, markers):
    template = read_builtin_template(family)
    tokenizer = tokenizer_with(family, template if markers else without_markers(template))
    out = tokenize_chat(tokenizer, MULTI, mask_history=True)
    assert trained_segments(tokenizer, out["input_ids"], out["labels"]) == expected_segments(family, MULTI)[-1:]


def test_train_on_prompt_trains_every_token(tokenizer):
    out = tokenize_chat(tokenizer, [SYSTEM, *MULTI], train_on_prompt=True)
    assert out["labels"] == out["input_ids"]


def test_max_length_truncates_the_end(tokenizer):
    full = tokenize_chat(tokenizer, MULTI)
    cut = tokenize_chat(tokenizer, MULTI, max_length=20)
    assert cut["input_ids"] == full["input_ids"][:20]
    assert cut["labels"] == full["labels"][:20]


def test_tiny_model_template_with_the_tokenizer_it_ships(tokenizer):
    out = tokenize_chat(tokenizer, [SYSTEM, *MULTI])
    assert_inference_ids(tokenizer, [SYSTEM, *MULTI], out["input_ids"])
    assert trained_segments(tokenizer, out["input_ids"], out["labels"]) == expected_segments("chatml", MULTI)


def test_every_builtin_family_has_tiny_tokens():
    assert set(BUILTIN_TEMPLATES) == set(TEMPLATE_TOKENS) == set(GENERATED)


def test_template_that_is_not_prefix_stable_fails_loudly():
    # Numbers every turn out of the total: the prompt before a turn renders differently from the whole chat.
    template = (
        "{% for m in messages %}[{{ loop.index }}/{{ messages|length }} {{ m['role'] }}]{{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}[{{ messages|length + 1 }}/{{ messages|length + 1 }} assistant]"
        "{% endif %}"
    )
    with pytest.raises(TemplateError, match="not prefix-stable at turn 1"):
        tokenize_chat(tokenizer_with("chatml", template), SINGLE)


def test_template_that_drops_the_content_fails_loudly():
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' %}{{ m['content'] }}"
        "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="renders the content of turn 1 0 times"):
        tokenize_chat(tokenizer_with("chatml", template), SINGLE)


def test_template_without_an_end_of_turn_token_fails_loudly():
    template = (
        "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant:\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="no end-of-turn token to train"):
        tokenize_chat(tokenizer_with("chatml", template), SINGLE)


def test_markers_that_miss_the_content_fail_loudly():
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{% generation %}<|im_end|>{% endgeneration %}{% else %}<|im_end|>"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="content is not inside the text marked for training"):
        tokenize_chat(tokenizer_with("chatml", template), SINGLE)


def test_chat_starting_with_the_assistant_fails_loudly(tokenizer):
    tokenizer = tokenizer_with("chatml", without_markers(read_builtin_template("chatml")))
    with pytest.raises(TemplateError, match="starts with an assistant turn"):
        tokenize_chat(tokenizer, [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}])


def test_tokenizer_without_template_is_named():
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template: set `template`"):
        tokenize_chat(tokenizer, SINGLE)
