"""Benchmark: prepare 10,000 GSM8K-sized chats (convert, render, tokenize, mask, filter) and print chats/s.

    python bench/prepare_data.py [--chats 10000] [--workers 2]

Runs on a fresh datasets cache each time (a cache hit would measure nothing). Target: under 20 s on 2 CPU cores
with the tiny tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

CACHE = tempfile.mkdtemp(prefix="llmhalluc-bench-cache-")
os.environ["HF_DATASETS_CACHE"] = CACHE
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmhalluc.config import DataConfig  # noqa: E402
from llmhalluc.data.pipeline import prepare_dataset  # noqa: E402
from llmhalluc.models.tiny import build_tokenizer  # noqa: E402

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Randy"]
ITEMS = ["clips", "books", "apples", "stickers", "marbles", "cupcakes", "pages", "shells", "cookies", "pencils"]


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]


def gsm8k_sized_row(rng: random.Random) -> dict[str, str]:
    """A GSM8K-shaped row: a question and a worked answer of 1 to 7 calculation lines ending in #### N, with
    lengths spread like GSM8K's (about 240 and 290 characters on average)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    months = rng.randint(1, 7)
    counts = [rng.randint(10, 90)]
    for _ in range(months):
        counts.append(counts[-1] + rng.randint(2, 20))
    question = (
        f"{name} sold {counts[0]} {item} in {MONTHS[0]}. "
        + "".join(
            f"In {MONTHS[m]} {name} sold {counts[m] - counts[m - 1]} more {item} than in {MONTHS[m - 1]}. "
            for m in range(1, months + 1)
        )
        + f"How many {item} did {name} sell in {MONTHS[months]}, and altogether?"
    )
    lines = [
        f"In {MONTHS[m]} {name} sold {counts[m - 1]} + {counts[m] - counts[m - 1]} = "
        f"<<{counts[m - 1]}+{counts[m] - counts[m - 1]}={counts[m]}>>{counts[m]} {item}."
        for m in range(1, months + 1)
    ]
    total = sum(counts)
    lines.append(f"Altogether {name} sold {' + '.join(map(str, counts))} = <<{total}>>{total} {item}.")
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {total}"}


def write_dataset(folder: Path, chats: int, seed: int = 0) -> None:
    """chats GSM8K-shaped rows and a dataset_info.json entry using the gsm8k converter."""
    rng = random.Random(seed)
    rows = [gsm8k_sized_row(rng) for _ in range(chats)]
    (folder / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.jsonl", "converter": "gsm8k"}}))


def measure(folder: Path, workers: int | None, template: str | None = None) -> tuple[float, int]:
    """Seconds to prepare the dataset in `folder` (raw load included), and the examples kept."""
    tokenizer = build_tokenizer("chatml")
    if template is not None:
        tokenizer.chat_template = template
    config = DataConfig(dataset=["bench"], dataset_dir=str(folder), max_length=1024, preprocessing_num_workers=workers)
    start = time.perf_counter()
    _, stats = prepare_dataset(["bench"], config, tokenizer)
    return time.perf_counter() - start, stats.examples


def main() -> None:
    """Run the benchmark and print chats/s for each setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    qwen25_style = (
        build_tokenizer("qwen").chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    )
    results = {}
    for label, workers, template in [
        (f"markers, {args.workers} workers", args.workers, None),
        ("markers, 1 process", None, None),
        (f"vendor-style template without markers, {args.workers} workers", args.workers, qwen25_style),
    ]:
        with tempfile.TemporaryDirectory() as tmp:
            write_dataset(Path(tmp), args.chats)
            seconds, kept = measure(Path(tmp), workers, template)
        results[label] = {"seconds": round(seconds, 2), "chats_per_second": round(kept / seconds, 1)}
        print(f"{label}: {kept} chats in {seconds:.2f} s = {kept / seconds:,.0f} chats/s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
