"""Host memory per rank at model load and at the final save: 2-process ZeRO-2 in bf16 on CPU, this tree against an
earlier commit (default: the one before weights were loaded in the engine's dtype and only the writing rank
materialised the saved weights).

    python bench/host_memory.py [--before COMMIT]

A ~150M-parameter random-init Llama (stored in bf16, as hub checkpoints are) trains one step; every rank reports
its peak resident memory after loading the model, and its resident memory just before the final save and the peak
during it (the high-water mark reset first; sitecustomize hooks around setup's load_model and the loop's
save_final_model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HOOKS = """
import json, os
def _gb(kilobytes):
    return round(kilobytes / 2**20, 3)
def _status(field):
    with open("/proc/self/status") as f:
        return _gb(int(next(line for line in f if line.startswith(field)).split()[1]))
def _peak():
    return _status("VmHWM:")  # the high-water mark since the last reset
def _resident():
    return _status("VmRSS:")
def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
if os.environ.get("RANK") is not None:
    import llmhalluc.train.loop as loop
    import llmhalluc.train.setup as setup
    record = {}
    real_load, real_save = setup.load_model, loop.save_final_model
    def load_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        record["peak_after_load_gb"] = _peak()
        return model
    def save_final_model(*args, **kwargs):
        record["resident_before_save_gb"] = _resident()
        record["peak_before_save_gb"] = _peak()
        _reset_peak()
        result = real_save(*args, **kwargs)
        record["peak_after_save_gb"] = _peak()
        with open(os.path.join(os.environ["HOST_MEMORY_OUT"], f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(record, f)
        return result
    setup.load_model, loop.save_final_model = load_model, save_final_model
"""


def make_model(folder: Path) -> Path:
    """A ~150M-parameter random-init Llama with the tiny tokenizer, saved in bf16 as hub checkpoints are."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmhalluc.models.tiny import build_tokenizer

    tokenizer = build_tokenizer("chatml")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measure(tree: Path, model: Path, work: Path) -> dict:
    """Per-rank memory of one 2-process ZeRO-2 bf16 step run from the source tree `tree`."""
    hooks = work / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    out = work / "records"
    out.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{hooks}:{tree}",
        "HOST_MEMORY_OUT": str(out),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(tree / "accelerate_configs" / "cpu_zero2.yaml"),
        str(tree / "train" / "sft.py"),
        str(tree / "configs" / "demo.yaml"),
        f"model_name_or_path={model}",
        f"dataset_dir={REPO / 'data'}",
        "eval_dataset=[]",
        "eval_steps=",
        "save_steps=",
        "max_steps=1",
        "per_device_train_batch_size=2",
        "packing=false",
        "bf16=true",
        f"output_dir={work / 'run'}",
    ]
    subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True, timeout=1800)
    return {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))}


def main() -> None:
    """Measure both trees and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="73e827e", help="the commit to compare against")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmhalluc-host-memory-"))
    model = make_model(work / "model")
    before_tree = work / "before-tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=REPO, check=True)
    try:
        results = {
            "model_parameters_millions": 152,
            "before": {"commit": args.before, **measure(before_tree, model, work / "before")},
            "after": measure(REPO, model, work / "after"),
        }
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=REPO, check=True)
    print(json.dumps(results, indent=1))
    (REPO / "bench" / "results" / "host-memory-zero2.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n| rank | peak after loading the model | the final save adds (peak during it - resident before) |")
    print("| --- | --- | --- |")
    for rank in sorted(results["after"]):
        b, a = results["before"][rank], results["after"][rank]
        added_b = b["peak_after_save_gb"] - b["resident_before_save_gb"]
        added_a = a["peak_after_save_gb"] - a["resident_before_save_gb"]
        print(
            f"| {rank} | {b['peak_after_load_gb']:.2f} GB before, {a['peak_after_load_gb']:.2f} GB after | "
            f"{added_b:.2f} GB before, {added_a:.2f} GB after |"
        )


if __name__ == "__main__":
    main()
