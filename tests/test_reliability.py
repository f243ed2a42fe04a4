"""Fault tolerance, for real: non-finite steps, a failing rank, a rank killed like the OOM killer, and the bad-input
table (kill -9 mid-save and mid-step, preemption and resume: tests/test_checkpoints.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, read_metrics, run_sft, sft_command, write_chats
from safetensors.torch import load_file

from llmhalluc.errors import UserError
from llmhalluc.runtime.dist import check_deepspeed_config, check_process_count

pytestmark = pytest.mark.slow


def demo_chats(count: int) -> list[list[dict]]:
    lines = (REPO / "data" / "demo_train.jsonl").read_text().splitlines()[:count]
    return [json.loads(line)["messages"] for line in lines]


def base_args(tiny_model_dir: Path, data_dir: Path) -> list[str]:
    return [
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        "dataset=chats",
        f"dataset_dir={data_dir}",
        "eval_dataset=[]",
        "packing=false",
        "eval_steps=",
        "max_length=512",
        "per_device_train_batch_size=2",
        "gradient_accumulation_steps=2",
        "num_train_epochs=3",  # 36 steps in one process, 18 in two: room after each kill
        "learning_rate=1e-3",
        "logging_steps=1",
        "save_steps=3",
        "seed=11",
    ]


@pytest.fixture(scope="module")
def chats_dir(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("data"), "chats", demo_chats(48))


def start(args: list[str], launch: str | None, log: Path) -> subprocess.Popen:
    with log.open("w") as sink:
        return subprocess.Popen(sft_command(args, launch), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)


def command_line(process: psutil.Process) -> str:
    """A process's command line, or "" for one that has exited (zombie children of DeepSpeed's probes, e.g.)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
        return ""


def workers(process: subprocess.Popen) -> list[psutil.Process]:
    """The training processes: the launched python itself, or the launcher's children running sft.py."""
    root = psutil.Process(process.pid)
    lines = {p: command_line(p) for p in [root, *root.children(recursive=True)]}
    return [p for p, line in lines.items() if "train/sft.py" in line and "accelerate" not in line]


