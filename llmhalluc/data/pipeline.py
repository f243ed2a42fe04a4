"""Dataset preparation: load, convert, tokenize, filter; cached under a fingerprint of every setting; with stats."""

from __future__ import annotations

import hashlib
import inspect
import itertools
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
from llmhalluc.data import chat, converters
from llmhalluc.data.chat import (
    IGNORE_INDEX,
    Messages,
    Span,
    chat_template_of,
    label_tokens,
    render_chats_with_assistant_spans,
    render_with_assistant_spans,
)
from llmhalluc.data.converters import ConvertOptions, DropRow, to_chat
from llmhalluc.data.registry import DatasetSpec, check_columns, load_raw_dataset, resolve_dataset
from llmhalluc.errors import DataError, TemplateError

DROP_HINTS = {
    "no_trained_tokens_after_truncation": "max_length is shorter than the prompts; raise max_length",
}


@dataclass
class DatasetStats:
    """What preparation kept, dropped and produced for one split."""

    rows: int = 0
    examples: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "rows": self.rows,
            "examples": self.examples,
            "dropped": dict(self.dropped),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "length_percentiles": self.length_percentiles,
        }

    def summary(self, split: str) -> str:
        """Human-readable lines for the startup log."""
        dropped = ", ".join(f"{reason}={count}" for reason, count in sorted(self.dropped.items())) or "none"
        lengths = " ".join(f"{k}={v}" for k, v in self.length_percentiles.items())
        return (
            f"{split}: {self.examples} examples from {self.rows} rows; dropped: {dropped}; "
            f"truncated: {self.truncated}\n"
            f"{split}: {self.tokens} tokens, {self.trained_tokens} trained "
            f"({100 * self.trained_tokens / max(self.tokens, 1):.1f}%); lengths {lengths}"
        )


