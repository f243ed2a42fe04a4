"""New tokens: added to the tokenizer, given embedding rows (resizing only when their ids do not fit), initialised.

The new ids are the tokenizer's ids after adding, never "the last N rows": models whose embedding matrix already
has spare rows (Qwen2.5/Qwen3) put new tokens there, and those rows are initialised too. A token the config names
that the tokenizer already has as an added token it does not use itself (Llama-3's `<|reserved_special_token_N|>`:
untrained rows, in no template, neither bos nor eos) is reused: its row is initialised and trained like a new one.
A token the tokenizer uses (eos, pad, a token of the chat template) or an ordinary word is left alone and reported.

Initialisation (LLaMA-Factory's names, and the researchers' `combined`), with noise N(0, 1/hidden_size) seeded:

- `noise_init`: the mean of the original vocabulary's rows (ids the tokenizer had before adding, less the rows
  being initialised; never rows of vocabulary padding) plus noise;
- `desc_init`: the mean of the rows at the description's token ids; `desc_init_w_noise`: plus the noise;
- `combined`: description_weight x the description's mean + (1 - description_weight) x the mean of the rows of the
  token's words (each word tokenized alone, ids de-duplicated in order) + noise.

Output embeddings, when not tied, follow `noise_init`/`desc_init*` from their own rows with the same noise; under
`combined` they take the input-based value with an independent noise draw (the researchers' rule). A tied model
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

from llmhalluc.config import Config, TokenDescription, read_token_descriptions
from llmhalluc.data.template import chat_template_of
from llmhalluc.errors import UserError
from llmhalluc.runtime.zero import full_shape, gathered


@dataclass
class NewTokens:
    """The tokens whose rows a run initialises and trains (added ones and reused ones), and those left alone."""

    ids: dict[str, int] = field(default_factory=dict)  # every token whose row is initialised: added and reused
    special: set[str] = field(default_factory=set)  # the added tokens that are special
    reused: dict[str, int] = field(default_factory=dict)  # tokens the tokenizer had, unused by it: initialised
    existing: dict[str, int] = field(default_factory=dict)  # tokens the tokenizer had and uses: left alone
    descriptions: dict[str, TokenDescription] = field(default_factory=dict)
    original_size: int = 0  # len(tokenizer) before adding: ids below it are the original vocabulary
    init: str = "noise_init"
    rows_before: int | None = None
    rows_after: int | None = None

    def summary(self) -> dict[str, Any]:
        """The run summary's record of the tokens."""
        added = [t for t in self.ids if t not in self.reused]
        return {
            "added": [{"token": t, "id": self.ids[t], "special": t in self.special} for t in added],
            "reused": self.reused,
            "already_in_vocabulary": self.existing,
            "init": self.init,
            "embedding_rows": {"before": self.rows_before, "after": self.rows_after},
        }


def requested_tokens(config: Config) -> tuple[list[str], list[str], dict[str, TokenDescription]]:
    """(special tokens, ordinary tokens, descriptions) the config asks for; the backtrack token (through its alias)
    joins the special ones. A token listed twice is an error naming it (descriptions were checked with the
    config)."""
    model = config.model
    descriptions: dict[str, TokenDescription] = {}
    if model.new_special_tokens_config:
        descriptions = read_token_descriptions(Path(model.new_special_tokens_config))
    aliases = config.data.token_aliases
    descriptions = {aliases.get(token, token): entry for token, entry in descriptions.items()}
    special = [aliases.get(t, t) for t in model.add_special_tokens]
    special += [t for t in descriptions if t not in special]
    backtrack = config.data.backtrack_target()
    if backtrack and backtrack not in special:
        special.append(backtrack)
    listed = [*special, *model.add_tokens]
    repeated = sorted({t for t in listed if listed.count(t) > 1})
    if repeated:
        raise UserError(f"add_special_tokens/add_tokens/new_special_tokens_config: {repeated[0]!r} is listed twice")
    return special, list(model.add_tokens), descriptions


