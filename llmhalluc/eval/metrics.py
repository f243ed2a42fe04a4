r"""Scoring generations: GSM8K-style final answers, SQuAD v2 exact match and F1 with the hallucination view
(abstention, hallucination and over-abstention rates), normalised exact match for any other dataset, and text
overlap (BLEU, ROUGE) on request. Scores and rates are fractions in [0, 1] (the official SQuAD script prints the same
numbers x 100); BLEU is sacrebleu's, on its 0-100 scale, ROUGE rouge-score's F-measure in [0, 1].

Final answers: the number right after the first final-answer marker found in the text (`####` or `The answer is`
by default, per dataset `answer_markers`; markers match in any case, whichever occurs first in the text counts, and
the colon and spaces after a marker are skipped: the researchers' `[Tt]he answer is[:\s]+N`),
normalised: no `$`, no thousands separators, no trailing period, `1200.00` -> `1200` (so `$1,200.00`, `1200.` and
`1,200 dollars` all read 1200). Flexible accuracy reads the last number in the text instead.

Unanswerable questions are never inferred from a missing marker: a reference without a final answer must be the
abstention answer (or end with it, after reasoning); otherwise it cannot be scored and is an error naming the row.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmhalluc.data.spec import DEFAULT_ANSWER_MARKERS

METRICS = ("gsm8k", "squad_v2", "exact_match")
_AFTER_MARKER = re.compile(r"[\s:]*(-?\$?\s*\d[\d,]*(?:\.\d+)?)")
_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_number(text: str) -> str:
    """A number as GSM8K compares it: no thousands separators or $, no trailing period or .0."""
    text = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"[-+]?\d+\.0*", text):
        text = text.split(".")[0]
    return text.lstrip("+")


def final_answer(text: str, markers: Sequence[str] = DEFAULT_ANSWER_MARKERS) -> str | None:
    """The normalised number after the first final-answer marker in the text, or None."""
    lowered = text.lower()
    found = [(lowered.find(marker.lower()), marker) for marker in markers]
    for position, marker in sorted((p, m) for p, m in found if p >= 0):
        number = _AFTER_MARKER.match(text, position + len(marker))
        if number:
            return normalize_number(number.group(1))
    return None


def last_number(output: str) -> str | None:
    """The last number in the output (flexible extraction)."""
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
    """Whether a short answer abstains: empty, or the abstention answer, once normalised."""
    normalized = normalize_answer(prediction)
    return normalized == "" or normalized == normalize_answer(abstention_answer)


def abstains_from_solving(
    prediction: str, abstention_answer: str, markers: Sequence[str] = DEFAULT_ANSWER_MARKERS
) -> bool:
    """Whether a worked answer abstains: no final answer, and empty or ending in the abstention answer (worked
    answers to an unanswerable question give their reasoning, then e.g. "I don't know.")."""
    normalized = normalize_answer(prediction)
    return final_answer(prediction, markers) is None and (
        normalized == "" or normalized.endswith(normalize_answer(abstention_answer))
    )


@dataclass
class Scored:
    """One prediction's scores."""

    correct: bool
    abstained: bool | None = None
    exact: float = 0.0
    f1: float = 0.0
    strict: bool = False
    flexible: bool = False
    exact_empty_only: float = 0.0  # SQuAD v2 exact match when only an empty output counts as abstaining (lm-eval's)


def score(
    metric: str,
    prediction: str,
    references: Sequence[str],
    answerable: bool | None,
    abstention: str,
    markers: Sequence[str] = DEFAULT_ANSWER_MARKERS,
) -> Scored:
    """Score one prediction against its references with the dataset's metric."""
    if metric == "gsm8k":
        abstained = abstains_from_solving(prediction, abstention, markers)
        if answerable is False:  # the right answer is to abstain
            return Scored(correct=abstained, abstained=abstained)
        gold = final_answer(references[0], markers)
        strict = final_answer(prediction, markers) == gold
        flexible = last_number(prediction) == gold
        return Scored(correct=strict, abstained=abstained, strict=strict, flexible=flexible)
    if metric == "squad_v2":
        abstained = abstains(prediction, abstention)
        answer = "" if abstained else prediction  # an abstention is SQuAD v2's empty (no-answer) prediction
        golds = [g for g in references if normalize_answer(g)] or [""]
        exact = max(float(normalize_answer(answer) == normalize_answer(g)) for g in golds)
        f1 = max(squad_f1(answer, g) for g in golds)
        empty_only = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
        return Scored(correct=exact == 1.0, abstained=abstained, exact=exact, f1=f1, exact_empty_only=empty_only)
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
        # lm-eval's squadv2 counts only an empty output as abstaining: an abstention answer scores 0 there.
        "exact_empty_only": mean([s.exact_empty_only for s in scored]),
        **rates,
        "count": count,
        "answerable": len(has),
        "unanswerable": len(no),
    }


def overlap_scores(names: Sequence[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """BLEU (sacrebleu's corpus BLEU, 0-100) and ROUGE-1/2/L (rouge-score's mean F-measure, no stemming) of the
    predictions against one reference each."""
    scores: dict[str, float] = {}
    if "bleu" in names:
        import sacrebleu

        scores["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    if "rouge" in names:
        from rouge_score import rouge_scorer

        kinds = ("rouge1", "rouge2", "rougeL")
        scorer = rouge_scorer.RougeScorer(list(kinds))
        per = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
        scores |= {kind: sum(s[kind].fmeasure for s in per) / len(per) for kind in kinds}
    return scores
