"""New tokens: added to the tokenizer, given embedding rows (resizing only when their ids do not fit), initialised.

The new ids are the tokenizer's ids after adding, never "the last N rows": models whose embedding matrix already
has spare rows (Qwen2.5/Qwen3) put new tokens there, and those rows are initialised too. Initialisation
(LLaMA-Factory's names):

- `noise_init`: the mean of the original vocabulary's rows (ids the tokenizer had before adding; never rows of
  vocabulary padding) plus noise N(0, 1/sqrt(hidden_size)), seeded;
- `desc_init`: the mean of the rows at the description's token ids;
- `desc_init_w_noise`: desc_init plus the same seeded noise.

Input embeddings get it, and output embeddings too when not tied (from the output matrix's own rows); a tied model
stays tied. Under ZeRO-3 the resize and the initialisation run on gathered parameters, computed on rank 0 and
broadcast, so every rank holds the 1-process result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmhalluc.config import Config, read_token_descriptions
from llmhalluc.errors import UserError
from llmhalluc.runtime.zero import full_shape, gathered


@dataclass
class NewTokens:
    """What was added to the tokenizer: token -> id, which are special, what existed already, descriptions."""

    ids: dict[str, int] = field(default_factory=dict)
    special: set[str] = field(default_factory=set)
    existing: dict[str, int] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    original_size: int = 0  # len(tokenizer) before adding: ids below it are the original vocabulary
    init: str = "noise_init"
    rows_before: int | None = None
    rows_after: int | None = None

    def summary(self) -> dict[str, Any]:
        """The run summary's record of the added tokens."""
        return {
            "added": [{"token": t, "id": i, "special": t in self.special} for t, i in self.ids.items()],
            "already_in_vocabulary": self.existing,
            "init": self.init,
            "embedding_rows": {"before": self.rows_before, "after": self.rows_after},
        }


def requested_tokens(config: Config) -> tuple[list[str], list[str], dict[str, str]]:
    """(special tokens, ordinary tokens, descriptions) the config asks for; the backtrack token joins the special
    ones. A token listed twice is an error naming it (descriptions were checked with the config)."""
    model = config.model
    descriptions: dict[str, str] = {}
    if model.new_special_tokens_config:
        descriptions = read_token_descriptions(Path(model.new_special_tokens_config))
    special = [*model.add_special_tokens, *descriptions]
    if config.data.backtrack_token and config.data.backtrack_token not in special:
        special.append(config.data.backtrack_token)
    listed = [*special, *model.add_tokens]
    repeated = sorted({t for t in listed if listed.count(t) > 1})
    if repeated:
        raise UserError(f"add_special_tokens/add_tokens/new_special_tokens_config: {repeated[0]!r} is listed twice")
    return special, list(model.add_tokens), descriptions


def add_tokens(tokenizer: PreTrainedTokenizerBase, config: Config) -> NewTokens:
    """Add the config's tokens to the tokenizer (special ones are never split, stripped or normalised)."""
    special, ordinary, descriptions = requested_tokens(config)
    new = NewTokens(descriptions=descriptions, original_size=len(tokenizer), init=config.model.init_special_tokens)
    vocabulary = tokenizer.get_vocab()
    for token in [*special, *ordinary]:
        if token in vocabulary:
            new.existing[token] = vocabulary[token]
    fresh_special = [t for t in special if t not in new.existing]
    fresh_ordinary = [t for t in ordinary if t not in new.existing]
    if fresh_special:
        tokens = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in fresh_special]
        tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    if fresh_ordinary:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in fresh_ordinary])
    new.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in [*fresh_special, *fresh_ordinary]}
    new.special = set(fresh_special)
    for token, description in descriptions.items():
        ids = tokenizer(description, add_special_tokens=False)["input_ids"]
        if not ids or any(i >= new.original_size for i in ids):
            raise UserError(f"new_special_tokens_config: the description of {token!r} must be ordinary text")
    return new


def own_padding_multiple(rows: int) -> int:
    """The multiple a model's embedding rows are padded to: the largest power of two (at most 128) dividing them."""
    multiple = 1
    while multiple < 128 and rows % (multiple * 2) == 0:
        multiple *= 2
    return multiple


def embed_new_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    new: NewTokens,
    seed: int,
    resize_to_multiple_of: int | None = None,
) -> None:
    """Give the new ids embedding rows (growing the matrices only when they do not fit) and initialise them."""
    embeddings = model.get_input_embeddings()
    new.rows_before = new.rows_after = full_shape(embeddings.weight)[0]
    if not new.ids:
        return
    needed = max(new.ids.values()) + 1
    if needed > new.rows_before:
        multiple = resize_to_multiple_of or own_padding_multiple(new.rows_before)
        model.resize_token_embeddings(needed, pad_to_multiple_of=multiple, mean_resizing=False)
        new.rows_after = full_shape(model.get_input_embeddings().weight)[0]
    ids = torch.tensor(sorted(new.ids.values()))
    tokens = sorted(new.ids, key=new.ids.get)
    hidden = model.config.get_text_config().hidden_size
    noise = None
    if new.init in ("noise_init", "desc_init_w_noise"):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(ids), hidden, generator=generator) / math.sqrt(hidden)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    for weight in matrices:
        with gathered([weight], modifier_rank=0):
            rows = weight.data
            if new.init == "noise_init":
                base = rows[: new.original_size].float().mean(dim=0, keepdim=True).expand(len(ids), -1)
            else:
                base = torch.stack(
                    [rows[_description_ids(tokenizer, new.descriptions[t])].float().mean(dim=0) for t in tokens]
                )
            values = base if noise is None else base + noise.to(base.device)
            rows[ids.to(rows.device)] = values.to(rows.dtype)


def _description_ids(tokenizer: PreTrainedTokenizerBase, description: str) -> torch.Tensor:
    return torch.tensor(tokenizer(description, add_special_tokens=False)["input_ids"])
