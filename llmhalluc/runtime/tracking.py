"""Live metrics from the main process: output_dir/metrics.jsonl, wandb, a progress bar, and a line per row.

Each row printed on stdout (the log of a nohup or SLURM job) carries the elapsed time and an estimate of the time
left; on a terminal a tqdm bar also shows progress (`disable_tqdm`, Hugging Face's name: null shows it on a
terminal only, true never, false always).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llmhalluc.config import Config

METRICS_FILE = "metrics.jsonl"
# Values shown on the console line of a row (every value goes to metrics.jsonl and wandb).
SHOWN = ("loss", "eval_loss", "lr", "grad_norm", "reward", "rewards/accuracies", "rewards/margins")
HEADLINE_METRICS = ("accuracy_strict", "/f1", "exact_match", "abstention_rate", "hallucination_rate")


class MetricsLogger:
    """Writes metric rows to metrics.jsonl and wandb, prints them, drives the progress bar; a no-op off the main
    process."""

    def __init__(
        self,
        config: Config,
        output_dir: Path,
        is_main: bool,
        total_steps: int,
        start_step: int,
        run_summary: dict[str, Any],
    ):
        self.is_main = is_main
        self.wandb_run = None
        self.bar = None
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.monotonic()
        if not is_main:
            return
        self.path = output_dir / METRICS_FILE
        drop_rows_after(self.path, start_step)  # a resumed run rewrites what came after its checkpoint
        self.file = self.path.open("a", encoding="utf-8")
        if "wandb" in config.run.report_to:
            self.wandb_run = start_wandb(config, output_dir, run_summary)
        disable = config.run.disable_tqdm
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            dynamic_ncols=True,
            disable=not sys.stderr.isatty() if disable is None else disable,
        )

    def log(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record one row (a training or evaluation step); returns it."""
        if not self.is_main:
            return row
        logged = row
        row = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        shown = {k: row[k] for k in SHOWN if isinstance(row.get(k), int | float)}
        shown |= {
            k: v for k, v in row.items() if k.startswith("gen/") and k.endswith(HEADLINE_METRICS) and v is not None
        }
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(text)
        tqdm.write(f"step {row['step']}/{self.total_steps}: {text} [{self.timing(row['step'])}]", file=sys.stdout)
        sys.stdout.flush()
        return logged

    def timing(self, step: int) -> str:
        """Elapsed wall time of this run (since it started or resumed) and the time left at its pace so far."""
        elapsed = time.monotonic() - self.started
        done = step - self.start_step
        left = elapsed / done * (self.total_steps - step) if done > 0 else None
        return f"{_clock(elapsed)} elapsed, ETA {_clock(left) if left is not None else '?'}"

    def log_html_table(self, name: str, columns: list[str], rows: list[list[str]]) -> None:
        """A wandb table whose last column is HTML (e.g. examples with their trained tokens marked)."""
        if self.wandb_run is None or not rows:
            return
        import wandb

        table = wandb.Table(columns=columns, data=[[*row[:-1], wandb.Html(row[-1])] for row in rows])
        self.wandb_run.log({name: table})

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A wandb table of plain values (e.g. sampled completions with their rewards)."""
        if self.wandb_run is None or not rows:
            return
        import wandb

        self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)})

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        """Flush and close everything."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _clock(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the jsonl rows of steps up to `step` (what a run resumed there has already written)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def start_wandb(config: Config, output_dir: Path, run_summary: dict[str, Any]) -> Any:
    """A wandb run that resumes across restarts of the same output_dir; never blocks training on the network."""
    import wandb

    output_dir.mkdir(parents=True, exist_ok=True)
    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    init = {
        "project": config.run.wandb_project,
        "name": config.run.run_name or output_dir.name,
        "id": run_id,
        "resume": "allow",
        # WANDB_DIR, when set, decides (users point it at local disk when output_dir is on a network filesystem).
        "dir": os.environ.get("WANDB_DIR") or str(output_dir),
        "config": {**config.to_flat_dict(), **run_summary},
        "settings": wandb.Settings(init_timeout=60, silent=True),
    }
    try:
        return wandb.init(**init)
    except Exception as err:  # no network or no login: keep training, keep the run on disk
        print(f"warning: wandb could not start online ({err}); logging offline to {init['dir']}/wandb", flush=True)
        return wandb.init(**init, mode="offline")
