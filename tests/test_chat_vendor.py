"""tokenize_chat on real vendor tokenizers and their own chat templates.

The reference here does not render partial chats: for each vendor it writes by hand what the assistant generates
for a turn (its content in the vendor's format, tool calls, reasoning, the end-of-turn token), finds that text in
the rendered chat right after the vendor's assistant header, and trains every token (from the tokenizer's offset
mapping) that starts inside it. Role headers that swallow whitespace (Phi-3's rstrip tokens, OLMo-2's and Qwen's BPE
merges of newlines) start before that text, so they must stay untrained.
"""

from __future__ import annotations

import copy
import functools
import json
import re

import jinja2
import pytest
from vendor import load_vendor_tokenizer, tokenizer_folder

from llmhalluc.data import IGNORE_INDEX, tokenize_chat
from llmhalluc.data.facts import token_facts
from llmhalluc.errors import TemplateError

WEATHER_CALL = {
    "id": "call12345",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
}
CHATS = {
    "single": [
        {"role": "user", "content": "Tom has 3 apples and gets 4 more. How many?"},
        {"role": "assistant", "content": "3 + 4 = 7.\n#### 7"},
    ],
    "system": [
        {"role": "system", "content": "You are a careful tutor."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
    ],
    "multi": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4.\n#### 4"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8"},
        {"role": "user", "content": "Sara has some cards. How many?"},
        {"role": "assistant", "content": "The problem does not say. I don't know."},
    ],
    "multi_system": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6!"},
    ],
    "whitespace": [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "  Hello there.\n"},
        {"role": "user", "content": "Again, on new lines."},
        {"role": "assistant", "content": "\n\nStarts with newlines.  "},
    ],
    "endings": [
        {"role": "user", "content": "A number?"},
        {"role": "assistant", "content": "The answer is 42"},
        {"role": "user", "content": "Punctuation?"},
        {"role": "assistant", "content": "Really?!"},
    ],
    "unicode": [
        {"role": "user", "content": "Écris en français, s'il te plaît."},
        {"role": "assistant", "content": "Café – naïve 日本語 🙂 ½ ≤ 3€"},
    ],
    "tools": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call12345"},
        {"role": "assistant", "content": "It is 21 °C in Paris."},
    ],
    "reasoning": [
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": "<think>\nSix sevens: 42.\n</think>\n\nIt is 42."},
    ],
}


