"""Benchmark suite: llmhalluc's loop vs TRL's SFTTrainer on the same model, data and hyperparameters.

    pip install -r bench/requirements.txt -c constraints.txt
    python bench/run.py                       # everything this machine can run; about 15 minutes on 2 CPU cores
    python bench/run.py --quick               # the tiny model only, fewer chats

Measures, in one run: training throughput (non-pad tokens/s and trained tokens/s) for the tiny model and a
~50M-parameter model in three comparisons: padded vs TRL padded, the defaults (our padding-free batches of sequences
vs TRL's padded ones: what a user who changes nothing gets), and packed vs TRL packed; data preparation throughput
(chats/s) on 10,000 GSM8K-shaped chats; padding efficiency (real tokens / computed tokens); and, when a GPU is
present, tokens/s/GPU, MFU and peak memory for a Llama-3.2-1B-shaped random-init model at seq 2048 packed, bf16,
ZeRO-2 and ZeRO-3 (gpu_suite below).
Every measurement runs in a fresh process. Results go to bench/results/<date>-<host>.json and a table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def python(*args: str, env: dict | None = None, timeout: int = 3600, script: str | Path = __file__) -> dict:
    """Run `python bench/run.py --worker ...` (or another bench script) in a fresh process and return the JSON it
    prints last."""
    result = subprocess.run(
        [sys.executable, str(Path(script)), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- workers (each runs in its own process) ---------------------------------------------------------------


def bench_run_overrides(model_dir: str | Path, data_dir: str | Path, out: str | Path) -> list[str]:
    """configs/demo.yaml pointed at a model, the `bench` dataset in data_dir and out: no eval, no checkpoints."""
    return [
        f"model_name_or_path={model_dir}",
        "dataset=bench",
        f"dataset_dir={data_dir}",
        "eval_dataset=[]",
        "eval_steps=",
        "save_steps=",
        f"output_dir={out}",
    ]


def worker_train_ours(model_dir: str, data_dir: str, layout: str, out: str, max_length: int, batch: int) -> dict:
    """Train one epoch with llmhalluc in a batch layout (padded, padding_free, packed); throughput from its metrics
    rows (training steps only, like TRL's)."""
    from llmhalluc.config import load_config
    from llmhalluc.train.loop import train

    config = load_config(
        REPO / "configs" / "demo.yaml",
        [
            *bench_run_overrides(model_dir, data_dir, out),
            f"max_length={max_length}",
            f"packing={layout == 'packed'}",
            f"padding_free={layout == 'padding_free'}",
            f"per_device_train_batch_size={batch}",
            "num_train_epochs=1",
            "learning_rate=1e-4",
            "logging_steps=1",
            "lr_scheduler_type=constant",
            "warmup_ratio=0",
        ],
    )
    train(config)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    seconds = sum(r["step_time"] for r in rows)
    return {
        "tokens": sum(r["tokens"] for r in rows),
        "trained_tokens": sum(r["trained_tokens"] for r in rows),
        "seconds": seconds,
        "steps": len(rows),
        "final_loss": rows[-1]["loss"],
    }


def worker_train_trl(model_dir: str, data_dir: str, layout: str, out: str, max_length: int, batch: int) -> dict:
    """Train one epoch with TRL's SFTTrainer (assistant-only loss, same template, batch, length, schedule), padded
    or packed."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (Path(data_dir) / "bench.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    on_gpu = os.environ.get("LLMHALLUC_BENCH_DEVICE") == "cuda"  # the GPU check's TRL comparison
    args = SFTConfig(
        output_dir=out,
        max_length=max_length,
        packing=layout == "packed",
        assistant_only_loss=True,
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
        dataloader_num_workers=0,
        use_cpu=not on_gpu,
        bf16=on_gpu,
        gradient_checkpointing=False,  # TRL's default is on; llmhalluc's is off: compare the same computation
        max_steps=int(os.environ.get("LLMHALLUC_BENCH_MAX_STEPS", "-1")),
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    tokens = trained = 0
    for example in trainer.train_dataset:
        tokens += len(example["input_ids"])
        trained += sum(label != -100 for label in example["labels"][1:])
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # With max_steps, the share of the (packed) rows it trained on, at the average tokens per row.
    share = min(1.0, trainer.state.global_step * batch / len(trainer.train_dataset))
    return {
        "tokens": tokens * share,
        "trained_tokens": trained * share,
        "seconds": result.metrics["train_runtime"],
        "steps": trainer.state.global_step,
        "final_loss": losses[-1],
    }


def worker_prepare_ours(data_dir: str, model_dir: str, workers: int) -> dict:
    """Seconds for llmhalluc to turn the raw chats into training examples (fresh cache)."""
    from transformers import AutoTokenizer

    from llmhalluc.config import DataConfig
    from llmhalluc.data.pipeline import prepare_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = DataConfig(dataset=["bench"], dataset_dir=data_dir, max_length=1024, preprocessing_num_workers=workers)
    start = time.perf_counter()
    _, stats = prepare_dataset(["bench"], config, tokenizer)
    return {"seconds": time.perf_counter() - start, "chats": stats.examples}


def worker_prepare_trl(data_dir: str, model_dir: str, workers: int) -> dict:
    """Seconds for SFTTrainer to prepare the same raw chats (its constructor's dataset preparation)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    start = time.perf_counter()
    rows = [json.loads(line) for line in (Path(data_dir) / "bench.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_length=1024,
        assistant_only_loss=True,
        report_to="none",
        dataset_num_proc=workers,
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return {"seconds": time.perf_counter() - start, "chats": len(trainer.train_dataset)}


# --- the suite ----------------------------------------------------------------------------------------------


def write_chats(folder: Path, chats: list[list[dict]]) -> None:
    """bench.jsonl in openai format plus its dataset_info.json entry."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    (folder / "dataset_info.json").write_text(
        json.dumps({"bench": {"file_name": "bench.jsonl", "formatting": "openai"}})
    )


def gsm8k_chats(count: int) -> list[list[dict]]:
    """GSM8K-shaped chats (question -> worked answer ending in #### N)."""
    import random

    from bench.prepare_data import gsm8k_sized_row

    rng = random.Random(0)
    rows = [gsm8k_sized_row(rng) for _ in range(count)]
    return [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]


def padding_efficiency(data_dir: Path, model_dir: Path, batch: int, max_length: int) -> dict:
    """Real tokens over computed tokens: padded batches in the sampler's order vs packed rows."""
    from transformers import AutoTokenizer

    from llmhalluc.config import DataConfig
    from llmhalluc.data.batching import GlobalBatchSampler, pack_rows, packing_efficiency
    from llmhalluc.data.pipeline import prepare_dataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset, _ = prepare_dataset(
        ["bench"], DataConfig(dataset=["bench"], dataset_dir=str(data_dir), max_length=max_length), tokenizer
    )
    lengths = dataset["length"]
    sampler = GlobalBatchSampler(len(lengths), batch, 1, 1, 0, seed=42)
    real = computed = 0
    for indices in sampler:
        real += sum(lengths[i] for i in indices)
        computed += max(lengths[i] for i in indices) * len(indices)
    shuffled = pack_rows(lengths, max_length, "shuffled_best_fit", seed=42)
    decreasing = pack_rows(lengths, max_length, "best_fit_decreasing", seed=42)
    return {
        "padded": real / computed,
        "packed_shuffled_best_fit": packing_efficiency(lengths, shuffled, max_length),
        "packed_best_fit_decreasing": packing_efficiency(lengths, decreasing, max_length),
    }


def main() -> None:
    """Run the suite, print the table, write bench/results/<date>-<host>.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer chats")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("worker_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker, args.worker_args)

    from llmhalluc.models.tiny import write_tiny_model

    results: dict = {
        "date": datetime.date.today().isoformat(),
        "host": socket.gethostname(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": os.cpu_count(),
    }
    work = Path(tempfile.mkdtemp(prefix="llmhalluc-bench-"))
    models = {"tiny (3.2M)": write_tiny_model(work / "tiny")}
    if not args.quick:
        models["small (~50M)"] = write_tiny_model(work / "small", hidden_size=576, num_layers=12)
    demo = [json.loads(line)["messages"] for line in (REPO / "data" / "demo_train.jsonl").read_text().splitlines()]
    write_chats(work / "demo", demo if not args.quick else demo[:240])
    batch, max_length = 8, 512

    results["padding_efficiency"] = {
        "demo chats, rows of 512": padding_efficiency(work / "demo", models["tiny (3.2M)"], batch, max_length),
    }
    results["training"] = []
    # (comparison, our layout, TRL's layout): TRL's default is padded batches of sequences, ours padding-free ones.
    comparisons = [
        ("padded", "padded", "padded"),
        ("default", "padding_free", "padded"),
        ("packed", "packed", "packed"),
    ]
    for model_name, model_dir in models.items():
        measured_trl: dict[str, dict] = {}
        for mode, ours, trl in comparisons:
            row = {"model": model_name, "mode": mode, "ours_layout": ours, "trl_layout": trl}
            for who, layout in (("trl", trl), ("ours", ours)):
                if who == "trl" and layout in measured_trl:  # TRL padded serves two comparisons
                    row[who] = measured_trl[layout]
                    continue
                out = work / f"run-{who}-{model_dir.name}-{layout}"
                measured = python(
                    "--worker",
                    f"train_{who}",
                    str(model_dir),
                    str(work / "demo"),
                    layout,
                    str(out),
                    str(max_length),
                    str(batch),
                )
                measured["tokens_per_second"] = measured["tokens"] / measured["seconds"]
                measured["trained_tokens_per_second"] = measured["trained_tokens"] / measured["seconds"]
                row[who] = measured
                if who == "trl":
                    measured_trl[layout] = measured
            row["speedup_trained_tokens"] = (
                row["ours"]["trained_tokens_per_second"] / row["trl"]["trained_tokens_per_second"]
            )
            results["training"].append(row)
            print(json.dumps(row), flush=True)

    chats = 2_000 if args.quick else 10_000
    write_chats(work / "gsm8k", gsm8k_chats(chats))
    for rows in (1024, 2048):
        results["padding_efficiency"][f"GSM8K-shaped chats, rows of {rows}"] = padding_efficiency(
            work / "gsm8k", models["tiny (3.2M)"], batch, rows
        )
    preparation = {}
    for who in ("trl", "ours"):
        measured = python(
            "--worker",
            f"prepare_{who}",
            str(work / "gsm8k"),
            str(models["tiny (3.2M)"]),
            "2",
            env={"HF_DATASETS_CACHE": str(work / f"cache-{who}")},
        )
        measured["chats_per_second"] = measured["chats"] / measured["seconds"]
        preparation[who] = measured
    preparation["speedup"] = preparation["ours"]["chats_per_second"] / preparation["trl"]["chats_per_second"]
    results["data_preparation"] = preparation

    import torch

    if torch.cuda.is_available():
        results["gpu"] = gpu_suite(work)
    else:
        results["gpu"] = "not measured: no GPU on this machine"
    print_table(results)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{results['date']}-{results['host']}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


def llama_1b_shaped(folder: Path) -> Path:
    """A random-init model with Llama-3.2-1B's shape (no download), with the tiny tokenizer and its template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmhalluc.models.tiny import build_tokenizer

    tokenizer = build_tokenizer("chatml")
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gpu_suite(work: Path) -> dict:
    """tokens/s/GPU, MFU and peak memory of the 1B shape at seq 2048 packed, bf16, with ZeRO-2 and ZeRO-3."""
    import importlib.util

    import torch

    gpus = torch.cuda.device_count()
    model_dir = llama_1b_shaped(work / "llama-1b-shape")
    attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    results = {"gpus": gpus, "device": torch.cuda.get_device_name(), "attention": attention}
    for stage in ("zero2", "zero3"):
        results[stage] = launch_throughput(
            model_dir,
            work / "gsm8k",
            work / f"gpu-{stage}",
            f"{stage}.yaml",
            gpus,
            [
                "max_length=2048",
                "per_device_train_batch_size=4",
                "max_steps=40",
                "logging_steps=5",
                "bf16=true",
                f"attn_implementation={attention}",
            ],
        )
    results["zero3_vs_zero2"] = (
        results["zero3"]["tokens_per_second_per_gpu"] / results["zero2"]["tokens_per_second_per_gpu"]
    )
    return results


def launch_throughput(
    model_dir: Path, data_dir: Path, out: Path, accelerate_config: str, processes: int, overrides: list[str]
) -> dict:
    """Train packed with `accelerate launch`; per-process throughput (all tokens and trained tokens), mean MFU and
    peak memory (GPU only) over the metrics rows after the first two (warm-up)."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / accelerate_config),
        "--num_processes",
        str(processes),
        str(REPO / "train" / "sft.py"),
        "configs/demo.yaml",
        *bench_run_overrides(model_dir, data_dir, out),
        "packing=true",
        "learning_rate=1e-5",
        *overrides,
    ]
    subprocess.run(command, cwd=REPO, check=True, timeout=3000)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    window_steps = [r["step"] - before for r, before in zip(rows, [0] + [r["step"] for r in rows])]
    measured = list(zip(rows, window_steps))[2:]
    if not measured:
        raise RuntimeError(f"{out}: fewer than 3 metrics rows; raise max_steps")
    rows = [r for r, _ in measured]
    seconds = sum(r["step_time"] * steps for r, steps in measured)  # step_time is per step of the row's window
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    memory = [r["peak_memory_gb"] for r in rows if "peak_memory_gb" in r]
    return {
        "tokens_per_second_per_gpu": sum(r["tokens"] for r in rows) / seconds / processes,
        "trained_tokens_per_second_per_gpu": sum(r["trained_tokens"] for r in rows) / seconds / processes,
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "peak_memory_gb": max(memory) if memory else None,
        "steps": sum(steps for _, steps in measured),
    }


def run_worker(name: str, worker_args: list[str]) -> None:
    """Dispatch a worker and print its JSON result."""
    if name.startswith("train_"):
        model_dir, data_dir, layout, out, max_length, batch = worker_args
        function = worker_train_ours if name == "train_ours" else worker_train_trl
        result = function(model_dir, data_dir, layout, out, int(max_length), int(batch))
    else:
        data_dir, model_dir, workers = worker_args
        function = worker_prepare_ours if name == "prepare_ours" else worker_prepare_trl
        result = function(data_dir, model_dir, int(workers))
    print(json.dumps(result))


def print_table(results: dict) -> None:
    """The README table."""
    print("\n| model | ours vs TRL | TRL trained tok/s | ours trained tok/s | ratio | TRL tok/s | ours tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in results["training"]:
        print(
            f"| {row['model']} | {row['ours_layout']} vs {row['trl_layout']} | "
            f"{row['trl']['trained_tokens_per_second']:,.0f} | "
            f"{row['ours']['trained_tokens_per_second']:,.0f} | {row['speedup_trained_tokens']:.2f}x | "
            f"{row['trl']['tokens_per_second']:,.0f} | {row['ours']['tokens_per_second']:,.0f} |"
        )
    for model in dict.fromkeys(row["model"] for row in results["training"]):
        rows = [row for row in results["training"] if row["model"] == model]
        best = {who: max(rows, key=lambda r: r[who]["trained_tokens_per_second"]) for who in ("trl", "ours")}
        ratio = best["ours"]["ours"]["trained_tokens_per_second"] / best["trl"]["trl"]["trained_tokens_per_second"]
        print(
            f"{model}: fastest vs fastest (ours {best['ours']['ours_layout']}, TRL {best['trl']['trl_layout']}): "
            f"{ratio:.2f}x"
        )
    prep = results["data_preparation"]
    print(
        f"\ndata preparation: TRL {prep['trl']['chats_per_second']:,.0f} chats/s, ours "
        f"{prep['ours']['chats_per_second']:,.0f} chats/s ({prep['speedup']:.1f}x)"
    )
    for data, eff in results["padding_efficiency"].items():
        print(
            f"padding efficiency, {data}: padded {eff['padded']:.1%}, packed shuffled best fit "
            f"{eff['packed_shuffled_best_fit']:.1%}, packed best fit decreasing "
            f"{eff['packed_best_fit_decreasing']:.1%}"
        )


if __name__ == "__main__":
    main()
