"""`train/sft.py CONFIG --dry-run`: resolve config and data, show what will be trained, load no model weights."""

from __future__ import annotations

import sys
from typing import TextIO

from transformers import PreTrainedTokenizerBase

from llmhalluc.config import Config
from llmhalluc.data.batching import pack_rows, packing_efficiency
from llmhalluc.data.chat import IGNORE_INDEX
from llmhalluc.data.pipeline import column, prepare_dataset
from llmhalluc.models.loading import load_tokenizer

GREEN, RESET = "\033[32m", "\033[0m"


def mark_trained(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int], colour: bool) -> str:
    """The example's text with trained tokens in green (colour) or between [[ and ]] (plain)."""
    opening, closing = (GREEN, RESET) if colour else ("[[", "]]")
    pieces, run, trained = [], [], None
    for token, label in zip(input_ids, labels):
        is_trained = label != IGNORE_INDEX
        if run and is_trained != trained:
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(f"{opening}{text}{closing}" if trained else text)
            run = []
        run.append(token)
        trained = is_trained
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append(f"{opening}{text}{closing}" if trained else text)
    return "".join(pieces)


def dry_run(config: Config, examples: int = 3, out: TextIO | None = None) -> None:
    """Print the resolved config, dataset stats and a few examples with their trained tokens marked."""
    out = out or sys.stdout
    colour = out.isatty()
    tokenizer = load_tokenizer(config.model)
    print(f"config:\n{config.to_yaml()}", file=out)
    splits = [("train", config.data.dataset)] + (
        [("eval", config.data.eval_dataset)] if config.data.eval_dataset else []
    )
    for split, names in splits:
        dataset, stats = prepare_dataset(names, config.data, tokenizer, config.training.seed)
        print(stats.summary(split), file=out)
        lengths = column(dataset, "length").tolist()
        if split == "train" and config.data.packing:
            bins = pack_rows(lengths, config.data.max_length, config.data.packing_strategy, config.training.seed)
            efficiency = packing_efficiency(lengths, bins, config.data.max_length)
            print(
                f"train: packing {len(lengths)} examples into {len(bins)} rows, efficiency {efficiency:.1%}", file=out
            )
        for index in range(min(examples, len(dataset))):
            row = dataset[index]
            marked = mark_trained(tokenizer, row["input_ids"], row["labels"], colour)
            print(f"--- {split} example {index} ({row['length']} tokens, {row['trained']} trained) ---", file=out)
            print(marked, file=out)
    print("dry run: nothing was trained or written", file=out)
