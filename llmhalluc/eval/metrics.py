"""Scoring generations: GSM8K final answers, SQuAD v2 exact match and F1 with the hallucination view (abstention,
hallucination and over-abstention rates), and normalised exact match for any other dataset. Every score and rate
is a fraction in [0, 1] (the official SQuAD script prints the same numbers x 100). GSM8K-style data may hold
unanswerable questions too (a reference without a `#### N` line): accuracy then counts the answerable ones, and the
abstention rates are reported as for SQuAD v2."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

METRICS = ("gsm8k", "squad_v2", "exact_match")
_FINAL = re.compile(r"####\s*([-+]?\$?\s*[\d,]*\.?\d+)")
_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_number(text: str) -> str:
    """A number as GSM8K compares it: no thousands separators or $, no trailing period or .0."""
    text = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"[-+]?\d+\.0*", text):
        text = text.split(".")[0]
    return text.lstrip("+")


def gsm8k_strict(output: str) -> str | None:
    """The number after the last `####` in the output."""
    found = _FINAL.findall(output)
    return normalize_number(found[-1]) if found else None


def gsm8k_flexible(output: str) -> str | None:
    """The last number in the output."""
    found = _NUMBER.findall(output)
    return normalize_number(found[-1]) if found else None


def normalize_answer(text: str) -> str:
    """SQuAD's official normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    """Token F1 of normalised strings (1 when both are empty, 0 when only one is)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def abstains(prediction: str, abstention_answer: str) -> bool:
    """Whether a prediction abstains: empty, or the abstention answer, once normalised."""
    normalized = normalize_answer(prediction)
    return normalized == "" or normalized == normalize_answer(abstention_answer)


def abstains_from_solving(prediction: str, abstention_answer: str) -> bool:
    """Whether a worked answer abstains: no final `####` number, and empty or ending in the abstention answer
    (GSM8K-style data answer an unanswerable question with their reasoning, then e.g. "I don't know.")."""
    normalized = normalize_answer(prediction)
    return gsm8k_strict(prediction) is None and (
        normalized == "" or normalized.endswith(normalize_answer(abstention_answer))
    )


def gsm8k_answerable(reference: str) -> bool:
    """A GSM8K-style reference is answerable when it has a final `#### N` line."""
    return gsm8k_strict(reference) is not None


@dataclass
class Scored:
    """One prediction's scores."""

    correct: bool
    abstained: bool | None = None
    exact: float = 0.0
    f1: float = 0.0
    strict: bool = False
    flexible: bool = False


def score(metric: str, prediction: str, references: Sequence[str], answerable: bool | None, abstention: str) -> Scored:
    """Score one prediction against its references with the dataset's metric."""
    if metric == "gsm8k":
        abstained = abstains_from_solving(prediction, abstention)
        if answerable is False:  # the right answer is to abstain
            return Scored(correct=abstained, abstained=abstained)
        gold = gsm8k_strict(references[0]) or normalize_number(references[0])
        strict = gsm8k_strict(prediction) == gold
        flexible = gsm8k_flexible(prediction) == gold
        return Scored(correct=strict, abstained=abstained, strict=strict, flexible=flexible)
    if metric == "squad_v2":
        abstained = abstains(prediction, abstention)
        answer = "" if abstained else prediction  # an abstention is SQuAD v2's empty (no-answer) prediction
        golds = [g for g in references if normalize_answer(g)] or [""]
        exact = max(float(normalize_answer(answer) == normalize_answer(g)) for g in golds)
        f1 = max(squad_f1(answer, g) for g in golds)
        return Scored(correct=exact == 1.0, abstained=abstained, exact=exact, f1=f1)
    exact = max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references)
    return Scored(correct=exact == 1.0, exact=exact)


def mean(values: Sequence[float]) -> float | None:
    """The average, or None for no values (a rate over an empty group is undefined, not 0)."""
    return sum(values) / len(values) if values else None


def aggregate(metric: str, scored: list[Scored], answerable: list[bool | None]) -> dict[str, Any]:
    """The dataset's metrics from its predictions' scores."""
    count = len(scored)
    if metric == "exact_match":
        return {"exact_match": mean([s.exact for s in scored]), "count": count}
    has = [s for s, a in zip(scored, answerable) if a is not False]
    no = [s for s, a in zip(scored, answerable) if a is False]
    rates = {
        "abstention_rate": mean([s.abstained for s in no]),
        "hallucination_rate": mean([not s.abstained for s in no]),
        "over_abstention_rate": mean([s.abstained for s in has]),
    }
    if metric == "gsm8k":
        result = {
            "accuracy_strict": mean([s.strict for s in has]),
            "accuracy_flexible": mean([s.flexible for s in has]),
            "count": count,
        }
        if no:  # unanswerable questions among them: the hallucination view
            result |= rates | {"answerable": len(has), "unanswerable": len(no)}
        return result
    return {
        "exact": mean([s.exact for s in scored]),
        "f1": mean([s.f1 for s in scored]),
        "has_ans_exact": mean([s.exact for s in has]),
        "has_ans_f1": mean([s.f1 for s in has]),
        "no_ans_exact": mean([s.exact for s in no]),
        **rates,
        "count": count,
        "answerable": len(has),
        "unanswerable": len(no),
    }
