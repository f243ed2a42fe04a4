"""The chat template as text: which template a tokenizer has, rendering a chat with it exactly as
`apply_chat_template` does, whether it marks the assistant's output, and the special token that closes an assistant
turn (what a trained model stops on), found by rendering probe chats."""

from __future__ import annotations

import functools
import re
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from llmhalluc.errors import TemplateError

SENTINEL = "LlmhallucSentinelXq7"
SENTINEL_USER = "LlmhallucNextTurnXq8"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Messages = list[dict[str, Any]]


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template text, or a TemplateError when it has none."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise TemplateError(
            f"the tokenizer of {tokenizer.name_or_path or 'this model'} has no chat template: set `template` to a "
            "built-in name (chatml, qwen, qwen3, qwen3_nothink, llama3, mistral, gemma, phi3) or a .jinja file"
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


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn in the tokenizer's chat template (e.g. <|im_end|>, <|eot_id|>,
    <|end|>), found by rendering a two-turn probe chat; a template without one is a TemplateError naming it."""
    probe = [{"role": "user", "content": SENTINEL_USER}, {"role": "assistant", "content": SENTINEL}]
    try:
        closing = end_of_turn_text(tokenizer, probe, 1)
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


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase, messages: Messages, turn: int) -> str:
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
    # The turn ends at the first special token both renderings share: what a template writes after it (the first
    # Llama-3-Instruct template appends the next assistant header even when no turn follows) is never generated.
    stops = stop_ids(tokenizer)
    first = next((i for i in range(common) if last["input_ids"][i] in stops), None)
    if first is None:
        found = after_last[: last["offset_mapping"][common - 1][1]] if common else ""
        raise TemplateError(
            f"the chat template does not close assistant turn {turn} with the same special token whether or not the "
            f"chat goes on (common closing text: {found!r}), so there is no end-of-turn token to train; add "
            "{% generation %} markers around what the assistant generates, including its stop token"
        )
    # An rstrip token's offsets also cover the whitespace after it, which is not part of the closing text.
    return after_last[: last["offset_mapping"][first][1]].rstrip()


def content_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""
