"""Backtrack tokens: a token that deletes the token before it, for training models to take back a wrong step.

Data holds an error, then as many backtrack tokens as the error has tokens, then the correction. Plain SFT trains
all of it; masked SFT keeps the error as input but never as a target. Three operations, all on token ids of the
training tokenizer:

- `apply_backtracks`: the text as the model meant it (each backtrack deletes itself and the nearest surviving token
  before it), for scoring generations;
- `find_backtracked`: the k tokens before each run of k backtracks (never reaching outside the assistant span the
  run is in), which masked SFT keeps out of the labels;
- `backtrack_positions`: position ids that follow the text as it stands after the deletions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def apply_backtracks(token_ids: Sequence[int], backtrack_id: int) -> list[int]:
    """The ids left after each backtrack token deletes itself and the nearest surviving token before it."""
    kept: list[int] = []
    for token in token_ids:
        if token == backtrack_id:
            if kept:
                kept.pop()
        else:
            kept.append(token)
    return kept


def backtrack_runs(token_ids: Sequence[int], backtrack_id: int, start: int = 0, stop: int | None = None):
    """(first index, length) of every maximal run of backtrack tokens in token_ids[start:stop]."""
    stop = len(token_ids) if stop is None else stop
    runs, index = [], start
    while index < stop:
        if token_ids[index] == backtrack_id:
            first = index
            while index < stop and token_ids[index] == backtrack_id:
                index += 1
            runs.append((first, index - first))
        else:
            index += 1
    return runs


@dataclass
class BacktrackStats:
    """What backtrack masking found in one example (summed per dataset by the pipeline)."""

    runs: int = 0
    tokens: int = 0  # backtrack tokens inside assistant spans
    masked: int = 0  # tokens kept out of the labels (0 unless masking is on)
    clamped: int = 0  # runs with fewer tokens before them in their span than backtracks
    masked_positions: list[int] = field(default_factory=list)  # the tokens masked SFT keeps out of the labels


def find_backtracked(
    token_ids: Sequence[int], spans: Sequence[tuple[int, int]], backtrack_id: int, mask: bool
) -> BacktrackStats:
    """For each run of k backtracks inside a token span [first, stop), the k tokens before the run (within the span)
    as masked_positions when `mask`; count runs, masked tokens and runs clamped at the span's start."""
    stats = BacktrackStats()
    for first, stop in spans:
        for run_start, length in backtrack_runs(token_ids, backtrack_id, first, stop):
            stats.runs += 1
            stats.tokens += length
            begin = max(first, run_start - length)
            if run_start - length < first:
                stats.clamped += 1
            if mask:
                stats.masked += run_start - begin
                stats.masked_positions.extend(range(begin, run_start))
    return stats


def backtrack_positions(token_ids: Sequence[int], backtrack_id: int) -> list[int]:
    """Position ids that rewind at backtracks: an ordinary token takes the current depth (then depth + 1); a backtrack
    token takes the previous position + 1, then depth - 1 (not below 0). `x x x B x` -> `0 1 2 3 2`."""
    positions, depth = [], 0
    for token in token_ids:
        if token == backtrack_id:
            positions.append(positions[-1] + 1 if positions else 0)
            depth = max(depth - 1, 0)
        else:
            positions.append(depth)
            depth += 1
    return positions
