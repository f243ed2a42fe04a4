"""Preference pairs: each row of a ranking dataset as two examples, prompt + chosen and prompt + rejected, rendered
with the chat template and labelled by the same exact masks as supervised fine-tuning (assistant tokens only;
training_detail spans and mask_backtracked respected), joined on their row. A pair is dropped, with its reason, when
either side cannot be used or both sides are the same tokens."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from llmhalluc.config import DataConfig
from llmhalluc.data.pipeline import DatasetStats, _describe, _prepare_one, column, mix_datasets, tokenize_options
from llmhalluc.errors import DataError

SIDES = ("chosen", "rejected")


@dataclass
class PairStats:
    """What preparation kept and dropped of a split's pairs, and the token numbers of each side."""

    rows: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)
    sides: dict[str, DatasetStats] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        """Pairs (what a batch counts)."""
        return self.pairs

    @property
    def tokens(self) -> int:
        """Tokens of both sides."""
        return sum(s.tokens for s in self.sides.values())

    @property
    def backtrack(self) -> dict[str, int]:
        """Backtrack numbers of the chosen side (where corrected traces are)."""
        return self.sides["chosen"].backtrack if self.sides else {}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "rows": self.rows,
            "pairs": self.pairs,
            "dropped": dict(self.dropped),
            **{side: stats.to_dict() for side, stats in self.sides.items()},
        }

    def summary(self, split: str) -> str:
        """Human-readable lines for the startup log."""
        dropped = ", ".join(f"{reason}={count}" for reason, count in sorted(self.dropped.items())) or "none"
        lines = [f"{split}: {self.pairs} pairs from {self.rows} rows; dropped: {dropped}"]
        for side, stats in self.sides.items():
            lines.append(
                f"{split}/{side}: {stats.tokens} tokens, {stats.trained_tokens} trained; truncated: {stats.truncated}"
            )
        return "\n".join(lines)


def prepare_pairs(
    names: list[str],
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    main_process_first: Callable[[], AbstractContextManager] = nullcontext,
    mix: bool = True,
) -> tuple[datasets.Dataset, PairStats]:
    """The tokenized pairs of the named ranking datasets (columns `chosen_*`, `rejected_*`, `length`, `source`, and
    `pair`, the pair's index in the result), mixed as data.mix_strategy says, and their stats."""
    options = tokenize_options(data, tokenizer)
    parts, stats = [], PairStats()
    with main_process_first():
        for index, name in enumerate(names):
            prepared = {side: _prepare_one(name, data, tokenizer, options, seed, side) for side in SIDES}
            part, dropped, rows = join_pairs(prepared)
            if len(part) == 0:
                first = next(iter(dropped), "no rows")
                raise DataError(f"dataset {name!r}: every pair was dropped; first reason: {first}")
            parts.append(part.add_column("source", [index] * len(part)))
            stats.rows += rows
            stats.dropped += dropped
    dataset = mix_datasets(parts, data.mix_strategy if mix else "concat", data.interleave_probs, seed)
    dataset = dataset.add_column("pair", np.arange(len(dataset)))
    stats.pairs = len(dataset)
    for side in SIDES:
        side_stats = DatasetStats(rows=stats.rows)
        _describe(side_view(dataset, side), side_stats)
        stats.sides[side] = side_stats
    return dataset, stats


def join_pairs(prepared: dict[str, tuple[datasets.Dataset, DatasetStats]]) -> tuple[datasets.Dataset, Counter, int]:
    """(the pairs whose both sides were kept and differ, the reasons of the dropped ones, the rows read)."""
    (chosen, chosen_stats), (rejected, rejected_stats) = prepared["chosen"], prepared["rejected"]
    dropped = Counter()
    for row in sorted(set(chosen_stats.dropped_rows) | set(rejected_stats.dropped_rows)):
        if row in chosen_stats.dropped_rows:
            dropped[f"chosen_{chosen_stats.dropped_rows[row]}"] += 1
        else:
            dropped[f"rejected_{rejected_stats.dropped_rows[row]}"] += 1
    chosen_rows, rejected_rows = column(chosen, "row"), column(rejected, "row")
    common = np.intersect1d(chosen_rows, rejected_rows)
    chosen = chosen.select(np.searchsorted(chosen_rows, common))
    rejected = rejected.select(np.searchsorted(rejected_rows, common))
    same = [
        c == r
        for c, r in zip(
            chosen.with_format("arrow")["input_ids"].to_pylist(), rejected.with_format("arrow")["input_ids"].to_pylist()
        )
    ]
    if any(same):
        dropped["identical_chosen_rejected"] += sum(same)
        keep = np.flatnonzero(~np.array(same))
        chosen, rejected = chosen.select(keep), rejected.select(keep)
    columns = {}
    for side, part in (("chosen", chosen), ("rejected", rejected)):
        for name in part.column_names:
            if name != "row":
                columns[f"{side}_{name}"] = part.with_format("arrow")[name]
    columns["row"] = chosen.with_format("arrow")["row"]
    pairs = datasets.Dataset(pa.table(columns)) if len(chosen) else datasets.Dataset.from_dict({"row": []})
    if len(pairs):
        pairs = pairs.add_column("length", column(pairs, "chosen_length") + column(pairs, "rejected_length"))
    return pairs, dropped, chosen_stats.rows


def side_view(pairs: datasets.Dataset, side: str) -> datasets.Dataset:
    """One side of the pairs as ordinary examples (for the stats and the audit)."""
    prefix = f"{side}_"
    names = [n for n in pairs.column_names if n.startswith(prefix)]
    return pairs.select_columns([*names, "source"]).rename_columns({n: n.removeprefix(prefix) for n in names})
