"""GRPO benchmark: llmhalluc's `stage: grpo` vs TRL's GRPOTrainer on the same model, prompts, reward and
hyperparameters.

    python bench/grpo.py                # the tiny model, the toy task of configs/demo_grpo.yaml; about 3 minutes
    python bench/grpo.py --steps 10     # fewer optimizer steps

Every measurement runs in a fresh process, one process, fp32: 8 prompts x 8 completions of at most 8 tokens per
step, temperature 1, the digits_only reward of configs/demo_rewards.py, dapo loss, beta 0, one update per generation
batch, constant learning rate 2e-3. Samples/s is completions per second of the whole step (generation, scoring and
training); generation seconds are the time spent in the model's generate (llmhalluc: its generation_time rows; TRL:
its _generate, timed by wrapping it), training the rest of the step. Results go to
bench/results/grpo-<date>-<host>.json and a table is printed.
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

PROMPTS_PER_STEP, GENERATIONS, LENGTH = 8, 8, 8


def worker_ours(model_dir: str, out: str, steps: int) -> dict:
    """One process of llmhalluc stage grpo on the toy task."""
    from llmhalluc.config import load_config
    from llmhalluc.train.loop import train

    config = load_config(
        REPO / "configs" / "demo_grpo.yaml",
        [
            f"model_name_or_path={model_dir}",
            f"output_dir={out}",
            f"per_device_train_batch_size={PROMPTS_PER_STEP * GENERATIONS}",
            "gradient_accumulation_steps=1",
            f"num_generations={GENERATIONS}",
            f"max_completion_length={LENGTH}",
            f"max_steps={steps}",
            "logging_steps=1",
            "save_steps=",
            f"generation_batch_size={PROMPTS_PER_STEP * GENERATIONS}",
        ],
    )
    started = time.perf_counter()
    train(config)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    generation = sum(r["generation_time"] for r in rows)
    rollout = sum(r["rollout_time"] for r in rows)  # generation, scoring, batching, logging the completions
    training = sum(r["step_time"] for r in rows)
    completions = sum(r["completions"] for r in rows)
    seconds = rollout + training
    return {
        "samples_per_second": completions / seconds,
        "seconds": seconds,
        "generation_seconds": generation,
        "training_seconds": seconds - generation,
        "wall_seconds": wall,
        "steps": len(rows),
        "first_reward": rows[0]["reward"],
        "last_reward": rows[-1]["reward"],
    }


def worker_trl(model_dir: str, out: str, steps: int) -> dict:
    """One process of TRL's GRPOTrainer on the same prompts and reward."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO / "configs"))
    from demo_rewards import digits_only

    lines = (REPO / "data" / "demo_train.jsonl").read_text().splitlines()
    chats = [json.loads(line)["messages"] for line in lines]
    rows = [{"prompt": chat[:-1]} for chat in chats if chat[-1]["role"] == "assistant"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=LENGTH,
        temperature=1.0,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        use_cpu=True,
        bf16=False,  # ours here is fp32, without gradient checkpointing
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        loss_type="dapo",
        beta=0.0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=digits_only,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    timed = {"generation_seconds": 0.0}
    generate = trainer._generate

    def timed_generate(*arguments, **options):
        started = time.perf_counter()
        result = generate(*arguments, **options)
        timed["generation_seconds"] += time.perf_counter() - started
        return result

    trainer._generate = timed_generate
    result = trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    seconds = result.metrics["train_runtime"]
    completions = trainer.state.global_step * PROMPTS_PER_STEP * GENERATIONS
    return {
        "samples_per_second": completions / seconds,
        "seconds": seconds,
        "generation_seconds": timed["generation_seconds"],
        "training_seconds": seconds - timed["generation_seconds"],
        "steps": trainer.state.global_step,
        "first_reward": rewards[0],
        "last_reward": rewards[-1],
    }


def main() -> None:
    """Run every measurement in a fresh process; print the table; write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of 64 completions")
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        worker = {"ours": worker_ours, "trl": worker_trl}[kind]
        print(json.dumps(worker(rest[0], rest[1], int(rest[2]))))
        return
    from llmhalluc.models.tiny import write_tiny_model

    root = Path(tempfile.mkdtemp(prefix="llmhalluc-bench-grpo-"))
    model = write_tiny_model(root / "tiny")
    steps = str(args.steps)
    results = {
        "llmhalluc stage grpo": python("--worker", "ours", str(model), str(root / "a"), steps, script=__file__),
        "TRL GRPOTrainer": python("--worker", "trl", str(model), str(root / "b"), steps, script=__file__),
    }
    print("| run | samples/s | seconds | generation s | training s | reward first -> last |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['samples_per_second']:.1f} | {r['seconds']:.1f} | {r['generation_seconds']:.1f} | "
            f"{r['training_seconds']:.1f} | {r['first_reward']:.3f} -> {r['last_reward']:.3f} |"
        )
    stamp = datetime.date.today().isoformat()
    path = REPO / "bench" / "results" / f"grpo-{stamp}-{socket.gethostname()}.json"
    record = {"steps": int(steps), "prompts_per_step": PROMPTS_PER_STEP, "num_generations": GENERATIONS}
    path.write_text(json.dumps(record | {"max_completion_length": LENGTH, "results": results}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
