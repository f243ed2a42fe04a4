"""Labels: which tokens of a rendered chat are trained. A token is trained when it *starts* inside an assistant
span; a role header that swallows the whitespace after it (an added token with rstrip, a BPE merge across the header
and the content) starts before the span, so it is never trained, and the content characters it swallowed are simply
not trainable. Then what the data marks untrained is taken out: `training: false` turns, `training_detail`
character spans (axolotl's fields), and with mask_backtracked the errors before backtrack tokens.

Every turn's content, reasoning and tool-call names are checked to lie in its trained text, and every other
message's content in the rendered chat; a template that drops part of it (as Qwen3's drops the reasoning of earlier
turns, Phi-3's tool calls and tool results) raises a TemplateError naming the turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Encoding

from llmhalluc.data.backtrack import BacktrackStats, backtrack_positions, find_backtracked
from llmhalluc.data.spans import TurnSpan, holds_all, missing_content_message, required_texts
from llmhalluc.data.template import Messages, content_of
from llmhalluc.errors import TemplateError

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's cross_entropy ignore_index)


@dataclass(frozen=True)
class TokenizeOptions:
    """How tokenize_chat labels a chat (the experiment's masking settings)."""

    max_length: int | None = None
    train_on_prompt: bool = False
    mask_history: bool = False
    backtrack_id: int | None = None
    mask_backtracked: bool = False
    backtrack_position_ids: bool = False
    backtrack_text: str | None = None  # the backtrack token as written in the rendered chat


@dataclass
class LabeledChat:
    """Token ids, labels (and position ids) of one chat, with what the audit counts."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    truncated: bool = False
    turns: int = 0  # assistant turns with a span
    turns_closed: int = 0  # of those, turns whose trained text ends in a trained stop token
    backtrack: BacktrackStats = field(default_factory=BacktrackStats)
    masked_tokens: int = 0  # tokens of trained turns kept out of the labels (training_detail, backtracked errors)
    masked_on_errors: int = 0  # of those, tokens on a character training_detail records as untrained

    def to_dict(self) -> dict[str, list[int]]:
        """{"input_ids", "labels"} and "position_ids" when computed."""
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out


def label_tokens(
    text: str,
    encoding: Encoding,
    spans: list[TurnSpan],
    messages: Messages,
    options: TokenizeOptions,
    stops: frozenset[int] = frozenset(),
) -> LabeledChat:
    """Labels for the encoding's ids: trained where a token starts inside an assistant span, less what the data
    marks untrained and (with mask_backtracked) the errors before backtracks; then truncation. A turn whose data
    records its errors (training_detail) is masked by those characters, which hold under any tokenizer; the
    token-count rule of mask_backtracked masks only turns that record none."""
    input_ids = encoding.ids
    _check_backtrack_text(text, input_ids, options)
    labels = [IGNORE_INDEX] * len(input_ids)
    token_spans: list[tuple[int, int, int]] = []  # (first, stop, turn) per span
    for span in spans:
        first, stop = _token_range(encoding, span, len(text))
        if first >= stop:
            raise TemplateError(f"assistant turn {span.turn}: no token starts in its span {span.start}-{span.end}")
        token_spans.append((first, stop, span.turn))
    _verify_contents(text, encoding, token_spans, spans, messages)
    recorded: list[tuple[int, int]] = []  # character ranges the data records as untrained
    trained_turns = []
    for (first, stop, turn), span in zip(token_spans, spans):
        message = messages[turn]
        if message.get("training") is False:
            continue
        trained_turns.append((first, stop))
        labels[first:stop] = input_ids[first:stop]
        if message.get("training_detail"):
            recorded += _untrain_detail(text, encoding, first, stop, span, message, labels)
    if options.train_on_prompt:
        labels = list(input_ids)
    backtrack = BacktrackStats()
    if options.backtrack_id is not None:
        detailed = {i for i, (_, _, turn) in enumerate(token_spans) if messages[turn].get("training_detail")}
        plain = [(f, s) for i, (f, s, _) in enumerate(token_spans) if i not in detailed]
        backtrack = find_backtracked(input_ids, plain, options.backtrack_id, options.mask_backtracked)
        counted = find_backtracked(
            input_ids, [token_spans[i][:2] for i in sorted(detailed)], options.backtrack_id, False
        )
        backtrack.runs, backtrack.tokens = backtrack.runs + counted.runs, backtrack.tokens + counted.tokens
        backtrack.clamped += counted.clamped
        for position in backtrack.masked_positions:
            labels[position] = IGNORE_INDEX
    masked = [t for first, stop in trained_turns for t in range(first, stop) if labels[t] == IGNORE_INDEX]
    on_errors = [t for t in masked if _overlaps(encoding.token_to_chars(t), recorded)]
    truncated = options.max_length is not None and len(input_ids) > options.max_length
    limit = options.max_length if truncated else len(input_ids)
    ids, labels = list(input_ids[:limit]), labels[:limit]
    # A trained turn is closed when its last span ends in a trained stop token (the audit's end-of-turn check).
    last_stop = {turn: stop for _, stop, turn in token_spans if messages[turn].get("training") is not False}
    closed = sum(
        1
        for stop in last_stop.values()
        if stop <= limit and labels[stop - 1] != IGNORE_INDEX and ids[stop - 1] in stops
    )
    positions = backtrack_positions(ids, options.backtrack_id) if options.backtrack_position_ids else None
    masked_kept = sum(t < limit for t in masked)
    return LabeledChat(
        ids,
        labels,
        positions,
        truncated,
        len(last_stop),
        closed,
        backtrack,
        masked_kept,
        sum(t < limit for t in on_errors),
    )


def _overlaps(token_chars: tuple[int, int], ranges: list[tuple[int, int]]) -> bool:
    return any(token_chars[0] < end and begin < token_chars[1] for begin, end in ranges)


def _check_backtrack_text(text: str, input_ids: list[int], options: TokenizeOptions) -> None:
    """Every backtrack token written in the chat is read as the backtrack token (one id), or the masks and position
    ids would miss the ones that are not."""
    if options.backtrack_id is None or not options.backtrack_text:
        return
    written, read = text.count(options.backtrack_text), input_ids.count(options.backtrack_id)
    if written != read:
        raise TemplateError(
            f"the backtrack token {options.backtrack_text!r} is written {written} times but read as that token {read} "
            "times: the tokenizer splits or merges it (add it with add_special_tokens)"
        )


def _token_range(encoding: Encoding, span: TurnSpan, text_length: int) -> tuple[int, int]:
    """[first, stop): the tokens that start inside the character span."""
    return _first_token_from(encoding, span.start, text_length), _first_token_from(encoding, span.end, text_length)


def _first_token_from(encoding: Encoding, char: int, text_length: int) -> int:
    """The first token that starts at or after character `char`."""
    if char >= text_length:
        return len(encoding.ids)
    token = encoding.char_to_token(char)
    if token is None:  # the character belongs to no token (a normalizer dropped it)
        return next((t for t, (start, _) in enumerate(encoding.offsets) if start >= char), len(encoding.ids))
    # A token holding `char` that started before it (a header that swallowed whitespace) is not the first.
    return token if encoding.token_to_chars(token)[0] >= char else token + 1


def _verify_contents(
    text: str, encoding: Encoding, token_spans: list[tuple[int, int, int]], spans: list[TurnSpan], messages: Messages
) -> None:
    """Each assistant turn's content (and reasoning) lies in the text its trained tokens start at."""
    trained: dict[int, str] = {}
    for (first, _, turn), span in zip(token_spans, spans):
        trained[turn] = trained.get(turn, "") + text[encoding.token_to_chars(first)[0] : span.end]
    for turn, trained_text in trained.items():
        if not holds_all(trained_text, required_texts(messages[turn])):
            raise TemplateError(missing_content_message(turn, messages))
        for name in _tool_call_names(messages[turn]):
            if name not in trained_text:
                raise TemplateError(
                    f"assistant turn {turn}: the chat template does not render its tool call {name!r} (templates "
                    "without tool support, such as Phi-3's, OLMo-2's and the built-in ones, drop tool_calls), so the "
                    "model would be trained on a turn without its call: use the model's own template if it "
                    "renders tool calls (Qwen2.5, Qwen3, Llama-3.1, Mistral v0.3), a .jinja template that does, or "
                    "drop these rows"
                )
    _verify_context(text, messages)


def _tool_call_names(message: dict[str, Any]) -> list[str]:
    """The function names of an assistant message's tool_calls (OpenAI's {"function": {"name": ...}} or flat)."""
    calls = message.get("tool_calls")
    names = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name.strip():
            names.append(name.strip())
    return names


def _verify_context(text: str, messages: Messages) -> None:
    """Every system, user and tool message is in the rendered chat: a template that drops one (Phi-3's and
    OLMo-2's drop tool results) would train the assistant to answer without what it was shown."""
    for index, message in enumerate(messages):
        content = content_of(message).strip()
        if message["role"] == "assistant" or not content or content in text:
            continue
        if json.dumps(content, ensure_ascii=False)[1:-1] in text:  # rendered as a JSON string (Llama-3.1's tool role)
            continue
        raise TemplateError(
            f"message {index} ({message['role']}): the chat template drops it from the rendered chat, so the "
            f"assistant would be trained without seeing it: use a template that renders {message['role']} messages"
        )


def _untrain_detail(
    text: str,
    encoding: Encoding,
    first: int,
    stop: int,
    span: TurnSpan,
    message: dict[str, Any],
    labels: list[int],
) -> list[tuple[int, int]]:
    """-100 on tokens of the span that cover a content character inside a `train: false` training_detail span
    (character offsets into the content, end inclusive); returns those spans as ranges of the rendered text."""
    content = content_of(message)
    start = text.find(content, span.start, span.end)
    offset = 0
    if start < 0:  # the template trimmed the content (Llama-3, Gemma, Mistral)
        stripped = content.strip()
        start = text.find(stripped, span.start, span.end)
        offset = len(content) - len(content.lstrip())
        if start < 0 or not stripped:
            raise TemplateError(
                f"assistant turn {span.turn}: training_detail needs the content verbatim in the rendered chat, but "
                "the template changes it"
            )
    untrained = [
        (start + d["begin_offset"] - offset, start + d["end_offset"] - offset + 1)
        for d in message["training_detail"]
        if not d.get("train", True)
    ]
    for token in range(first, stop):
        if _overlaps(encoding.token_to_chars(token), untrained):
            labels[token] = IGNORE_INDEX
    return untrained
