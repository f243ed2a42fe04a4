"""The best model and early stopping (Hugging Face's names): the metric_for_best_model of every evaluation row is
compared with the best so far; early_stopping_patience evaluations in a row without improvement stop the run; with
load_best_model_at_end the final model is the best checkpoint's (rotation never deletes it). The best value, its
step and the evaluations since are part of the trainer state, so a resumed run carries on counting."""

from __future__ import annotations

import math
from typing import Any

from llmhalluc.config import Config
from llmhalluc.train.checkpoint import TrainerState, load_checkpoint


def greater_is_better(config: Config) -> bool:
    """greater_is_better as set, else HF's rule: a metric whose name ends in loss is minimised."""
    run = config.run
    if run.greater_is_better is not None:
        return run.greater_is_better
    return not (run.metric_for_best_model or "eval_loss").endswith("loss")


class BestModel:
    """Tracks metric_for_best_model over the evaluation rows; says when to stop early."""

    def __init__(self, config: Config, state: TrainerState, is_main: bool = True):
        run = config.run
        self.metric = run.metric_for_best_model
        self.greater = greater_is_better(config)
        self.patience = run.early_stopping_patience
        self.state, self.is_main = state, is_main
        self.stop = False

    def observe(self, row: dict[str, Any]) -> None:
        """Compare an evaluation row's metric with the best so far (rows without it are not evaluations of it)."""
        value = row.get(self.metric) if self.metric else None
        if not isinstance(value, int | float) or not math.isfinite(value):
            return
        state, best = self.state, self.state.best_metric
        if best is None or (value > best if self.greater else value < best):
            state.best_metric, state.best_step, state.evaluations_since_best = float(value), row["step"], 0
        else:
            state.evaluations_since_best += 1
        self.stop = self.patience is not None and state.evaluations_since_best >= self.patience
        if self.stop and self.is_main:
            print(
                f"early stopping at step {row['step']}: {self.patience} evaluations without a better {self.metric} "
                f"(best {state.best_metric:.6g} at step {state.best_step})",
                flush=True,
            )


def load_best_model(run: Any, state: TrainerState) -> int:
    """Put the best checkpoint's weights in the model (when it is not the current one); returns the step the final
    model comes from."""
    if not run.config.run.load_best_model_at_end or state.best_step in (None, state.step):
        return state.step
    load_checkpoint(run, run.output_dir / f"checkpoint-{state.best_step}")  # (its optimizer state, unused now)
    run.accelerator.print(
        f"final model: the best checkpoint, step {state.best_step} ({run.config.run.metric_for_best_model} "
        f"{state.best_metric:.6g})"
    )
    return state.best_step
