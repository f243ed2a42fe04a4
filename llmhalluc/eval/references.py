"""What an evaluation asks and expects: for each example of an eval dataset, the chat up to its final assistant
turn (the prompt), the reference answers, and whether the question can be answered."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from llmhalluc.config import DataConfig
from llmhalluc.data.converters import ConvertOptions, DropRow, to_chat
from llmhalluc.data.registry import load_rows
from llmhalluc.data.spec import DatasetSpec
from llmhalluc.errors import DataError
from llmhalluc.eval.metrics import gsm8k_answerable

DEFAULT_METRICS = {"gsm8k": "gsm8k", "squad_v2": "squad_v2"}  # by converter; any other dataset: exact_match


@dataclass
class EvalItem:
    """One example to generate for: its row, the prompt chat, the references and whether it is answerable."""

    index: int
    prompt: list[dict[str, Any]]
    references: list[str]
    answerable: bool | None


@dataclass
class EvalSet:
    """An eval dataset's items and the metric that scores them."""

    name: str
    metric: str
    items: list[EvalItem]
    dropped: Counter


def metric_of(spec: DatasetSpec) -> str:
    """The dataset_info.json entry's `metric`, else the converter's, else exact_match."""
    return spec.metric or DEFAULT_METRICS.get(spec.converter, "exact_match")


def load_eval_set(name: str, data: DataConfig, seed: int = 0) -> EvalSet:
    """The eval items of a dataset_info.json entry (rows that cannot become a chat are dropped and counted)."""
    spec, raw = load_rows(name, data.dataset_dir, seed, data.max_samples)
    options = ConvertOptions.of(data)
    metric = metric_of(spec)
    items, dropped = [], Counter()
    for index, row in enumerate(raw):
        try:
            messages = to_chat(row, spec, options)
        except DropRow as drop:
            dropped[drop.reason] += 1
            continue
        reference = messages[-1]["content"]
        if metric == "squad_v2":
            golds = [t for t in (row.get(spec.columns.get("answers", "answers")) or {}).get("text", []) if t.strip()]
            references, answerable = golds or [""], bool(golds)
        elif metric == "gsm8k":
            references, answerable = [reference], gsm8k_answerable(reference)
        else:
            references, answerable = [reference], None
        items.append(EvalItem(index, messages[:-1], references, answerable))
    if not items:
        first = next(iter(dropped), "no rows")
        raise DataError(f"eval dataset {name!r} has no examples with references to score (first reason: {first})")
    if metric == "squad_v2" and spec.converter != "squad_v2":
        raise DataError(f"eval dataset {name!r}: metric squad_v2 needs the squad_v2 converter (its answers column)")
    return EvalSet(name, metric, items, dropped)
