"""What a run says about itself: the start-up lines, output_dir/config.yaml and run_summary.json (written at the
start, completed at the end), and the final report with the lines that load the result."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmhalluc.config import Config, changed_keys
from llmhalluc.models.export import load_hint
from llmhalluc.plot import write_loss_plot
from llmhalluc.runtime.tracking import METRICS_FILE
from llmhalluc.train.preemption import PREEMPTED_MARKER

SUMMARY_FILE = "run_summary.json"


class RunRecord:
    """The run's record on the main process: at the start config.yaml, run_summary.json with status running and
    the start-up lines; at the end the summary completed (finished | preempted | diverged | failed, end time, wall
    time, final metrics), loss.png and the report."""

    def __init__(self, run: Any):
        self.run = run
        self.is_main = run.accelerator.is_main_process
        self.output_dir: Path = run.output_dir
        self.path = self.output_dir / SUMMARY_FILE
        self.summary = run.summary()
        self.started = time.time()
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.yaml").write_text(run.config.to_yaml())
        (self.output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        self._write({"status": "running", "started": _now()})
        print(startup_lines(run.config, self.summary, self.output_dir), flush=True)

    def finish(self, status: str, state: Any, error: str | None = None) -> None:
        """Complete the summary and plot the losses; for a run that did not crash also print the report."""
        if not self.is_main:
            return
        fields: dict[str, Any] = {
            "status": status,
            "ended": _now(),
            "wall_seconds": round(time.time() - self.started, 1),
        }
        if error:
            self._write(fields | {"error": error})
            if (self.output_dir / METRICS_FILE).is_file():  # the curves up to the crash
                write_loss_plot(self.output_dir)
            return
        final = final_metrics(self.output_dir, state.train_seconds, state.trained_tokens_seen, state.step)
        if state.best_step is not None:  # metric_for_best_model was evaluated
            metric = self.run.config.run.metric_for_best_model
            final |= {"best_step": state.best_step, "best_metric": {metric: state.best_metric}}
        final["final_model_step"] = state.final_model_step if state.final_model_step is not None else state.step
        self._write(fields | {"final": final})
        write_loss_plot(self.output_dir)
        load = load_hint(self.output_dir, self.run.export) if status == "finished" else None
        print(report(status, self.started, final, self.output_dir, load), flush=True)

    def _write(self, fields: dict[str, Any]) -> None:
        self.summary = {**self.summary, **fields}
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.summary, indent=1) + "\n")
        temporary.replace(self.path)  # never half-written


def startup_lines(config: Config, summary: dict[str, Any], output_dir: Path) -> str:
    """What the run is, before its first step: the keys that differ from the defaults (the whole resolved config is
    output_dir/config.yaml) and one line of the run summary (all of it is run_summary.json)."""
    changed = changed_keys(config)
    shown = "\n".join(f"  {key}: {json.dumps(value)}" for key, value in changed.items())
    zero = f", ZeRO-{summary['zero_stage']}" if summary["zero_stage"] else ""
    parameters = summary["parameters"]
    return (
        f"config ({len(changed)} keys set; every key in {output_dir / 'config.yaml'}):\n{shown}\n"
        f"run: stage {summary['stage']}, {summary['processes']} process(es) on {summary['machines']} machine(s) "
        f"({summary['distributed_type']}{zero}), precision {summary['mixed_precision']}, "
        f"{summary['batch_layout']} batches of {summary['global_batch_sequences']} "
        f"{'pairs' if summary['stage'] == 'dpo' else 'sequences'} per step, "
        f"{summary['total_steps']} steps ({summary['steps_per_epoch']} per epoch), attention {summary['attention']}, "
        f"{parameters['trainable']:,} of {parameters['total']:,} parameters trained; "
        f"summary in {output_dir / SUMMARY_FILE}"
    )


def final_metrics(output_dir: Path, train_seconds: float, trained_tokens: int, steps: int) -> dict[str, Any]:
    """The numbers of a finished run, from its metrics.jsonl: last train loss, last and best eval loss."""
    path = output_dir / METRICS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    final: dict[str, Any] = {"steps": steps, "train_seconds": round(train_seconds, 1)}
    if train:
        final["train_loss"] = train[-1]["loss"]
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        final |= {
            "eval_loss": evals[-1]["eval_loss"],
            "best_eval_loss": best["eval_loss"],
            "best_eval_step": best["step"],
        }
    if train_seconds > 0:
        final["trained_tokens_per_second"] = round(trained_tokens / train_seconds, 1)
    for key, value in (evals[-1] if evals else {}).items():
        if key.startswith("gen/"):
            final[key] = value
    return final


def report(status: str, started: float, final: dict[str, Any], output_dir: Path, load: list[str] | None) -> str:
    """The block printed when a run ends: what it achieved and where the model is."""
    lines = [f"run {status}: {final.get('steps', 0)} steps in {time.time() - started:.0f} s wall time"]
    if "train_loss" in final:
        lines.append(f"  final train loss  {final['train_loss']:.4f}")
    if "eval_loss" in final:
        lines.append(
            f"  final eval loss   {final['eval_loss']:.4f} (best {final['best_eval_loss']:.4f} at step "
            f"{final['best_eval_step']})"
        )
    if "trained_tokens_per_second" in final:
        lines.append(f"  trained tokens/s  {final['trained_tokens_per_second']:,.0f}")
    for key in sorted(k for k in final if k.startswith("gen/")):
        lines.append(f"  {key}  {final[key]:.4f}")
    if load is not None:
        lines.append(f"  model             {output_dir.resolve()}")
        lines.append(f"  load it with      {load[0]}")
        lines += [f"  or                {line}" for line in load[1:]]
    lines.append(f"  metrics           {output_dir / METRICS_FILE}, plot {output_dir / 'loss.png'}")
    return "\n".join(lines)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
