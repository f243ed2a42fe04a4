"""`train/run.py PLAN.yaml`: a study as one command. A plan is a list of steps, each an experiment config (a file, or
overrides of a shared base) that trains, merges and evaluates its model; a step's model may be another step's
output. Steps run in order; a step whose output is complete is skipped, a step that was killed resumes from its last
checkpoint; the study's results go to one table (results.md, results.json) at the plan's output_dir.

    output_dir: outputs/study            # the study's root: step S writes <output_dir>/<S>
    base: configs/demo.yaml              # optional: the config every step starts from
    steps:
      - name: sft
        overrides: {finetuning_type: lora, lora_target: all}
        do_merge: true                   # LoRA merged into <output_dir>/sft/merged
      - name: dpo
        model: sft                       # train from step sft's model (default: the previous training step's)
        config: configs/demo_dpo.yaml    # optional: this step's own config instead of base
        overrides: {eval_dataset: [demo_dpo_eval]}
        do_eval: true                    # generation evaluation of its model on eval_dataset

An experiment config without `steps:` is a plan of one step (its own output_dir, do_train / do_merge / do_eval from
the config). A step's model comes from another step when `model:` names it or, by default, from the previous step
that trains: that step's merged model when it merged, its model when it trained all weights; a LoRA adapter must be
merged (do_merge) before another stage trains on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from llmhalluc.cli.harness import LmEval, lm_eval_done, lm_eval_scores
from llmhalluc.config import Config, load_config
from llmhalluc.errors import ConfigError, UserError

STEP_KEYS = {"name", "config", "overrides", "model", "do_train", "do_merge", "do_eval"}
STEP_KEYS |= {"lm_eval_tasks", "lm_eval_include_path", "lm_eval_args"}
PLAN_KEYS = {"output_dir", "base", "steps"}
EVAL_TAG = "pipeline"
FINISHED = "finished"


@dataclasses.dataclass
class Step:
    """One step of a plan: its name, resolved config, where its model comes from and what it does."""

    name: str
    config: Config
    source: str | None  # the step whose model it trains from, or None (the config's model_name_or_path)
    do_train: bool
    do_merge: bool
    do_eval: bool
    lm_eval: LmEval | None = None  # lm-eval tasks scored on the step's model

    @property
    def output_dir(self) -> Path:
        """Where the step writes its model, checkpoints, metrics and evaluations."""
        return Path(self.config.run.output_dir)

    @property
    def model_out(self) -> Path:
        """The model the step leaves for the next: merged when it merged."""
        return self.output_dir / "merged" if self.do_merge else self.output_dir

    def trained(self) -> bool:
        """Whether its training finished (run_summary.json says so, written after the final model)."""
        summary = self.output_dir / "run_summary.json"
        return summary.is_file() and json.loads(summary.read_text()).get("status") == FINISHED

    def evaluated(self) -> bool:
        """Whether its generation evaluation finished (its results.json is written last)."""
        return (self.output_dir / "eval" / EVAL_TAG / "results.json").is_file()

    def checkpoint(self) -> Path | None:
        """The newest complete checkpoint of an unfinished training, if any."""
        steps = sorted(
            (int(p.name.split("-")[1]), p)
            for p in self.output_dir.glob("checkpoint-*")
            if p.name.split("-")[1].isdigit() and (p / "COMPLETE").exists()
        )
        return steps[-1][1] if steps else None

    def todo(self) -> list[str]:
        """What is left of the step: train (or resume), evaluate."""
        left = []
        if self.do_train and not self.trained():
            checkpoint = self.checkpoint()
            left.append(f"train (resume from {checkpoint.name})" if checkpoint else "train")
        if self.do_eval and not self.evaluated():
            left.append("evaluate")
        if self.lm_eval is not None and not lm_eval_done(self.output_dir):
            left.append("lm-eval " + ",".join(self.lm_eval.tasks))
        return left

    @property
    def evaluated_model(self) -> Path:
        """The model the step's evaluations score: its trained model, else the one it was given."""
        return self.model_out if self.do_train else Path(self.config.model.model_name_or_path)


