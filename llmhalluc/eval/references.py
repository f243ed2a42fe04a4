"""What an evaluation asks and expects: for each example of an eval dataset, the chat up to its final assistant
turn (the prompt, with few-shot examples as prior turns when asked), the reference answers, and whether the question
can be answered."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from llmhalluc.config import DataConfig, GenerationEvalConfig
from llmhalluc.data.converters import ConvertOptions, DropRow, to_chat
from llmhalluc.data.registry import load_rows
from llmhalluc.data.spec import DEFAULT_ANSWER_MARKERS, DatasetSpec
from llmhalluc.errors import DataError
from llmhalluc.eval.metrics import abstains, abstains_from_solving, final_answer

DEFAULT_METRICS = {"gsm8k": "gsm8k", "squad_v2": "squad_v2"}  # by converter; any other dataset: exact_match


@dataclass
class EvalItem:
    """One example to generate for: its row, the prompt chat, the references and whether it is answerable."""

    index: int
    prompt: list[dict[str, Any]]
    references: list[str]
    answerable: bool | None
    shots: list[int] | None = None  # rows of the few-shot source shown before it


@dataclass
class EvalSet:
    """An eval dataset's items, the metric that scores them, and how its final answers are marked."""

    name: str
    metric: str
    items: list[EvalItem]
    dropped: Counter
    markers: tuple[str, ...] = DEFAULT_ANSWER_MARKERS


def metric_of(spec: DatasetSpec) -> str:
    """The dataset_info.json entry's `metric`, else the converter's, else exact_match."""
    return spec.metric or DEFAULT_METRICS.get(spec.converter, "exact_match")


def chats_of(name: str, data: DataConfig, seed: int) -> list[tuple[int, list[dict[str, Any]]]]:
    """(row index, chat) of every row of a dataset_info.json entry that becomes a chat."""
    spec, raw = load_rows(name, data.dataset_dir, seed, data.max_samples)
    options = ConvertOptions.of(data)
    chats = []
    for index, row in enumerate(raw):
        try:
            chats.append((index, to_chat(row, spec, options)))
        except DropRow:
            continue
    return chats


def load_eval_set(
    name: str, data: DataConfig, seed: int = 0, generation: GenerationEvalConfig | None = None
) -> EvalSet:
    """The eval items of a dataset_info.json entry (rows that cannot become a chat are dropped and counted); with
    generation.num_fewshot, each prompt led by that many solved examples."""
    spec, raw = load_rows(name, data.dataset_dir, seed, data.max_samples)
    options = ConvertOptions.of(data)
    metric = metric_of(spec)
    markers = spec.answer_markers
    abstention = data.abstention_answer
    items, dropped = [], Counter()
    for index, row in enumerate(raw):
        try:
            messages = to_chat(row, spec, options)
        except DropRow as drop:
            if drop.reason == "answer_without_final_line":  # a reference that cannot be scored is never skipped
                raise DataError(
                    f"eval dataset {name!r} row {index}: its reference has no final answer after "
                    f"{' or '.join(map(repr, markers))} and does not end with the abstention answer "
                    f"{abstention!r} (set the entry's answer_markers, or abstention_answer)"
                ) from None
            dropped[drop.reason] += 1
            continue
        reference = messages[-1]["content"]
        if metric == "squad_v2" and spec.converter == "squad_v2":
            golds = [t for t in (row.get(spec.columns.get("answers", "answers")) or {}).get("text", []) if t.strip()]
            references, answerable = golds or [""], bool(golds)
        elif metric == "squad_v2":  # a short reply: unanswerable when it is the abstention answer
            answerable = not abstains(reference, abstention)
            references = [reference] if answerable else [""]
        elif metric == "gsm8k":
            answerable = final_answer(reference, markers) is not None
            if not answerable and not (reference.strip() and abstains_from_solving(reference, abstention, markers)):
                raise DataError(
                    f"eval dataset {name!r} row {index}: its reference has no final answer after "
                    f"{' or '.join(map(repr, markers))} and does not end with the abstention answer "
                    f"{abstention!r}, so it can be neither scored nor taken as unanswerable (set the entry's "
                    "answer_markers, or abstention_answer)"
                )
            references = [reference]
        else:
            references, answerable = [reference], None
        items.append(EvalItem(index, messages[:-1], references, answerable))
    if not items:
        first = next(iter(dropped), "no rows")
        raise DataError(f"eval dataset {name!r} has no examples with references to score (first reason: {first})")
    if generation is not None and generation.num_fewshot:
        add_shots(items, name, data, seed, generation)
    return EvalSet(name, metric, items, dropped, markers)


def add_shots(items: list[EvalItem], name: str, data: DataConfig, seed: int, generation: GenerationEvalConfig) -> None:
    """Lead each prompt with num_fewshot solved examples (user turn, assistant answer) of the few-shot source: drawn
    for each evaluated row from a generator seeded by the seed and the row (the same on every rank, in every run),
    never the evaluated row itself; after a system message, before the first user turn."""
    source = generation.fewshot_dataset or (data.dataset[0] if data.dataset else None)
    if source is None:
        raise DataError("num_fewshot: name the dataset the examples come from with fewshot_dataset")
    chats = chats_of(source, data, seed)
    solved = [(index, chat) for index, chat in chats if len(chat) >= 2 and chat[-1]["content"].strip()]
    k = generation.num_fewshot
    for item in items:
        pool = [(i, c) for i, c in solved if not (source == name and i == item.index)]
        if len(pool) < k:
            raise DataError(f"num_fewshot: {k} examples asked for, but fewshot_dataset {source!r} has {len(pool)}")
        chosen = random.Random(f"{seed}:{name}:{item.index}").sample(pool, k)
        shots = [turn for _, chat in chosen for turn in _solved_pair(chat)]
        lead = 1 if item.prompt and item.prompt[0]["role"] == "system" else 0
        item.prompt = [*item.prompt[:lead], *shots, *item.prompt[lead:]]
        item.shots = [i for i, _ in chosen]


def _solved_pair(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chat's last user turn and its answer, as two plain messages."""
    user = next(m for m in reversed(chat[:-1]) if m["role"] == "user")
    return [{"role": "user", "content": user["content"]}, {"role": "assistant", "content": chat[-1]["content"]}]
