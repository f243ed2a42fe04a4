"""Rewards: a metric computed per completion. Built-ins score what the model meant (backtracks applied) against the
reference as it reads after its own backtracks; user functions are called as TRL calls them.

Built-ins (docs/grpo.md has the table and hand-computed examples):

- `gsm8k`: 1 when the final answer (the dataset's answer markers) equals the reference's, else 0; on an
  unanswerable question 1 for abstaining.
- `squad_v2`: SQuAD v2 F1 on answerable questions (an abstention scores 0); on unanswerable ones +1 for abstaining
  and -1 for any answer (a hallucination).
- `format`: 1 when the completion contains `format_pattern`, else 0.
- `backtrack`: the researchers' backtrack efficiency on token ids, with the reference's backtracks applied (their
  code compared with the un-applied reference, so the gold trace itself lost reward). With n backtrack tokens,
  acc(p, t) the share of positions of t that p matches (1 when equal), gold the reference's ids after backtracks,
  draft the completion before its first backtrack and final the completion after them:
  n > max_backtracks: -1; n = 0: 0 when final is the gold, else -0.1; improvement = acc(final) - acc(draft) > 0 and
  the draft more than half the gold's length: 0.4 x improvement + 0.25 / sqrt(n); an improvement from a shorter
  draft: -0.2 n; no improvement: -0.2 n when the draft was already the gold, else -0.3.

A user function has TRL's signature `f(prompts, completions, **columns) -> list[float | None]`: prompts are chats
(lists of messages), completions `[{"role": "assistant", "content": raw text}]` (a backtrack token shown as the
data writes it), and the columns are the dataset row's, plus `reference`, `answerable`, `completion_ids` (up to the
end of turn) and `trainer_state` (`global_step`, `max_steps`). None means "does not apply" (TRL's): a completion no
function scores gets advantage 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmhalluc.data.backtrack import apply_backtracks
from llmhalluc.errors import UserError
from llmhalluc.eval.metrics import score

BUILT_IN = ("gsm8k", "squad_v2", "format", "backtrack")


@dataclass
class Scoring:
    """What the rewards of a batch of completions read: each completion's prompt, texts and ids, and its row."""

    prompts: list[list[dict[str, Any]]]  # the chat each completion answers
    meant: list[str]  # the completion as it reads after its backtracks
    raw: list[str]  # the completion as generated (backtrack tokens shown as the data writes them)
    ids: list[list[int]]  # the completion's ids up to its end of turn (not included)
    references: list[list[str]]  # reference answers, backtracks applied
    reference_ids: list[list[int]]  # the first reference's ids, backtracks applied
    answerable: list[bool | None]
    metrics: list[str]  # the dataset's metric (gsm8k, squad_v2, exact_match)
    markers: list[tuple[str, ...]]  # the dataset's final-answer markers
    columns: list[dict[str, Any]]  # the dataset row
    step: int = 0
    max_steps: int = 0


@dataclass(frozen=True)
class Reward:
    """A named reward function of a Scoring, one value (or None) per completion."""

    name: str
    function: Callable[[Scoring], list[float | None]]


def gsm8k_reward(batch: Scoring, abstention: str) -> list[float | None]:
    """1 for the reference's final answer (or abstaining where it cannot be answered), else 0."""
    return [
        float(score("gsm8k", text, refs, answerable, abstention, markers).correct)
        for text, refs, answerable, markers in zip(batch.meant, batch.references, batch.answerable, batch.markers)
    ]


def squad_v2_reward(batch: Scoring, abstention: str) -> list[float | None]:
    """F1 on answerable questions; +1 for abstaining and -1 for answering an unanswerable one."""
    rewards: list[float | None] = []
    for text, refs, answerable in zip(batch.meant, batch.references, batch.answerable):
        scored = score("squad_v2", text, refs, answerable, abstention)
        rewards.append(scored.f1 if answerable is not False else (1.0 if scored.abstained else -1.0))
    return rewards


def format_reward(batch: Scoring, pattern: re.Pattern) -> list[float | None]:
    """1 when the completion (backtracks applied) contains the pattern."""
    return [float(pattern.search(text) is not None) for text in batch.meant]


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """1 when equal; else the share of the target's positions the prediction matches (0 for an empty target)."""
    if list(predicted) == list(target):
        return 1.0
    if not target:
        return 0.0
    return sum(p == t for p, t in zip(predicted, target)) / len(target)