def _tool_json_qwen(call: dict) -> str:
    function = call["function"]
    arguments = json.dumps(function["arguments"], ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n</tool_call>'


def generated_qwen(messages: list[dict], turn: int, thinking: bool) -> str:
    """Qwen2.5 / Qwen3: the content, tool calls in <tool_call> blocks, <|im_end|>; Qwen3 writes a reasoning block
    into turns after the last user message when they are last or carry reasoning."""
    message = messages[turn]
    content = message["content"]
    last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
    reasoning = ""
    if thinking and "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    if thinking and turn > last_query and (turn == len(messages) - 1 or reasoning):
        content = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
    calls = [_tool_json_qwen(call) for call in message.get("tool_calls", [])]
    if calls:
        content = (content + "\n" if content else "") + "\n".join(calls)
    return content + "<|im_end|>"


def generated_mistral(messages: list[dict], turn: int) -> str:
    """Mistral v0.3: " " + the trimmed content + </s>; tool calls as [TOOL_CALLS] [...] with their ids."""
    message = messages[turn]
    if message.get("tool_calls"):
        calls = [
            json.dumps(call["function"], ensure_ascii=False)[:-1] + f', "id": "{call["id"]}"}}'
            for call in message["tool_calls"]
        ]
        return "[TOOL_CALLS] [" + ", ".join(calls) + "]</s>"
    return " " + message["content"].strip() + "</s>"


def generated_llama3(messages: list[dict], turn: int) -> str:
    message = messages[turn]
    if message.get("tool_calls"):
        function = message["tool_calls"][0]["function"]
        arguments = json.dumps(function["arguments"], ensure_ascii=False)
        return f'{{"name": "{function["name"]}", "parameters": {arguments}}}<|eot_id|>'
    return message["content"].strip() + "<|eot_id|>"


# vendor: (tokenizer fixture, chat template, the assistant header, what a turn generates, chats its template renders)
VENDORS = {
    "qwen2_5": ("qwen3", "qwen2_5", "<|im_start|>assistant\n", lambda m, t: generated_qwen(m, t, False), set(CHATS)),
    "qwen3": ("qwen3", "qwen3", "<|im_start|>assistant\n", lambda m, t: generated_qwen(m, t, True), set(CHATS)),
    "phi3": ("phi3", "phi3", "<|assistant|>\n", lambda m, t: m[t]["content"] + "<|end|>", set(CHATS) - {"tools"}),
    "mistral_v03": ("mistral_v03", "own", "", generated_mistral, set(CHATS) - {"system", "multi_system"}),
    "olmo2": (
        "olmo2",
        "own",
        "<|assistant|>\n",
        lambda m, t: m[t]["content"] + "<|endoftext|>",
        set(CHATS) - {"tools"},
    ),
    "llama3_1": (
        "llama3_1",
        "llama3_1",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        generated_llama3,
        set(CHATS),
    ),
    "gemma3": (
        "gemma3",
        "gemma3",
        "<start_of_turn>model\n",
        lambda m, t: m[t]["content"].strip() + "<end_of_turn>",
        set(CHATS) - {"tools"},
    ),
}
CASES = [(vendor, chat) for vendor, spec in VENDORS.items() for chat in sorted(CHATS) if chat in spec[4]]


def vendor_tokenizer(vendor: str):
    fixture, template, *_ = VENDORS[vendor]
    if tokenizer_folder(fixture) is None:
        pytest.skip(f"{fixture} is not in the repository (license); set LLMHALLUC_VENDOR_TOKENIZERS to test it")
    return _loaded(fixture, template)


@functools.cache
def _loaded(fixture: str, template: str):
    return load_vendor_tokenizer(fixture, template)  # tokenize_chat never changes a tokenizer: one per session


def reference_labels(tokenizer, vendor: str, messages: list[dict], last_turn_only: bool = False) -> list[int]:
    """Labels from hand-written generations located by search, and the tokenizer's offset mapping."""
    _, _, header, generated, _ = VENDORS[vendor]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for turn in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        expected = generated(messages, turn)
        start = text.find(expected, cursor)
        assert start >= 0, f"turn {turn}: {expected!r} not in {text!r}"
        assert text[:start].endswith(header), (turn, text[:start][-40:])
        spans.append((start, start + len(expected)))
        cursor = start + len(expected)
    spans = spans[-1:] if last_turn_only else spans
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        token if any(begin <= start < end for begin, end in spans) else IGNORE_INDEX
        for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]


