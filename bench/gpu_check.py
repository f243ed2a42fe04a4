"""The GPU check: what CPU tests cannot show, in one command (scripts/gpu_check.sh), without hub access.

    python bench/gpu_check.py              # on a GPU machine (sized for a few minutes on one H100)
    python bench/gpu_check.py --cpu-smoke  # the same sections on CPU with the tiny model (tests/test_bench.py)

1. attention: packed rows and padding-free rows give each example the logits it gets alone, for flash_attention_2
   (when installed) and sdpa (with llmhalluc's explicit block-diagonal mask);
2. precision: one optimizer step's loss and grad norm on one process without DeepSpeed, with ZeRO-2 and with ZeRO-3;
3. host syncs: 30 micro-steps (forward, loss, backward) under torch.cuda.set_sync_debug_mode("warn") raise no
   synchronization warning (on CPU: no host read of a tensor value, recorded by HostReadRecorder);
4. throughput: a Llama-3.2-1B-shaped model at seq 2048, bf16, ZeRO-2 and ZeRO-3: tokens/s/GPU, MFU, peak memory, and
   TRL's SFTTrainer on the same model, data and batch (the ratio).

Writes bench/results/<date>-<gpu>.json and prints a table; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Tolerances: bf16 keeps 8 bits of mantissa, so logits (magnitude ~1-10) agree to a few hundredths, and one step's
# loss across ZeRO stages to about a percent; fp32 (the CPU smoke run) agrees to float noise.
LOGIT_TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: 1e-4}
LOSS_TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


class HostReadRecorder(TorchFunctionMode):
    """Records every call that would make the host wait for a device value: .item(), .tolist(), bool(), int(),
    float(), nonzero, masked_select, unique, and indexing with a boolean tensor."""

    READS = (
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.Tensor.masked_select,
        torch.masked_select,
        torch.Tensor.unique,
        torch.unique,
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.calls.append(getattr(func, "__qualname__", repr(func)))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.calls.append(f"{func.__name__} with a boolean mask")
        return func(*args, **(kwargs or {}))


def synthetic_examples(tokenizer, count: int, seed: int = 0) -> list[dict]:
    """Tokenized GSM8K-shaped chats (question -> worked answer), as training examples."""
    import random

    from bench.prepare_data import gsm8k_sized_row
    from llmhalluc.data import tokenize_chat

    rng = random.Random(seed)
    rows = [gsm8k_sized_row(rng) for _ in range(count)]
    chats = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]
    return [tokenize_chat(tokenizer, chat) for chat in chats]


def small_model(tokenizer, attention: str, dtype: torch.dtype, device: str):
    """A random-init 4-layer Llama (GQA) sized for the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_implementation=attention,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def check_attention(tokenizer, device: str, dtype: torch.dtype) -> list[dict]:
    """Section 1: per-example logits inside packed and padding-free rows vs alone."""
    import importlib.util

    from llmhalluc.data.batching import PackedCollator, PaddingFreeCollator
    from llmhalluc.train.loss import model_inputs

    attentions = ["sdpa", "eager"] if device == "cpu" else ["sdpa"]
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attentions.insert(0, "flash_attention_2")
    examples = synthetic_examples(tokenizer, 8)
    results = []
    for attention in attentions:
        model = small_model(tokenizer, attention, dtype, device)
        for layout, rows in (("packed", [examples[:3], examples[3:]]), ("padding_free", [examples])):
            if layout == "packed":
                batch = PackedCollator(tokenizer.pad_token_id, pad_to_multiple_of=64)(rows)
            else:
                batch = PaddingFreeCollator(tokenizer.pad_token_id)(examples)
            width = batch["input_ids"].shape[1]
            starts = []  # where each example starts in the flattened [rows x width] tokens
            for r, row in enumerate(rows):
                offset = r * width
                for example in row:
                    starts.append(offset)
                    offset += len(example["input_ids"])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            worst = 0.0
            with torch.no_grad():
                logits = model(**model_inputs(batch, model.config), use_cache=False).logits
                flat = logits.reshape(-1, logits.shape[-1])
                for example, start in zip(examples, starts):
                    ids = torch.tensor([example["input_ids"]], device=device)
                    alone = model(input_ids=ids, use_cache=False).logits[0]
                    inside = flat[start : start + len(example["input_ids"])]
                    worst = max(worst, (inside.float() - alone.float()).abs().max().item())
            results.append(
                {
                    "attention": attention,
                    "layout": layout,
                    "max_abs_logit_difference": worst,
                    "tolerance": LOGIT_TOLERANCE[dtype],
                    "ok": worst <= LOGIT_TOLERANCE[dtype],
                }
            )
    return results


