"""tokenize_chat: the inference tokenization of a chat, and labels that train exactly what the assistant generates.

The chat is rendered with the tokenizer's chat template (llmhalluc.data.template); the characters the assistant
generates are located (llmhalluc.data.spans); tokens starting inside them are trained, less what the data marks
untrained (llmhalluc.data.labels). Backtrack tokens are handled by llmhalluc.data.backtrack.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from llmhalluc.data.labels import TokenizeOptions, label_tokens
from llmhalluc.data.spans import render_with_assistant_spans
from llmhalluc.data.template import Messages, stop_ids
from llmhalluc.errors import TemplateError


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
        backtrack_token,
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