def backtrack_efficiency(ids: Sequence[int], gold: Sequence[int], backtrack_id: int, max_backtracks: int) -> float:
    """The researchers' backtrack reward of one completion against the gold ids (backtracks applied)."""
    count = sum(token == backtrack_id for token in ids)
    if count > max_backtracks:
        return -1.0
    if count == 0:
        return 0.0 if token_accuracy(ids, gold) == 1.0 else -0.1
    draft = list(ids[: list(ids).index(backtrack_id)])
    improvement = token_accuracy(apply_backtracks(ids, backtrack_id), gold) - token_accuracy(draft, gold)
    if improvement > 0:
        return 0.4 * improvement + 0.25 / math.sqrt(count) if len(draft) > 0.5 * len(gold) else -0.2 * count
    return -0.2 * count if token_accuracy(draft, gold) == 1.0 else -0.3


def backtrack_reward(batch: Scoring, backtrack_id: int, max_backtracks: int) -> list[float | None]:
    """backtrack_efficiency of every completion."""
    return [
        backtrack_efficiency(ids, gold, backtrack_id, max_backtracks)
        for ids, gold in zip(batch.ids, batch.reference_ids)
    ]


def user_reward(function: Callable[..., Any], name: str) -> Callable[[Scoring], list[float | None]]:
    """A user function called with TRL's arguments, its answer checked."""

    def call(batch: Scoring) -> list[float | None]:
        keys = sorted({key for row in batch.columns for key in row})
        columns = {key: [row.get(key) for row in batch.columns] for key in keys}
        columns |= {
            "reference": [refs[0] for refs in batch.references],
            "answerable": batch.answerable,
            "completion_ids": batch.ids,
            "trainer_state": _TrainerState(batch.step, batch.max_steps),
        }
        completions = [[{"role": "assistant", "content": text}] for text in batch.raw]
        values = function(prompts=batch.prompts, completions=completions, **columns)
        if not isinstance(values, list | tuple) or len(values) != len(batch.raw):
            raise UserError(
                f"reward function {name!r} returned {type(values).__name__} of length "
                f"{len(values) if hasattr(values, '__len__') else '?'}; expected a list of {len(batch.raw)} numbers"
            )
        checked = []
        for value in values:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise UserError(f"reward function {name!r} returned {value!r}; expected a number or None")
            checked.append(None if value is None or math.isnan(value) else float(value))
        return checked

    return call


@dataclass(frozen=True)
class _TrainerState:
    """What TRL passes as trainer_state that a reward function may read."""

    global_step: int
    max_steps: int


def load_function(entry: str) -> Callable[..., Any]:
    """A function named by `package.module.function` or `path/to/file.py:function`."""
    if ":" in entry:
        path, _, attribute = entry.rpartition(":")
        file = Path(path)
        if not file.is_file():
            raise UserError(f"reward_funcs: {entry!r}: no file {file}")
        spec = importlib.util.spec_from_file_location(f"llmhalluc_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module_name, _, attribute = entry.rpartition(".")
        if not module_name:
            raise UserError(
                f"reward_funcs: {entry!r} is neither a built-in ({', '.join(BUILT_IN)}) nor an import path "
                "(package.module.function or path/to/file.py:function)"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UserError(f"reward_funcs: {entry!r}: cannot import {module_name} ({err})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserError(f"reward_funcs: {entry!r}: {attribute!r} is not a function of {module.__name__}")
    return function


def build_rewards(
    names: Sequence[str], abstention: str, format_pattern: str, backtrack_id: int | None, max_backtracks: int
) -> list[Reward]:
    """The reward functions a config names, built-ins bound to their settings."""
    rewards = []
    for entry in names:
        if entry == "gsm8k":
            rewards.append(Reward(entry, lambda batch: gsm8k_reward(batch, abstention)))
        elif entry == "squad_v2":
            rewards.append(Reward(entry, lambda batch: squad_v2_reward(batch, abstention)))
        elif entry == "format":
            try:
                pattern = re.compile(format_pattern)
            except re.error as err:
                raise UserError(f"format_pattern: {format_pattern!r} is not a regular expression ({err})") from None
            rewards.append(Reward(entry, lambda batch, pattern=pattern: format_reward(batch, pattern)))
        elif entry == "backtrack":
            if backtrack_id is None:
                raise UserError("reward_funcs: backtrack needs backtrack_token (the token that deletes the one before)")
            rewards.append(Reward(entry, lambda batch: backtrack_reward(batch, backtrack_id, max_backtracks)))
        else:
            function = load_function(entry)
            name = getattr(function, "__name__", None) or type(function).__name__
            rewards.append(Reward(name, user_reward(function, name)))
    names_seen = [reward.name for reward in rewards]
    repeated = sorted({name for name in names_seen if names_seen.count(name) > 1})
    if repeated:
        raise UserError(f"reward_funcs: {', '.join(repeated)} named twice (each reward is logged by its name)")
    return rewards
