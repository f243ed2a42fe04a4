"""A study step's lm-eval tasks: lm-eval's own or the researchers' task YAMLs (lm_eval_include_path), run on the
step's model with the `llmhalluc-hf` model type (continuations read after their backtracks), on every process of the
study (lm-eval's data parallelism on GPUs); the scores go to <step>/lm_eval/results.json, written last by the main
process."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmhalluc.errors import ConfigError, UserError

RESULTS = Path("lm_eval") / "results.json"


@dataclass
class LmEval:
    """The lm-eval tasks of a step and how they run."""

    tasks: list[str]
    include_path: str | None = None
    args: dict[str, Any] = field(default_factory=dict)  # simple_evaluate's keywords: limit, batch_size, num_fewshot

    @classmethod
    def of(cls, entry: dict[str, Any], where: str, plan_folder: Path) -> LmEval | None:
        """The step's lm_eval_tasks / lm_eval_include_path / lm_eval_args, checked; None without tasks."""
        tasks = entry.get("lm_eval_tasks")
        if tasks is None:
            if "lm_eval_include_path" in entry or "lm_eval_args" in entry:
                raise ConfigError(f"{where}: lm_eval_include_path and lm_eval_args need lm_eval_tasks")
            return None
        if isinstance(tasks, str):
            tasks = [tasks]
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ConfigError(f"{where}: lm_eval_tasks must be a task name or a list of them")
        include = entry.get("lm_eval_include_path")
        if include is not None:
            beside = plan_folder / str(include)
            include = str((beside if beside.exists() else Path(include)).resolve())
            if not Path(include).exists():
                raise ConfigError(f"{where}: lm_eval_include_path {entry['lm_eval_include_path']!r} does not exist")
        args = entry.get("lm_eval_args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"{where}: lm_eval_args must be a mapping of simple_evaluate's keywords")
        return cls(tasks, include, dict(args))


def lm_eval_done(output_dir: Path) -> bool:
    """Whether the step's lm-eval scores are written."""
    return (output_dir / RESULTS).is_file()


def run_lm_eval(spec: LmEval, model: Path, backtrack_token: str | None, output_dir: Path, main: bool = True) -> None:
    """Score `model` on the tasks and write the scores (by the main process). Under a multi-process launch every
    process calls it: lm-eval splits the requests over the GPUs and gathers the scores on the main process."""
    scores = evaluate_tasks(spec, model, backtrack_token)
    if not main:
        return
    results = output_dir / RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    temporary = results.with_suffix(".tmp")
    temporary.write_text(json.dumps({"model": str(model), "tasks": spec.tasks, "results": scores}, indent=1) + "\n")
    temporary.replace(results)


def evaluate_tasks(spec: LmEval, model: Path, backtrack_token: str | None) -> dict[str, dict[str, float]]:
    """lm-eval's simple_evaluate of the tasks: {task: {metric,filter: value}} (numbers only)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        import llmhalluc.lm_eval  # noqa: F401  (registers llmhalluc-hf)
    except ImportError:
        raise UserError("lm_eval_tasks needs lm-eval: pip install -e .[lm-eval]") from None
    model_args = f"pretrained={model}" + (f",backtrack_token={backtrack_token}" if backtrack_token else "")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {"apply_chat_template": True, "batch_size": 8, "device": device} | spec.args
    manager = TaskManager(include_path=spec.include_path) if spec.include_path else TaskManager()
    from llmhalluc.runtime.dist import deepspeed_off

    with deepspeed_off():
        output = lm_eval.simple_evaluate(
            model="llmhalluc-hf", model_args=model_args, tasks=spec.tasks, task_manager=manager, **options
        )
    if output is None:  # a process other than the main one of a data-parallel evaluation
        return {}
    return {
        task: {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for task, values in output["results"].items()
    }


def lm_eval_scores(output_dir: Path) -> dict[tuple[str, str], float]:
    """(task, metric) -> value of the step's lm-eval results, when written."""
    path = output_dir / RESULTS
    if not path.is_file():
        return {}
    results = json.loads(path.read_text())["results"]
    return {(task, metric): value for task, values in results.items() for metric, value in values.items()}
