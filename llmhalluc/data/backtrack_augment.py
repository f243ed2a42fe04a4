"""Backtrack training data from any registered dataset: errors written into the answers, each taken back with one
backtrack token per error token, then the true continuation.

    python -m llmhalluc.data.backtrack_augment DATASET --tokenizer MODEL --ratio 1 --errors 3 --seed 42 \\
        --output data/gsm8k_bt.jsonl [--dataset-dir data] [--name gsm8k_bt] [--alternative COLUMN]

In the last assistant turn of every row, at a number of token positions of the answer (`--ratio` p: a fraction of
its tokens when below 1, at least one; else that many positions; never position 0), `--errors` n error tokens are
inserted before the answer's token at that position, followed by n backtrack tokens. Error tokens are drawn from
the tokenizer's ordinary vocabulary (tokens that decode to clean text and re-tokenize to themselves), or, with
`--alternative COLUMN`, taken from that column's text (a wrong answer) at the same token positions. Positions and
tokens come from `--seed` only: the same call writes the same file.

Unlike data made by decoding token ids, the answer's own text is kept character for character and each error is
recorded as a character span (`training_detail`, `train: false`): masked SFT then keeps exactly those characters out
of the labels under any tokenizer, the one the data was made with or another. Errors are redrawn (seeded) until the
answer re-tokenizes, under the generating tokenizer, to exactly the inserted tokens, so n backtracks take back
exactly the n error tokens there. The output is JSON Lines in the openai format and an entry in the output
folder's dataset_info.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmhalluc.data.converters import ConvertOptions, DropRow, to_chat
from llmhalluc.data.registry import load_rows
from llmhalluc.errors import UserError

BACKTRACK = "<|BACKTRACK|>"
REDRAWS = 20  # error draws per answer before an answer is written without errors (counted in the report)


def error_candidates(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Ordinary token ids whose text is clean and re-tokenizes to the id alone: never a special or added token,
    never part of a multi-byte character."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = [i for i in range(tokenizer.vocab_size) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array(
        [
            token_id
            for token_id, text, again in zip(ids, texts, encoded)
            if text.strip() and "\ufffd" not in text and text.isprintable() and again == [token_id]
        ]
    )


def position_count(tokens: int, ratio: float) -> int:
    """How many positions of an answer of `tokens` tokens get an error: a fraction below 1 (at least one), else that
    many, never more than the positions after the first token."""
    count = max(1, int(tokens * ratio)) if ratio < 1 else int(ratio)
    return min(count, max(1, tokens - 1))


def augment_answer(
    answer: str,
    tokenizer: PreTrainedTokenizerBase,
    rng: np.random.Generator,
    candidates: np.ndarray,
    ratio: float,
    errors: int,
    backtrack: str,
    alternative: str | None = None,
) -> tuple[str, list[dict[str, Any]]] | None:
    """The answer with errors and backtracks inserted, and the errors' character spans (training_detail entries,
    end inclusive); None when no draw re-tokenizes exactly (or the answer has fewer than 2 tokens)."""
    encoding = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    if len(ids) < 2:
        return None
    backtrack_id = tokenizer.convert_tokens_to_ids(backtrack)
    alternative_ids = tokenizer(alternative, add_special_tokens=False)["input_ids"] if alternative else None
    for _ in range(REDRAWS):
        count = position_count(len(ids), ratio)
        positions = sorted(rng.choice(np.arange(1, len(ids)), size=count, replace=False).tolist())
        pieces, spans, expected, cursor, previous = [], [], [], 0, 0
        for position in positions:
            if alternative_ids is not None and position + errors <= len(alternative_ids):
                error_ids = alternative_ids[position : position + errors]
            else:
                error_ids = rng.choice(candidates, size=errors, replace=True).tolist()
            start = offsets[position][0]
            error_text = tokenizer.decode(error_ids, clean_up_tokenization_spaces=False)
            pieces.append(answer[cursor:start])
            length = sum(len(p) for p in pieces)
            spans.append({"begin_offset": length, "end_offset": length + len(error_text) - 1, "train": False})
            pieces += [error_text, backtrack * errors]
            expected += ids[previous:position] + error_ids + [backtrack_id] * errors
            cursor, previous = start, position
        pieces.append(answer[cursor:])
        expected += ids[previous:]
        text = "".join(pieces)
        if tokenizer(text, add_special_tokens=False)["input_ids"] == expected:
            return text, spans
    return None


def augment_rows(
    rows: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    ratio: float,
    errors: int,
    seed: int,
    backtrack: str = BACKTRACK,
    alternatives: list[str | None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Backtrack rows (openai format, errors recorded in training_detail) from chats; and what was done."""
    candidates = error_candidates(tokenizer)
    rng = np.random.default_rng(seed)
    out, report = [], {"rows": len(rows), "augmented": 0, "unchanged": 0, "errors": 0}
    for index, messages in enumerate(rows):
        answer = messages[-1]["content"]
        alternative = alternatives[index] if alternatives else None
        made = augment_answer(answer, tokenizer, rng, candidates, ratio, errors, backtrack, alternative)
        last = dict(messages[-1])
        if made is None:
            report["unchanged"] += 1
        else:
            last["content"], last["training_detail"] = made
            report["augmented"] += 1
            report["errors"] += len(made[1])
        out.append({"messages": [*messages[:-1], last], "source_row": index})
    return out, report


