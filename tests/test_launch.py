"""Launch surface: accelerate configs, DeepSpeed json resolution, the SLURM script, and 2 machines on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from conftest import REPO, free_port, read_metrics, run_sft, write_chats

from llmhalluc.config import TrainingConfig
from llmhalluc.errors import UserError
from llmhalluc.runtime.dist import resolve_deepspeed_config

CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))
GPU_CONFIGS = {"single_gpu", "ddp", "zero2", "zero3", "zero3_offload", "multi_node_zero3"}
CPU_CONFIGS = {"cpu_ddp", "cpu_zero2", "cpu_zero3", "cpu_zero3_offload"}


def test_every_setup_has_a_config():
    assert {p.stem for p in CONFIGS} == GPU_CONFIGS | CPU_CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_parses_and_says_when_to_pick_it(path):
    parsed = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("#"), "each config starts with a comment saying when to pick it"
    if raw["distributed_type"] == "DEEPSPEED":
        ds_file = REPO / parsed.deepspeed_config["deepspeed_config_file"]
        assert ds_file.is_file()
        # accelerate refuses mixed_precision next to a deepspeed_config_file: bf16 comes from the experiment.
        assert "mixed_precision" not in raw
        assert parsed.deepspeed_config["zero3_init_flag"] == ("zero3" in path.stem)
    if path.stem in GPU_CONFIGS:
        assert raw["use_cpu"] is False
        if raw["distributed_type"] != "DEEPSPEED":
            assert raw["mixed_precision"] == "bf16"
    else:
        assert raw["num_processes"] == 2 and raw.get("mixed_precision", "no") == "no"
    if path.stem == "multi_node_zero3":
        assert parsed.num_machines == 2 and raw["rdzv_backend"] == "static"


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_json_auto_values_become_the_experiments_numbers(name):
    ds_config = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    training = TrainingConfig(
        per_device_train_batch_size=3,
        gradient_accumulation_steps=5,
        max_grad_norm=0.7,
        learning_rate=2e-5,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        weight_decay=0.1,
    )
    resolve_deepspeed_config(ds_config, training, num_processes=16, source=name)
    assert ds_config["train_micro_batch_size_per_gpu"] == 3
    assert ds_config["gradient_accumulation_steps"] == 5
    assert ds_config["train_batch_size"] == 3 * 5 * 16
    assert ds_config["gradient_clipping"] == 0.7
    if name == "zero3_offload":
        assert ds_config["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}
    # What is left "auto" is what accelerate fills from the model and precision at prepare time.
    left = {k for k, v in ds_config["zero_optimization"].items() if v == "auto"}
    assert left <= {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"}
    assert ds_config["bf16"] == {"enabled": "auto"}
    if "stage3" in json.dumps(ds_config):
        assert ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_hard_coded_deepspeed_values_that_disagree_are_named_with_both_values():
    ds_config = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds_config["train_micro_batch_size_per_gpu"] = 4
    ds_config["gradient_clipping"] = 1.0
    ds_config["optimizer"]["params"]["lr"] = 1e-4
    with pytest.raises(UserError) as caught:
        resolve_deepspeed_config(
            ds_config, TrainingConfig(per_device_train_batch_size=2, max_grad_norm=0.5, learning_rate=1e-5), 8, "x.json"
        )
    message = str(caught.value)
    assert "x.json: train_micro_batch_size_per_gpu is 4 but the experiment's per_device_train_batch_size is 2" in (
        message
    )
    assert "gradient_clipping is 1.0 but the experiment's max_grad_norm is 0.5" in message
    assert "optimizer.params.lr is 0.0001 but the experiment's learning_rate is 1e-05" in message


# --- the SLURM script, with srun/scontrol/accelerate replaced by stubs -------------------------------------

STUBS = {
    "srun": """#!/usr/bin/env bash
