"""new_special_tokens_config: the file that describes new tokens (for their initialisation), read and checked with
the config, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from llmhalluc.config.schema import DataConfig, ModelConfig
from llmhalluc.errors import ConfigError


@dataclass(frozen=True)
class TokenDescription:
    """A new token's entry in new_special_tokens_config: its description, words that say what it does, and the
    description's weight in the combined initialisation (the words get the rest)."""

    description: str
    words: tuple[str, ...] = ()
    description_weight: float = 0.5


def token_description_problems(model: ModelConfig, data: DataConfig) -> list[str]:
    """desc_init* needs a description, combined a description and words, for every token it initialises."""
    init = model.init_special_tokens
    if init == "noise_init":
        return []
    if not model.new_special_tokens_config:
        return [f"init_special_tokens: {init} needs new_special_tokens_config (a YAML mapping token: description)"]
    try:
        descriptions = read_token_descriptions(Path(model.new_special_tokens_config))
    except ConfigError as err:
        return err.problems
    wanted = [*model.add_special_tokens, *model.add_tokens, *([data.backtrack_token] if data.backtrack_token else [])]
    where = model.new_special_tokens_config
    problems = [
        f"init_special_tokens: {init} needs a description for every new token, and {token!r} has none in {where}"
        for token in wanted
        if token not in descriptions and data.token_aliases.get(token, token) not in descriptions
    ]
    if init == "combined":
        problems += [
            f"init_special_tokens: combined needs words for every new token, and {token!r} has none in {where} "
            "(words: [delete, remove, ...])"
            for token, entry in descriptions.items()
            if not entry.words
        ]
    return problems


def read_token_descriptions(path: Path) -> dict[str, TokenDescription]:
    """new_special_tokens_config: a YAML mapping of token to its description, or to {description, words (or
    semantic_words), description_weight}."""
    if not path.is_file():
        raise ConfigError(f"new_special_tokens_config: file not found: {path}")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"new_special_tokens_config: {path} is not valid YAML: {problem}") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise ConfigError(f"new_special_tokens_config: {path} must be a mapping of token: description")
    read = {}
    for token, entry in mapping.items():
        where = f"new_special_tokens_config: token {token!r} in {path}"
        if isinstance(entry, str):
            entry = {"description": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a description or a mapping of description, words")
        unknown = set(entry) - {"description", "words", "semantic_words", "description_weight", "strategy"}
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r} (description, words, description_weight)")
        description = entry.get("description")
        if not isinstance(description, str) or not description.strip():
            raise ConfigError(f"{where} has an empty description")
        words = entry.get("words", entry.get("semantic_words", []))
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise ConfigError(f"{where}: words must be a list of non-empty words")
        weight = entry.get("description_weight", 0.5)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
            raise ConfigError(f"{where}: description_weight must be a number from 0 to 1, got {weight!r}")
        read[token] = TokenDescription(description, tuple(w.strip() for w in words), float(weight))
    return read
