"""Batches: padded, or packed (best-fit rows, restarting position_ids, no attention_mask).

Labels follow the Hugging Face convention: `labels[t]` is the token at position t and the loss compares position
t-1's prediction with it. In a packed row the first token of every example is unlabeled, so no example is trained
to predict the start of the next one. Every batch also carries `lengths`, the real tokens of each example, which
is metadata for the loop, not a model input.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmhalluc.data.chat import IGNORE_INDEX

Example = dict[str, list[int]]


@dataclass(frozen=True)
class PaddedCollator:
    """Right-pads a list of examples to the longest (optionally to a multiple); labels are -100 on padding."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels of shape [len(examples), longest], and lengths."""
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "lengths": lengths}


@dataclass(frozen=True)
class PackedCollator:
    """Stacks packed rows into [rows, longest row]; each example's position_ids restart at 0, so attention stays
    inside it. A row shorter than the longest is filled with a pad run (its own positions, no labels).
    `cu_seq_lens` (segment boundaries over the flattened rows, the pad runs being segments too) and `max_seq_len`
    are the flash-attention varlen arguments for the same layout."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: Sequence[Sequence[Example]]) -> dict[str, torch.Tensor]:
        """input_ids, position_ids and labels of shape [len(rows), longest row], lengths per example, and the
        segment boundaries."""
        sizes = [sum(len(e["input_ids"]) for e in row) for row in rows]
        longest = max(sizes)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        lengths, boundaries = [], [0]
        for r, row in enumerate(rows):
            start = 0
            for example in row:
                n = len(example["input_ids"])
                input_ids[r, start : start + n] = torch.tensor(example["input_ids"])
                labels[r, start + 1 : start + n] = torch.tensor(example["labels"][1:])
                position_ids[r, start : start + n] = torch.arange(n)
                lengths.append(n)
                start += n
                boundaries.append(r * longest + start)
            position_ids[r, start:] = torch.arange(longest - start)
            if start < longest:
                boundaries.append((r + 1) * longest)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": labels,
            "lengths": torch.tensor(lengths),
            "cu_seq_lens": torch.tensor(boundaries, dtype=torch.int32),
            "max_seq_len": max(end - begin for begin, end in itertools.pairwise(boundaries)),
        }


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


def should_pack(lengths: Sequence[int], max_length: int, packing: bool | None) -> bool:
    """The packing setting, or with None (auto): pack short chats, those whose median fills a quarter row at most."""
    if packing is not None:
        return packing
    ordered = sorted(lengths)
    return bool(ordered) and ordered[len(ordered) // 2] * 4 <= max_length


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
