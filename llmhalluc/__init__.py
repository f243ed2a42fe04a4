"""llmhalluc: exact, fast, readable fine-tuning of causal language models with Accelerate and DeepSpeed."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import llmhalluc` alone must not pull in torch and transformers.
    if name == "load_pretrained":
        from llmhalluc.models.export import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'llmhalluc' has no attribute {name!r}")
