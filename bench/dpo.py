"""DPO benchmark: llmhalluc's `stage: dpo` vs TRL's DPOTrainer on the same model, pairs and hyperparameters.

    python bench/dpo.py                 # the tiny model, the 480 demo pairs; about 3 minutes on 2 CPU cores
    python bench/dpo.py --steps 20      # fewer optimizer steps

Every measurement runs in a fresh process, one process, sigmoid loss, beta 0.1, 8 pairs per step, constant learning
rate. Throughput is non-pad tokens of both sides per second of training steps. llmhalluc computes the reference
log-probs once before training (timed separately as `reference_seconds`); TRL is measured both ways: its default (a
reference forward every step, with a copy of the model) and with precompute_ref_log_probs (its precompute runs inside
train() and is part of its runtime). Results go to bench/results/dpo-<date>-<host>.json and a table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import python  # noqa: E402

PAIRS_PER_STEP = 8


def pairs(count: int) -> list[dict]:
    """The first `count` demo pairs (data/demo_dpo.jsonl)."""
    lines = (REPO / "data" / "demo_dpo.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


def worker_ours(model_dir: str, out: str, steps: int, layout: str) -> dict:
    """One process of llmhalluc stage dpo; step throughput from its metrics rows, the reference pass timed apart."""
    from llmhalluc.config import load_config
    from llmhalluc.train import preference
    from llmhalluc.train.loop import train

    timed = {}
    compute = preference.compute_reference

    def timed_reference(run):
        started = time.perf_counter()
        result = compute(run)
        timed["reference_seconds"] = time.perf_counter() - started
        return result

    preference.compute_reference = timed_reference
    config = load_config(
        REPO / "configs" / "demo_dpo.yaml",
        [
            f"model_name_or_path={model_dir}",
            f"max_samples={steps * PAIRS_PER_STEP}",
            "eval_dataset=[]",
            "eval_steps=",
            "save_steps=",
            f"output_dir={out}",
            f"per_device_train_batch_size={PAIRS_PER_STEP}",
            f"padding_free={layout == 'padding_free'}",
            f"max_steps={steps}",
            "logging_steps=1",
            "lr_scheduler_type=constant",
            "warmup_ratio=0",
        ],
    )
    started = time.perf_counter()
    train(config)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    seconds = sum(r["step_time"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {
        "tokens_per_second": tokens / seconds,
        "seconds": seconds,
        "wall_seconds": wall,
        "steps": len(rows),
        "first_loss": rows[0]["loss"],
        **timed,
    }


def worker_trl(model_dir: str, out: str, steps: int, precompute: str) -> dict:
    """One process of TRL's DPOTrainer on the same pairs (conversational prompt / chosen / rejected)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [
        {"prompt": p["messages"], "chosen": [p["chosen"]], "rejected": [p["rejected"]]}
        for p in pairs(steps * PAIRS_PER_STEP)
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=out,
        beta=0.1,
        max_length=512,
        per_device_train_batch_size=PAIRS_PER_STEP,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        use_cpu=True,
        dataloader_num_workers=0,
        precompute_ref_log_probs=precompute == "precompute",
        bf16=False,  # TRL's defaults are bf16 and gradient checkpointing; ours here are fp32 and none
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer
    )
    tokens = sum(
        len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in trainer.train_dataset
    )
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds = result.metrics["train_runtime"]
    return {
        "tokens_per_second": tokens / seconds,
        "seconds": seconds,
        "steps": trainer.state.global_step,
        "first_loss": losses[0],
    }


def main() -> None:
    """Run every measurement in a fresh process; print the table; write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of 8 pairs (at most 60)")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        worker = {"ours": worker_ours, "trl": worker_trl}[kind]
        print(json.dumps(worker(rest[0], rest[1], int(rest[2]), rest[3])))
        return
    from llmhalluc.models.tiny import write_tiny_model

    root = Path(tempfile.mkdtemp(prefix="llmhalluc-bench-dpo-"))
    model = write_tiny_model(root / "tiny")
    steps = str(min(args.steps, 60))
    results = {
        "llmhalluc padding-free": python(
            "--worker", "ours", str(model), str(root / "a"), steps, "padding_free", script=__file__
        ),
        "llmhalluc padded": python("--worker", "ours", str(model), str(root / "b"), steps, "padded", script=__file__),
        "TRL DPOTrainer (reference forward per step)": python(
            "--worker", "trl", str(model), str(root / "c"), steps, "live", script=__file__
        ),
        "TRL DPOTrainer (precompute_ref_log_probs)": python(
            "--worker", "trl", str(model), str(root / "d"), steps, "precompute", script=__file__
        ),
    }
    print("| run | tokens/s | seconds | first loss |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_second']:,.0f} | {r['seconds']:.1f} | {r['first_loss']:.6f} |")
    stamp = datetime.date.today().isoformat()
    path = REPO / "bench" / "results" / f"dpo-{stamp}-{socket.gethostname()}.json"
    path.write_text(json.dumps({"steps": int(steps), "pairs_per_step": PAIRS_PER_STEP, "results": results}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