@pytest.mark.parametrize(("vendor", "chat"), CASES)
def test_masks_equal_the_reference(vendor, chat):
    tokenizer = vendor_tokenizer(vendor)
    messages = CHATS[chat]
    out = tokenize_chat(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert out["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert out["labels"] == reference_labels(tokenizer, vendor, messages)
    # Every trained run ends in the turn's stop token, and no special token of a header is trained.
    trained_specials = {tokenizer.convert_ids_to_tokens(t) for t in out["labels"] if t in tokenizer.all_special_ids}
    assert trained_specials <= {"<|im_end|>", "<|end|>", "</s>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"}


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_mask_history_train_on_prompt_and_truncation(vendor):
    tokenizer = vendor_tokenizer(vendor)
    messages = CHATS["multi"]
    history = tokenize_chat(tokenizer, messages, mask_history=True)
    assert history["labels"] == reference_labels(tokenizer, vendor, messages, last_turn_only=True)
    everything = tokenize_chat(tokenizer, messages, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]
    full = tokenize_chat(tokenizer, messages)
    cut = len(full["input_ids"]) * 2 // 3
    truncated = tokenize_chat(tokenizer, messages, max_length=cut)
    assert truncated["input_ids"] == full["input_ids"][:cut]
    assert truncated["labels"] == full["labels"][:cut]


def test_phi3_header_that_swallows_whitespace_stays_untrained():
    tokenizer = vendor_tokenizer("phi3")
    out = tokenize_chat(tokenizer, CHATS["whitespace"])
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    headers = [i for i, token in enumerate(out["input_ids"]) if token == assistant]
    assert len(headers) == 2 and all(out["labels"][i] == IGNORE_INDEX for i in headers)
    first_trained = next(i for i, label in enumerate(out["labels"]) if label != IGNORE_INDEX)
    assert tokenizer.convert_ids_to_tokens(out["input_ids"][first_trained]) == "▁Hello"


def test_qwen3_earlier_reasoning_fails_loudly_unless_only_the_final_turn_is_trained():
    tokenizer = vendor_tokenizer("qwen3")
    messages = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>two twos</think>\n\n2 + 2 = 4."},
        {"role": "user", "content": "3 + 3?"},
        {"role": "assistant", "content": "<think>three threes</think>\n\n3 + 3 = 6."},
    ]
    with pytest.raises(TemplateError, match="assistant turn 1: the chat template drops part of it"):
        tokenize_chat(tokenizer, messages)
    out = tokenize_chat(tokenizer, messages, mask_history=True)
    assert out["labels"] == reference_labels(tokenizer, "qwen3", messages, last_turn_only=True)
    trained = tokenizer.decode([t for t in out["labels"] if t != IGNORE_INDEX])
    assert trained == "<think>\nthree threes\n</think>\n\n3 + 3 = 6.<|im_end|>"


@pytest.mark.parametrize("chat", ["system", "multi_system"])
def test_mistral_v03_system_prompt_on_the_last_user_turn_fails_loudly_saying_why(chat):
    # The template writes the system prompt into the last user turn only: in a training render (where an assistant
    # turn follows) it is not there at all, while at inference it is.
    tokenizer = vendor_tokenizer("mistral_v03")
    with pytest.raises(TemplateError, match=r"move the system prompt onto the last user turn.*template: mistral"):
        tokenize_chat(tokenizer, CHATS[chat])


@pytest.mark.parametrize("vendor", ["phi3", "olmo2", "gemma3"])
def test_templates_without_tool_support_fail_loudly_instead_of_dropping_calls_or_results(vendor):
    # Phi-3's, OLMo-2's and Gemma-3's templates render an assistant turn's tool_calls as nothing, and Phi-3's and
    # OLMo-2's drop tool messages: training would teach an empty turn and an answer given without the tool's result.
    tokenizer = vendor_tokenizer(vendor)
    dropped_call = r"assistant turn 1: the chat template does not render its tool call 'get_weather'"
    with pytest.raises(TemplateError, match=dropped_call):
        tokenize_chat(tokenizer, CHATS["tools"][:2])
    if vendor == "gemma3":  # Gemma's template refuses the tool role itself (the pipeline names the row)
        with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
            tokenize_chat(tokenizer, CHATS["tools"])
        return
    with pytest.raises(TemplateError, match=dropped_call):
        tokenize_chat(tokenizer, CHATS["tools"])
    result_only = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "Let me look it up."},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 °C in Paris."},
    ]
    with pytest.raises(TemplateError, match=r"message 2 \(tool\): the chat template drops it"):
        tokenize_chat(tokenizer, result_only)


def test_a_template_that_appends_the_assistant_header_after_every_chat_never_trains_it():
    # The first Llama-3-Instruct template (April 2024) wrote the next assistant header after every chat, with or
    # without add_generation_prompt: trl's llama3.jinja without its add_generation_prompt guard.
    tokenizer = copy.deepcopy(load_vendor_tokenizer("llama3_1", "llama3"))
    first = re.sub(r"\{% if add_generation_prompt %\}(.*)\{% endif %\}$", r"\1", tokenizer.chat_template, flags=re.S)
    assert first != tokenizer.chat_template
    tokenizer.chat_template = first
    messages = CHATS["multi"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    out = tokenize_chat(tokenizer, messages)
    # What is trained: each assistant turn's content and its <|eot_id|>; never a header, at the end or elsewhere.
    expected = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
    trained_runs, run = [], []
    for token, label in zip(out["input_ids"], out["labels"]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            trained_runs.append(tokenizer.decode(run))
            run = []
    assert trained_runs == expected
    last_eot = max(i for i, t in enumerate(out["input_ids"]) if t == tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    assert all(label == IGNORE_INDEX for label in out["labels"][last_eot + 1 :])
    assert token_facts(tokenizer).end_of_turn_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
