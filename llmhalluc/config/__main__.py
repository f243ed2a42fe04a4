"""`python -m llmhalluc.config`: docs/configuration.md's tables; `--get KEY CONFIG [k=v ...]`: one resolved value."""

from llmhalluc.config.engine import main

if __name__ == "__main__":
    raise SystemExit(main())
