"""Batches: padded, padding-free (one row of the micro-batch's sequences) or packed rows of max_length.

Labels follow the Hugging Face convention: `labels[t]` is the token at position t and the loss compares position
t-1's prediction with it. In a packed or padding-free row the first token of every example is unlabeled, so no
example is trained to predict the start of the next one. Every batch also carries metadata for the loop, computed
here on the CPU so the device never waits for the host:

- `predict_index`: flat indices (into rows x length) of the positions that predict a trained token, `targets` the
  tokens they predict and `target_sources` the dataset each comes from (the loss runs the LM head only there);
- `lengths`: the real tokens of each example (throughput and attention FLOPs).

Packed and padding-free rows carry `cu_seq_lens`/`max_seq_len` (segment boundaries over the flattened rows, for
flash-attention's varlen kernels and the per-example sdpa on CPU) and `segment_ids` (an explicit block-diagonal
mask for sdpa and eager on GPU): boundaries are never inferred from position ids, which may rewind at backtracks.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmhalluc.data.labels import IGNORE_INDEX

Example = dict[str, Any]


def add_targets(batch: dict[str, Any], sources: torch.Tensor, num_sources: int) -> dict[str, Any]:
    """Add predict_index, targets (ordered by source dataset) and source_counts (host ints) from the batch's labels;
    `sources` gives the source dataset of every position."""
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    index = predicts.flatten().nonzero().squeeze(1)
    target_sources = sources.flatten()[index]
    index = index[torch.argsort(target_sources, stable=True)]
    batch["predict_index"] = index
    batch["targets"] = labels.flatten()[index + 1]  # position t predicts token t + 1 of the same row
    batch["source_counts"] = torch.bincount(target_sources, minlength=num_sources).tolist()
    return batch


@dataclass(frozen=True)
class PaddedCollator:
    """Right-pads a list of examples to the longest (optionally to a multiple); labels are -100 on padding."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    num_sources: int = 1

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        """input_ids, attention_mask and labels (and position_ids when the examples carry them) of shape
        [len(examples), longest], the targets, and lengths."""
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        sources = torch.zeros((len(examples), longest), dtype=torch.long)
        with_positions = "position_ids" in examples[0]
        position_ids = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
            sources[row] = example.get("source", 0)
            if with_positions:
                position_ids[row, :n] = torch.tensor(example["position_ids"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if with_positions:
            batch["position_ids"] = position_ids
        batch["lengths"] = torch.tensor([len(e["input_ids"]) for e in examples])
        return add_targets(batch, sources, self.num_sources)


@dataclass(frozen=True)
class PackedCollator:
    """Stacks packed rows into [rows, longest row]; each example's position_ids restart at 0 (or are the example's
    own, e.g. rewound at backtracks). A row shorter than the longest is filled with a pad run (its own positions
    and segment, no labels)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    num_sources: int = 1

    def __call__(self, rows: Sequence[Sequence[Example]]) -> dict[str, Any]:
        """input_ids, position_ids, labels, segment_ids of shape [len(rows), longest row], lengths per example,
        segment boundaries and the targets."""
        sizes = [sum(len(e["input_ids"]) for e in row) for row in rows]
        longest = max(sizes)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        segment_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        sources = torch.zeros((len(rows), longest), dtype=torch.long)
        lengths, boundaries = [], [0]
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                n = len(example["input_ids"])
                input_ids[r, start : start + n] = torch.tensor(example["input_ids"])
                labels[r, start + 1 : start + n] = torch.tensor(example["labels"][1:])
                positions = example.get("position_ids")
                position_ids[r, start : start + n] = torch.tensor(positions) if positions else torch.arange(n)
                segment_ids[r, start : start + n] = len(boundaries)
                sources[r, start : start + n] = example.get("source", 0)
                lengths.append(n)
                start += n
                boundaries.append(r * longest + start)
            position_ids[r, start:] = torch.arange(longest - start)
            if start < longest:
                segment_ids[r, start:] = len(boundaries)
                boundaries.append((r + 1) * longest)
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "segment_ids": segment_ids,
            "lengths": torch.tensor(lengths),
            "cu_seq_lens": torch.tensor(boundaries, dtype=torch.int32),
            "max_seq_len": max(end - begin for begin, end in itertools.pairwise(boundaries)),
        }
        return add_targets(batch, sources, self.num_sources)


@dataclass(frozen=True)
class PaddingFreeCollator:
    """A micro-batch of sequences as one row [1, total tokens]: no pad token is computed, and with per-example
    attention the numbers equal the padded batch's."""

    pad_token_id: int
    num_sources: int = 1

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        """PackedCollator's layout for a single row holding every example."""
        return PackedCollator(self.pad_token_id, num_sources=self.num_sources)([examples])


def pack_best_fit(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Groups of example indices, each summing to at most `capacity`: every example, taken in `order`, goes into
    the fullest row it still fits in (best fit), or opens a new row."""
    bins: list[list[int]] = []
    # (space left, row number), kept sorted so the tightest row that fits is found by bisection.
    free: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens, more than the row capacity {capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
            continue
        space, number = free.pop(slot)
        bins[number].append(index)
        bisect.insort(free, (space - length, number))
    return bins


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best fit, longest examples first: the tightest packing, but rows end up holding examples of similar length."""
    return pack_best_fit(lengths, capacity, sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)))


def pack_shuffled_best_fit(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Best fit in a seeded random order: rows mix lengths (and so kinds) of examples, about 1% less tight."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    return pack_best_fit(lengths, capacity, order)


def pack_rows(lengths: Sequence[int], capacity: int, strategy: str, seed: int) -> list[list[int]]:
    """The packing strategy the config names: "shuffled_best_fit" or "best_fit_decreasing"."""
    if strategy == "best_fit_decreasing":
        return pack_best_fit_decreasing(lengths, capacity)
    return pack_shuffled_best_fit(lengths, capacity, seed)


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Real tokens over row slots (rows x capacity)."""
    return sum(lengths) / (len(bins) * capacity) if bins else 0.0


class PackedRows(torch.utils.data.Dataset):
    """A dataset whose item i is the list of examples packed into row i."""

    def __init__(self, examples: Any, bins: list[list[int]]):
        self.examples = examples
        self.bins = bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> list[Example]:
        return [self.examples[i] for i in self.bins[index]]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches: per epoch a seeded permutation cut into global batches, then into micro-batches.

    A global batch is `per_device * accumulation * num_processes` items; which items form it depends only on the
    seed and epoch, never on how it is split, so any split of the same global batch trains on the same data. The
    items of the last incomplete global batch of an epoch are not used in that epoch.
    """

    def __init__(
        self,
        num_items: int,
        per_device: int,
        accumulation: int,
        num_processes: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.num_items = num_items
        self.per_device = per_device
        self.accumulation = accumulation
        self.num_processes = num_processes
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.global_batch = per_device * accumulation * num_processes

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch."""
        return self.num_items // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of `epoch`."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        for step in range(self.steps_per_epoch):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            for micro in range(self.accumulation):
                start = (micro * self.num_processes + self.rank) * self.per_device
                yield batch[start : start + self.per_device]


def eval_batches(num_items: int, batch_size: int, num_processes: int, rank: int) -> list[list[int]]:
    """This rank's evaluation batches; every rank gets the same number (empty lists pad the short ranks)."""
    mine = list(range(rank, num_items, num_processes))
    per_rank = math.ceil(math.ceil(num_items / num_processes) / batch_size)
    batches = [mine[i * batch_size : (i + 1) * batch_size] for i in range(per_rank)]
    return batches