def read_plan(path: Path) -> tuple[list[Step], Path]:
    """(the steps of a plan file, or the one step of an experiment config; the study's root), every config resolved
    and every reference checked; a bad plan is an error naming the step."""
    if not path.is_file():
        raise ConfigError(f"plan file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or "steps" not in data:
        config = load_config(path)
        run = config.run
        step = Step("main", config, None, run.do_train, config.model.merge, run.do_eval)
        if step.do_eval and not config.data.eval_dataset:
            raise ConfigError(f"{path}: do_eval needs eval_dataset (the datasets its model is evaluated on)")
        return [step], Path(run.output_dir)
    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown plan keys {', '.join(unknown)} (a plan has {', '.join(sorted(PLAN_KEYS))})")
    root = Path(data.get("output_dir") or "")
    if not str(root):
        raise ConfigError(f"{path}: output_dir is required (each step writes <output_dir>/<step name>)")
    entries = data["steps"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: steps must be a non-empty list")
    names = [entry.get("name") if isinstance(entry, dict) else None for entry in entries]
    steps: list[Step] = []
    for index, entry in enumerate(entries):
        name = names[index]
        where = f"{path}: step {index + 1}" + (f" {name!r}" if name else "")
        if (
            not isinstance(entry, dict)
            or not isinstance(name, str)
            or not name.replace("_", "").replace("-", "").isalnum()
        ):
            raise ConfigError(f"{where}: each step is a mapping with a name (letters, digits, - and _)")
        if names.count(name) > 1:
            raise ConfigError(f"{where}: the name {name!r} is used by {names.count(name)} steps")
        unknown = sorted(set(entry) - STEP_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown step keys {', '.join(unknown)} ({', '.join(sorted(STEP_KEYS))})")
        source, folder = source_of(entry, name, index, names, steps, where, entries)
        config_file = entry.get("config") or data.get("base")
        if not config_file:
            raise ConfigError(f"{where}: no config: give the step a config or the plan a base")
        overrides = dict(entry.get("overrides") or {})
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: overrides must be a mapping of key: value")
        overrides["output_dir"] = str(root / name)
        do_merge = bool(entry.get("do_merge", False))
        if do_merge:
            overrides["merge"] = True
        if source is not None:
            overrides["model_name_or_path"] = str(steps_by_name(steps)[source].model_out.resolve())
        elif folder is not None:
            overrides["model_name_or_path"] = folder
        beside = path.parent / str(config_file)  # next to the plan, else from the current folder
        config_path = beside if beside.is_file() else Path(config_file)
        try:
            config = load_config(config_path, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        except UserError as err:
            raise ConfigError(f"{where}: {str(err).replace('command line: ', 'overrides: ')}") from None
        do_train, do_eval = bool(entry.get("do_train", True)), bool(entry.get("do_eval", False))
        if do_eval and not config.data.eval_dataset:
            raise ConfigError(f"{where}: do_eval needs eval_dataset (the datasets its model is evaluated on)")
        if do_merge and config.model.finetuning_type != "lora":
            raise ConfigError(f"{where}: do_merge merges a LoRA adapter, but finetuning_type is full")
        steps.append(Step(name, config, source, do_train, do_merge, do_eval, LmEval.of(entry, where, path.parent)))
    for step in steps:
        if step.source is not None:
            before = steps_by_name(steps)[step.source]
            if before.config.model.finetuning_type == "lora" and not before.do_merge:
                raise ConfigError(
                    f"{path}: step {step.name!r} trains from step {before.name!r}'s LoRA adapter: set do_merge: true "
                    f"on {before.name!r} (stacking adapters is not supported)"
                )
    return steps, root


def steps_by_name(steps: list[Step]) -> dict[str, Step]:
    return {step.name: step for step in steps}


def source_of(
    entry: dict[str, Any], name: str, index: int, names: list[str], steps: list[Step], where: str, entries: list
) -> tuple[str | None, str | None]:
    """(the step whose model this step trains from, or a model folder): `model:` when it names a step or a folder,
    else the previous training step; a reference to itself, a later step or a cycle is an error."""
    if "model" not in entry:
        previous = [s for s in steps if s.do_train]
        return (previous[-1].name if previous else None), None
    wanted = entry["model"]
    if wanted not in names:
        if isinstance(wanted, str) and Path(wanted).exists():
            return None, wanted
        raise ConfigError(f"{where}: model {wanted!r} is neither a step of the plan nor an existing folder")
    chain, current = [name], wanted
    while current is not None:
        if current in chain:
            raise ConfigError(f"{where}: its model references form a cycle: {' -> '.join([*chain, current])}")
        chain.append(current)
        following = entries[names.index(current)]
        current = following.get("model") if isinstance(following, dict) and following.get("model") in names else None
    if names.index(wanted) > index:
        raise ConfigError(f"{where}: it trains from step {wanted!r}, which runs after it: order the steps")
    return wanted, None


def kind(step: Step) -> str:
    """What a step is: its stage and fine-tuning type, or an evaluation only."""
    return f"{step.config.training.stage} {step.config.model.finetuning_type}" if step.do_train else "evaluation only"


def describe(steps: list[Step]) -> str:
    """Every step: what it does, its input model, its output, and what is left of it (the dry run)."""
    lines = []
    for step in steps:
        model = (
            f"step {step.source} ({step.config.model.model_name_or_path})"
            if step.source
            else (step.config.model.model_name_or_path)
        )
        actions = [
            a for a, on in (("train", step.do_train), ("merge", step.do_merge), ("evaluate", step.do_eval)) if on
        ]
        left = step.todo()
        status = "to run: " + ", ".join(left) if left else "done, skipped"
        lines.append(
            f"{step.name}: {kind(step)}, {' + '.join(actions)}; model {model}; output {step.output_dir}; {status}"
        )
    return "\n".join(lines)


def with_values(config: Config, section: str, **values: Any) -> Config:
    """The config with some keys of one section replaced."""
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})


def commit() -> str:
    """The toolkit's git commit (short), or unknown outside a checkout."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return found.stdout.strip() or "unknown"


def results_rows(steps: list[Step]) -> list[dict[str, Any]]:
    """One row per step x dataset x metric: the final training rows (train loss or reward, eval loss, generation
    metrics during training) and the step's evaluation, with the model path, config hash and commit."""
    rows, revision = [], commit()
    for step in steps:
        digest = hashlib.sha256(step.config.to_yaml().encode()).hexdigest()[:12]  # the step's resolved config
        base = {
            "step": step.name,
            "stage": step.config.training.stage if step.do_train else "eval",
            "model": str(step.evaluated_model.resolve()),
            "config_hash": digest,
            "commit": revision,
        }
        found: dict[tuple[str, str], Any] = {}
        metrics = step.output_dir / "metrics.jsonl"
        if step.do_train and metrics.is_file():
            for line in metrics.read_text().splitlines():
                row = json.loads(line)
                for key in ("loss", "reward"):
                    if isinstance(row.get(key), int | float):
                        found["train", key] = row[key]
                for key, value in row.items():
                    if key.endswith("_time"):
                        continue  # wall time, not a result
                    if key.startswith("eval_") and isinstance(value, int | float):
                        found["+".join(step.config.data.eval_dataset), key] = value
                    elif key.startswith("gen/") and isinstance(value, int | float):
                        _, dataset, metric = key.split("/", 2)
                        found[dataset, f"during training: {metric}"] = value
        results = step.output_dir / "eval" / EVAL_TAG / "results.json"
        if step.do_eval and results.is_file():
            for dataset, values in json.loads(results.read_text())["results"].items():
                for metric, value in values.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        found[dataset, metric] = value
        found |= {
            (f"lm-eval {task}", metric): value for (task, metric), value in lm_eval_scores(step.output_dir).items()
        }
        rows += [base | {"dataset": d, "metric": m, "value": v} for (d, m), v in found.items()]
    return rows


COLUMNS = ["step", "stage", "dataset", "metric", "value", "model", "config_hash", "commit"]


def log_results_table(steps: list[Step], rows: list[dict[str, Any]], root: Path) -> None:
    """The results as a wandb table (`study/results`) in a run of its own, when a step reports to wandb."""
    reporting = [step for step in steps if "wandb" in step.config.run.report_to]
    if not reporting:
        return
    from llmhalluc.runtime.tracking import start_wandb

    config = with_values(reporting[0].config, "run", run_name=f"{root.name}-results")
    run = start_wandb(config, root, {"study_steps": [step.name for step in steps]})
    import wandb

    run.log({"study/results": wandb.Table(columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in rows])})
    run.finish()


def write_results(root: Path, rows: list[dict[str, Any]]) -> None:
    """results.json and results.md at the study's root, replaced whole."""
    root.mkdir(parents=True, exist_ok=True)
    columns = COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        value = row["value"]
        shown = {**row, "value": f"{value:.6g}" if isinstance(value, float) else value}
        lines.append("| " + " | ".join(str(shown[c]) for c in columns) + " |")
    for name, text in (("results.json", json.dumps({"rows": rows}, indent=1)), ("results.md", "\n".join(lines))):
        temporary = root / f"{name}.tmp"
        temporary.write_text(text + "\n")
        temporary.replace(root / name)
