"""From dataset_info.json names to model-ready batches: the public data API."""

from llmhalluc.data.backtrack import apply_backtracks, backtrack_positions
from llmhalluc.data.chat import tokenize_chat
from llmhalluc.data.labels import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "apply_backtracks", "backtrack_positions", "tokenize_chat"]
