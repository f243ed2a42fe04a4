"""tokenize_chat: the inference tokenization of a chat, and labels that train exactly what the assistant generates.

An assistant turn's span runs from the end of its generation prompt through the end-of-turn token(s) that close it;
a token is trained when it *starts* inside that span. A role header that swallows the whitespace after it (an added
token with rstrip, a BPE merge across the header and the content) starts before the span, so it is never trained,
and the content characters it swallowed are simply not trainable. Templates with `{% generation %}` markers give the
spans directly. For templates without them (most vendor templates), each assistant turn is located by rendering:

- the chat before the turn with `add_generation_prompt=True` must be a prefix of the whole chat: the turn starts
  where it ends;
- the end-of-turn text is what the template writes after an assistant turn's content both when the chat ends there
  and when a user turn follows (so Phi-3's end-of-chat eos is not mistaken for it), less whitespace; it must end in
  a special token, the one the model learns to stop on;
- the turn ends at the first end-of-turn text after its start, so whatever the template renders in between
  (content, reasoning, tool calls) is trained as rendered.

Every turn's content, reasoning and tool-call names are checked to lie in its trained text, and every other
message's content in the rendered chat; a template that drops part of it (as Qwen3's drops the reasoning of earlier
turns, Phi-3's tool calls and tool results) or breaks the other assumptions raises a TemplateError naming the turn,
never a silently wrong mask. Messages may carry `training: false` (a context-only assistant turn) and
`training_detail` (character spans of the content not to train, axolotl's fields); backtrack tokens are handled by
llmhalluc.data.backtrack.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Encoding
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from llmhalluc.data.backtrack import IGNORE_INDEX, BacktrackStats, backtrack_positions, mask_backtracked
from llmhalluc.errors import TemplateError

SENTINEL = "LlmhallucSentinelXq7"
SENTINEL_USER = "LlmhallucNextTurnXq8"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class TurnSpan:
    """The characters [start, end) the assistant generates in assistant message number `turn` of the chat."""

    start: int
    end: int
    turn: int


@dataclass(frozen=True)
class TokenizeOptions:
    """How tokenize_chat labels a chat (the experiment's masking settings)."""

    max_length: int | None = None
    train_on_prompt: bool = False
    mask_history: bool = False
    backtrack_id: int | None = None
    mask_backtracked: bool = False
    backtrack_position_ids: bool = False


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

    def to_dict(self) -> dict[str, list[int]]:
        """{"input_ids", "labels"} and "position_ids" when computed."""
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Messages,
    max_length: int | None = None,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    backtrack_token: str | None = None,
    mask_backtracked: bool = False,
    backtrack_position_ids: bool = False,
) -> dict[str, list[int]]:
    """Token ids of the rendered chat and labels: the ids on assistant-generated tokens, -100 elsewhere (and on
    the k tokens before each run of k backtrack tokens with mask_backtracked); position ids that rewind at
    backtracks with backtrack_position_ids."""
    if backtrack_position_ids and backtrack_token is None:
        raise TemplateError("backtrack_position_ids needs a backtrack_token")
    options = TokenizeOptions(
        max_length,
        train_on_prompt,
        mask_history,
        backtrack_id_of(tokenizer, backtrack_token),
        mask_backtracked,
        backtrack_position_ids,
    )
    text, spans = render_with_assistant_spans(tokenizer, messages, last_turn_only=mask_history)
    # The backend tokenizer gives the same ids as tokenizer(text, add_special_tokens=False), plus char->token maps.
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return label_tokens(text, encoding, spans, messages, options, stop_ids(tokenizer)).to_dict()


def backtrack_id_of(tokenizer: PreTrainedTokenizerBase, backtrack_token: str | None) -> int | None:
    """The id of the backtrack token, which must be one added token of the tokenizer; None without one."""
    if backtrack_token is None:
        return None
    added = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
    if backtrack_token not in added:
        raise TemplateError(
            f"backtrack_token {backtrack_token!r} is not an added token of the tokenizer, so it would be split "
            "into pieces: add it with add_special_tokens"
        )
    return added[backtrack_token]


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


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokens a model can stop on: special and added tokens."""
    return frozenset(tokenizer.all_special_ids) | frozenset(tokenizer.added_tokens_decoder)


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
        required = _required_texts(messages[turn])
        while position < len(blocks) and not _holds_all(text[slice(*blocks[position])], required):
            if spans:  # a block between two turns' contents belongs to the earlier turn
                spans.append(TurnSpan(*blocks[position], spans[-1].turn))
            position += 1
        if position == len(blocks):
            raise TemplateError(_missing_content_message(turn, messages))
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
    closing = _end_of_turn(tokenizer, messages, turn)
    if closing in _content_of(messages[turn]):
        raise TemplateError(
            f"assistant turn {turn}: its content contains the end-of-turn text {closing!r}, which the tokenizer reads "
            "as the stop token"
        )
    end = text.find(closing, len(prompt))
    if end < 0:
        raise TemplateError(f"the end-of-turn text {closing!r} of turn {turn} does not follow its generation prompt")
    return TurnSpan(len(prompt), end + len(closing), turn)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template (e.g. <|im_end|>, <|eot_id|>,
    <|end|>), found by rendering a two-turn probe chat; a template without one is a TemplateError naming it."""
    probe = [{"role": "user", "content": SENTINEL_USER}, {"role": "assistant", "content": SENTINEL}]
    try:
        closing = _end_of_turn(tokenizer, probe, 1)
    except Exception as err:  # no template, or one that does not close turns with a special token
        raise TemplateError(
            f"the chat template of {tokenizer.name_or_path or 'this tokenizer'} does not end an assistant turn with a "
            f"special token, so a trained model would have no token to stop generating on ({err}); choose a "
            "template that does (template: chatml, llama3, ...)"
        ) from None
    ids = tokenizer(closing, add_special_tokens=False)["input_ids"]
    return [i for i in ids if i in stop_ids(tokenizer)][-1]


