"""`train/eval.py CONFIG`: generation evaluation of a trained model (full or LoRA adapter) or any model, on the
config's eval datasets, in one process or data-parallel under accelerate launch (ZeRO-3 keeps the model sharded)."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType
from transformers import PreTrainedTokenizerBase

from llmhalluc.config import Config, DataConfig
from llmhalluc.data.facts import TokenFacts, token_facts
from llmhalluc.errors import ConfigError
from llmhalluc.eval.generation import check_engine
from llmhalluc.eval.runner import RESULTS_FILE, evaluate_generations, load_eval_sets, metric_rows, results_table
from llmhalluc.models.export import is_adapter, load_pretrained
from llmhalluc.models.loading import load_model, load_tokenizer, resolve_attention
from llmhalluc.runtime.dist import build_accelerator, quiet_other_ranks

SAMPLE_ROWS = 20  # predictions per dataset shown in the wandb table


def evaluated_model(config: Config) -> Path | str:
    """What to evaluate: the trained model (or adapter) in output_dir when there is one, else model_name_or_path."""
    output_dir = Path(config.run.output_dir) if config.run.output_dir else None
    if output_dir is not None and (
        is_adapter(output_dir) or ((output_dir / "config.json").is_file() and any(output_dir.glob("*.safetensors")))
    ):
        return output_dir
    return config.model.model_name_or_path


def results_dir(config: Config, started: datetime.datetime) -> Path:
    """Where an evaluation writes: output_dir/eval/<eval_tag> (outputs/eval/<model folder name>/<eval_tag> for a
    config without an output_dir); without eval_tag, the UTC start time, suffixed when that folder exists."""
    if config.run.output_dir:
        root = Path(config.run.output_dir) / "eval"
    else:
        root = Path("outputs") / "eval" / Path(config.model.model_name_or_path.rstrip("/")).name
    tag = config.generation.eval_tag
    if tag is not None:
        if (root / tag / RESULTS_FILE).exists():
            raise ConfigError(
                f"eval_tag: {root / tag} already holds an evaluation; choose another eval_tag or leave it unset"
            )
        return root / tag
    stamp = started.strftime("%Y%m%d-%H%M%S")
    candidates = (root / (stamp if n == 0 else f"{stamp}-{n}") for n in itertools.count())
    return next(c for c in candidates if not c.exists())


def evaluate_model(config: Config, keep_process_group: bool = False) -> dict[str, dict[str, Any]]:
    """Generate for every eval dataset, score, write output_dir/eval/<tag>/<dataset>/predictions.jsonl and
    output_dir/eval/<tag>/results.json, print the table, report to wandb; returns the results."""
    check_engine(config.generation.engine)
    started = datetime.datetime.now(datetime.timezone.utc)
    out_dir = results_dir(config, started)
    eval_sets = load_eval_sets(config)  # bad data fails here, before any model loads
    accelerator = build_accelerator(config)
    quiet_other_ranks(accelerator)
    source = evaluated_model(config)
    model_config = dataclasses.replace(config.model, model_name_or_path=str(source))
    accelerator.print(f"evaluating {source} on {', '.join(config.data.eval_dataset)}")
    tokenizer = load_tokenizer(model_config)
    facts = eval_token_facts(tokenizer, config.data, accelerator)
    model = None
    if config.generation.engine == "hf":
        if is_adapter(source):
            model, _ = load_pretrained(source)
        else:
            model = load_model(model_config, resolve_attention(model_config))
        model.config.use_cache = True
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            model = accelerator.prepare(model)  # ZeRO-3 keeps the weights sharded; its gathers run in generate
        else:
            model = model.to(accelerator.device)  # generation needs no gradient sync: no DDP wrapper
    about = {
        "model": str(source),
        "eval_tag": out_dir.name,
        "started": started.isoformat(timespec="seconds"),
        "generation": dataclasses.asdict(config.generation),
        "config": config.to_flat_dict(),
    }
    results = evaluate_generations(
        model, tokenizer, facts, config, accelerator, eval_sets, out_dir, str(source), about=about
    )
    if accelerator.is_main_process:
        print(results_table(results), flush=True)
        print(f"predictions and results in {out_dir}", flush=True)
        if "wandb" in config.run.report_to:
            report_to_wandb(config, results, out_dir)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # the engine goes before the process group
        accelerator.free_memory()
    if not keep_process_group:  # accelerate's end_training destroys the process group
        accelerator.end_training()
    return results


def eval_token_facts(tokenizer: PreTrainedTokenizerBase, data: DataConfig, accelerator: Any) -> TokenFacts:
    """The evaluated tokenizer's token facts; a configured backtrack token the model does not have (a base model
    evaluated with its fine-tuning config) is said, and generations are then scored as written."""
    backtrack_token = data.backtrack_target()
    if backtrack_token is not None and backtrack_token not in tokenizer.get_vocab():
        accelerator.print(
            f"note: the evaluated tokenizer has no {backtrack_token}; generations are scored as written, without "
            "applying backtracks"
        )
        backtrack_token = None
    return token_facts(tokenizer, backtrack_token, aliases=data.token_aliases)


def report_to_wandb(config: Config, results: dict[str, dict[str, Any]], out_dir: Path) -> None:
    """The metrics and a table of sample predictions, in the training run's wandb run when there is one."""
    import json

    import wandb

    from llmhalluc.runtime.tracking import start_wandb

    run = start_wandb(config, out_dir.parent.parent, {"evaluation": True, "eval_tag": out_dir.name})
    run.log(metric_rows(results))
    for name in results:
        lines = (out_dir / name / "predictions.jsonl").read_text().splitlines()[:SAMPLE_ROWS]
        rows = [json.loads(line) for line in lines]
        columns = ["index", "prompt", "prediction", "references", "correct", "abstained"]
        table = wandb.Table(
            columns=columns, data=[[r[c] if c != "references" else " | ".join(r[c]) for c in columns] for r in rows]
        )
        run.log({f"eval/{name}/predictions": table})
    run.finish()
