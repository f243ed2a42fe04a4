"""llmhalluc: exact, fast, readable supervised fine-tuning of causal language models."""

__version__ = "0.1.0"