def wait_for(condition, timeout: float = 300, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError("timed out waiting")


def logged_steps(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# --- non-finite steps --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_model_dir) -> dict:
    """The tiny model with one token's embedding set to NaN, and chats that do or do not contain it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("poisoned")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (token,) = tokenizer("§", add_special_tokens=False)["input_ids"][:1]
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    chats = demo_chats(16)
    chats[3][0]["content"] = "§ " + chats[3][0]["content"]  # one chat in 16 makes its step non-finite
    write_chats(root / "data", "one_bad", chats)
    write_chats(root / "data", "all_bad", [[{**c[0], "content": "§ " + c[0]["content"]}, *c[1:]] for c in chats])
    return {"model": root / "model", "data": root / "data"}


@pytest.mark.parametrize("launch", [None, "cpu_ddp.yaml", "cpu_zero2.yaml"], ids=["1proc", "ddp", "zero2"])
def test_a_non_finite_step_is_skipped_and_counted(tmp_path, poisoned, launch):
    out = tmp_path / "out"
    run_sft(
        [
            "configs/demo.yaml",
            f"model_name_or_path={poisoned['model']}",
            "dataset=one_bad",
            f"dataset_dir={poisoned['data']}",
            "eval_dataset=[]",
            "packing=false",
            "eval_steps=",
            "save_steps=",
            "per_device_train_batch_size=1",
            "max_steps=8",
            "logging_steps=1",
            f"output_dir={out}",
        ],
        accelerate_config=launch,
    )
    rows = read_metrics(out)
    skipped = [r for r in rows if r["skipped_steps"]]
    assert len(skipped) == 1 and skipped[0]["skipped_steps"] == 1
    bad = skipped[0]
    assert not (bad["grad_norm"] < float("inf"))  # NaN or inf
    assert all(r["loss"] == r["loss"] and r["grad_norm"] < float("inf") for r in rows if r is not bad)
    weights = load_file(out / "model.safetensors")
    finite = [k for k in weights if k != "model.embed_tokens.weight"]
    assert all(torch.isfinite(weights[k]).all() for k in finite), "a skipped step updated nothing"


def test_too_many_non_finite_steps_in_a_row_stop_with_the_checkpoint_intact(tmp_path, poisoned):
    out = tmp_path / "out"
    result = run_sft(
        [
            "configs/demo.yaml",
            f"model_name_or_path={poisoned['model']}",
            "dataset=all_bad",
            f"dataset_dir={poisoned['data']}",
            "eval_dataset=[]",
            "packing=false",
            "eval_steps=",
            "save_steps=1",
            "per_device_train_batch_size=2",
            "max_steps=8",
            "max_nonfinite_steps=3",
            "logging_steps=1",
            f"output_dir={out}",
        ],
        expect_code=3,
    )
    assert "3 optimizer steps in a row had a non-finite loss or gradient norm" in result.stderr
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "model.safetensors").exists()
    assert [r["skipped_steps"] for r in read_metrics(out)] == [1, 1, 1]


# --- a failing rank ----------------------------------------------------------------------------------------

FAILING_RANK = """
import os
if os.environ.get("RANK") == "1":
    import llmhalluc.train.loop as loop
    real_step = loop.train_step
    calls = {"n": 0}
    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure on rank 1")
        return real_step(*args, **kwargs)
    loop.train_step = failing_step
"""


def test_one_failing_rank_ends_every_rank_without_a_hang(tmp_path, tiny_model_dir, chats_dir):
    # sitecustomize runs in every worker at start-up: rank 1 raises in its third step, as a real bug would.
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAILING_RANK)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'inject'}:{os.environ.get('PYTHONPATH', '')}"}
    started = time.time()
    result = subprocess.run(
        sft_command([*base_args(tiny_model_dir, chats_dir), f"output_dir={tmp_path / 'out'}"], "cpu_zero3.yaml"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
    assert time.time() - started < 300  # far below the 30-minute process-group timeout


def test_one_rank_killed_like_the_oom_killer_ends_the_others(tmp_path, tiny_model_dir, chats_dir):
    out = tmp_path / "out"
    process = start([*base_args(tiny_model_dir, chats_dir), f"output_dir={out}"], "cpu_ddp.yaml", tmp_path / "oom.log")
    wait_for(lambda: logged_steps(out) >= 2)
    ranks = workers(process)
    next(p for p in ranks if p.environ().get("RANK") == "1").send_signal(signal.SIGKILL)
    assert process.wait(timeout=300) != 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


# --- bad input: exit code 2, one line naming the culprit, nothing written ------------------------------------


def test_bad_input_table(tmp_path, tiny_model_dir, chats_dir):
    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    write_chats(
        tmp_path / "data",
        "not_alternating",
        [
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        ]
        * 4,
    )
    write_chats(tmp_path / "data", "empty_after_filtering", [[{"role": "user", "content": "only a question"}]] * 4)
    write_chats(
        tmp_path / "data",
        "long_prompts",
        [[{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]] * 4,
    )
    ran = tmp_path / "ran"  # an output_dir that holds a run
    ran.mkdir()
    (ran / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    cases = {
        "max_length shorter than every prompt": (
            ["dataset=long_prompts", f"dataset_dir={tmp_path / 'data'}", "max_length=64"],
            "dataset 'long_prompts': every row was dropped; first reason: no_trained_tokens_after_truncation",
        ),
        "roles not alternating for a template that requires it": (
            ["dataset=not_alternating", f"dataset_dir={tmp_path / 'data'}", "template=gemma"],
            "dataset 'not_alternating': row 0: the chat template failed: gemma template: roles must alternate",
        ),
        "empty dataset after filtering": (
            ["dataset=empty_after_filtering", f"dataset_dir={tmp_path / 'data'}"],
            "every row was dropped; first reason: no_assistant_turn",
        ),
        "tokenizer without chat template": (
            [f"model_name_or_path={no_template}"],
            "has no chat template: set `template`",
        ),
        "unknown template": (["template=vicuna"], "template: unknown template 'vicuna'; built-in: chatml, gemma"),
        "output_dir with another run": ([f"output_dir={ran}"], f"output_dir {ran} already holds a run"),
        "eval_steps without eval dataset": (["eval_steps=5"], "eval_steps is set but eval_dataset is empty"),
        "keys of another trainer": (
            ["deepspeed=ds.json", "cutoff_len=512", "fsdp=full"],
            "unknown key 'deepspeed': DeepSpeed is chosen by the accelerate config",
        ),
    }
    for name, (overrides, message) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        args = [*base_args(tiny_model_dir, chats_dir), f"output_dir={out}", *overrides]
        if "output_dir=" in overrides[0]:
            args = [*base_args(tiny_model_dir, chats_dir), *overrides]
        result = run_sft(args, expect_code=2)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors and message in result.stderr, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, name
        if name != "output_dir with another run":
            assert not out.exists(), name
    assert result.stderr.count("unknown key") == 3  # the last case: every unknown key at once


def test_more_processes_than_gpus_is_named():
    check_process_count(8, 8)
    with pytest.raises(UserError, match="9 processes were started on this machine but it has 8 GPU"):
        check_process_count(9, 8)


def test_deepspeed_json_with_invalid_stage_or_unknown_keys(tmp_path, tiny_model_dir, chats_dir):
    with pytest.raises(UserError) as caught:
        check_deepspeed_config(
            {"zero_optimization": {"stage": 4, "overlap_com": True}, "trian_batch_size": 8}, "x.json"
        )
    message = str(caught.value)
    assert "x.json: unknown key 'trian_batch_size' (closest: 'train_batch_size')" in message
    assert "zero_optimization.stage: Input should be 0, 1, 2, 3" in message
    assert "zero_optimization.overlap_com: Extra inputs are not permitted" in message
    # And through a real launch: rejected before anything is written.
    bad = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    bad["zero_optimization"]["stage"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    launch = (
        (REPO / "accelerate_configs" / "cpu_zero3.yaml")
        .read_text()
        .replace("ds_configs/zero3.json", str(tmp_path / "bad.json"))
    )
    (tmp_path / "bad.yaml").write_text(launch)
    out = tmp_path / "out"
    result = run_sft(
        [*base_args(tiny_model_dir, chats_dir), f"output_dir={out}"],
        accelerate_config=str(tmp_path / "bad.yaml"),
        expect_code=1,
    )
    assert "zero_optimization.stage: Input should be 0, 1, 2, 3" in result.stderr
    assert not out.exists()


# --- security ------------------------------------------------------------------------------------------------


def test_yaml_cannot_run_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model_name_or_path: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    result = run_sft([str(evil)], expect_code=2)
    assert "YAML syntax error" in result.stderr and "could not determine a constructor" in result.stderr
    assert not (tmp_path / "pwned").exists()


def test_wandb_key_is_never_written_and_remote_code_is_announced(tmp_path, tiny_model_dir, chats_dir):
    secret = "0123456789abcdef0123456789abcdef01234567"
    out = tmp_path / "out"
    result = run_sft(
        [
            *base_args(tiny_model_dir, chats_dir),
            f"output_dir={out}",
            "max_steps=2",
            "report_to=wandb",
            "trust_remote_code=true",
        ],
        env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"},
    )
    assert "WARNING: trust_remote_code is on" in result.stdout
    assert secret not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
