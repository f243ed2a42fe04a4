"""Converters: each format's row -> chat, and every reason a row is dropped."""

from __future__ import annotations

import pytest

from llmhalluc.data.converters import CONVERTERS, ConvertOptions, DropRow, check_chat, to_chat
from llmhalluc.data.registry import DEFAULT_TAGS
from llmhalluc.data.spec import DatasetSpec

OPTIONS = ConvertOptions(abstention_answer="I don't know.")


def spec(converter: str, formatting: str = "alpaca", columns: dict | None = None, tags: dict | None = None):
    own = CONVERTERS[converter].columns
    return DatasetSpec(
        name="t",
        source="file",
        location="x",
        formatting=formatting,
        converter=converter,
        columns=columns if columns is not None else {c: c for c in own},
        tags=tags or {},
    )


def drop_reason(row: dict, dataset_spec: DatasetSpec) -> str:
    with pytest.raises(DropRow) as caught:
        to_chat(row, dataset_spec, OPTIONS)
    return caught.value.reason


def test_gsm8k_keeps_the_final_answer_line():
    row = {"question": "2+3?", "answer": "2 + 3 = 5\n#### 5"}
    assert to_chat(row, spec("gsm8k"), OPTIONS) == [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
    ]
    assert drop_reason({"question": "q", "answer": "no marker"}, spec("gsm8k")) == "answer_without_final_line"
    assert drop_reason({"question": "q", "answer": ""}, spec("gsm8k")) == "empty_assistant_turn"


def test_squad_v2_answers_or_abstains():
    answerable = {
        "context": "Ana lives in Oslo.",
        "question": "Where?",
        "answers": {"text": ["Oslo"], "answer_start": [13]},
    }
    unanswerable = {
        "context": "Ana lives in Oslo.",
        "question": "How old?",
        "answers": {"text": [], "answer_start": []},
    }
    chat = to_chat(answerable, spec("squad_v2"), OPTIONS)
    assert chat[0]["content"] == "Context: Ana lives in Oslo.\n\nQuestion: Where?"
    assert chat[1]["content"] == "Oslo"
    assert to_chat(unanswerable, spec("squad_v2"), OPTIONS)[1]["content"] == "I don't know."
    custom = ConvertOptions(abstention_answer="The context does not say.")
    assert to_chat(unanswerable, spec("squad_v2"), custom)[1]["content"] == "The context does not say."
    assert drop_reason({**answerable, "answers": "Oslo"}, spec("squad_v2")) == "malformed_answers"


def test_prompt_query_response_joins_prompt_and_query_into_the_user_turn():
    row = {"prompt": "Answer briefly.", "query": "2+2?", "response": "4"}
    assert to_chat(row, spec("prompt_query_response"), OPTIONS) == [
        {"role": "user", "content": "Answer briefly.\n2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert to_chat({**row, "prompt": ""}, spec("prompt_query_response"), OPTIONS)[0]["content"] == "2+2?"


def test_alpaca_drops():
    columns = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}
    alpaca = spec("alpaca", columns=columns)
    assert drop_reason({"instruction": "", "input": "", "output": "x"}, alpaca) == "empty_user_turn"
    assert drop_reason({"instruction": "q", "input": None, "output": None}, alpaca) == "empty_assistant_turn"
    assert drop_reason({"instruction": "q", "output": "a", "history": [["only one"]]}, alpaca) == "malformed_history"
    assert drop_reason({"instruction": 3, "output": "a"}, alpaca) == "non_text_content"


def test_sharegpt_roles_and_drops():
    sharegpt = spec("sharegpt", "sharegpt", columns={"messages": "conversations"}, tags=DEFAULT_TAGS["sharegpt"])

    def row(*turns):
        return {"conversations": [{"from": r, "value": v} for r, v in turns]}

    chat = to_chat(row(("system", "S"), ("human", "q"), ("gpt", "a")), sharegpt, OPTIONS)
    assert [m["role"] for m in chat] == ["system", "user", "assistant"]
    assert drop_reason(row(("gpt", "a"), ("human", "q")), sharegpt) == "roles_out_of_order"
    assert drop_reason(row(("human", "q"), ("gpt", "a"), ("gpt", "b")), sharegpt) == "roles_out_of_order"
    assert drop_reason(row(("human", "q"), ("gpt", "a"), ("human", "more?")), sharegpt) == "roles_out_of_order"
    assert drop_reason(row(("human", "q"), ("system", "late"), ("gpt", "a")), sharegpt) == "roles_out_of_order"
    assert drop_reason(row(("human", "q"), ("robot", "a")), sharegpt) == "unknown_role"
    assert drop_reason(row(("human", "q"), ("gpt", "  ")), sharegpt) == "empty_assistant_turn"
    assert drop_reason(row(("human", "q")), sharegpt) == "no_assistant_turn"
    assert drop_reason({"conversations": "q"}, sharegpt) == "messages_not_a_list"
    # Two user turns in a row are a valid chat; a template that forbids them says so when rendering.
    assert len(to_chat(row(("human", "a"), ("human", "b"), ("gpt", "c")), sharegpt, OPTIONS)) == 3


def test_openai_content_parts_are_joined_and_tools_allowed():
    openai = spec("openai", "openai", columns={"messages": "messages"}, tags=DEFAULT_TAGS["openai"])
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
            {"role": "assistant", "content": "call"},
            {"role": "tool", "content": "result"},
            {"role": "assistant", "content": "done"},
        ]
    }
    chat = to_chat(row, openai, OPTIONS)
    assert chat[0]["content"] == "Hello"
    assert [m["role"] for m in chat] == ["user", "assistant", "tool", "assistant"]
    image = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "url": "x"}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    assert drop_reason(image, openai) == "non_text_content"


def test_check_chat_accepts_the_documented_grammar():
    check_chat(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    )
    with pytest.raises(DropRow):
        check_chat([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])
