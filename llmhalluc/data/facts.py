"""Token facts: the ids every part of a run agrees on (padding, stopping, backtracking, added tokens), derived once
from the tokenizer after tokens are added, then passed to whatever needs them (batches, generation, saving)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from llmhalluc.data.chat import backtrack_id_of
from llmhalluc.data.template import end_of_turn_id


@dataclass(frozen=True)
class TokenFacts:
    """The token ids of a run: pad, eos, the chat template's end of turn, the backtrack token, added tokens."""

    pad_id: int
    eos_id: int | None
    end_of_turn_id: int
    backtrack_id: int | None = None
    backtrack_token: str | None = None
    new_ids: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # text written in the data -> the token it stands for

    @property
    def stop_ids(self) -> list[int]:
        """What generation stops on: eos (when the tokenizer has one), then the end-of-turn token."""
        ids = [] if self.eos_id is None else [self.eos_id]
        return ids + [i for i in (self.end_of_turn_id,) if i not in ids]


def token_facts(
    tokenizer: PreTrainedTokenizerBase,
    backtrack_token: str | None = None,
    new_ids: dict[str, int] | None = None,
    aliases: dict[str, str] | None = None,
) -> TokenFacts:
    """The TokenFacts of a tokenizer (with its chat template and pad token set, tokens added); a template without an
    end-of-turn token or a backtrack token that is not one added token is an error naming it."""
    return TokenFacts(
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        end_of_turn_id=end_of_turn_id(tokenizer),
        backtrack_id=backtrack_id_of(tokenizer, backtrack_token),
        backtrack_token=backtrack_token,
        new_ids=dict(new_ids or {}),
        aliases=dict(aliases or {}),
    )
