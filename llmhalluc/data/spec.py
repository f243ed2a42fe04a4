"""DatasetSpec: one dataset_info.json entry, validated (llmhalluc.data.registry builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field

# What precedes the final answer of a worked solution: GSM8K's own line, and "The answer is:" as the researchers'
# converter writes it. The first of them found in a text decides (docs/evaluation.md).
DEFAULT_ANSWER_MARKERS = ("####", "The answer is")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset_info.json entry, validated: where the rows are and how they become chats."""

    name: str
    source: str  # "file" or "hf_hub"
    location: str  # a local path (file or folder) or a hub repository id
    formatting: str
    converter: str
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str | None] = field(default_factory=dict)
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    columns_given: bool = False
    metric: str | None = None  # (ours) how train/eval.py scores generations; None: chosen by the converter
    instructions: dict[str, str] = field(default_factory=dict)  # column key -> a fixed text for every row
    answer_markers: tuple[str, ...] = DEFAULT_ANSWER_MARKERS  # (ours) what precedes a final answer (GSM8K-style)
    ranking: bool = False  # a preference dataset: each row a prompt with a chosen and a rejected answer