# Stub srun: run the command once per node with SLURM_NODEID set (in parallel), like srun --ntasks-per-node=1.
nodes=1; overlap=0
while [[ "$1" == --* ]]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=};; --overlap) overlap=1;; esac; shift
done
echo "srun nodes=$nodes overlap=$overlap $1 ${*:2}" | head -c 200 >> "$STUB_LOG"; echo >> "$STUB_LOG"
pids=()
for ((node = 0; node < nodes; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0; for pid in "${pids[@]}"; do wait "$pid" || status=$?; done; exit $status
""",
    "scontrol": """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then for host in $STUB_HOSTS; do echo "$host"; done; exit 0; fi
echo "scontrol $*" >> "$STUB_LOG"
""",
    "accelerate": """#!/usr/bin/env bash
echo "accelerate $*" >> "$STUB_LOG"
if [ -n "${STUB_RUN_SECONDS:-}" ]; then sleep "$STUB_RUN_SECONDS"; fi
if [ -n "${STUB_PREEMPT_DIR:-}" ]; then mkdir -p "$STUB_PREEMPT_DIR"; echo '{}' > "$STUB_PREEMPT_DIR/PREEMPTED"; fi
""",
    "pkill": """#!/usr/bin/env bash
echo "pkill $*" >> "$STUB_LOG"
""",
}


def run_sbatch(tmp_path: Path, nodes: int, hosts: str, extra_env: dict | None = None, background: bool = False):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "STUB_LOG": str(log),
        "STUB_HOSTS": hosts,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": "gpu[01-02]" if nodes == 2 else "gpu01",
        "SLURM_GPUS_ON_NODE": "8",
        "MAIN_PORT": "29555",
        **(extra_env or {}),
    }
    command = [
        "bash",
        str(REPO / "scripts" / "slurm" / "sft.sbatch"),
        "configs/demo.yaml",
        f"output_dir={tmp_path / 'out'}",
        "learning_rate=1e-4",
    ]
    if background:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ), log
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return result, log


def launches(log: Path) -> list[str]:
    return sorted(line for line in log.read_text().splitlines() if line.startswith("accelerate "))


def expected_launch(tmp_path: Path, nodes: int, rank: int) -> str:
    return (
        "accelerate launch --config_file accelerate_configs/multi_node_zero3.yaml "
        f"--num_machines {nodes} --num_processes {8 * nodes} --machine_rank {rank} "
        f"--main_process_ip gpu01 --main_process_port 29555 train/sft.py configs/demo.yaml "
        f"output_dir={tmp_path / 'out'} learning_rate=1e-4 resume_from_checkpoint=auto"
    )


def test_sbatch_one_node(tmp_path):
    result, log = run_sbatch(tmp_path, nodes=1, hosts="gpu01")
    assert result.returncode == 0, result.stdout + result.stderr
    assert launches(log) == [expected_launch(tmp_path, 1, 0)]
    assert "scontrol requeue" not in log.read_text()


def test_sbatch_two_nodes(tmp_path):
    result, log = run_sbatch(tmp_path, nodes=2, hosts="gpu01 gpu02")
    assert result.returncode == 0, result.stdout + result.stderr
    assert launches(log) == [expected_launch(tmp_path, 2, 0), expected_launch(tmp_path, 2, 1)]
    assert "srun nodes=2 overlap=0 bash" in log.read_text()


def test_sbatch_forwards_the_time_limit_signal_and_requeues(tmp_path):
    process, log = run_sbatch(
        tmp_path,
        nodes=2,
        hosts="gpu01 gpu02",
        background=True,
        extra_env={"STUB_RUN_SECONDS": "3", "STUB_PREEMPT_DIR": str(tmp_path / "out")},
    )
    deadline = time.time() + 30
    while time.time() < deadline and not (log.exists() and "accelerate launch" in log.read_text()):
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@600 does
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    calls = log.read_text()
    assert "srun nodes=2 overlap=1 pkill -USR1 -f train/sft.py" in calls
    assert "scontrol requeue 4242" in calls
    assert "requeueing job 4242" in output


def test_sbatch_reports_a_bad_config_before_launching(tmp_path):
    result, _ = run_sbatch(tmp_path, nodes=1, hosts="gpu01", extra_env={})
    assert result.returncode == 0
    bad = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm" / "sft.sbatch"), "configs/nope.yaml"],
        cwd=REPO,
        env={
            **os.environ,
            "SLURM_JOB_NUM_NODES": "1",
            "GPUS_PER_NODE": "1",
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "STUB_HOSTS": "gpu01",
            "STUB_LOG": str(tmp_path / "bad.log"),
            "SLURM_JOB_NODELIST": "gpu01",
            "PYTHON": sys.executable,
        },
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "config file not found: configs/nope.yaml" in bad.stderr
    assert not (tmp_path / "bad.log").exists() or "accelerate" not in (tmp_path / "bad.log").read_text()


# --- two machines on loopback ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_machines_on_loopback_train_like_one_machine_with_two_processes(tmp_path, tiny_model_dir):
    data = write_chats(
        tmp_path / "data",
        "chats",
        [json.loads(line)["messages"] for line in (REPO / "data" / "demo_train.jsonl").read_text().splitlines()[:40]],
    )
    args = [
        str(REPO / "train" / "sft.py"),
        "configs/demo.yaml",
        f"model_name_or_path={tiny_model_dir}",
        "dataset=chats",
        f"dataset_dir={data}",
        "eval_dataset=[]",
        "packing=false",
        "eval_steps=",
        "save_steps=",
        "per_device_train_batch_size=2",
        "gradient_accumulation_steps=2",
        "max_steps=4",
        "logging_steps=1",
        "learning_rate=1e-3",
    ]
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    one = tmp_path / "one_machine"  # the reference: one machine's 2 ranks, forked as a launch would start them
    run_sft([*args[1:], f"output_dir={one}"], accelerate_config="cpu_zero3.yaml")

    two = tmp_path / "two_machines"
    port = str(free_port())
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    machines = []
    for rank, log in enumerate(logs):  # output to files: an undrained pipe would block a chatty rank
        with log.open("w") as sink:
            machines.append(
                subprocess.Popen(
                    [
                        *launcher,
                        "--config_file",
                        str(REPO / "accelerate_configs" / "multi_node_zero3.yaml"),
                        "--num_machines",
                        "2",
                        "--num_processes",
                        "2",
                        "--machine_rank",
                        str(rank),
                        "--main_process_ip",
                        "127.0.0.1",
                        "--main_process_port",
                        port,
                        *args,
                        f"output_dir={two}",
                    ],
                    cwd=REPO,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )
    codes = [m.wait(timeout=600) for m in machines]
    assert codes == [0, 0], "\n\n".join(log.read_text()[-5000:] for log in logs)
    summary = json.loads((two / "run_summary.json").read_text())
    assert summary["machines"] == 2 and summary["processes"] == 2 and summary["zero_stage"] == 3
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4]
    for a, b in zip(rows_one, rows_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_pipeline_sbatch_runs_the_plan_and_requeues_the_study(tmp_path):
    """scripts/slurm/pipeline.sbatch launches train/run.py PLAN on every GPU of every node (the plan resumes its own
    steps) and requeues the job when the study stopped for the time limit (PREEMPTED at the plan's output_dir)."""
    plan = tmp_path / "plan.yaml"
    study = tmp_path / "study"
    plan.write_text(f"output_dir: {study}\nbase: configs/demo.yaml\nsteps:\n  - name: sft\n")
    run_sbatch(tmp_path, nodes=2, hosts="gpu01 gpu02")  # writes the stubs
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "STUB_LOG": str(tmp_path / "study.log"),
        "STUB_HOSTS": "gpu01 gpu02",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_GPUS_ON_NODE": "8",
        "MAIN_PORT": "29555",
        "STUB_PREEMPT_DIR": str(study),
    }
    result = subprocess.run(
        ["bash", "scripts/slurm/pipeline.sbatch", str(plan)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "study.log").read_text()
    assert "--num_machines 2 --num_processes 16 --machine_rank 0" in calls  # every GPU runs the plan
    assert f"--main_process_ip gpu01 --main_process_port 29555 train/run.py {plan}\n" in calls
    assert "resume_from_checkpoint" not in calls and "scontrol requeue 77" in calls
    bad = subprocess.run(
        ["bash", "scripts/slurm/pipeline.sbatch", str(tmp_path / "nope.yaml")], cwd=REPO, env=env, capture_output=True
    )
    assert bad.returncode == 2 and b"plan file not found" in bad.stderr