def check_host_syncs(tokenizer, device: str, dtype: torch.dtype, steps: int = 30) -> dict:
    """Section 3: micro-steps (padding-free and padded) that never wait for the device."""
    from llmhalluc.data.batching import PaddedCollator, PaddingFreeCollator
    from llmhalluc.train.loss import cross_entropy_sum

    examples = synthetic_examples(tokenizer, 4 * steps, seed=1)
    model = small_model(tokenizer, "sdpa", dtype, device).train()
    collators = {"padding_free": PaddingFreeCollator(tokenizer.pad_token_id), "padded": PaddedCollator(0)}
    found: dict[str, list[str]] = {}
    for layout, collate in collators.items():
        batches = [collate(examples[4 * i : 4 * i + 4]) for i in range(steps)]
        on_device = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        if device == "cuda":
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for batch in on_device:
                        loss, _ = cross_entropy_sum(model, batch)
                        loss.backward()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            found[layout] = sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)})
        else:
            recorder = HostReadRecorder()
            with recorder:
                for batch in on_device:
                    loss, _ = cross_entropy_sum(model, batch)
                    loss.backward()
            found[layout] = sorted(set(recorder.calls))
    return {"micro_steps": steps, "found": found, "ok": not any(found.values())}


def launch(config: str, processes: int, args: list[str], timeout: int = 1200) -> list[dict]:
    """Run train/sft.py under accelerate launch; its metrics rows."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        str(REPO / "train" / "sft.py"),
        *args,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_precision(model_dir: Path, data_dir: Path, work: Path, device: str) -> dict:
    """Section 2: one optimizer step, 1 process: no DeepSpeed, ZeRO-2, ZeRO-3."""
    setups = {"single": "single_gpu.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}
    if device == "cpu":  # the code path: one process without DeepSpeed, and ZeRO-3 (ZeRO-2 runs in the CPU tests)
        setups = {"single": None, "zero3": "cpu_zero3.yaml"}
    rows = {}
    for name, config in setups.items():
        args = [
            "configs/demo.yaml",
            f"model_name_or_path={model_dir}",
            "dataset=bench",
            f"dataset_dir={data_dir}",
            "eval_dataset=[]",
            "eval_steps=",
            "save_steps=",
            f"output_dir={work / ('precision-' + name)}",
            "max_steps=1",
            "per_device_train_batch_size=8",
            "learning_rate=1e-4",
            "lr_scheduler_type=constant",
            "warmup_ratio=0",
            "logging_steps=1",
            f"bf16={device == 'cuda'}",
        ]
        if config is None:
            result = subprocess.run([sys.executable, "train/sft.py", *args], cwd=REPO, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(result.stderr[-4000:])
            out = work / "precision-single"
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        else:
            metrics = launch(config, 1, args)
        rows[name] = next(r for r in metrics if "loss" in r)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reference = rows["single"]
    worst = max(abs(r["loss"] - reference["loss"]) / reference["loss"] for r in rows.values())
    return {
        "loss": {k: r["loss"] for k, r in rows.items()},
        "grad_norm": {k: r["grad_norm"] for k, r in rows.items()},
        "max_relative_loss_difference": worst,
        "tolerance": LOSS_TOLERANCE[dtype],
        "ok": worst <= LOSS_TOLERANCE[dtype],
    }


def check_throughput(work: Path, device: str, cpu_model: Path | None) -> dict:
    """Section 4: ZeRO-2 and ZeRO-3 throughput of the 1B shape (the tiny model on CPU), and TRL on the same."""
    from bench.run import gsm8k_chats, launch_throughput, llama_1b_shaped, python, write_chats

    gpus = torch.cuda.device_count() if device == "cuda" else 1  # on CPU: the code path, in one process
    write_chats(work / "gsm8k", gsm8k_chats(4000 if device == "cuda" else 64))
    model_dir = llama_1b_shaped(work / "llama-1b-shape") if device == "cuda" else cpu_model
    steps, length, batch = (40, 2048, 4) if device == "cuda" else (5, 1024, 1)
    results: dict = {"gpus": gpus}
    for stage in ("zero2", "zero3") if device == "cuda" else ("zero3",):  # on CPU the launcher path once
        config = f"{stage}.yaml" if device == "cuda" else f"cpu_{stage}.yaml"
        results[stage] = launch_throughput(
            model_dir,
            work / "gsm8k",
            work / f"throughput-{stage}",
            config,
            gpus,
            [
                f"max_length={length}",
                f"per_device_train_batch_size={batch}",
                f"max_steps={steps}",
                "logging_steps=2",
                f"bf16={device == 'cuda'}",
            ],
        )
    if "zero2" in results:
        results["zero3_vs_zero2"] = (
            results["zero3"]["tokens_per_second_per_gpu"] / results["zero2"]["tokens_per_second_per_gpu"]
        )
    if device == "cuda":  # TRL on one GPU, packed like ours, same model, data and batch
        trl = python(
            "--worker",
            "train_trl",
            str(model_dir),
            str(work / "gsm8k"),
            "packed",
            str(work / "throughput-trl"),
            str(length),
            str(batch),
            env={"LLMHALLUC_BENCH_DEVICE": "cuda", "LLMHALLUC_BENCH_MAX_STEPS": str(steps)},
        )
        results["trl_tokens_per_second"] = trl["tokens"] / trl["seconds"]
        ours_one_gpu = results["zero2"]["tokens_per_second_per_gpu"]
        results["ours_zero2_vs_trl_per_gpu"] = ours_one_gpu / results["trl_tokens_per_second"]
    return results


def main(argv: list[str] | None = None) -> int:
    """Run every section; print the table; write the results file; exit 1 if a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same sections on CPU with the tiny model")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    from bench.run import gsm8k_chats, write_chats
    from llmhalluc.models.tiny import build_tokenizer, write_tiny_model

    device = "cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    work = Path(tempfile.mkdtemp(prefix="llmhalluc-gpu-check-"))
    tokenizer = build_tokenizer("chatml")
    tiny = write_tiny_model(work / "tiny")
    write_chats(work / "bench", gsm8k_chats(64))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results: dict = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    path = args.out / f"{results['date']}-{slug}.json"
    sections = {
        "attention": lambda: check_attention(tokenizer, device, dtype),
        "precision": lambda: check_precision(tiny, work / "bench", work, device),
        # On CPU the section checks the code path (tests/test_train.py records host reads of whole train steps).
        "host_syncs": lambda: check_host_syncs(tokenizer, device, dtype, 30 if device == "cuda" else 4),
        "throughput": lambda: check_throughput(work, device, tiny),
    }
    results["seconds"], results["complete"] = {}, False
    for section, run in sections.items():
        started = time.perf_counter()
        try:
            results[section] = run()
        except Exception as err:  # a failed section must not cost the others their (scarce) GPU time
            results[section] = {"error": f"{type(err).__name__}: {err}"[-4000:], "ok": False}
        results["seconds"][section] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(results, indent=1) + "\n")  # after each section: a timeout keeps what ran
    results["complete"], results["ok"] = True, all_checks_passed(results)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"wrote {path}")
    return 0 if results["ok"] else 1