def used_by_tokenizer(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """Whether the tokenizer relies on the token itself: bos, eos, pad, unk, its named special tokens, or a token
    its chat template writes."""
    return token in tokenizer.all_special_tokens or token in chat_template_of(tokenizer)


def add_tokens(tokenizer: PreTrainedTokenizerBase, config: Config) -> NewTokens:
    """Add the config's tokens to the tokenizer (special ones are never split, stripped or normalised); reuse the
    added tokens it has but does not use; leave the others it has alone."""
    special, ordinary, descriptions = requested_tokens(config)
    new = NewTokens(descriptions=descriptions, original_size=len(tokenizer), init=config.model.init_special_tokens)
    vocabulary = tokenizer.get_vocab()
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    for token in [*special, *ordinary]:
        if token not in vocabulary:
            continue
        if token in special and token in added and not used_by_tokenizer(tokenizer, token):
            new.reused[token] = vocabulary[token]
        else:
            new.existing[token] = vocabulary[token]
    fresh_special = [t for t in special if t not in vocabulary]
    fresh_ordinary = [t for t in ordinary if t not in vocabulary]
    if fresh_special:
        tokens = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in fresh_special]
        tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    if fresh_ordinary:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in fresh_ordinary])
    fresh = {t: tokenizer.convert_tokens_to_ids(t) for t in [*fresh_special, *fresh_ordinary]}
    new.ids = {**new.reused, **fresh}
    new.special = set(fresh_special)
    for alias, token in config.data.token_aliases.items():
        if token not in tokenizer.get_vocab():
            raise UserError(f"token_aliases: {alias!r} stands for {token!r}, which is not a token of the tokenizer")
    for token, entry in descriptions.items():
        for text in (entry.description, *entry.words):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids or any(i >= new.original_size or i in new.ids.values() for i in ids):
                raise UserError(f"new_special_tokens_config: {token!r}: {text!r} must be ordinary text")
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
    """Give the new ids embedding rows (growing the matrices only when they do not fit) and initialise the rows of
    every added and reused token."""
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
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(ids), hidden, generator=generator) / math.sqrt(hidden)
    if new.init == "desc_init":
        noise = torch.zeros_like(noise)
    inputs = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    untied = output is not None and output.weight is not inputs
    with gathered([inputs, *([output.weight] if untied else [])], modifier_rank=0):
        base = initial_rows(inputs.data, tokenizer, new, tokens, ids)
        inputs.data[ids.to(inputs.device)] = (base + noise.to(base.device)).to(inputs.dtype)
        if untied:
            rows = output.weight.data
            if new.init == "combined":  # the input-based value, an independent draw of noise
                own = base + (torch.randn(len(ids), hidden, generator=generator) / math.sqrt(hidden)).to(base.device)
            else:
                own = initial_rows(rows, tokenizer, new, tokens, ids) + noise.to(rows.device)
            rows[ids.to(rows.device)] = own.to(rows.dtype)


def initial_rows(
    rows: torch.Tensor, tokenizer: PreTrainedTokenizerBase, new: NewTokens, tokens: list[str], ids: torch.Tensor
) -> torch.Tensor:
    """The value before noise of each token's row, from the matrix `rows` (in float32)."""
    if new.init == "noise_init":
        keep = torch.ones(new.original_size, dtype=torch.bool)
        keep[ids[ids < new.original_size]] = False  # reused rows are what is being replaced
        return rows[: new.original_size][keep.to(rows.device)].float().mean(dim=0, keepdim=True).expand(len(ids), -1)
    values = []
    for token in tokens:
        entry = new.descriptions[token]
        described = rows[_ids_of(tokenizer, [entry.description])].float().mean(dim=0)
        if new.init == "combined":
            worded = rows[_ids_of(tokenizer, list(entry.words))].float().mean(dim=0)
            described = entry.description_weight * described + (1 - entry.description_weight) * worded
        values.append(described)
    return torch.stack(values)


def _ids_of(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """The token ids of each text tokenized alone, de-duplicated in order (a description's are kept as written)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids if len(texts) == 1 else list(dict.fromkeys(ids)))
