"""Converters: one raw example -> a chat (`[{"role", "content"}, ...]`), or a DropRow naming why it cannot be one."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmhalluc.config import DataConfig
from llmhalluc.data.spec import DatasetSpec

Messages = list[dict[str, Any]]
# Message fields a chat may carry besides role and content, passed through to the template and the masker:
# tool calls (OpenAI's format), reasoning, and axolotl's per-message / per-span loss control.
EXTRA_FIELDS = ("tool_calls", "reasoning_content", "training", "training_detail", "tool_call_id", "name")


class DropRow(Exception):
    """This row cannot become a chat; `reason` is a short snake_case name counted in the dataset stats."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ConvertOptions:
    """Settings converters take from the experiment config."""

    abstention_answer: str = "I don't know."
    aliases: tuple[tuple[str, str], ...] = ()  # (text written in the data, the token it stands for)

    @classmethod
    def of(cls, data: DataConfig) -> ConvertOptions:
        """The options an experiment's data settings give."""
        return cls(data.abstention_answer, tuple(data.token_aliases.items()))


@dataclass(frozen=True)
class Converter:
    """A registered converter: the function, the column keys it reads (keys of an entry's `columns`), those it can do
    without, and LLaMA-Factory key names an entry may use for them."""

    convert: Callable[[dict[str, Any], DatasetSpec, ConvertOptions], Messages]
    columns: tuple[str, ...]
    optional: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)


def to_chat(row: dict[str, Any], spec: DatasetSpec, options: ConvertOptions, side: str = "chosen") -> Messages:
    """Convert one row with the spec's converter and check the chat is well formed; a ranking row becomes its
    prompt followed by the `side` ("chosen" or "rejected") answer."""
    if spec.ranking:
        row, spec = with_answer(row, spec, side)
    messages = CONVERTERS[spec.converter].convert(row, spec, options)
    check_chat(messages)
    return apply_aliases(messages, options.aliases) if options.aliases else messages


def with_answer(row: dict[str, Any], spec: DatasetSpec, side: str) -> tuple[dict[str, Any], DatasetSpec]:
    """A ranking row as an ordinary row of its formatting whose answer is the chosen or the rejected one: alpaca's
    response column, or one more assistant message after a sharegpt/openai conversation (LLaMA-Factory's layout)."""
    answer = row.get(spec.columns[side])
    if spec.formatting == "alpaca":
        if not isinstance(answer, str):
            raise DropRow(f"{side}_not_text")
        return row, dataclasses.replace(spec, columns={**spec.columns, "response": spec.columns[side]})
    tags = spec.tags
    if isinstance(answer, str):
        answer = {tags["role_tag"]: tags["assistant_tag"], tags["content_tag"]: answer}
    if not isinstance(answer, dict) or answer.get(tags["role_tag"]) != tags["assistant_tag"]:
        raise DropRow(f"{side}_not_an_assistant_message")
    turns = row.get(spec.columns["messages"])
    if not isinstance(turns, list):
        raise DropRow("messages_not_a_list")
    return {**row, spec.columns["messages"]: [*turns, answer]}, spec


def apply_aliases(messages: Messages, aliases: tuple[tuple[str, str], ...]) -> Messages:
    """Every alias written in a message replaced by the token it stands for; training_detail spans move with the
    text (a span that starts or ends inside an alias covers its whole token)."""
    return [_aliased(message, aliases) for message in messages]


def _aliased(message: dict[str, Any], aliases: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    content = message["content"]
    if not any(alias in content for alias, _ in aliases):
        return message
    pieces, starts, ends, position = [], [], [], 0  # per original character: where its unit starts and ends now
    index = 0
    while index < len(content):
        match = next(((a, t) for a, t in aliases if content.startswith(a, index)), None)
        text, width = (match[1], len(match[0])) if match else (content[index], 1)
        starts += [position] * width
        ends += [position + len(text)] * width
        pieces.append(text)
        position += len(text)
        index += width
    changed = {**message, "content": "".join(pieces)}
    if message.get("training_detail"):
        changed["training_detail"] = [
            {**span, "begin_offset": starts[span["begin_offset"]], "end_offset": ends[span["end_offset"]] - 1}
            for span in message["training_detail"]
        ]
    return changed


def check_chat(messages: Messages) -> None:
    """Raise DropRow unless the chat is system? (user+ (assistant (tool+ assistant)*))+ with text in every turn."""
    allowed_after = {
        None: {"system", "user"},
        "system": {"user"},
        "user": {"user", "assistant"},
        "assistant": {"user", "tool"},
        "tool": {"tool", "assistant"},
    }
    previous = None
    for message in messages:
        role, content = message["role"], message["content"]
        if role not in allowed_after[previous]:
            raise DropRow("roles_out_of_order")
        if not isinstance(content, str):
            raise DropRow("non_text_content")
        if not content.strip() and not (role == "assistant" and message.get("tool_calls")):
            raise DropRow("empty_assistant_turn" if role == "assistant" else f"empty_{role}_turn")
        _check_loss_fields(message)
        previous = role
    if "assistant" not in {m["role"] for m in messages}:
        raise DropRow("no_assistant_turn")
    if previous != "assistant":
        raise DropRow("roles_out_of_order")


def _check_loss_fields(message: dict[str, Any]) -> None:
    """`training` is a bool; `training_detail` a list of {begin_offset, end_offset (inclusive), train} inside the
    content."""
    if "training" in message and not isinstance(message["training"], bool):
        raise DropRow("malformed_training_flag")
    detail = message.get("training_detail")
    if detail is None:
        return
    if not isinstance(detail, list):
        raise DropRow("malformed_training_detail")
    for span in detail:
        begin, end = (span.get("begin_offset"), span.get("end_offset")) if isinstance(span, dict) else (None, None)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end < len(message["content"])):
            raise DropRow("malformed_training_detail")
        if not isinstance(span.get("train", True), bool):
            raise DropRow("malformed_training_detail")