def prepare_dataset(
    names: list[str],
    data: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    main_process_first: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[datasets.Dataset, DatasetStats]:
    """The tokenized examples (`input_ids`, `labels`) of the named datasets, concatenated, and their stats."""
    parts, stats = [], DatasetStats()
    with main_process_first():
        for name in names:
            part, part_stats = _prepare_one(name, data, tokenizer, seed)
            parts.append(part)
            stats.rows += part_stats.rows
            stats.dropped.update(part_stats.dropped)
            stats.truncated += part_stats.truncated
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    lengths = column(dataset, "length")
    stats.examples = len(dataset)
    stats.tokens = int(lengths.sum())
    stats.trained_tokens = int(column(dataset, "trained").sum())
    stats.length_percentiles = {f"p{q}": int(np.percentile(lengths, q, method="lower")) for q in (50, 90, 99)} | {
        "max": int(lengths.max())
    }
    return dataset, stats


def _prepare_one(
    name: str, data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[datasets.Dataset, DatasetStats]:
    spec = resolve_dataset(name, data.dataset_dir)
    raw = load_raw_dataset(spec, seed=seed)
    if data.max_samples is not None and len(raw) > data.max_samples:
        raw = raw.select(range(data.max_samples))
    check_columns(spec, raw)
    options = ConvertOptions(abstention_answer=data.abstention_answer)
    settings = TokenizeSettings(data.max_length, data.train_on_prompt, data.mask_history)
    try:
        processed = raw.map(
            _process_batch,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            fn_kwargs={"spec": spec, "options": options, "tokenizer": tokenizer, "settings": settings},
            num_proc=data.preprocessing_num_workers if len(raw) > 1000 else None,
            new_fingerprint=fingerprint(raw, spec, options, tokenizer, settings),
            desc=f"Tokenizing {name}",
        )
    except (TemplateError, DataError) as err:
        raise DataError(f"dataset {name!r}: {err}") from None
    drop_reasons = processed.with_format("arrow")["drop_reason"].to_pylist()
    reasons = Counter(r for r in drop_reasons if r)
    stats = DatasetStats(rows=len(raw), dropped=reasons, truncated=int(column(processed, "truncated").sum()))
    if reasons.total() == len(raw):
        first = next(r for r in drop_reasons if r)
        hint = f" ({DROP_HINTS[first]})" if first in DROP_HINTS else ""
        raise DataError(f"dataset {name!r}: every row was dropped; first reason: {first}{hint}")
    if reasons:
        processed = processed.filter(
            lambda reasons: [r is None for r in reasons], input_columns=["drop_reason"], batched=True
        )
    return processed.remove_columns(["drop_reason", "truncated"]), stats


def column(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """A whole column as a numpy array, read through Arrow (iterating a datasets Column goes row by row)."""
    return dataset.with_format("arrow")[name].to_numpy()


@dataclass(frozen=True)
class TokenizeSettings:
    """The tokenize_chat options the experiment config sets."""

    max_length: int | None
    train_on_prompt: bool
    mask_history: bool


OUTPUT_SCHEMA = pa.schema(
    {
        "input_ids": pa.list_(pa.int32()),
        "labels": pa.list_(pa.int32()),
        "length": pa.int32(),
        "trained": pa.int32(),
        "drop_reason": pa.string(),
        "truncated": pa.bool_(),
    }
)


def _render_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[tuple[int, Messages]], last_turn_only: bool
) -> list[tuple[str, list[Span]]]:
    """Text and assistant spans of (row index, chat) pairs in one template call; an error names its row."""
    try:
        return render_chats_with_assistant_spans(tokenizer, [messages for _, messages in rows], last_turn_only)
    except Exception:
        pass  # rendered again one by one below, to name the row
    for index, messages in rows:
        try:
            render_with_assistant_spans(tokenizer, messages, last_turn_only)
        except TemplateError as err:
            raise TemplateError(f"row {index}: {err}") from None
        except Exception as err:  # the template's own raise_exception, e.g. roles that must alternate
            raise TemplateError(f"row {index}: the chat template failed: {err}") from None
    raise AssertionError("a batch failed to render but every row rendered alone")


def _process_batch(
    batch: dict[str, list],
    indices: list[int],
    spec: DatasetSpec,
    options: ConvertOptions,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
) -> pa.Table:
    """Convert and tokenize a batch of raw rows; rows that cannot be used get a drop_reason instead."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
    chats: list[Any] = []
    for row in rows:
        try:
            chats.append(to_chat(row, spec, options))
            out["drop_reason"].append(None)
        except DropRow as drop:
            chats.append(None)
            out["drop_reason"].append(drop.reason)
    kept = [(index, messages) for index, messages in zip(indices, chats) if messages is not None]
    rendered = iter(_render_rows(tokenizer, kept, settings.mask_history) if kept else [])
    pairs = [next(rendered) if messages is not None else ("", []) for messages in chats]
    texts, spans = [text for text, _ in pairs], [row_spans for _, row_spans in pairs]
    # The backend tokenizer directly: the same ids as tokenizer(texts, add_special_tokens=False), and
    # char->token lookups in Rust instead of every offset converted to Python.
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    for i, messages in enumerate(chats):
        ids, labels, truncated = [], [], False
        if messages is not None:
            try:
                full = label_tokens(
                    texts[i],
                    encodings[i],
                    spans[i],
                    messages,
                    None,
                    settings.train_on_prompt,
                    settings.mask_history,
                )
            except TemplateError as err:
                raise TemplateError(f"row {indices[i]}: {err}") from None
            ids, labels = full["input_ids"], full["labels"]
            if settings.max_length is not None and len(ids) > settings.max_length:
                ids, labels, truncated = ids[: settings.max_length], labels[: settings.max_length], True
        # The first token is never predicted (nothing precedes it), so it never counts as trained.
        trained = len(labels) - 1 - labels[1:].count(IGNORE_INDEX) if labels else 0
        if messages is not None and trained == 0:
            out["drop_reason"][i] = "no_trained_tokens_after_truncation" if truncated else "no_trained_tokens"
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["trained"].append(trained)
        out["truncated"].append(truncated)
    # Typed Arrow columns: datasets' own conversion of nested Python lists (type inference and checks per
    # value) cost more than tokenizing; token ids fit int32 and halve the cache.
    columns = {
        name: _int32_lists(values)
        if name in ("input_ids", "labels")
        else pa.array(values, OUTPUT_SCHEMA.field(name).type)
        for name, values in out.items()
    }
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def _int32_lists(lists: list[list[int]]) -> pa.ListArray:
    """Arrow list<int32> through one flat numpy buffer: 5x faster than pa.array on the nested lists."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(values) for values in lists], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about the tokenizer that changes token ids: vocabulary, specials, chat template."""
    digest = hashlib.sha256()
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    digest.update(chat_template_of(tokenizer).encode())
    return digest.hexdigest()


def fingerprint(
    raw: datasets.Dataset,
    spec: DatasetSpec,
    options: ConvertOptions,
    tokenizer: PreTrainedTokenizerBase,
    settings: TokenizeSettings,
) -> str:
    """Cache key of a prepared dataset: the raw data, the code and every setting that changes the output."""
    digest = hashlib.sha256()
    for part in (raw._fingerprint, repr(spec), repr(options), repr(settings), tokenizer_fingerprint(tokenizer)):
        digest.update(part.encode())
    for module in (chat, converters):
        digest.update(inspect.getsource(module).encode())
    for function in (_process_batch, _render_rows, _int32_lists):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()[:32]
