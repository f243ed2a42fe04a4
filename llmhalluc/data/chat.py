"""tokenize_chat: the inference tokenization of a chat, and labels that train exactly what the assistant generates.

A token is trained when the assistant produces it at inference: the text after the generation prompt of its turn,
through the end-of-turn token(s) that close the turn. Templates with `{% generation %}` markers say where that is.
For templates without them (most vendor templates), each assistant turn is located by rendering:

- the chat before the turn with `add_generation_prompt=True` must be a prefix of the whole chat: the turn starts
  where it ends;
- the chat with the turn's content replaced by a sentinel must equal the whole chat outside the content: that gives
  where the content ends;
- the end-of-turn tokens are what the template writes after the content both when the chat ends there and when a
  user turn follows (so Phi-3's end-of-chat eos is not mistaken for end-of-turn), less trailing whitespace; they
  must end in a special token, the one the model learns to stop on.

Every trained span is checked to hold its turn's content. Anything that breaks these assumptions is a TemplateError
naming the turn, never a silently wrong mask.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from tokenizers import Encoding
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from llmhalluc.errors import TemplateError

IGNORE_INDEX = -100
SENTINEL = "LlmhallucSentinelXq7"
SENTINEL_USER = "LlmhallucNextTurnXq8"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Messages = list[dict[str, Any]]
Span = tuple[int, int]


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    max_length: int | None = None,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> dict[str, list[int]]:
    """Token ids of the rendered chat and labels: the ids on assistant-generated tokens, -100 elsewhere."""
    text, spans = render_with_assistant_spans(tokenizer, messages, last_turn_only=mask_history)
    # The backend tokenizer gives the same ids as tokenizer(text, add_special_tokens=False), plus char->token maps.
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return label_tokens(text, encoding, spans, messages, max_length, train_on_prompt, last_turn_only=mask_history)


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template text, or a TemplateError when it has none."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise TemplateError(
            f"the tokenizer of {tokenizer.name_or_path or 'this model'} has no chat template: set `template` to a "
            "built-in name (chatml, qwen, llama3, mistral, gemma, phi3) or a .jinja file"
        )
    return template


def render(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The chat as text, exactly as `tokenizer.apply_chat_template(messages, tokenize=False)` renders it."""
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=chat_template_of(tokenizer),
        add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map,
    )
    return rendered[0]


@functools.lru_cache(maxsize=64)
def has_generation_markers(template: str) -> bool:
    """Whether the template marks assistant output with {% generation %}."""
    return bool(_GENERATION_TAG.search(template))


def render_with_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, last_turn_only: bool = False
) -> tuple[str, list[Span]]:
    """The rendered chat and the character spans the assistant generates (only its last turn's if asked)."""
    return render_chats_with_assistant_spans(tokenizer, [messages], last_turn_only)[0]


def render_chats_with_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, chats: list[Messages], last_turn_only: bool = False
) -> list[tuple[str, list[Span]]]:
    """render_with_assistant_spans for many chats: one template call for all when the template has markers."""
    template = chat_template_of(tokenizer)
    if not has_generation_markers(template):
        results = []
        for messages in chats:
            text = render(tokenizer, messages)
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
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
        spans = [tuple(span) for span in marked if span[1] > span[0]]
        if last_turn_only:
            # A template may mark several blocks per turn; the last turn's are those after its generation prompt.
            last_turn = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            last_prompt = _prompt_before(tokenizer, messages, text, last_turn)
            spans = [span for span in spans if span[1] > len(last_prompt)]
        results.append((text, spans))
    return results


def _prompt_before(tokenizer: PreTrainedTokenizerBase, messages: Messages, text: str, turn: int) -> str:
    """The chat before assistant turn `turn` with its generation prompt; must be a prefix of the whole chat."""
    if turn == 0:
        raise TemplateError("the chat starts with an assistant turn, so there is no prompt to generate it from")
    prompt = render(tokenizer, messages[:turn], add_generation_prompt=True)
    if not text.startswith(prompt):
        raise TemplateError(
            f"the chat template is not prefix-stable at turn {turn}: the chat before it rendered with "
            "add_generation_prompt=True is not a prefix of the whole chat; add {% generation %} markers to the "
            "template or choose a built-in template"
        )
    return prompt


def _locate_turn(tokenizer: PreTrainedTokenizerBase, messages: Messages, text: str, turn: int) -> Span:
    """The character span of assistant turn `turn` in `text`: after its generation prompt, through end-of-turn."""
    if SENTINEL in text or SENTINEL_USER in text:
        raise TemplateError(f"the chat contains the reserved string {SENTINEL!r}")
    prompt = _prompt_before(tokenizer, messages, text, turn)
    with_sentinel = [*messages[:turn], {**messages[turn], "content": SENTINEL}, *messages[turn + 1 :]]
    before, after = _split_at_sentinel(render(tokenizer, with_sentinel), turn)
    if not (text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text)):
        raise TemplateError(
            f"the chat template renders turn {turn} differently when only its content changes, so its content "
            "cannot be located; add {% generation %} markers to the template"
        )
    if len(before) < len(prompt):
        raise TemplateError(f"the content of turn {turn} starts inside its own generation prompt")
    content_end = len(text) - len(after)
    closing = _end_of_turn(tokenizer, messages, turn)
    if not text.startswith(closing, content_end):
        raise TemplateError(f"the end-of-turn text {closing!r} of turn {turn} does not follow its content")
    return len(prompt), content_end + len(closing)