def _field(row: dict[str, Any], spec: DatasetSpec, key: str) -> str:
    """The text of column key `key`: the entry's fixed instruction for it, or the row's value of its column."""
    if key in spec.instructions:
        return spec.instructions[key]
    return _text(row, spec.columns.get(key))


def _text(row: dict[str, Any], column: str | None) -> str:
    """The string in `column`, '' when the column is unset or the value is null."""
    if column is None:
        return ""
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DropRow("non_text_content")
    return value


def convert_alpaca(row: dict[str, Any], spec: DatasetSpec, options: ConvertOptions) -> Messages:
    """LLaMA-Factory alpaca: system?, history [[user, assistant], ...], prompt + "\\n" + query, response."""
    columns = spec.columns
    messages: Messages = []
    if system := _field(row, spec, "system"):
        messages.append({"role": "system", "content": system})
    history = row.get(columns["history"]) if columns.get("history") else None
    for pair in history or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise DropRow("malformed_history")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = "\n".join(part for part in (_field(row, spec, "prompt"), _field(row, spec, "query")) if part)
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _field(row, spec, "response")},
    ]
    return messages


def convert_sharegpt(row: dict[str, Any], spec: DatasetSpec, options: ConvertOptions) -> Messages:
    """LLaMA-Factory sharegpt (and openai): a message list with role/content keys named by the entry's tags."""
    tags = spec.tags
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "assistant",
        tags["system_tag"]: "system",
    }
    roles.pop(None, None)
    turns = row.get(spec.columns["messages"])
    if not isinstance(turns, list):
        raise DropRow("messages_not_a_list")
    messages: Messages = []
    if system := _field(row, spec, "system"):
        messages.append({"role": "system", "content": system})
    for turn in turns:
        if not isinstance(turn, dict) or turn.get(tags["role_tag"]) not in roles:
            raise DropRow("unknown_role")
        content = turn.get(tags["content_tag"])
        message = {"role": roles[turn[tags["role_tag"]]], "content": _content_text(content)}
        # datasets fills fields a row lacks with None (its schema is the union over rows): None means absent.
        message.update({key: _without_nulls(turn[key]) for key in EXTRA_FIELDS if turn.get(key) is not None})
        messages.append(message)
    return messages


def _without_nulls(value: Any) -> Any:
    # datasets stores nested objects with the union of every row's keys (absent ones as None), so a tool call's
    # arguments would gain other rows' keys as nulls: keys whose value is None are dropped.
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _content_text(content: Any) -> Any:
    # OpenAI-style content may be a list of parts; text parts are joined, anything else is not text.
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise DropRow("non_text_content")
        return "".join(p.get("text") or "" for p in content)
    return "" if content is None else content


def convert_prompt_query_response(row: dict[str, Any], spec: DatasetSpec, options: ConvertOptions) -> Messages:
    """llmhalluc's own format: user turn = prompt + "\\n" + query, assistant turn = response."""
    user = "\n".join(part for part in (_field(row, spec, "prompt"), _field(row, spec, "query")) if part)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _field(row, spec, "response")}]


def convert_gsm8k(row: dict[str, Any], spec: DatasetSpec, options: ConvertOptions) -> Messages:
    """GSM8K: the question (then an instruction, when the entry gives one) as the user turn, the worked answer as
    the reply; the answer must hold a final answer after one of the entry's answer_markers (`#### N` or `The answer
    is: N` by default, in any case), or end with the abstention answer (an unanswerable question)."""
    answer = _field(row, spec, "answer")
    lowered = answer.lower()
    marked = any(marker.lower() in lowered for marker in spec.answer_markers)
    abstains = lowered.rstrip().endswith(options.abstention_answer.strip().lower())
    if answer.strip() and not marked and not abstains:
        raise DropRow("answer_without_final_line")
    question = "\n".join(part for part in (_field(row, spec, "question"), _field(row, spec, "prompt")) if part)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def convert_squad_v2(row: dict[str, Any], spec: DatasetSpec, options: ConvertOptions) -> Messages:
    """SQuAD v2: context + question -> the first answer text, or the abstention answer when there is none."""
    answers = row.get(spec.columns["answers"])
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), list):
        raise DropRow("malformed_answers")
    texts = [t for t in answers["text"] if isinstance(t, str) and t.strip()]
    reply = texts[0] if texts else options.abstention_answer
    user = f"Context: {_field(row, spec, 'context')}\n\nQuestion: {_field(row, spec, 'question')}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


CONVERTERS: dict[str, Converter] = {
    "alpaca": Converter(convert_alpaca, ("prompt", "query", "response", "system", "history")),
    "sharegpt": Converter(convert_sharegpt, ("messages", "system")),
    "openai": Converter(convert_sharegpt, ("messages", "system")),
    "prompt_query_response": Converter(convert_prompt_query_response, ("prompt", "query", "response")),
    # The researchers' GSM8K entries name question and answer query and response, and add an instruction as prompt.
    "gsm8k": Converter(
        convert_gsm8k, ("question", "answer", "prompt"), ("prompt",), {"query": "question", "response": "answer"}
    ),
    "squad_v2": Converter(convert_squad_v2, ("context", "question", "answers")),
}
