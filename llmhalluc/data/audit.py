"""The mask audit: what the masks train, per dataset, and the warnings that would stop a careful user — before the
first step, in the startup log, run_summary.json and wandb."""

from __future__ import annotations

import html
from typing import Any

from transformers import PreTrainedTokenizerBase

from llmhalluc.config import DataConfig
from llmhalluc.data.labels import IGNORE_INDEX
from llmhalluc.data.pipeline import DatasetStats
from llmhalluc.errors import DataError

SMALL_SHARE = 0.01  # a dataset below 1% of the mix, when more was asked for, is starved


def per_dataset(stats: DatasetStats, names: list[str]) -> dict[str, DatasetStats]:
    """The stats of each dataset in the final mix (the split's own stats when there is one dataset)."""
    return stats.sources if stats.sources else {names[0]: stats}


def audit(stats: DatasetStats, data: DataConfig) -> dict[str, Any]:
    """Per dataset: share of tokens trained, trained tokens per example, share of assistant turns whose
    end-of-turn token is trained, truncated and dropped examples, tokens kept out of trained turns and how many of
    them fall on the errors the data records (training_detail), backtrack counts, share of the mix."""
    report = {}
    for name, part in per_dataset(stats, data.dataset).items():
        report[name] = {
            "examples": part.examples,
            "share_of_mix": round(part.examples / max(stats.examples, 1), 4),
            "trained_share_of_tokens": round(part.trained_tokens / max(part.tokens, 1), 4),
            "trained_per_example": part.trained_per_example,
            "turns_with_end_of_turn_trained": round(part.turns_closed / part.turns, 4) if part.turns else None,
            "truncated": part.truncated,
            "dropped": dict(part.dropped),
            "masked_tokens": part.masked_tokens,
            "masked_on_recorded_errors": part.masked_on_errors,
            **({"backtrack": part.backtrack} if part.backtrack else {}),
        }
    return report


def warnings(stats: DatasetStats, data: DataConfig) -> list[str]:
    """The problems a careful user would stop for."""
    found = []
    probabilities = dict(zip(data.dataset, data.interleave_probs or []))
    for name, part in per_dataset(stats, data.dataset).items():
        if part.turns_closed < part.turns:
            found.append(
                f"dataset {name!r}: {part.turns - part.turns_closed} of {part.turns} assistant turns end without a "
                "trained end-of-turn token, so the model would not learn to stop: check the template's "
                "{% generation %} markers (they must include the end-of-turn token)"
            )
        if part.trained_tokens == 0:
            found.append(f"dataset {name!r}: 0 trained tokens in the mix (raise max_length, or check its masks)")
        lost = part.dropped.get("no_trained_tokens_after_truncation", 0)
        if lost:
            found.append(
                f"dataset {name!r}: {lost} examples lost every trained token to truncation at max_length "
                f"{data.max_length} and were dropped"
            )
        share = part.examples / max(stats.examples, 1)
        if probabilities.get(name, 0) > SMALL_SHARE and share < SMALL_SHARE:
            found.append(
                f"dataset {name!r}: {share:.2%} of the mix although interleave_probs asked for "
                f"{probabilities[name]:.0%} ({data.mix_strategy} stopped early?)"
            )
    return found


def check_backtracks(stats: DatasetStats, data: DataConfig) -> None:
    """Masked SFT or backtrack position ids on a dataset without one backtrack token in its answers is a mistake (the
    data writes the token some other way), never a run to start."""
    if not (data.mask_backtracked or data.backtrack_position_ids):
        return
    wanted = "mask_backtracked" if data.mask_backtracked else "backtrack_position_ids"
    for name, part in per_dataset(stats, data.dataset).items():
        if not part.backtrack.get("tokens"):
            raise DataError(
                f"dataset {name!r}: not one {data.backtrack_target()!r} in its assistant turns, so {wanted} has "
                "nothing to act on; if the data writes the token as other text (e.g. <|BACKTRACK|>), map that text to "
                "it with token_aliases"
            )


def audit_lines(stats: DatasetStats, data: DataConfig, split: str = "train") -> list[str]:
    """The audit, a line per dataset, for the startup log."""
    lines = []
    for name, row in audit(stats, data).items():
        per = row["trained_per_example"]
        closed = row["turns_with_end_of_turn_trained"]
        lines.append(
            f"{split}/{name} mask audit: {row['trained_share_of_tokens']:.1%} of tokens trained, "
            f"{per.get('mean', 0)} per example (p50 {per.get('p50', 0)}, p99 {per.get('p99', 0)}), end-of-turn "
            f"trained in {'n/a' if closed is None else f'{closed:.0%}'} of turns, {row['truncated']} truncated"
            + (
                f", {row['masked_tokens']} tokens masked ({row['masked_on_recorded_errors']} on recorded errors)"
                if row["masked_tokens"]
                else ""
            )
        )
    return lines


def marked_html(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]) -> str:
    """An example as HTML: trained tokens highlighted, backtracked errors struck through, the rest plain."""
    errors = set(example.get("backtrack_masked_positions") or [])
    pieces = []
    for position, (token, label) in enumerate(zip(example["input_ids"], example["labels"])):
        text = html.escape(tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        if label != IGNORE_INDEX:
            pieces.append(f'<span style="background:#c8f7c5">{text}</span>')
        elif position in errors:
            pieces.append(f'<span style="color:#c00;text-decoration:line-through">{text}</span>')
        else:
            pieces.append(text)
    return '<pre style="white-space:pre-wrap">' + "".join(pieces) + "</pre>"
