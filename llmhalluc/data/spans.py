"""Where the assistant speaks: the character spans of a rendered chat that the assistant generates.

A turn's span runs from the end of its generation prompt through the end-of-turn token(s) that close it. Templates
with `{% generation %}` markers give the spans directly. For templates without them (most vendor templates), each
assistant turn is located by rendering:

- the chat before the turn with `add_generation_prompt=True` must be a prefix of the whole chat: the turn starts
  where it ends;
- the end-of-turn text is what the template writes after an assistant turn's content both when the chat ends there
  and when a user turn follows (so Phi-3's end-of-chat eos is not mistaken for it), less whitespace; it must end in
  a special token, the one the model learns to stop on;
- the turn ends at the first end-of-turn text after its start, so whatever the template renders in between
  (content, reasoning, tool calls) is trained as rendered.

A template that breaks these assumptions raises a TemplateError naming the turn, never a silently wrong span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from llmhalluc.data.template import (
    SENTINEL,
    SENTINEL_USER,
    Messages,
    chat_template_of,
    content_of,
    end_of_turn_text,
    has_generation_markers,
    render,
)
from llmhalluc.errors import TemplateError

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass(frozen=True)
class TurnSpan:
    """The characters [start, end) the assistant generates in assistant message number `turn` of the chat."""

    start: int
    end: int
    turn: int


def render_with_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, last_turn_only: bool = False
) -> tuple[str, list[TurnSpan]]:
    """The rendered chat and the character spans the assistant generates (only its last turn's if asked)."""
    return render_chats_with_assistant_spans(tokenizer, [messages], last_turn_only)[0]


def render_chats_with_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, chats: list[Messages], last_turn_only: bool = False
) -> list[tuple[str, list[TurnSpan]]]:
    """render_with_assistant_spans for many chats: one template call for all when the template has markers."""
    template = chat_template_of(tokenizer)
    if not has_generation_markers(template):
        results = []
        for messages in chats:
            text = render(tokenizer, messages)
            turns = assistant_turns(messages)
            turns = turns[-1:] if last_turn_only else turns
            results.append((text, [_locate_turn(tokenizer, messages, text, i) for i in turns]))
        return results
    rendered, indices = render_jinja_template(
        conversations=chats,
        chat_template=template,
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    results = []
    for messages, text, marked in zip(chats, rendered, indices):
        spans = _assign_turns(text, [(start, end) for start, end in marked if end > start], messages)
        if last_turn_only:
            # A template may mark several blocks per turn; the last turn's are those after its generation prompt.
            last_turn = assistant_turns(messages)[-1]
            last_prompt = _prompt_before(tokenizer, messages, text, last_turn)
            spans = [span for span in spans if span.end > len(last_prompt)]
        results.append((text, spans))
    return results


def assistant_turns(messages: Messages) -> list[int]:
    """Indices of the assistant messages."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def _assign_turns(text: str, blocks: list[tuple[int, int]], messages: Messages) -> list[TurnSpan]:
    """Marked blocks -> spans of assistant turns: each turn owns the first block (after the previous turn's) that
    holds its content, and any unmatched blocks that follow it (an end-of-chat eos marked on its own)."""
    spans: list[TurnSpan] = []
    position = 0
    for turn in assistant_turns(messages):
        required = required_texts(messages[turn])
        while position < len(blocks) and not holds_all(text[slice(*blocks[position])], required):
            if spans:  # a block between two turns' contents belongs to the earlier turn
                spans.append(TurnSpan(*blocks[position], spans[-1].turn))
            position += 1
        if position == len(blocks):
            raise TemplateError(missing_content_message(turn, messages))
        spans.append(TurnSpan(*blocks[position], turn))
        position += 1
    spans += [TurnSpan(*block, spans[-1].turn) for block in blocks[position:]] if spans else []
    return spans


def _prompt_before(tokenizer: PreTrainedTokenizerBase, messages: Messages, text: str, turn: int) -> str:
    """The chat before assistant turn `turn` with its generation prompt; must be a prefix of the whole chat."""
    if turn == 0:
        raise TemplateError("the chat starts with an assistant turn, so there is no prompt to generate it from")
    prompt = render(tokenizer, messages[:turn], add_generation_prompt=True)
    if not text.startswith(prompt):
        hint = ""
        if messages[0]["role"] == "system":
            hint = (
                " (templates such as Mistral v0.3's move the system prompt onto the last user turn, so the chat "
                "rendered for training is not what the model sees when it generates each turn; use a template that "
                "keeps the system prompt in place, e.g. template: mistral)"
            )
        raise TemplateError(
            f"the chat template is not prefix-stable at turn {turn}: the chat before it rendered with "
            f"add_generation_prompt=True is not a prefix of the whole chat{hint}; add {{% generation %}} markers to "
            "the template or choose a built-in template"
        )
    return prompt


def _locate_turn(tokenizer: PreTrainedTokenizerBase, messages: Messages, text: str, turn: int) -> TurnSpan:
    """The span of assistant turn `turn` in `text`: after its generation prompt, through its end-of-turn."""
    if SENTINEL in text or SENTINEL_USER in text:
        raise TemplateError(f"the chat contains the reserved string {SENTINEL!r}")
    prompt = _prompt_before(tokenizer, messages, text, turn)
    closing = end_of_turn_text(tokenizer, messages, turn)
    if closing in content_of(messages[turn]):
        raise TemplateError(
            f"assistant turn {turn}: its content contains the end-of-turn text {closing!r}, which the tokenizer reads "
            "as the stop token"
        )
    end = text.find(closing, len(prompt))
    if end < 0:
        raise TemplateError(f"the end-of-turn text {closing!r} of turn {turn} does not follow its generation prompt")
    return TurnSpan(len(prompt), end + len(closing), turn)


def required_texts(message: dict[str, Any]) -> list[str]:
    """What of an assistant message must appear in its trained text: reasoning (<think> or reasoning_content)
    and the answer, each stripped of surrounding whitespace."""
    content = content_of(message)
    parts = [m.strip() for m in _THINK.findall(content)]
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        parts.append(reasoning.strip())
    parts.append(_THINK.sub("", content).strip())
    return [part for part in parts if part]


def holds_all(trained: str, required: list[str]) -> bool:
    position = 0
    for part in required:
        found = trained.find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    return True


def missing_content_message(turn: int, messages: Messages) -> str:
    message = messages[turn]
    if _THINK.search(content_of(message)) or message.get("reasoning_content"):
        return (
            f"assistant turn {turn}: the chat template drops part of it (its reasoning) from the rendered chat, as "
            "Qwen3's does for turns before the last user message, so the model would be trained on text other than "
            "the data: set mask_history: true to train only the final turn, or remove the reasoning from earlier "
            "turns"
        )
    return f"assistant turn {turn}: its content is not inside the text marked for training"
