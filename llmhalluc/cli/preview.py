"""`train/sft.py CONFIG --dry-run [N]`: resolve config and data, show N examples of each dataset with what will be
trained, load no model weights, write nothing."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from transformers import PreTrainedTokenizerBase

from llmhalluc.config import Config, changed_keys
from llmhalluc.data.batching import pack_rows, packing_efficiency
from llmhalluc.data.facts import token_facts
from llmhalluc.data.labels import IGNORE_INDEX
from llmhalluc.data.pairs import prepare_pairs
from llmhalluc.data.pipeline import column, prepare_dataset
from llmhalluc.eval.rewards import build_rewards
from llmhalluc.models.loading import load_tokenizer
from llmhalluc.models.tokens import add_tokens
from llmhalluc.train.rollout import load_prompts, prompts_summary

# How a token is shown: trained, masked as a backtracked error (input, never a target), or neither.
MARKS = {"trained": (("\033[32m", "\033[0m"), ("[[", "]]")), "error": (("\033[31;9m", "\033[0m"), ("{{", "}}"))}


def mark_trained(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[int],
    labels: list[int],
    colour: bool,
    masked_errors: frozenset[int] = frozenset(),
) -> str:
    """The example's text with trained tokens in green or between [[ and ]], and backtracked errors that masked SFT
    keeps out of the loss in red strike-through or between {{ and }} (plain text when not on a terminal)."""

    def kind(position: int) -> str | None:
        if labels[position] != IGNORE_INDEX:
            return "trained"
        return "error" if position in masked_errors else None

    pieces, run, current = [], [], None
    for position, token in enumerate(input_ids):
        if run and kind(position) != current:
            pieces.append(_marked(tokenizer, run, current, colour))
            run = []
        run.append(token)
        current = kind(position)
    if run:
        pieces.append(_marked(tokenizer, run, current, colour))
    return "".join(pieces)


def _marked(tokenizer: PreTrainedTokenizerBase, tokens: list[int], kind: str | None, colour: bool) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if kind is None:
        return text
    opening, closing = MARKS[kind][0 if colour else 1]
    return f"{opening}{text}{closing}"


def shown_examples(sources: list[int], backtrack_runs: list[int] | None, datasets: int, per_dataset: int) -> list[int]:
    """Indices of up to `per_dataset` examples of each dataset, in order; with backtracks, examples that have some
    first (where masks differ from plain SFT)."""
    shown = []
    for source in range(datasets):
        mine = [i for i, s in enumerate(sources) if s == source]
        if backtrack_runs is not None:
            mine = sorted(mine, key=lambda i: backtrack_runs[i] == 0)
        shown += sorted(mine[:per_dataset])
    return shown


def dry_run(config: Config, examples: int = 3, out: TextIO | None = None) -> None:
    """Print the keys that differ from the defaults, dataset stats, and `examples` examples of each dataset with their
    trained tokens marked."""
    out = out or sys.stdout
    colour = out.isatty()
    tokenizer = load_tokenizer(config.model)
    new_tokens = add_tokens(tokenizer, config)
    changed = "\n".join(f"  {key}: {value!r}" for key, value in changed_keys(config).items())
    print(f"config (keys that differ from the defaults):\n{changed}", file=out)
    if new_tokens.ids or new_tokens.existing:
        added = ", ".join(f"{t} -> {i}" for t, i in new_tokens.ids.items()) or "none"
        print(
            f"new tokens: {added} (initialised with {new_tokens.init}); already in the vocabulary: "
            f"{', '.join(new_tokens.existing) or 'none'}",
            file=out,
        )
    splits = [("train", config.data.dataset)] + (
        [("eval", config.data.eval_dataset)] if config.data.eval_dataset else []
    )
    if config.training.stage == "grpo":
        show_prompts(config, tokenizer, examples, out)
        splits = []  # eval_dataset is generation evaluation's
    for split, names in splits:
        if config.training.stage == "dpo":
            show_pairs(config, tokenizer, split, names, examples, colour, out)
            continue
        dataset, stats = prepare_dataset(names, config.data, tokenizer, config.training.seed)
        print(stats.summary(split), file=out)
        lengths = column(dataset, "length").tolist()
        if split == "train" and config.data.packing:
            bins = pack_rows(lengths, config.data.max_length, config.data.packing_strategy, config.training.seed)
            efficiency = packing_efficiency(lengths, bins, config.data.max_length)
            print(
                f"train: packing {len(lengths)} examples into {len(bins)} rows, efficiency {efficiency:.1%}", file=out
            )
        runs = column(dataset, "backtrack_runs").tolist() if "backtrack_runs" in dataset.column_names else None
        if runs is not None:
            print(f"{split}: trained tokens [[...]], backtracked errors kept out of the loss {{{{...}}}}", file=out)
        for index in shown_examples(column(dataset, "source").tolist(), runs, len(names), examples):
            row = dataset[index]
            errors = frozenset(row.get("backtrack_masked_positions") or [])
            marked = mark_trained(tokenizer, row["input_ids"], row["labels"], colour, errors)
            name = names[row["source"]]
            print(
                f"--- {split} example {index} of {name} ({row['length']} tokens, {row['trained']} trained) ---",
                file=out,
            )
            print(marked, file=out)
    print("dry run: nothing was trained or written", file=out)


def show_pairs(
    config: Config, tokenizer: Any, split: str, names: list[str], examples: int, colour: bool, out: TextIO
) -> None:
    """A preference split's stats and dropped pairs, and its first pairs with each side's trained tokens marked."""
    pairs, stats = prepare_pairs(names, config.data, tokenizer, config.training.seed)
    print(stats.summary(split), file=out)
    for index in range(min(examples, len(pairs))):
        pair = pairs[index]
        for side in ("chosen", "rejected"):
            marked = mark_trained(tokenizer, pair[f"{side}_input_ids"], pair[f"{side}_labels"], colour, frozenset())
            print(
                f"--- {split} pair {index} of {names[pair['source']]}, {side} ({pair[f'{side}_length']} tokens, "
                f"{pair[f'{side}_trained']} trained) ---",
                file=out,
            )
            print(marked, file=out)


def show_prompts(config: Config, tokenizer: Any, examples: int, out: TextIO) -> None:
    """Stage grpo: the prompts' stats, the reward functions (loaded, so a bad one fails here), and the first prompts
    of each dataset as the model continues them, with their references."""
    facts = token_facts(tokenizer, config.data.backtrack_target(), None, config.data.token_aliases)
    rl = config.rl
    rewards = build_rewards(
        rl.reward_funcs, config.data.abstention_answer, rl.format_pattern, facts.backtrack_id, rl.max_backtracks
    )
    weights = rl.reward_weights or [1.0] * len(rewards)
    items, stats = load_prompts(config, tokenizer)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    print(prompts_summary(config, stats, processes), file=out)
    print("rewards: " + " + ".join(f"{w:g} x {r.name}" for r, w in zip(rewards, weights)), file=out)
    for source, name in enumerate(config.data.dataset):
        shown = [item for item in items if item["source"] == source][:examples]
        for item in shown:
            print(
                f"--- prompt of {name} row {item['row']} ({len(item['prompt_ids'])} tokens; up to "
                f"{rl.max_completion_length} sampled, {rl.num_generations} times) ---",
                file=out,
            )
            print(tokenizer.decode(item["prompt_ids"]), file=out)
            print(f"reference: {item['references'][0]!r} (answerable: {item['answerable']})", file=out)
