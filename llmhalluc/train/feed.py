"""What the loop is fed: the training DataLoader in seeded global batches, its layout, and the evaluation set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from torch.utils.data import DataLoader

from llmhalluc.config import Config, DataConfig
from llmhalluc.data.audit import audit, audit_lines, check_backtracks, marked_html, warnings
from llmhalluc.data.batching import (
    GlobalBatchSampler,
    PackedCollator,
    PackedRows,
    PaddedCollator,
    PaddingFreeCollator,
    pack_rows,
    packing_efficiency,
)
from llmhalluc.data.pipeline import DatasetStats, column, prepare_dataset
from llmhalluc.errors import UserError
from llmhalluc.models.attention import per_example_sdpa
from llmhalluc.runtime.dist import data_preparation_turns

LAYOUTS = ("padded", "padding_free", "packed")


def batch_layout(data: DataConfig, attention: str, on_gpu: bool, compiled: bool) -> str:
    """How micro-batches are laid out: packed rows when asked; else padding-free where the attention path keeps
    examples apart exactly and fast (flash-attention varlen on GPU, per-example sdpa on CPU) unless the config says
    otherwise; else padded."""
    if data.packing:
        return "packed"
    if data.padding_free is not None:
        return "padding_free" if data.padding_free else "padded"
    fast = attention.startswith("flash_attention") if on_gpu else per_example_sdpa(attention, on_gpu, compiled)
    return "padding_free" if fast else "padded"


@dataclass
class TrainData:
    """The training DataLoader, its sampler, the batch layout, and what the run summary says about the data."""

    loader: DataLoader
    sampler: GlobalBatchSampler
    layout: str
    stats: DatasetStats
    audit: dict[str, Any] = field(default_factory=dict)  # the mask audit per dataset, and its warnings
    packing: dict[str, Any] | None = None  # rows and efficiency of packed rows
    workers: int = 0  # DataLoader worker processes per rank
    audit_panel: list[list[str]] = field(default_factory=list)  # [dataset, HTML] rows for wandb

    def summary(self) -> dict[str, Any]:
        """The run summary's record of the training data."""
        summary = {"train_data": self.stats.to_dict(), "batch_layout": self.layout, "mask_audit": self.audit}
        if self.packing is not None:
            summary["packing"] = self.packing
        return summary | {"dataloader_num_workers": self.workers}


@dataclass
class EvalData:
    """The tokenized evaluation examples (every eval dataset, concatenated), how they are batched, their stats."""

    dataset: Any
    collate: Any
    stats: DatasetStats


def build_train_loader(config: Config, tokenizer: Any, accelerator: Accelerator, layout: str) -> TrainData:
    """Tokenized training data as padded or padding-free micro-batches of sequences, or packed rows, in seeded
    global batches for this rank."""
    data, training = config.data, config.training
    examples, stats = prepare_dataset(
        data.dataset, data, tokenizer, training.seed, partial(data_preparation_turns, accelerator)
    )
    accelerator.print(stats.summary("train"))
    check_backtracks(stats, data)
    for line in audit_lines(stats, data):
        accelerator.print(line)
    problems = warnings(stats, data)
    for problem in problems:
        accelerator.print(f"warning: {problem}")
    panel = audit_panel(examples, tokenizer, data.dataset) if accelerator.is_main_process else []
    lengths = column(examples, "length").tolist()
    examples = examples.select_columns(model_columns(examples))
    audited = {"datasets": audit(stats, data), "warnings": problems}
    packing = None
    sources = len(data.dataset)
    if layout == "packed":
        bins = pack_rows(lengths, data.max_length, data.packing_strategy, training.seed)
        efficiency = packing_efficiency(lengths, bins, data.max_length)
        packing = {"rows": len(bins), "efficiency": round(efficiency, 4)}
        accelerator.print(
            f"packing: {len(lengths)} examples into {len(bins)} rows of {data.max_length} "
            f"({len(lengths) / len(bins):.1f} examples per row), efficiency {efficiency:.1%}; "
            "per_device_train_batch_size counts rows"
        )
        items, collate = (
            PackedRows(examples, bins),
            PackedCollator(tokenizer.pad_token_id, data.pad_to_multiple_of, sources),
        )
    elif layout == "padding_free":
        items, collate = examples, PaddingFreeCollator(tokenizer.pad_token_id, sources)
    else:
        items, collate = examples, PaddedCollator(tokenizer.pad_token_id, data.pad_to_multiple_of, sources)
    workers = data.dataloader_num_workers
    if workers is None:  # overlap collation with compute on GPU; on CPU the cores are busy computing
        workers = 2 if torch.cuda.is_available() else 0
    loader, sampler = seeded_loader(
        items, collate, training, accelerator, workers, "packed rows" if layout == "packed" else "examples"
    )
    return TrainData(loader, sampler, layout, stats, audited, packing, workers, panel)


