"""lm-eval with backtracks applied: the `llmhalluc-hf` model type, lm-eval's HF model that returns each generated
continuation as the model meant it (every backtrack token deleting itself and the token before it), so any
generate_until task, lm-eval's own or yours under --include_path, scores the text after the backtracks.

    python -m llmhalluc.lm_eval --model llmhalluc-hf \\
        --model_args pretrained=outputs/demo_backtrack,backtrack_token=<|BACKTRACK|> \\
        --tasks gsm8k --apply_chat_template --batch_size 8

Every lm-eval argument works as with `lm_eval`; `backtrack_token` names the token (as the tokenizer knows it: for a
Llama-3 model whose data wrote <|BACKTRACK|> through token_aliases, <|reserved_special_token_0|>). Without it the
model type is lm-eval's `hf`, except that continuations are decoded as train/eval.py decodes them (no clean-up of
tokenization spaces). Needs `pip install -e .[lm-eval]`.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from llmhalluc.data.backtrack import apply_backtracks
from llmhalluc.errors import UserError, report_and_exit_code


@register_model("llmhalluc-hf")
class BacktrackHFLM(HFLM):
    """lm-eval's HFLM whose generated continuations are decoded with their backtracks applied."""

    def __init__(self, *args: Any, backtrack_token: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        use_global_rank(self)
        self.backtrack_id = None
        if backtrack_token is not None:
            token_id = self.tokenizer.convert_tokens_to_ids(backtrack_token)
            if backtrack_token not in self.tokenizer.get_vocab() or token_id is None:
                raise UserError(
                    f"model_args backtrack_token: {backtrack_token!r} is not a token of the tokenizer of "
                    f"{self.tokenizer.name_or_path} (give the token itself, e.g. <|reserved_special_token_0|> for an "
                    "alias)"
                )
            self.backtrack_id = token_id

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        """Ids as text; a generated continuation (skip_special_tokens) with its backtracks applied first."""
        if isinstance(tokens, int):
            tokens = [tokens]
        if skip_special_tokens and self.backtrack_id is not None:
            tokens = apply_backtracks(list(tokens), self.backtrack_id)
        return self.tokenizer.decode(
            tokens, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )


def use_global_rank(lm: HFLM) -> None:
    """Data-parallel lm-eval on several nodes: HFLM takes its rank from the node-local index while its world size
    counts every process, so each node would score the first shards (the rest never) and more than one process would
    gather as rank 0. The rank is the launch's global one."""
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None and lm.world_size > 1:
        lm._rank = accelerator.process_index


def main() -> None:
    """lm-eval's command line, with llmhalluc-hf registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "python -m llmhalluc.lm_eval"
    try:
        cli_evaluate()
    except UserError as err:
        sys.exit(report_and_exit_code(err))


if __name__ == "__main__":
    main()