def all_checks_passed(results: dict) -> bool:
    """Whether every exactness section passed and the throughput section ran."""
    attention = results["attention"]
    if isinstance(attention, dict) or not all(row["ok"] for row in attention):
        return False
    return results["precision"]["ok"] and results["host_syncs"]["ok"] and "error" not in results["throughput"]


def print_table(results: dict) -> None:
    """The check's results, one line per measurement; a section that raised, one line with its error."""
    print(f"\nGPU check on {results['device']} (torch {results['torch']})\n")
    print("| check | result | tolerance | ok |\n| --- | --- | --- | --- |")
    printers = {
        "attention": print_attention,
        "precision": print_precision,
        "host_syncs": print_host_syncs,
        "throughput": print_throughput,
    }
    for section, print_section in printers.items():
        value = results[section]
        if isinstance(value, dict) and "error" in value:
            print(f"| {section} | failed: {value['error'].strip().splitlines()[-1][:200]} | | False |")
        else:
            print_section(value)


def print_attention(rows: list[dict]) -> None:
    """Rows of section 1."""
    for row in rows:
        print(
            f"| logits, {row['attention']} {row['layout']} vs alone | max abs diff "
            f"{row['max_abs_logit_difference']:.2e} | {row['tolerance']:.0e} | {row['ok']} |"
        )


def print_precision(precision: dict) -> None:
    """The row of section 2."""
    losses = ", ".join(f"{k} {v:.6f}" for k, v in precision["loss"].items())
    print(
        f"| one-step loss ({losses}) | max rel diff {precision['max_relative_loss_difference']:.2e} | "
        f"{precision['tolerance']:.0e} | {precision['ok']} |"
    )


def print_host_syncs(syncs: dict) -> None:
    """The row of section 3."""
    print(f"| host syncs in {syncs['micro_steps']} micro-steps | {syncs['found']} | none | {syncs['ok']} |")


def print_throughput(throughput: dict) -> None:
    """Rows of section 4."""
    for stage in [s for s in ("zero2", "zero3") if s in throughput]:
        r = throughput[stage]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "n/a"
        print(f"| {stage} throughput | {r['tokens_per_second_per_gpu']:,.0f} tok/s/GPU, MFU {mfu}, peak {memory} | | |")
    if "zero3_vs_zero2" in throughput:
        print(f"| ZeRO-3 / ZeRO-2 | {throughput['zero3_vs_zero2']:.2f} | | |")
    if "ours_zero2_vs_trl_per_gpu" in throughput:
        print(
            f"| TRL SFTTrainer, 1 GPU | {throughput['trl_tokens_per_second']:,.0f} tok/s (ours per GPU / TRL: "
            f"{throughput['ours_zero2_vs_trl_per_gpu']:.2f}x) | | |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