def seeded_loader(
    items: Any, collate: Any, training: Any, accelerator: Accelerator, workers: int, what: str
) -> tuple[DataLoader, GlobalBatchSampler]:
    """A DataLoader of this rank's micro-batches of `items` in seeded global batches, and its sampler; an error when
    the items (`what` they are) do not fill one global batch."""
    sampler = GlobalBatchSampler(
        len(items),
        training.per_device_train_batch_size,
        training.gradient_accumulation_steps,
        accelerator.num_processes,
        accelerator.process_index,
        training.seed,
    )
    if sampler.steps_per_epoch == 0:
        raise UserError(
            f"the training set has {len(items)} {what}, fewer than one global batch of {sampler.global_batch} "
            f"(per_device_train_batch_size {training.per_device_train_batch_size} x gradient_accumulation_steps "
            f"{training.gradient_accumulation_steps} x {accelerator.num_processes} processes): lower the batch size "
            "or add data"
        )
    loader = DataLoader(
        items,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        # Its own generator, so iterating never consumes the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(training.seed),
    )
    return loader, sampler


def audit_panel(examples: datasets.Dataset, tokenizer: Any, names: list[str], per_dataset: int = 2) -> list[list[str]]:
    """[dataset, example as HTML with its trained tokens marked], the first examples of each dataset."""
    sources = column(examples, "source")
    rows = []
    for index, name in enumerate(names):
        for position in (sources == index).nonzero()[0][:per_dataset]:
            rows.append([name, marked_html(tokenizer, examples[int(position)])])
    return rows


def model_columns(dataset: datasets.Dataset) -> list[str]:
    """The columns a batch is built from."""
    return [name for name in ("input_ids", "labels", "position_ids", "source") if name in dataset.column_names]


def prepare_eval_set(config: Config, tokenizer: Any, accelerator: Accelerator) -> EvalData | None:
    """The tokenized evaluation examples (every eval dataset, concatenated), padded batches of them, and their stats;
    None without eval datasets."""
    if not config.data.eval_dataset:
        return None
    eval_set, stats = prepare_dataset(
        config.data.eval_dataset,
        config.data,
        tokenizer,
        config.training.seed,
        partial(data_preparation_turns, accelerator),
        mix=False,
    )
    collate = PaddedCollator(tokenizer.pad_token_id, config.data.pad_to_multiple_of, len(config.data.eval_dataset))
    return EvalData(eval_set.select_columns(model_columns(eval_set)), collate, stats)


def accumulation_windows(
    loader: DataLoader, sampler: GlobalBatchSampler, start_step: int, accumulation: int
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(epoch, the micro-batches of one optimizer step), forever, starting at optimizer step `start_step`."""
    epoch, done = divmod(start_step, sampler.steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        epoch_loader = skip_first_batches(loader, done * accumulation) if done else loader
        micro_batches = iter(epoch_loader)
        for _ in range(sampler.steps_per_epoch - done):
            yield epoch, [next(micro_batches) for _ in range(accumulation)]
        epoch, done = epoch + 1, 0


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to the device (non-blocking from pinned memory); plain values stay."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
