"""`python -m llmhalluc.merge ADAPTER_DIR OUTPUT_DIR`: base + LoRA adapter as one standalone Hugging Face model."""

from llmhalluc.models.export import main

if __name__ == "__main__":
    raise SystemExit(main())