def main(argv: list[str] | None = None) -> int:
    """Command line: read a registered dataset, write backtrack rows and their dataset_info.json entry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="a dataset_info.json entry")
    parser.add_argument("--dataset-dir", default="data", help="folder holding dataset_info.json (data)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer (a model folder or hub id) to count tokens with")
    parser.add_argument("--ratio", type=float, default=1.0, help="positions per answer: a fraction (<1) or a count")
    parser.add_argument("--errors", type=int, default=1, help="error tokens (and backtrack tokens) per position")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--backtrack-token", default=BACKTRACK)
    parser.add_argument("--alternative", help="a column of wrong answers to take the errors from")
    parser.add_argument("--max-samples", type=int, help="use only the first rows")
    parser.add_argument("--output", type=Path, required=True, help="the .jsonl to write")
    parser.add_argument("--name", help="the new dataset_info.json entry's name (default: the output file's stem)")
    args = parser.parse_args(argv)
    try:
        if args.ratio <= 0 or args.errors < 1:
            raise UserError("--ratio must be positive and --errors at least 1")
        spec, raw = load_rows(args.dataset, args.dataset_dir, args.seed, args.max_samples)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if args.backtrack_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [args.backtrack_token]})
        chats, alternatives = [], []
        for index, row in enumerate(raw):
            try:
                chats.append(to_chat(row, spec, ConvertOptions()))
            except DropRow as drop:
                raise UserError(f"dataset {args.dataset!r} row {index + 1}: {drop.reason}") from None
            alternatives.append(row.get(args.alternative) if args.alternative else None)
        if args.alternative and args.alternative not in raw.column_names:
            raise UserError(f"--alternative: dataset {args.dataset!r} has no column {args.alternative!r}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows, report = augment_rows(
        chats, tokenizer, args.ratio, args.errors, args.seed, args.backtrack_token, alternatives
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    info_file = args.output.parent / "dataset_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    entry = {"file_name": args.output.name, "formatting": "openai"}
    if spec.metric:
        entry["metric"] = spec.metric
    info[args.name or args.output.stem] = entry
    info_file.write_text(json.dumps(info, indent=1) + "\n")
    print(
        f"wrote {args.output}: {report['augmented']} of {report['rows']} rows with {report['errors']} errors "
        f"({report['unchanged']} left unchanged: no draw re-tokenized exactly); entry "
        f"{args.name or args.output.stem!r} in {info_file}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