def _split_at_sentinel(rendered: str, turn: int) -> tuple[str, str]:
    if rendered.count(SENTINEL) != 1:
        raise TemplateError(
            f"the chat template renders the content of turn {turn} {rendered.count(SENTINEL)} times; expected once"
        )
    before, _, after = rendered.partition(SENTINEL)
    return before, after


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, messages: Messages, turn: int) -> str:
    """What the template writes after assistant content in every context: its end-of-turn tokens."""
    head = [*messages[:turn], {**messages[turn], "content": SENTINEL}]
    _, after_last = _split_at_sentinel(render(tokenizer, head), turn)
    _, after_more = _split_at_sentinel(render(tokenizer, [*head, {"role": "user", "content": SENTINEL_USER}]), turn)
    last = tokenizer(after_last, add_special_tokens=False, return_offsets_mapping=True)
    more = tokenizer(after_more, add_special_tokens=False, return_offsets_mapping=True)
    common = 0
    for id_last, id_more, span_last, span_more in zip(
        last["input_ids"], more["input_ids"], last["offset_mapping"], more["offset_mapping"]
    ):
        if id_last != id_more or span_last != span_more:
            break
        common += 1
    # Whitespace after the end-of-turn token separates turns; the model never generates it.
    while common and after_last[slice(*last["offset_mapping"][common - 1])].isspace():
        common -= 1
    if not common or last["input_ids"][common - 1] not in _stop_candidates(tokenizer):
        found = after_last[: last["offset_mapping"][common - 1][1]] if common else ""
        raise TemplateError(
            f"the chat template does not close assistant turn {turn} with the same special token whether or not the "
            f"chat goes on (common closing text: {found!r}), so there is no end-of-turn token to train; add "
            "{% generation %} markers around what the assistant generates, including its stop token"
        )
    return after_last[: last["offset_mapping"][common - 1][1]]


def _stop_candidates(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokens a model can stop on: special and added tokens."""
    return set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)


def label_tokens(
    text: str,
    encoding: Encoding,
    spans: list[Span],
    messages: Messages,
    max_length: int | None = None,
    train_on_prompt: bool = False,
    last_turn_only: bool = False,
) -> dict[str, list[int]]:
    """Labels for the encoding's ids: trained where a token overlaps an assistant span; then truncation."""
    input_ids = encoding.ids
    labels = [IGNORE_INDEX] * len(input_ids)
    trained_texts = []
    for span in spans:
        first, stop = _token_range(encoding, span, len(text))
        if first is None or first >= stop:
            raise TemplateError(f"no token lies in the assistant span {span}")
        if encoding.token_to_chars(stop - 1)[1] != span[1]:
            raise TemplateError(f"a token crosses the end of the assistant span at character {span[1]}")
        trained_texts.append(text[encoding.token_to_chars(first)[0] : span[1]])
        labels[first:stop] = input_ids[first:stop]
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    _verify_contents(trained_texts, contents[-1:] if last_turn_only else contents)
    if train_on_prompt:
        labels = list(input_ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": list(input_ids), "labels": labels}


def _token_range(encoding: Encoding, span: Span, text_length: int) -> tuple[int | None, int]:
    """[first, stop): the tokens overlapping the character span (a character split over tokens included)."""
    first = encoding.char_to_token(span[0])
    stop = encoding.char_to_token(span[1]) if span[1] < text_length else len(encoding.ids)
    if stop is None:  # the character after the span belongs to no token (a normalizer dropped it)
        stop = next((t for t, (start, _) in enumerate(encoding.offsets) if start >= span[1]), len(encoding.ids))
    return first, stop


def _verify_contents(trained_texts: list[str], contents: list[str]) -> None:
    """Each assistant turn's content lies in a trained span, in order."""
    position = 0
    for number, content in enumerate(contents):
        visible = _visible_answer(content)
        while position < len(trained_texts) and visible not in trained_texts[position]:
            position += 1
        if position == len(trained_texts):
            raise TemplateError(f"assistant turn {number}: its content is not inside the text marked for training")
        position += 1


def _visible_answer(content: str) -> str:
    # Reasoning templates (Qwen3) may drop `<think>...</think>` from earlier turns; the answer after it stays.
    return content.rsplit("</think>", 1)[-1].strip() if "</think>" in content else content.strip()