def _split_at_sentinel(rendered: str, turn: int) -> tuple[str, str]:
    if rendered.count(SENTINEL) != 1:
        raise TemplateError(
            f"the chat template renders the content of turn {turn} {rendered.count(SENTINEL)} times; expected once"
        )
    before, _, after = rendered.partition(SENTINEL)
    return before, after


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, messages: Messages, turn: int) -> str:
    """What the template writes after plain assistant content in every context: its end-of-turn tokens."""
    head = [*messages[:turn], {"role": "assistant", "content": SENTINEL}]
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
    if not common or last["input_ids"][common - 1] not in stop_ids(tokenizer):
        found = after_last[: last["offset_mapping"][common - 1][1]] if common else ""
        raise TemplateError(
            f"the chat template does not close assistant turn {turn} with the same special token whether or not the "
            f"chat goes on (common closing text: {found!r}), so there is no end-of-turn token to train; add "
            "{% generation %} markers around what the assistant generates, including its stop token"
        )
    # An rstrip token's offsets also cover the whitespace after it, which is not part of the closing text.
    return after_last[: last["offset_mapping"][common - 1][1]].rstrip()


def _content_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _required_texts(message: dict[str, Any]) -> list[str]:
    """What of an assistant message must appear in its trained text: reasoning (<think> or reasoning_content)
    and the answer, each stripped of surrounding whitespace."""
    content = _content_of(message)
    parts = [m.strip() for m in _THINK.findall(content)]
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        parts.append(reasoning.strip())
    parts.append(_THINK.sub("", content).strip())
    return [part for part in parts if part]


def _holds_all(trained: str, required: list[str]) -> bool:
    position = 0
    for part in required:
        found = trained.find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    return True


def _missing_content_message(turn: int, messages: Messages) -> str:
    message = messages[turn]
    if _THINK.search(_content_of(message)) or message.get("reasoning_content"):
        return (
            f"assistant turn {turn}: the chat template drops part of it (its reasoning) from the rendered chat, as "
            "Qwen3's does for turns before the last user message, so the model would be trained on text other than "
            "the data: set mask_history: true to train only the final turn, or remove the reasoning from earlier "
            "turns"
        )
    return f"assistant turn {turn}: its content is not inside the text marked for training"


def label_tokens(
    text: str,
    encoding: Encoding,
    spans: list[TurnSpan],
    messages: Messages,
    options: TokenizeOptions,
    stops: frozenset[int] = frozenset(),
) -> LabeledChat:
    """Labels for the encoding's ids: trained where a token starts inside an assistant span, less what the data
    marks untrained and (with mask_backtracked) the errors before backtracks; then truncation."""
    input_ids = encoding.ids
    labels = [IGNORE_INDEX] * len(input_ids)
    token_spans: list[tuple[int, int, int]] = []  # (first, stop, turn) per span
    for span in spans:
        first, stop = _token_range(encoding, span, len(text))
        if first >= stop:
            raise TemplateError(f"assistant turn {span.turn}: no token starts in its span {span.start}-{span.end}")
        token_spans.append((first, stop, span.turn))
    _verify_contents(text, encoding, token_spans, spans, messages)
    for (first, stop, turn), span in zip(token_spans, spans):
        message = messages[turn]
        if message.get("training") is False:
            continue
        labels[first:stop] = input_ids[first:stop]
        if message.get("training_detail"):
            _untrain_detail(text, encoding, first, stop, span, message, labels)
    if options.train_on_prompt:
        labels = list(input_ids)
    backtrack = BacktrackStats()
    if options.backtrack_id is not None:
        backtrack = mask_backtracked(
            input_ids, labels, [(f, s) for f, s, _ in token_spans], options.backtrack_id, options.mask_backtracked
        )
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
    return LabeledChat(ids, labels, positions, truncated, len(last_stop), closed, backtrack)


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
        if not _holds_all(trained_text, _required_texts(messages[turn])):
            raise TemplateError(_missing_content_message(turn, messages))
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
        content = _content_of(message).strip()
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
) -> None:
    """-100 on tokens of the span that cover a content character inside a `train: false` training_detail span
    (character offsets into the content, end inclusive)."""
    content = _content_of(message)
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
        token_start, token_end = encoding.token_to_chars(token)
        if any(token_start < end and begin < token_end for begin, end in untrained):
            labels[token] = IGNORE_INDEX
